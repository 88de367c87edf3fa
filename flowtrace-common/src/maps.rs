//! The names of the kernel programs' maps, as user space opens them (`Ebpf::take_map`,
//! `EbpfLoader::map_max_entries`).
//!
//! The kernel's statics (`flowtrace-ebpf/src/maps.rs`) carry the same names: aya-ebpf's
//! `#[map(name = ...)]` takes only a string literal, so they cannot use these constants.
//! `flowtrace/tests/kernel_object.rs` checks that the built object has exactly the maps of
//! `ALL`.

/// Flow buffers, indexed by the active-buffer bit (`CONTROL_ACTIVE_BUFFER`).
pub const FLOWS_0: &str = "FLOWS_0";
pub const FLOWS_1: &str = "FLOWS_1";
pub const FLOWS: [&str; 2] = [FLOWS_0, FLOWS_1];

/// The control block user space writes (`CONTROL_*` slots).
pub const CONTROL: &str = "CONTROL";

/// The per-CPU flow cache in front of the flow buffers (`CacheSlot`s).
pub const CACHE: &str = "CACHE";

/// NAT buffers, indexed like `FLOWS`.
pub const NAT_0: &str = "NAT_0";
pub const NAT_1: &str = "NAT_1";
pub const NAT: [&str; 2] = [NAT_0, NAT_1];

/// The per-CPU table of recent sightings (kernel only).
pub const SIGHTINGS: &str = "SIGHTINGS";

/// Latency buffers, indexed like `FLOWS`.
pub const LATENCY_0: &str = "LATENCY_0";
pub const LATENCY_1: &str = "LATENCY_1";
pub const LATENCY: [&str; 2] = [LATENCY_0, LATENCY_1];

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

/// The per-CPU counters, one slot per `Counter`.
pub const COUNTERS: &str = "COUNTERS";

/// Drop buffers (`DropKey` -> `DropStats`), indexed like `FLOWS`.
pub const DROPS_0: &str = "DROPS_0";
pub const DROPS_1: &str = "DROPS_1";
pub const DROPS: [&str; 2] = [DROPS_0, DROPS_1];

/// Drops that found the drop buffer full, per reason (`LOST_REASON_SLOTS` u64s).
pub const DROPS_LOST: &str = "DROPS_LOST";

/// The kernel struct offsets the tracepoint programs read (`DropLayout`, one slot).
pub const DROP_LAYOUT: &str = "DROP_LAYOUT";

/// Every map of the object, in the kernel's declaration order.
pub const ALL: [&str; 20] = [
    FLOWS_0,
    FLOWS_1,
    CONTROL,
    CACHE,
    NAT_0,
    NAT_1,
    SIGHTINGS,
    LATENCY_0,
    LATENCY_1,
    RTT_PENDING,
    RTT_HINT,
    TRACE_EVENTS,
    TRACE_SCRATCH,
    LAT_SCRATCH,
    RTT_SCRATCH,
    COUNTERS,
    DROPS_0,
    DROPS_1,
    DROP_LAYOUT,
    DROPS_LOST,
];

const _: () = assert!(FLOWS.len() == crate::FLOW_BUFFERS as usize);
const _: () = assert!(NAT.len() == crate::FLOW_BUFFERS as usize);
const _: () = assert!(LATENCY.len() == crate::FLOW_BUFFERS as usize);
const _: () = assert!(DROPS.len() == crate::FLOW_BUFFERS as usize);

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
