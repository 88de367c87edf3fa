//! Latency: samples handed to user space as `LatencyEvent`s (hop samples come from
//! `nat::sight`), and TCP round trips at one interface, with `RTT_HINT` in front of
//! `RTT_PENDING`.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use flowtrace_common::{
    Counter, FlowKey, LatencyEvent, RttPending, SlowInput, EVENT_LATENCY, LAT_HANDSHAKE,
    LAT_RESPONSE, SLOW_SAMPLED,
};

use crate::{
    counters::count,
    maps::{events_flags, EVENTS, LAT_SCRATCH, RTT_HINT, RTT_PENDING, RTT_SCRATCH},
    TCP_ACK, TCP_PSH, TCP_SYN,
};

/// Hands one sample of `ns` for the key in `LAT_SCRATCH` to user space. Out of line: one
/// copy of the ring's call for the hop samples and the round trips.
#[inline(never)]
pub(crate) fn add_latency(ns: u64) {
    let Some(e) = LAT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, valid for the program run; the caller wrote the key.
    unsafe {
        (*e).kind = EVENT_LATENCY;
        (*e).ns = ns;
        if EVENTS.output::<LatencyEvent>(&*e, events_flags()).is_err() {
            count(Counter::LatencyMapFull);
        }
    }
}

/// How long a data segment waits for its answer before a newer one of its direction may take
/// its place: response times longer than a second are not measured.
const RTT_PENDING_MAX_AGE_NS: u64 = 1_000_000_000;

/// Whether a segment may wait in `slot` of `RTT_HINT`.
#[inline(always)]
fn rtt_hinted(slot: u32) -> bool {
    RTT_HINT.get(slot).is_some_and(|v| *v != 0)
}

/// Marks (`on`) or clears `slot` of `RTT_HINT`.
#[inline(always)]
fn set_rtt_hint(slot: u32, on: bool) {
    if let Some(v) = RTT_HINT.get_ptr_mut(slot) {
        // SAFETY: a map value pointer; a racing store from another CPU writes 0 or 1 too.
        unsafe { *v = on as u32 };
    }
}

/// Whether a TCP segment may start or answer a round trip at this interface (see `rtt`):
/// most segments neither ask nor may answer (pure ACKs; data nothing waits for, which is
/// most of a bulk transfer), and they stop here, in the hook, before the slow path.
#[inline(always)]
pub(crate) fn rtt_wanted(flags: u8, payload: u32, sampled: bool, key: &FlowKey) -> bool {
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    let opens = if syn { !ack } else { payload > 0 && sampled };
    opens
        || (ack
            && (syn || (payload > 0 && (sampled || flags & TCP_PSH != 0)))
            && rtt_hinted(key.rtt_hint_slot(true)))
}

/// TCP round trips at this interface: a SYN waits for its SYN-ACK, a sampled data segment
/// for the first data segment (or SYN-ACK) acknowledging it. The time between them is the
/// round trip beyond this interface: network plus, for data, the peer's time to answer.
/// Only one segment per direction and interface waits at a time.
#[inline(never)]
pub(crate) fn rtt(input: &SlowInput, now: u64) {
    let (flags, payload, id, key, ctl) = (
        input.tcp_flags,
        input.payload,
        &input.id,
        &input.key,
        input.ctl,
    );
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    let sampled = ctl & SLOW_SAMPLED != 0;
    let answers = ack
        && (syn || (payload > 0 && (sampled || flags & TCP_PSH != 0)))
        && rtt_hinted(key.rtt_hint_slot(true));
    let opens = if syn { !ack } else { payload > 0 && sampled };
    if !(answers || opens) {
        return;
    }
    let Some(rk) = RTT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, valid for the program run.
    let rk = unsafe { &mut *rk };
    rk.ifindex = key.ifindex;
    rk._pad = 0;
    // An answer: does a segment of the other direction wait at this interface?
    if answers {
        rk.tuple.set_reversed_from_key(key);
        if let Some(p) = RTT_PENDING.get_ptr(&*rk) {
            // SAFETY: a map value pointer, valid until the program ends.
            let (expected, sent, kind) = unsafe { ((*p).expected_ack, (*p).sent_ns, (*p).kind) };
            let acked = u32::from_be(id.l4_b);
            if (acked.wrapping_sub(expected) as i32) >= 0 {
                let _ = RTT_PENDING.remove(&*rk);
                set_rtt_hint(key.rtt_hint_slot(true), false);
                if let Some(e) = LAT_SCRATCH.get_ptr_mut(0) {
                    // SAFETY: this CPU's scratch slot.
                    unsafe {
                        let k = &mut (*e).key;
                        k.tuple = rk.tuple;
                        k.from_ifindex = 0;
                        k.from_direction = 0;
                        k.to_ifindex = key.ifindex;
                        k.to_direction = key.direction;
                        k.kind = kind;
                        k._pad = 0;
                    }
                    add_latency(now.wrapping_sub(sent));
                }
            }
        }
    }
    // A question: a SYN, or a sampled data segment, starts waiting (unless one already does).
    if opens {
        rk.tuple.set_from_key(key);
        let pending = RttPending {
            expected_ack: u32::from_be(id.l4_a)
                .wrapping_add(payload)
                .wrapping_add(syn as u32),
            kind: if syn { LAT_HANDSHAKE } else { LAT_RESPONSE },
            _pad0: 0,
            _pad1: 0,
            sent_ns: now,
        };
        // Looked up first: an insert that finds the key (BPF_NOEXIST) still takes a node
        // off the LRU's free list and puts it back, under its lock, which costs several
        // times a lookup; in a bulk transfer, where nothing answers data with data, every
        // sampled segment would pay it. A data segment that has waited longer than
        // `RTT_PENDING_MAX_AGE_NS` is replaced: the lookups keep it recent in the LRU, and
        // an answer that came at last would be timed from it, too long. A SYN is not: its
        // retransmission (after the 1 s initial timeout) is part of the handshake's time.
        // SAFETY: a map value pointer, valid until the program ends.
        let waiting = RTT_PENDING.get_ptr(&*rk).map(|p| unsafe { (*p).sent_ns });
        match waiting {
            None => {
                let _ = RTT_PENDING.insert(&*rk, &pending, BPF_NOEXIST as u64);
            }
            Some(sent) if !syn && now.wrapping_sub(sent) > RTT_PENDING_MAX_AGE_NS => {
                let _ = RTT_PENDING.insert(&*rk, &pending, BPF_ANY as u64);
            }
            Some(_) => {}
        }
        // Marked even when a segment already waits: its mark may have been cleared by an
        // answer to another segment sharing the slot. Written only when clear, so the
        // shared line is not dirtied under the CPUs that read it.
        let slot = key.rtt_hint_slot(false);
        if !rtt_hinted(slot) {
            set_rtt_hint(slot, true);
        }
    }
}
