//! Every map of the programs, in one place: what user space reads and writes, and the per-CPU
//! scratch slots the programs build keys and events in.
//!
//! The names user space opens them by are `flowtrace_common::maps`. `#[map(name = ...)]` takes
//! only a string literal, so each static keeps its own name as the map's name, and
//! `flowtrace/tests/kernel_object.rs` checks the built object's maps against that list.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use flowtrace_common::drops::{
    DropKey, DropLayout, DropStats, DEFAULT_DROP_ENTRIES, LOST_REASON_SLOTS,
};
use flowtrace_common::{
    CacheSlot, FlowKey, FlowStats, LatencyHist, LatencyKey, NatRecord, RttKey, RttPending,
    Sighting, TraceEvent, Tuple, CACHE_SLOTS, CONTROL_SLOTS, COUNTER_SLOTS, DEFAULT_FLOW_ENTRIES,
    DEFAULT_LATENCY_ENTRIES, DEFAULT_NAT_ENTRIES, FLOW_BUFFERS, RTT_HINT_SLOTS,
    RTT_PENDING_ENTRIES, SIGHTING_SLOTS, TRACE_RING_BYTES,
};

/// Flow buffer 0. The kernel writes to the buffer named by `CONTROL[CONTROL_ACTIVE_BUFFER]`;
/// user space flips it and drains the other one, which then has no writer.
#[map]
pub(crate) static FLOWS_0: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Flow buffer 1 (see `FLOWS_0`).
#[map]
pub(crate) static FLOWS_1: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Small control block written by user space (`CONTROL_ACTIVE_BUFFER`, ...).
#[map]
pub(crate) static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_SLOTS, 0);

/// Per-CPU direct-mapped flow cache in front of the flow buffers: two halves of
/// `CACHE_SLOTS`, the active one chosen like the flow buffer (see `CacheSlot`).
#[map]
pub(crate) static CACHE: PerCpuArray<CacheSlot> =
    PerCpuArray::with_max_entries(FLOW_BUFFERS * CACHE_SLOTS, 0);

/// NAT buffer 0: rewrites seen between two hooks, keyed by the tuple before the rewrite.
/// Double-buffered with the flow buffers (same `CONTROL_ACTIVE_BUFFER`).
#[map]
pub(crate) static NAT_0: PerCpuHashMap<Tuple, NatRecord> =
    PerCpuHashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// NAT buffer 1 (see `NAT_0`).
#[map]
pub(crate) static NAT_1: PerCpuHashMap<Tuple, NatRecord> =
    PerCpuHashMap::with_max_entries(DEFAULT_NAT_ENTRIES, 0);

/// Per-CPU table of recent packet sightings, direct-mapped by packet id (see `Sighting`).
#[map]
pub(crate) static SIGHTINGS: PerCpuArray<Sighting> =
    PerCpuArray::with_max_entries(SIGHTING_SLOTS, 0);

/// Latency buffer 0: histograms per (tuple, segment or round-trip interface), double-buffered
/// with the flow buffers (same `CONTROL_ACTIVE_BUFFER`).
#[map]
pub(crate) static LATENCY_0: PerCpuHashMap<LatencyKey, LatencyHist> =
    PerCpuHashMap::with_max_entries(DEFAULT_LATENCY_ENTRIES, 0);

/// Latency buffer 1 (see `LATENCY_0`).
#[map]
pub(crate) static LATENCY_1: PerCpuHashMap<LatencyKey, LatencyHist> =
    PerCpuHashMap::with_max_entries(DEFAULT_LATENCY_ENTRIES, 0);

/// TCP segments waiting at an interface for their acknowledgement. Shared by all CPUs: a
/// SYN and its SYN-ACK cross an interface on different CPUs. LRU: an unanswered segment
/// is forgotten under pressure instead of blocking new ones.
#[map]
pub(crate) static RTT_PENDING: LruHashMap<RttKey, RttPending> =
    LruHashMap::with_max_entries(RTT_PENDING_ENTRIES, 0);

/// Non-zero where a segment may wait in `RTT_PENDING` (see `FlowKey::rtt_hint_slot`): an
/// answering segment looks there first, an array read instead of a hash lookup, so a
/// connection with nothing waiting costs no lookup per data segment. A collision only costs
/// a lookup that finds nothing, or (when an answer clears a slot another waiting segment
/// shares) one lost round-trip sample.
#[map]
pub(crate) static RTT_HINT: Array<u32> = Array::with_max_entries(RTT_HINT_SLOTS, 0);

/// Sampled packets and SYNs at each hook, written only while a tracer is attached (the
/// `CONTROL_TRACING` bit of `CONTROL[CONTROL_ACTIVE_BUFFER]`).
#[map]
pub(crate) static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Per-CPU scratch space where a trace event is built before it is copied to the ring.
#[map]
pub(crate) static TRACE_SCRATCH: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where map keys are built (a 52-byte key on the stack would not fit
/// the 512 bytes the program and its functions share).
#[map]
pub(crate) static LAT_SCRATCH: PerCpuArray<LatencyKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub(crate) static RTT_SCRATCH: PerCpuArray<RttKey> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters indexed by `Counter`: packets seen and every way an update was lost.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Drop buffer 0: drops and retransmissions per (tuple, place, reason), double-buffered with
/// the flow buffers (same `CONTROL_ACTIVE_BUFFER`). Shared by all CPUs, updated atomically:
/// only packets that die pay for it, and its size does not grow with the CPU count.
#[map]
pub(crate) static DROPS_0: HashMap<DropKey, DropStats> =
    HashMap::with_max_entries(DEFAULT_DROP_ENTRIES, 0);

/// Drop buffer 1 (see `DROPS_0`).
#[map]
pub(crate) static DROPS_1: HashMap<DropKey, DropStats> =
    HashMap::with_max_entries(DEFAULT_DROP_ENTRIES, 0);

/// The running kernel's struct offsets, written once by user space from its BTF.
#[map]
pub(crate) static DROP_LAYOUT: Array<DropLayout> = Array::with_max_entries(1, 0);

/// Drops that found the drop buffer full, by reason (the last slot holds every reason from
/// it up): counted whole since the start, shared by all CPUs, so the totals per reason stay
/// exact in a flood of fresh tuples even where the flows are lost.
#[map]
pub(crate) static DROPS_LOST: Array<u64> = Array::with_max_entries(LOST_REASON_SLOTS, 0);
