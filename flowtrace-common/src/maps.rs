//! The names of the kernel programs' maps, as user space opens them (`Ebpf::take_map`,
//! `EbpfLoader::map_max_entries`).
//!
//! The kernel's statics (`flowtrace-ebpf/src/maps.rs`) carry the same names: aya-ebpf's
//! `#[map(name = ...)]` takes only a string literal, so they cannot use these constants.
//! `flowtrace/tests/kernel_object.rs` checks that the built object has exactly the maps of
//! `ALL`.

/// The control block user space writes (`CONTROL_*` slots).
pub const CONTROL: &str = "CONTROL";

/// The per-CPU flow cache (`CacheSlot`s), two halves indexed by the active-buffer bit
/// (`CONTROL_ACTIVE_BUFFER`).
pub const CACHE: &str = "CACHE";

/// The event ring: flow counters handed over from the cache, NAT rewrites, latency samples
/// (`EVENT_*` records).
pub const EVENTS: &str = "EVENTS";

/// The per-CPU table of recent sightings (kernel only).
pub const SIGHTINGS: &str = "SIGHTINGS";

/// TCP segments waiting for their acknowledgement, and the hint array in front of them
/// (kernel only).
pub const RTT_PENDING: &str = "RTT_PENDING";
pub const RTT_HINT: &str = "RTT_HINT";

/// The trace ring buffer (`TraceEvent`s).
pub const TRACE_EVENTS: &str = "TRACE_EVENTS";

/// Per-CPU scratch slots the programs build events and keys in (kernel only).
pub const TRACE_SCRATCH: &str = "TRACE_SCRATCH";
pub const LAT_SCRATCH: &str = "LAT_SCRATCH";
pub const RTT_SCRATCH: &str = "RTT_SCRATCH";
pub const NAT_SCRATCH: &str = "NAT_SCRATCH";
/// What a hook hands its slow path (`SlowInput`, per CPU), and the program array holding
/// the slow path (`programs::SLOW` at index 0; kernel only but for the loader's write).
pub const SLOW_SCRATCH: &str = "SLOW_SCRATCH";
pub const SLOW_PATH: &str = "SLOW_PATH";

/// The per-CPU counters, one slot per `Counter`.
pub const COUNTERS: &str = "COUNTERS";

/// Drop buffers (`DropKey` -> `DropStats`), indexed like the cache halves.
pub const DROPS_0: &str = "DROPS_0";
pub const DROPS_1: &str = "DROPS_1";
pub const DROPS: [&str; 2] = [DROPS_0, DROPS_1];

/// Drops that found the drop buffer full, per reason (`LOST_REASON_SLOTS` u64s).
pub const DROPS_LOST: &str = "DROPS_LOST";

/// The kernel struct offsets the tracepoint programs read (`DropLayout`, one slot).
pub const DROP_LAYOUT: &str = "DROP_LAYOUT";

/// Every map of the object, in the kernel's declaration order.
pub const ALL: [&str; 18] = [
    CONTROL,
    CACHE,
    EVENTS,
    SIGHTINGS,
    RTT_PENDING,
    RTT_HINT,
    TRACE_EVENTS,
    TRACE_SCRATCH,
    LAT_SCRATCH,
    RTT_SCRATCH,
    NAT_SCRATCH,
    SLOW_SCRATCH,
    SLOW_PATH,
    COUNTERS,
    DROPS_0,
    DROPS_1,
    DROP_LAYOUT,
    DROPS_LOST,
];

const _: () = assert!(DROPS.len() == crate::FLOW_BUFFERS as usize);

/// The global (`.rodata`) user space sets at load time: the shift that turns a flow's hash
/// into its slot in one half of the cache (`CacheSlot::index`), `32 - log2(slots)`.
pub const CACHE_SHIFT: &str = "CACHE_SHIFT";

/// The global user space sets at load time: bytes waiting in the event ring from which a
/// record wakes the agent (below it the agent reads the ring on a timer).
pub const EVENTS_WAKE_BYTES: &str = "EVENTS_WAKE_BYTES";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_fit_the_kernel() {
        for (i, a) in ALL.iter().enumerate() {
            // BPF_OBJ_NAME_LEN is 16 including the NUL: a longer name is cut in `bpftool
            // map show`, which is where an operator looks for these.
            assert!(a.len() < 16, "{a} is longer than the kernel keeps");
            for b in &ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
