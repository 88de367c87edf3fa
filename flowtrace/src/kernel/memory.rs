//! What the kernel maps cost in memory, computed from their definitions the way the kernel
//! accounts for them (`map_mem_usage` of array, hash, LRU hash, ring buffer and program
//! array maps, Linux 6.x), for any number of possible CPUs. The agent's own maps on this
//! machine are checked against the kernel's figure (`memlock` in /proc/PID/fdinfo) by a test,
//! so the projection to larger nodes rests on a formula checked where it can be.

use flowtrace_common::{
    drops::{DropKey, DropLayout, DropStats, LOST_REASON_SLOTS},
    maps, CacheSlot, LatencyEvent, NatEvent, RttKey, RttPending, Sighting, SlowInput, TraceEvent,
    CONTROL_SLOTS, COUNTER_SLOTS, FLOW_BUFFERS, RTT_HINT_SLOTS, RTT_PENDING_ENTRIES,
    SIGHTING_SLOTS, TRACE_RING_BYTES,
};

/// How a map type lays out its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Array,
    PerCpuArray,
    /// Preallocated hash (the default), shared by all CPUs.
    Hash,
    /// Preallocated LRU hash, shared by all CPUs.
    LruHash,
    RingBuf,
    ProgArray,
}

/// One map as the programs define it (sizes in bytes).
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub key_size: u64,
    pub value_size: u64,
    /// Entries, or bytes for a ring buffer.
    pub max_entries: u64,
}

/// `struct htab_elem` and `struct bucket` on 64-bit kernels, and what every map's own struct
/// adds (about 300 bytes, as measured by `cargo xtask map-memory` on Linux 6.18).
const HTAB_ELEM: u64 = 48;
const MAP_STRUCT: u64 = 312;
const HTAB_BUCKET: u64 = 16;
const PAGE: u64 = 4096;

fn round8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

impl MapSpec {
    /// Bytes the kernel accounts this map with on a machine of `cpus` possible CPUs.
    pub fn bytes(&self, cpus: u64) -> u64 {
        let value = round8(self.value_size);
        let n = self.max_entries;
        MAP_STRUCT
            + match self.kind {
                Kind::Array => n * value,
                Kind::PerCpuArray => n * 8 + n * value * cpus,
                Kind::ProgArray => n * 8,
                Kind::Hash | Kind::LruHash => {
                    let elem = HTAB_ELEM + round8(self.key_size) + value;
                    // A preallocated plain hash keeps one spare element per CPU.
                    let elems = if self.kind == Kind::Hash { n + cpus } else { n };
                    n.next_power_of_two() * HTAB_BUCKET + elems * elem + 4 * 8 * cpus
                }
                // The data pages, the consumer and producer pages, and a page pointer per page
                // of the doubled mapping.
                Kind::RingBuf => {
                    let pages = n / PAGE + 2;
                    pages * PAGE + (pages + n / PAGE) * 8
                }
            }
    }
}

fn size<T>() -> u64 {
    std::mem::size_of::<T>() as u64
}

/// Every map of the object with the sizes the agent loads it with: `cache_slots` per cache
/// half, a `ring_bytes` event ring, `drop_entries` per drop buffer.
pub fn specs(cache_slots: u32, ring_bytes: u32, drop_entries: u32) -> Vec<MapSpec> {
    let spec = |name, kind, key_size, value_size, max_entries: u64| MapSpec {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
    };
    use Kind::*;
    let drops = u64::from(drop_entries);
    vec![
        spec(maps::CONTROL, Array, 4, 4, u64::from(CONTROL_SLOTS)),
        spec(
            maps::CACHE,
            PerCpuArray,
            4,
            size::<CacheSlot>(),
            u64::from(FLOW_BUFFERS * cache_slots),
        ),
        spec(maps::EVENTS, RingBuf, 0, 0, u64::from(ring_bytes)),
        spec(
            maps::SIGHTINGS,
            PerCpuArray,
            4,
            size::<Sighting>(),
            u64::from(SIGHTING_SLOTS),
        ),
        spec(
            maps::RTT_PENDING,
            LruHash,
            size::<RttKey>(),
            size::<RttPending>(),
            u64::from(RTT_PENDING_ENTRIES),
        ),
        spec(maps::RTT_HINT, Array, 4, 4, u64::from(RTT_HINT_SLOTS)),
        spec(
            maps::TRACE_EVENTS,
            RingBuf,
            0,
            0,
            u64::from(TRACE_RING_BYTES),
        ),
        spec(maps::TRACE_SCRATCH, PerCpuArray, 4, size::<TraceEvent>(), 1),
        spec(maps::LAT_SCRATCH, PerCpuArray, 4, size::<LatencyEvent>(), 1),
        spec(maps::RTT_SCRATCH, PerCpuArray, 4, size::<RttKey>(), 1),
        spec(maps::NAT_SCRATCH, PerCpuArray, 4, size::<NatEvent>(), 1),
        spec(maps::SLOW_SCRATCH, PerCpuArray, 4, size::<SlowInput>(), 1),
        spec(maps::SLOW_PATH, ProgArray, 4, 4, 1),
        spec(maps::COUNTERS, PerCpuArray, 4, 8, u64::from(COUNTER_SLOTS)),
        spec(
            maps::DROPS_0,
            Hash,
            size::<DropKey>(),
            size::<DropStats>(),
            drops,
        ),
        spec(
            maps::DROPS_1,
            Hash,
            size::<DropKey>(),
            size::<DropStats>(),
            drops,
        ),
        spec(maps::DROP_LAYOUT, Array, 4, size::<DropLayout>(), 1),
        spec(maps::DROPS_LOST, Array, 4, 8, u64::from(LOST_REASON_SLOTS)),
    ]
}

/// Total bytes of `specs` at `cpus` possible CPUs.
pub fn total(specs: &[MapSpec], cpus: u64) -> u64 {
    specs.iter().map(|s| s.bytes(cpus)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_of_the_object_has_a_spec() {
        let s = specs(128, 1 << 22, 4096);
        let mut names: Vec<_> = s.iter().map(|m| m.name).collect();
        names.sort();
        let mut all = maps::ALL.to_vec();
        all.sort();
        assert_eq!(names, all);
    }

    #[test]
    fn per_cpu_maps_grow_with_the_cpus_and_shared_ones_do_not() {
        let s = specs(128, 1 << 22, 4096);
        let cache = s.iter().find(|m| m.name == maps::CACHE).unwrap();
        assert_eq!(cache.bytes(2) - cache.bytes(1), 256 * 96);
        let ring = s.iter().find(|m| m.name == maps::EVENTS).unwrap();
        assert_eq!(ring.bytes(2), ring.bytes(256));
    }
}
