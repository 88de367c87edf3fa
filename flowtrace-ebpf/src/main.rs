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
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use flowtrace_common::{
    parse::{packet_id, parse_frame, PacketInfo, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    CacheSlot, Counter, FlowKey, FlowStats, LatencyHist, LatencyKey, NatRecord, PacketId, RttKey,
    RttPending, Sighting, TraceEvent, Tuple, CACHE_SLOTS, CONTROL_ACTIVE_BUFFER,
    CONTROL_LATENCY_SAMPLE, CONTROL_SLOTS, CONTROL_TRACING, COUNTER_SLOTS, DEFAULT_FLOW_ENTRIES,
    DEFAULT_LATENCY_ENTRIES, DEFAULT_NAT_ENTRIES, DIR_EGRESS, DIR_INGRESS, FLOW_BUFFERS,
    LAT_HANDSHAKE, LAT_HOP, LAT_RESPONSE, RTT_HINT_SLOTS, RTT_PENDING_ENTRIES, SIGHTING_MAX_AGE_NS,
    SIGHTING_SLOTS, TRACE_RING_BYTES,
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

/// Latency buffer 0: histograms per (tuple, segment or round-trip interface), double-buffered
/// with the flow buffers (same `CONTROL_ACTIVE_BUFFER`).
#[map]
static LATENCY_0: PerCpuHashMap<LatencyKey, LatencyHist> =
    PerCpuHashMap::with_max_entries(DEFAULT_LATENCY_ENTRIES, 0);

/// Latency buffer 1 (see `LATENCY_0`).
#[map]
static LATENCY_1: PerCpuHashMap<LatencyKey, LatencyHist> =
    PerCpuHashMap::with_max_entries(DEFAULT_LATENCY_ENTRIES, 0);

/// TCP segments waiting at an interface for their acknowledgement. Shared by all CPUs: a
/// SYN and its SYN-ACK cross an interface on different CPUs. LRU: an unanswered segment
/// is forgotten under pressure instead of blocking new ones.
#[map]
static RTT_PENDING: LruHashMap<RttKey, RttPending> =
    LruHashMap::with_max_entries(RTT_PENDING_ENTRIES, 0);

/// Non-zero where a segment may wait in `RTT_PENDING` (see `FlowKey::rtt_hint_slot`): an
/// answering segment looks there first, an array read instead of a hash lookup, so a
/// connection with nothing waiting costs no lookup per data segment. A collision only costs
/// a lookup that finds nothing, or (when an answer clears a slot another waiting segment
/// shares) one lost round-trip sample.
#[map]
static RTT_HINT: Array<u32> = Array::with_max_entries(RTT_HINT_SLOTS, 0);

/// Sampled packets and SYNs at each hook, written only while a tracer is attached
/// (`CONTROL_TRACING`).
#[map]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Per-CPU scratch space where a trace event is built before it is copied to the ring.
#[map]
static TRACE_SCRATCH: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where map keys are built (a 52-byte key on the stack would not fit
/// the 512 bytes the program and its functions share).
#[map]
static LAT_SCRATCH: PerCpuArray<LatencyKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
static RTT_SCRATCH: PerCpuArray<RttKey> = PerCpuArray::with_max_entries(1, 0);

/// The SYN, PSH and ACK bits of the TCP flags byte.
const TCP_SYN: u8 = 0x02;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// `ctl` bits passed to the out-of-line functions (BPF functions take at most 5 arguments).
const CTL_BUFFER: u32 = 1;
const CTL_SAMPLED: u32 = 2;

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

/// Compares this packet with the last one sighted under the same packet id on this CPU: the
/// same packet at another hook of this node with another tuple was rewritten in between
/// (kube-proxy's DNAT, the un-DNAT of replies, SNAT/masquerade), so the rewrite is recorded.
/// A packet sampled for latency (`CTL_SAMPLED`) also adds the time since the earlier hook
/// to that segment's histogram. Then this sighting replaces the slot's. First, the packet
/// goes to the tracers if `CTL_TRACE` says so. Out of line: it runs on cache misses, SYNs and
/// sampled packets only.
#[inline(never)]
fn sight(id: &PacketId, key: &FlowKey, now: u64, ctl: u32, packet: &FlowStats) {
    // A tracer sees the sampled packets and every SYN (so each new connection shows whole).
    // Without a tracer this costs one array lookup on the packets that get here.
    if (ctl & CTL_SAMPLED != 0 || packet.tcp_flags & TCP_SYN != 0)
        && CONTROL
            .get(CONTROL_ACTIVE_BUFFER)
            .is_some_and(|w| *w & CONTROL_TRACING != 0)
    {
        trace(id, key, now, packet.tcp_flags, packet.bytes);
    }
    let active = ctl & CTL_BUFFER;
    let Some(s) = SIGHTINGS.get_ptr_mut(id.slot()) else {
        return;
    };
    // Kept small on purpose: this function's stack adds to the caller's (512 bytes in all),
    // so the tuples are compared and copied in place rather than built on the stack.
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs.
    unsafe {
        let earlier = &mut *s;
        if earlier.seen_ns != 0
            && earlier.id.same_as(id)
            && now.wrapping_sub(earlier.seen_ns) <= SIGHTING_MAX_AGE_NS
            && (earlier.ifindex != key.ifindex || earlier.direction != key.direction)
            && earlier.tuple.protocol == key.protocol
            && earlier.tuple.ip_version == key.ip_version
        {
            if !earlier.tuple.same_as_key(key) {
                record_nat(earlier, key, now, active);
            }
            if ctl & CTL_SAMPLED != 0 {
                if let Some(k) = LAT_SCRATCH.get_ptr_mut(0) {
                    (*k).tuple.set_from_key(key);
                    (*k).from_ifindex = earlier.ifindex;
                    (*k).from_direction = earlier.direction;
                    (*k).to_ifindex = key.ifindex;
                    (*k).to_direction = key.direction;
                    (*k).kind = LAT_HOP;
                    (*k)._pad = 0;
                    add_latency(now.wrapping_sub(earlier.seen_ns), active);
                }
            }
        }
        earlier.id = *id;
        earlier.tuple.set_from_key(key);
        earlier.ifindex = key.ifindex;
        earlier.direction = key.direction;
        earlier.seen_ns = now;
    }
}

/// Writes one trace event (a tracer is attached; the packet is sampled or a SYN). Out of
/// line: without a tracer it never runs.
#[inline(always)]
fn trace(id: &PacketId, key: &FlowKey, now: u64, tcp_flags: u8, bytes: u64) {
    // Built in a per-CPU scratch slot and copied out (bpf_ringbuf_output): a reserved
    // record is a reference the verifier tracks, which made it give up on this program.
    let Some(e) = TRACE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs; every field
    // is written before the slot is copied.
    unsafe {
        (*e).ts_ns = now;
        (*e).id = *id;
        (*e).tuple.set_from_key(key);
        (*e).ifindex = key.ifindex;
        (*e).direction = key.direction;
        (*e).tcp_flags = tcp_flags;
        (*e)._pad = 0;
        (*e).bytes = bytes.min(u64::from(u32::MAX)) as u32;
        (*e)._pad2 = 0;
        if TRACE_EVENTS.output::<TraceEvent>(&*e, 0).is_err() {
            count(Counter::TraceRingFull);
        }
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

/// A zeroed histogram to create latency entries from (a global, not a 160-byte stack value).
static EMPTY_HIST: LatencyHist = LatencyHist::EMPTY;

/// Adds one sample to the histogram of the key in `LAT_SCRATCH`, in the active buffer.
#[inline(never)]
fn add_latency(ns: u64, active: u32) {
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
fn rtt(info: &PacketInfo, id: &PacketId, key: &FlowKey, now: u64, ctl: u32) {
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
