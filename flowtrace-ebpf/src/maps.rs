//! Every map of the programs, in one place: what user space reads and writes, and the per-CPU
//! scratch slots the programs build keys and events in.
//!
//! The names user space opens them by are `flowtrace_common::maps`. `#[map(name = ...)]` takes
//! only a string literal, so each static keeps its own name as the map's name, and
//! `flowtrace/tests/kernel_object.rs` checks the built object's maps against that list.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use flowtrace_common::drops::{
    DropKey, DropLayout, DropStats, DEFAULT_DROP_ENTRIES, LOST_REASON_SLOTS,
};
use flowtrace_common::{
    CacheSlot, LatencyEvent, NatEvent, RttKey, RttPending, Sighting, SlowInput, TraceEvent,
    CONTROL_SLOTS, COUNTER_SLOTS, DEFAULT_EVENT_RING_BYTES, FLOW_BUFFERS, MIN_CACHE_SLOTS,
    RTT_HINT_SLOTS, RTT_PENDING_ENTRIES, SIGHTING_SLOTS, TRACE_RING_BYTES,
};

/// Small control block written by user space (`CONTROL_ACTIVE_BUFFER`, ...).
#[map]
pub(crate) static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_SLOTS, 0);

/// Per-CPU direct-mapped flow cache, where every packet is counted: two halves of
/// `1 << (32 - CACHE_SHIFT)` slots, the active one named by `CONTROL[CONTROL_ACTIVE_BUFFER]`
/// (see `CacheSlot`). User space sizes it at load time from the number of possible CPUs.
#[map]
pub(crate) static CACHE: PerCpuArray<CacheSlot> =
    PerCpuArray::with_max_entries(FLOW_BUFFERS * MIN_CACHE_SLOTS, 0);

/// `32 - log2(slots per cache half)`, set by user space at load time (a read-only global:
/// the verifier knows its value).
#[unsafe(no_mangle)]
static CACHE_SHIFT: u32 = 32 - MIN_CACHE_SLOTS.trailing_zeros();

/// The shift of `CacheSlot::index` for this cache's size.
#[inline(always)]
pub(crate) fn cache_shift() -> u32 {
    // SAFETY: a plain read of a global; volatile so the compiler keeps the load that user
    // space's value (written into .rodata before loading) is read by.
    unsafe { core::ptr::read_volatile(&CACHE_SHIFT) }
}

/// Bytes waiting in the event ring from which a record wakes user space (set at load time,
/// an eighth of the ring): below it records are written without a wakeup, and user space
/// reads the ring on a short timer. A wakeup per record would cost an interrupt per record.
#[unsafe(no_mangle)]
static EVENTS_WAKE_BYTES: u64 = (DEFAULT_EVENT_RING_BYTES / 8) as u64;

/// The flags for a record written to `EVENTS` now (see `EVENTS_WAKE_BYTES`).
#[inline(always)]
pub(crate) fn events_flags() -> u64 {
    // SAFETY: a plain read of a global (see `cache_shift`).
    let wake = unsafe { core::ptr::read_volatile(&EVENTS_WAKE_BYTES) };
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wake {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// The event ring, shared by all CPUs: flow counters handed over from the cache, NAT
/// rewrites and latency samples, read continuously by user space. Sized at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENT_RING_BYTES, 0);

/// Per-CPU table of recent packet sightings, direct-mapped by packet id (see `Sighting`).
#[map]
pub(crate) static SIGHTINGS: PerCpuArray<Sighting> =
    PerCpuArray::with_max_entries(SIGHTING_SLOTS, 0);

/// TCP segments waiting at an interface for their acknowledgement. Shared by all CPUs: a
/// SYN and its SYN-ACK cross an interface on different CPUs. LRU: an unanswered segment
/// is forgotten under pressure instead of blocking new ones.
#[map]
pub(crate) static RTT_PENDING: LruHashMap<RttKey, RttPending> =
    LruHashMap::with_max_entries(RTT_PENDING_ENTRIES, 0);

/// Non-zero where a segment may wait in `RTT_PENDING` (see `FlowKey::rtt_hint_slot`): when it
/// began waiting (`flowtrace_common::rtt_hint_value`). An answering segment looks there
/// first, an array read instead of a hash lookup, so a connection with nothing waiting costs
/// no lookup per data segment; a sampled segment of a direction with a young one waiting
/// stops there too. A collision only costs a lookup that finds nothing, a sampled segment
/// that does not start waiting while another flow's waits (under a second), or (when an
/// answer clears a slot another waiting segment shares) one lost round-trip sample.
#[map]
pub(crate) static RTT_HINT: Array<u32> = Array::with_max_entries(RTT_HINT_SLOTS, 0);

/// Sampled packets and SYNs at each hook, written only while a tracer is attached (the
/// `CONTROL_TRACING` bit of `CONTROL[CONTROL_ACTIVE_BUFFER]`).
#[map]
pub(crate) static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Per-CPU scratch space where a trace event is built before it is copied to the ring.
#[map]
pub(crate) static TRACE_SCRATCH: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where events and keys are built (a 64-byte event on the stack
/// would crowd the 512 bytes the program and its functions share).
#[map]
pub(crate) static LAT_SCRATCH: PerCpuArray<LatencyEvent> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub(crate) static RTT_SCRATCH: PerCpuArray<RttKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub(crate) static NAT_SCRATCH: PerCpuArray<NatEvent> = PerCpuArray::with_max_entries(1, 0);

/// What a hook hands its slow path (see `SlowInput`).
#[map]
pub(crate) static SLOW_SCRATCH: PerCpuArray<SlowInput> = PerCpuArray::with_max_entries(1, 0);

/// The slow path (`flowtrace_slow`) at index 0, written by user space before any hook is
/// attached. A tail call, not a function: the verifier checks the slow path once, alone,
/// instead of once for every way the parser can reach it.
#[map]
pub(crate) static SLOW_PATH: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU counters indexed by `Counter`: packets seen and every way an update was lost.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Drop buffer 0: drops and retransmissions per (tuple, place, reason), double-buffered with
/// the flow cache's halves (same `CONTROL_ACTIVE_BUFFER`). Shared by all CPUs, updated atomically:
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
