//! flowtrace's kernel programs: TC classifiers that count packets and bytes per 5-tuple
//! per hop (interface + direction).
//!
//! They only observe. Every path returns `TC_ACT_UNSPEC` (`TCX_NEXT` under TCX), which lets
//! the next program on the hook run and never drops, delays or rewrites a packet.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use flowtrace_common::{
    parse::{packet_id, parse_frame, PacketInfo, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    CacheSlot, Counter, FlowKey, FlowStats, NatRecord, Sighting, Tuple, CACHE_SLOTS,
    CONTROL_ACTIVE_BUFFER, CONTROL_SLOTS, COUNTER_SLOTS, DEFAULT_FLOW_ENTRIES, DEFAULT_NAT_ENTRIES,
    DIR_EGRESS, DIR_INGRESS, FLOW_BUFFERS, SIGHTING_MAX_AGE_NS, SIGHTING_SLOTS,
};

use crate::packet::{skb_meta, DirectPacket};

/// Flow buffer 0. The kernel writes to the buffer named by `CONTROL[CONTROL_ACTIVE_BUFFER]`;
/// user space flips it and drains the other one, which then has no writer.
#[map]
static FLOWS_0: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Flow buffer 1 (see `FLOWS_0`).
#[map]
static FLOWS_1: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Small control block written by user space (`CONTROL_ACTIVE_BUFFER`, ...).
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_SLOTS, 0);

/// Per-CPU direct-mapped flow cache in front of the flow buffers: two halves of
/// `CACHE_SLOTS`, the active one chosen like the flow buffer (see `CacheSlot`).
#[map]
static CACHE: PerCpuArray<CacheSlot> = PerCpuArray::with_max_entries(FLOW_BUFFERS * CACHE_SLOTS, 0);

/// NAT buffer 0: rewrites seen between two hooks, keyed by the tuple before the rewrite.
/// Double-buffered with the flow buffers (same `CONTROL_ACTIVE_BUFFER`).
#[map]
static NAT_0: PerCpuHashMap<Tuple, NatRecord> =
    PerCpuHashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// NAT buffer 1 (see `NAT_0`).
#[map]
static NAT_1: PerCpuHashMap<Tuple, NatRecord> =
    PerCpuHashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// Per-CPU table of recent packet sightings, direct-mapped by packet id (see `Sighting`).
#[map]
static SIGHTINGS: PerCpuArray<Sighting> = PerCpuArray::with_max_entries(SIGHTING_SLOTS, 0);

/// The SYN bit of the TCP flags byte.
const TCP_SYN: u8 = 0x02;

/// Per-CPU counters indexed by `Counter`: packets seen and every way an update was lost.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[classifier]
pub fn flowtrace_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn flowtrace_egress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    count_n(counter, 1);
}

#[inline(always)]
fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) {
    let meta = skb_meta(ctx);
    // Every counter is in wire packets, like the flows: a GSO/GRO aggregate counts as its
    // segments, so packets_seen = flow packets + lost + unparsed + non-IP holds exactly.
    let segments = if meta.gso_segs > 1 {
        meta.gso_segs as u64
    } else {
        1
    };
    count_n(Counter::PacketsSeen, segments);
    let pkt = DirectPacket::new(ctx);
    match parse_frame(&pkt, meta) {
        Ok(info) => record(ctx, &info, meta, direction),
        Err(e) => count_n(e.counter(), segments),
    }
}

