//! Latency: histograms in `LATENCY_0`/`LATENCY_1` (hop samples come from `nat::sight`), and
//! TCP round trips at one interface, with `RTT_HINT` in front of `RTT_PENDING`.

use aya_ebpf::bindings::BPF_NOEXIST;
use flowtrace_common::{
    parse::PacketInfo, Counter, FlowKey, LatencyHist, PacketId, RttPending, LAT_HANDSHAKE,
    LAT_RESPONSE,
};

use crate::{
    counters::count,
    maps::{LATENCY_0, LATENCY_1, LAT_SCRATCH, RTT_HINT, RTT_PENDING, RTT_SCRATCH},
    CTL_BUFFER, CTL_SAMPLED, TCP_ACK, TCP_PSH, TCP_SYN,
};

/// A zeroed histogram to create latency entries from (a global, not a 160-byte stack value).
static EMPTY_HIST: LatencyHist = LatencyHist::EMPTY;

/// Adds one sample to the histogram of the key in `LAT_SCRATCH`, in the active buffer.
#[inline(never)]
pub(crate) fn add_latency(ns: u64, active: u32) {
    let Some(k) = LAT_SCRATCH.get_ptr(0) else {
        return;
    };
    let map = if active == 0 { &LATENCY_0 } else { &LATENCY_1 };
    // SAFETY: the scratch key is this CPU's and stays valid for the program run.
    let key = unsafe { &*k };
    let h = match map.get_ptr_mut(key) {
        Some(h) => h,
        None => {
            let _ = map.insert(key, &EMPTY_HIST, BPF_NOEXIST as u64);
            match map.get_ptr_mut(key) {
                Some(h) => h,
                None => {
                    count(Counter::LatencyMapFull);
                    return;
                }
            }
        }
    };
    // SAFETY: per-CPU value, only this CPU writes it while this program runs.
    unsafe { (*h).add(ns) };
}

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

/// TCP round trips at this interface: a SYN waits for its SYN-ACK, a sampled data segment
/// for the first data segment (or SYN-ACK) acknowledging it. The time between them is the
/// round trip beyond this interface: network plus, for data, the peer's time to answer.
/// Only one segment per direction and interface waits at a time.
#[inline(never)]
pub(crate) fn rtt(info: &PacketInfo, id: &PacketId, key: &FlowKey, now: u64, ctl: u32) {
    let flags = info.tcp_flags;
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    let payload = info
        .l3_len
        .saturating_sub(info.l3_header_len + info.l4_header_len);
    let sampled = ctl & CTL_SAMPLED != 0;
    // Most segments neither ask nor may answer (pure ACKs; data nothing waits for, which is
    // most of a bulk transfer): they leave here, before any map is touched.
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
                if let Some(k) = LAT_SCRATCH.get_ptr_mut(0) {
                    // SAFETY: this CPU's scratch slot.
                    unsafe {
                        (*k).tuple = rk.tuple;
                        (*k).from_ifindex = 0;
                        (*k).from_direction = 0;
                        (*k).to_ifindex = key.ifindex;
                        (*k).to_direction = key.direction;
                        (*k).kind = kind;
                        (*k)._pad = 0;
                    }
                    add_latency(now.wrapping_sub(sent), ctl & CTL_BUFFER);
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
        // Marked even when a segment already waits (the insert fails): its mark may have
        // been cleared by an answer to another segment sharing the slot.
        let _ = RTT_PENDING.insert(&*rk, &pending, BPF_NOEXIST as u64);
        set_rtt_hint(key.rtt_hint_slot(false), true);
    }
}
