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
    parse::{parse_frame, PacketInfo},
    CacheSlot, Counter, FlowKey, FlowStats, CACHE_SLOTS, CONTROL_ACTIVE_BUFFER, CONTROL_SLOTS,
    COUNTER_SLOTS, DEFAULT_FLOW_ENTRIES, DIR_EGRESS, DIR_INGRESS, FLOW_BUFFERS,
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
        add_to_map(flows, &key, &packet);
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs (user space
    // reads a half only after it stopped being active).
    unsafe {
        if (*slot).valid != 0 {
            if (*slot).key.same_as(&key) {
                merge_into(&mut (*slot).stats, &packet);
                return;
            }
            // Another flow owns the slot: move its counters to the map, then take the slot.
            add_to_map(flows, &(*slot).key, &(*slot).stats);
        }
        (*slot).key = key;
        (*slot).stats = packet;
        (*slot).valid = 1;
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
