//! Flow counting: the per-CPU flow cache (`CACHE`) in front of the flow buffers
//! (`FLOWS_0`/`FLOWS_1`), and the choice of which packets go on to the sightings
//! (`nat::sight`) and the round trips (`latency::rtt`).

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::PerCpuHashMap, programs::TcContext,
};
use flowtrace_common::{
    parse::{packet_id, PacketInfo, SkbMeta, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    CacheSlot, Counter, FlowKey, FlowStats, CACHE_SLOTS, CONTROL_ACTIVE_BUFFER,
    CONTROL_LATENCY_SAMPLE,
};

use crate::{
    counters::{count, count_n},
    latency::rtt,
    maps::{CACHE, CONTROL, FLOWS_0, FLOWS_1},
    nat::sight,
    packet::DirectPacket,
    CTL_SAMPLED, TCP_SYN,
};

/// Counts one parsed packet in its flow at this hook (the cache slot, or the active flow
/// buffer), then sends the packets that need it to the sightings and the round trips.
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
    let (packets, bytes) = info.wire_counts(meta);
    let active = match CONTROL.get(CONTROL_ACTIVE_BUFFER) {
        Some(v) => *v & 1,
        None => {
            count(Counter::ControlMissing);
            0
        }
    };
    let flows = if active == 0 { &FLOWS_0 } else { &FLOWS_1 };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let packet = FlowStats {
        packets,
        bytes,
        first_seen_ns: now,
        last_seen_ns: now,
        tcp_flags: info.tcp_flags,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let miss = match CACHE.get_ptr_mut(active * CACHE_SLOTS + CacheSlot::index(&key)) {
        None => {
            add_to_map(flows, &key, &packet);
            true
        }
        // SAFETY: per-CPU slot, only this CPU touches it while this program runs (user space
        // reads a half only after it stopped being active).
        Some(slot) => unsafe {
            if (*slot).valid != 0 && (*slot).key.same_as(&key) {
                merge_into(&mut (*slot).stats, &packet);
                false
            } else {
                if (*slot).valid != 0 {
                    // Another flow owns the slot: move its counters to the map, then take it.
                    add_to_map(flows, &(*slot).key, &(*slot).stats);
                }
                (*slot).key = key;
                (*slot).stats = packet;
                (*slot).valid = 1;
                true
            }
        },
    };
    if !matches!(key.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        // Only what Services carry. ICMP has too little per-packet identity: neighbour
        // solicitations and advertisements for one target, for instance, look alike.
        return;
    }
    let rate = CONTROL.get(CONTROL_LATENCY_SAMPLE).copied().unwrap_or(0);
    // A cache miss is the first packet of this flow at this hook in this drain period (or
    // one evicted by a colliding flow): only then, for a SYN (a SYN retransmitted after a
    // loss past this hook is the connection's only other chance to show its rewrite), and
    // for packets sampled for latency is the packet compared across hooks.
    let syn = info.tcp_flags & TCP_SYN != 0;
    if !(miss || syn || rate != 0) {
        return;
    }
    let id = packet_id(&DirectPacket::new(ctx), info);
    let sampled = id.sampled(rate);
    let ctl = active | if sampled { CTL_SAMPLED } else { 0 };
    if miss || syn || sampled {
        // The packet's counts go along for the tracers (see `sight`), through memory: what
        // the verifier knows of values kept in registers differs between the paths that
        // reach here (TCP or not, SYN or not), and those differences multiply its work on
        // everything `sight` and `rtt` do.
        sight(&id, &key, now, ctl, &packet);
    }
    if rate != 0 && key.protocol == IPPROTO_TCP {
        rtt(info, &id, &key, now, ctl);
    }
}

/// Adds `add` into `key`'s per-CPU entry of `flows`, creating it if needed.
#[inline(always)]
fn add_to_map(flows: &PerCpuHashMap<FlowKey, FlowStats>, key: &FlowKey, add: &FlowStats) {
    if let Some(stats) = flows.get_ptr_mut(key) {
        merge_into(stats, add);
        return;
    }
    if flows.insert(key, add, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Either another CPU created the entry between our lookup and insert (this CPU's slot of
    // it is then zeroed, so add into it) or the map is full.
    match flows.get_ptr_mut(key) {
        Some(stats) => merge_into(stats, add),
        None => count_n(Counter::FlowMapFull, add.packets),
    }
}

/// Adds one packet's (or an evicted cache slot's) counters into per-CPU counters.
#[inline(always)]
fn merge_into(stats: *mut FlowStats, add: &FlowStats) {
    // SAFETY: a per-CPU map value or cache slot; only this CPU writes it while this program runs.
    unsafe {
        // An entry created by another CPU starts zeroed in this CPU's slot.
        if (*stats).packets == 0 {
            (*stats).first_seen_ns = add.first_seen_ns;
        }
        (*stats).packets += add.packets;
        (*stats).bytes += add.bytes;
        (*stats).last_seen_ns = add.last_seen_ns;
        (*stats).tcp_flags |= add.tcp_flags;
    }
}
