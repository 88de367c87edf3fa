//! Latency: samples handed to user space as `LatencyEvent`s (hop samples come from
//! `nat::sight`), and TCP round trips at one interface, with `RTT_HINT` in front of
//! `RTT_PENDING`.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use flowtrace_common::{
    rtt_hint_value, rtt_hint_young, Counter, FlowKey, LatencyEvent, RttPending, SlowInput,
    EVENT_LATENCY, LAT_HANDSHAKE, LAT_RESPONSE, RTT_PENDING_MAX_AGE_NS,
};

use crate::{
    counters::count,
    maps::{events_flags, EVENTS, LAT_SCRATCH, RTT_HINT, RTT_PENDING, RTT_SCRATCH},
    TCP_ACK, TCP_SYN,
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

/// `rtt_wanted`'s bits: the segment starts waiting; it may answer one waiting.
pub(crate) const RTT_OPEN: u32 = 1;
pub(crate) const RTT_ANSWER: u32 = 2;

/// Whether a segment may wait in `slot` of `RTT_HINT` (see `rtt_hint_value`).
#[inline(always)]
fn rtt_hint(slot: u32) -> u32 {
    RTT_HINT.get(slot).copied().unwrap_or(0)
}

/// Writes `value` (0: nothing waits) into `slot` of `RTT_HINT`, only where it differs, so
/// the shared line is not dirtied under the CPUs that read it.
#[inline(always)]
fn set_rtt_hint(slot: u32, value: u32) {
    if let Some(v) = RTT_HINT.get_ptr_mut(slot) {
        // SAFETY: a map value pointer; a racing store from another CPU writes a hint too.
        unsafe {
            if *v != value {
                *v = value;
            }
        }
    }
}

/// Whether a TCP segment that reached the slow path starts waiting (`RTT_OPEN`) or may answer
/// one waiting (`RTT_ANSWER`) at this interface (see `rtt`). The hook sends on only the
/// segments that might (`flows::record`): sampled ones, SYNs, a flow's first at the hook and
/// data segments whose acknowledgement moved (`fresh`); the rest of a bulk transfer (its pure
/// ACKs, its data acknowledging nothing new) stops there. A SYN opens; a sampled data segment
/// opens unless a segment of its direction waits, younger than `RTT_PENDING_MAX_AGE_NS` (the
/// hint says so), which it could not replace; a SYN-ACK or a fresh data segment answers if the
/// hint says something of the other direction waits.
#[inline(always)]
pub(crate) fn rtt_wanted(
    flags: u8,
    payload: u32,
    sampled: bool,
    fresh: bool,
    key: &FlowKey,
    now: u64,
) -> u32 {
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    let mut ctl = 0;
    if ack && (syn || (payload > 0 && fresh)) && rtt_hint(key.rtt_hint_slot(true)) != 0 {
        ctl |= RTT_ANSWER;
    }
    let opens = if syn {
        !ack
    } else {
        payload > 0 && sampled && !rtt_hint_young(rtt_hint(key.rtt_hint_slot(false)), now)
    };
    if opens {
        ctl |= RTT_OPEN;
    }
    ctl
}

/// TCP round trips at this interface: a SYN waits for its SYN-ACK, a sampled data segment
/// for the first data segment (or SYN-ACK) acknowledging it. The time between them is the
/// round trip beyond this interface: network plus, for data, the peer's time to answer.
/// Only one segment per direction and interface waits at a time.
#[inline(never)]
pub(crate) fn rtt(input: &SlowInput, wanted: u32, now: u64) {
    let (flags, payload, id, key) = (input.tcp_flags, input.payload, &input.id, &input.key);
    let syn = flags & TCP_SYN != 0;
    let answers = wanted & RTT_ANSWER != 0;
    let opens = wanted & RTT_OPEN != 0;
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
                set_rtt_hint(key.rtt_hint_slot(true), 0);
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
        // times a lookup. A data segment that has waited longer than
        // `RTT_PENDING_MAX_AGE_NS` is replaced: an answer that came at last would be timed
        // from it, too long. A SYN is not: its retransmission (after the 1 s initial timeout)
        // is part of the handshake's time. The hook sends a data segment here only when the
        // hint had no young one waiting, so in a bulk transfer this runs about once a second.
        // SAFETY: a map value pointer, valid until the program ends.
        let waiting = RTT_PENDING.get_ptr(&*rk).map(|p| unsafe { (*p).sent_ns });
        let since = match waiting {
            None => {
                let _ = RTT_PENDING.insert(&*rk, &pending, BPF_NOEXIST as u64);
                now
            }
            Some(sent) if !syn && now.wrapping_sub(sent) > RTT_PENDING_MAX_AGE_NS => {
                let _ = RTT_PENDING.insert(&*rk, &pending, BPF_ANY as u64);
                now
            }
            Some(sent) => sent,
        };
        // Written even when a segment already waits: its hint may have been cleared by an
        // answer to another segment sharing the slot.
        set_rtt_hint(key.rtt_hint_slot(false), rtt_hint_value(since));
    }
}
