//! Flow counting: the per-CPU flow cache (`CACHE`), whose slots go to user space through the
//! event ring (`EVENTS`) when another flow takes them, and the choice of which packets go on
//! to the slow path (`slow`: the sightings and the round trips).

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::TcContext,
};
use flowtrace_common::{
    latency_rate, latency_window_shift,
    parse::{PacketInfo, SkbMeta, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    sample_window, CacheSlot, Counter, FlowKey, FlowStats, CONTROL_ACTIVE_BUFFER,
    CONTROL_LATENCY_SAMPLE, EVENT_FLOW, SLOW_FRESH, SLOW_RTT, SLOW_SAMPLED, SLOW_SIGHT,
};

use crate::{
    counters::{count, count_n},
    maps::{cache_shift, events_flags, CACHE, CONTROL, EVENTS, SLOW_PATH, SLOW_SCRATCH},
    TCP_SYN,
};

/// Counts one parsed packet in its flow's cache slot at this hook, then hands the packets
/// that need it to the slow path (a tail call).
///
/// The common case (the flow owns its slot) is an array access, a comparison of the key and
/// five adds: no hash map, no helper call but the coarse clock. Last seen comes from
/// `bpf_ktime_get_coarse_ns` (the same clock as `bpf_ktime_get_ns`, at tick resolution),
/// which is all it needs, where reading the fine clock costs more than the rest of a cache
/// hit; a flow's first packet at a hook (a miss) reads the fine clock, which orders hops.
/// Sightings and round trips read the fine clock themselves.
#[inline(always)]
pub(crate) fn record(ctx: &TcContext, info: &PacketInfo, meta: SkbMeta, direction: u8) {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = FlowKey {
        src_addr: info.src_addr,
        dst_addr: info.dst_addr,
        src_port: info.src_port,
        dst_port: info.dst_port,
        ifindex,
        direction,
        ip_version: info.ip_version,
        protocol: info.protocol,
        _pad: 0,
    };
    let (packets, bytes, payload) = info.wire_counts_with_payload(meta);
    let active = match CONTROL.get(CONTROL_ACTIVE_BUFFER) {
        Some(v) => *v & 1,
        None => {
            count(Counter::ControlMissing);
            0
        }
    };
    // Sampling for latency (see `CONTROL_LATENCY_SAMPLE`): one packet in `rate` by its id's
    // hash, and of those at most one per flow in each per-flow window at this hook, which the
    // flow's slot keeps (`FlowStats::last_sample`). Every hook sees a flow's packets in the
    // same order within microseconds, so they take the same ones: the first sampled one in
    // each window (a window edge between two hooks of one packet loses that one sample).
    let word = CONTROL.get(CONTROL_LATENCY_SAMPLE).copied().unwrap_or(0);
    let rate = latency_rate(word);
    let id = info.id;
    let mut sampled = id.sampled(rate);
    let shift = cache_shift();
    let index = (active << (32 - (shift & 31))) + CacheSlot::index(&key, shift);
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let window_shift = latency_window_shift(word);
    let window = if sampled && window_shift != 0 {
        sample_window(now, window_shift)
    } else {
        0
    };
    let ack = info.id.l4_b;
    let Some(slot) = CACHE.get_ptr_mut(index) else {
        // Out of the array: cannot happen with the shift user space sets; counted anyway.
        count_n(Counter::FlowMapFull, packets);
        return;
    };
    // Whether the peer may have sent something since this flow's last segment with payload
    // here: its acknowledgement moved (or this CPU has not counted the flow here before). Only
    // then may an unsampled TCP data segment answer a round trip, and only then does it go on
    // to the slow path, which looks at the hint. Per CPU, so a segment on another CPU than
    // the last one may go for nothing; none that moved is missed, as the first data segment
    // with a new acknowledgement on each CPU goes.
    let mut moved = true;
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs (user space
    // reads a half only after it stopped being active).
    let miss = unsafe {
        if (*slot).kind != 0 && (*slot).key.same_as(&key) {
            let s = &mut (*slot).stats;
            s.packets += packets;
            s.bytes += bytes;
            s.payload_bytes += payload;
            // The coarse clock lags the fine one by up to a tick: never behind first_seen.
            if now > s.last_seen_ns {
                s.last_seen_ns = now;
            }
            s.tcp_flags |= info.tcp_flags;
            if payload != 0 {
                moved = s.last_ack != ack;
                s.last_ack = ack;
            }
            if window != 0 {
                if s.last_sample == window {
                    sampled = false;
                } else {
                    s.last_sample = window;
                }
            }
            false
        } else {
            if (*slot).kind != 0 {
                // Another flow owns the slot: its counters go to user space first.
                hand_over(slot);
            }
            // The fine clock for a flow's first packet at this hook: the hops of one packet are
            // microseconds apart, and their first-seen times put a path's hops in order.
            let first = bpf_ktime_get_ns();
            (*slot).kind = EVENT_FLOW;
            (*slot).key = key;
            (*slot).stats = FlowStats {
                packets,
                bytes,
                payload_bytes: payload,
                first_seen_ns: first,
                last_seen_ns: first,
                tcp_flags: info.tcp_flags,
                _pad0: 0,
                last_sample: window,
                // A pure ACK's acknowledgement is not a data segment's: the first data
                // segment after it must still count as acknowledging something new.
                last_ack: if payload != 0 { ack } else { 0 },
            };
            true
        }
    };
    if !matches!(key.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        // Only what Services carry. ICMP has too little per-packet identity: neighbour
        // solicitations and advertisements for one target, for instance, look alike.
        return;
    }
    // A cache miss is the first packet of this flow at this hook in this drain period (or
    // one evicted by a colliding flow): only then, for a SYN (a SYN retransmitted after a
    // loss past this hook is the connection's only other chance to show its rewrite), and
    // for packets sampled for latency is the packet compared across hooks. A TCP segment
    // with payload that acknowledges something new may answer a round trip, which the slow
    // path decides. Everything else (nearly every packet) stops here.
    let syn = info.tcp_flags & TCP_SYN != 0;
    let may_answer = rate != 0 && moved && payload != 0 && key.protocol == IPPROTO_TCP;
    if !(miss || syn || sampled || may_answer) {
        return;
    }
    let mut ctl = if miss || syn || sampled {
        SLOW_SIGHT
    } else {
        0
    };
    if sampled {
        ctl |= SLOW_SAMPLED;
    }
    if moved {
        ctl |= SLOW_FRESH;
    }
    if rate != 0 && key.protocol == IPPROTO_TCP {
        ctl |= SLOW_RTT;
    }
    let payload = info
        .l3_len
        .saturating_sub(info.l3_header_len + info.l4_header_len);
    let Some(slow) = SLOW_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; every field is written before the tail call, and the
    // slow path runs on this CPU right after, within this program run.
    unsafe {
        (*slow).key = key;
        (*slow).ctl = ctl;
        (*slow).id = id;
        (*slow).bytes = bytes;
        (*slow).tcp_flags = info.tcp_flags;
        (*slow)._pad0 = 0;
        (*slow)._pad1 = 0;
        (*slow).payload = payload;
        // Does not return when the slow path is there (it returns TC_ACT_UNSPEC itself).
        SLOW_PATH.tail_call(ctx, 0);
    }
    count(Counter::ControlMissing);
}

/// Hands a cache slot's counters to user space (the slot is the record). Out of line: it
/// runs only when a flow takes another's slot.
#[inline(never)]
fn hand_over(slot: *const CacheSlot) {
    // SAFETY: a valid per-CPU cache slot (see `record`).
    unsafe {
        if EVENTS.output::<CacheSlot>(&*slot, events_flags()).is_err() {
            count_n(Counter::FlowMapFull, (*slot).stats.packets);
        }
    }
}