#[inline(always)]
fn record(
    ctx: &TcContext,
    info: &PacketInfo,
    meta: flowtrace_common::parse::SkbMeta,
    direction: u8,
) {
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
    let Some(slot) = CACHE.get_ptr_mut(active * CACHE_SLOTS + CacheSlot::index(&key)) else {
        sight(ctx, info, &key, now, active);
        add_to_map(flows, &key, &packet);
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs (user space
    // reads a half only after it stopped being active).
    unsafe {
        if (*slot).valid != 0 {
            if (*slot).key.same_as(&key) {
                merge_into(&mut (*slot).stats, &packet);
                // A SYN is sighted even on a hit: a SYN retransmitted after a loss past this
                // hook is the connection's only other chance to show its rewrite.
                if info.tcp_flags & TCP_SYN != 0 {
                    sight(ctx, info, &key, now, active);
                }
                return;
            }
            // Another flow owns the slot: move its counters to the map, then take the slot.
            add_to_map(flows, &(*slot).key, &(*slot).stats);
        }
        // A cache miss: the first packet of this flow at this hook in this drain period (or
        // one evicted by a colliding flow). Only here is the packet compared across hooks.
        sight(ctx, info, &key, now, active);
        (*slot).key = key;
        (*slot).stats = packet;
        (*slot).valid = 1;
    }
}

/// Compares this packet with the last one sighted under the same packet id on this CPU: the
/// same packet at another hook of this node with another tuple was rewritten in between
/// (kube-proxy's DNAT, the un-DNAT of replies, SNAT/masquerade), so the rewrite is recorded.
/// Then this sighting replaces the slot's. Out of line: it runs on cache misses only.
#[inline(never)]
fn sight(ctx: &TcContext, info: &PacketInfo, key: &FlowKey, now: u64, active: u32) {
    // Only what Services carry. ICMP has too little per-packet identity: neighbour
    // solicitations and advertisements for one target, for instance, look alike.
    if !matches!(key.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return;
    }
    let id = packet_id(&DirectPacket::new(ctx), info);
    let Some(s) = SIGHTINGS.get_ptr_mut(id.slot()) else {
        return;
    };
    // Kept small on purpose: this function's stack adds to the caller's (512 bytes in all),
    // so the tuples are compared and copied in place rather than built on the stack.
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs.
    unsafe {
        let earlier = &mut *s;
        if earlier.seen_ns != 0
            && earlier.id.same_as(&id)
            && now.wrapping_sub(earlier.seen_ns) <= SIGHTING_MAX_AGE_NS
            && (earlier.ifindex != key.ifindex || earlier.direction != key.direction)
            && earlier.tuple.protocol == key.protocol
            && earlier.tuple.ip_version == key.ip_version
            && !earlier.tuple.same_as_key(key)
        {
            record_nat(earlier, key, now, active);
        }
        earlier.id = id;
        earlier.tuple.set_from_key(key);
        earlier.ifindex = key.ifindex;
        earlier.direction = key.direction;
        earlier.seen_ns = now;
    }
}

/// A zeroed NAT record to create entries from (a global, so no 72-byte value is built on
/// the stack: `sight`'s stack adds to the caller's within the 512-byte limit).
static EMPTY_NAT: NatRecord = NatRecord {
    translated: Tuple {
        src_addr: [0; 4],
        dst_addr: [0; 4],
        src_port: 0,
        dst_port: 0,
        ip_version: 0,
        protocol: 0,
        _pad: 0,
    },
    from_ifindex: 0,
    to_ifindex: 0,
    from_direction: 0,
    to_direction: 0,
    _pad0: 0,
    sightings: 0,
    first_seen_ns: 0,
    last_seen_ns: 0,
};

/// Adds one sighting of a rewrite, from `earlier`'s hook and tuple to `key`'s, to the
/// active NAT buffer.
#[inline(always)]
fn record_nat(earlier: &Sighting, key: &FlowKey, now: u64, active: u32) {
    let nat = if active == 0 { &NAT_0 } else { &NAT_1 };
    let original = &earlier.tuple;
    let r = match nat.get_ptr_mut(original) {
        Some(r) => r,
        None => {
            // Fails if the map is full, or if the entry appeared meanwhile (then found below).
            let _ = nat.insert(original, &EMPTY_NAT, BPF_NOEXIST as u64);
            match nat.get_ptr_mut(original) {
                Some(r) => r,
                None => {
                    count(Counter::NatMapFull);
                    return;
                }
            }
        }
    };
    // SAFETY: per-CPU value, only this CPU writes it while this program runs.
    unsafe {
        if (*r).sightings == 0 {
            (*r).first_seen_ns = now;
        }
        (*r).translated.set_from_key(key);
        (*r).from_ifindex = earlier.ifindex;
        (*r).to_ifindex = key.ifindex;
        (*r).from_direction = earlier.direction;
        (*r).to_direction = key.direction;
        (*r).sightings += 1;
        (*r).last_seen_ns = now;
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
