//! Draining the kernel's flow buffers without losing updates.
//!
//! The kernel writes every update into the buffer (and the half of the per-CPU flow cache)
//! named by `CONTROL[active]`. A drain flips `active`, waits for programs that already read
//! the old value to finish (TC programs run with bottom halves disabled and take
//! microseconds; the grace period is milliseconds), then reads and clears everything in the
//! buffer and cache half that now have no writer. An update is therefore either in the
//! drained buffer before it is read or in the other one, never lost between a read and a
//! delete. The residual risk is a program run stalled for longer than the grace period
//! (e.g. a preempted vCPU) writing between our read and delete of its entry; reading and
//! deleting key by key keeps that window to one syscall.

use std::{collections::HashMap, time::Duration};

use aya::maps::{
    Array, HashMap as KernelHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use flowtrace_common::{
    drops::{DropKey, DropStats},
    CacheSlot, Counter, FlowKey, FlowStats, LatencyHist, LatencyKey, NatRecord, Tuple, CACHE_SLOTS,
    CONTROL_ACTIVE_BUFFER, CONTROL_LATENCY_SAMPLE, CONTROL_TRACING, COUNTER_SLOTS,
};

use flowtrace_common::maps;

use crate::error::{Error, Result};

/// Default wait between flipping the active buffer and reading the old one.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(5);

/// One drained flow at one hook, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainedFlow {
    pub key: FlowKey,
    pub stats: FlowStats,
}

/// One rewrite the kernel saw, summed over CPUs: the tuple before it and what it became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainedNat {
    pub original: Tuple,
    pub record: NatRecord,
}

/// One latency histogram, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainedLatency {
    pub key: LatencyKey,
    pub hist: LatencyHist,
}

/// One drop or retransmission aggregate (the drop buffers are shared by all CPUs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainedDrop {
    pub key: DropKey,
    pub stats: DropStats,
}

/// What one drain produced: the flows, the rewrites, the latency samples, the drops, and
/// the map errors met on the way (each left its entry in place for the next drain).
#[derive(Debug, Default)]
pub struct Drained {
    pub flows: Vec<DrainedFlow>,
    pub nat: Vec<DrainedNat>,
    pub latency: Vec<DrainedLatency>,
    pub drops: Vec<DrainedDrop>,
    pub problems: Vec<Error>,
}

/// Folds one CPU's record of a rewrite into another's: the latest translation wins (it is
/// the one conntrack applies now), sightings add up.
fn merge_nat(into: &mut NatRecord, other: &NatRecord) {
    if other.sightings == 0 {
        return;
    }
    if into.sightings == 0 || other.first_seen_ns < into.first_seen_ns {
        into.first_seen_ns = other.first_seen_ns;
    }
    if other.last_seen_ns >= into.last_seen_ns {
        let (first, sightings) = (into.first_seen_ns, into.sightings);
        *into = *other;
        into.first_seen_ns = first;
        into.sightings = sightings;
    }
    into.sightings += other.sightings;
}

/// The maps the agent reads, taken out of the loaded object.
pub struct Drainer {
    buffers: [PerCpuHashMap<MapData, FlowKey, FlowStats>; 2],
    nat: [PerCpuHashMap<MapData, Tuple, NatRecord>; 2],
    latency: [PerCpuHashMap<MapData, LatencyKey, LatencyHist>; 2],
    drops: [KernelHashMap<MapData, DropKey, DropStats>; 2],
    drops_lost: Array<MapData, u64>,
    cache: PerCpuArray<MapData, CacheSlot>,
    control: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    grace: Duration,
}

/// What a drain does to an idle buffer, per-CPU or shared: list its keys, read an entry,
/// delete it.
trait IdleBuffer<K> {
    type Value;
    fn key_list(&self) -> impl Iterator<Item = std::result::Result<K, aya::maps::MapError>>;
    fn read(&self, key: &K) -> std::result::Result<Self::Value, aya::maps::MapError>;
    fn delete(&mut self, key: &K) -> std::result::Result<(), aya::maps::MapError>;
}

impl<K: aya::Pod, V: aya::Pod> IdleBuffer<K> for PerCpuHashMap<MapData, K, V> {
    type Value = PerCpuValues<V>;
    fn key_list(&self) -> impl Iterator<Item = std::result::Result<K, aya::maps::MapError>> {
        self.keys()
    }
    fn read(&self, key: &K) -> std::result::Result<Self::Value, aya::maps::MapError> {
        self.get(key, 0)
    }
    fn delete(&mut self, key: &K) -> std::result::Result<(), aya::maps::MapError> {
        self.remove(key)
    }
}

/// The drop buffers are shared by all CPUs. The tracepoint programs may run in process
/// context, where they can be preempted past the grace period; reading and deleting key by
/// key keeps the window in which such a late update is lost to one syscall.
impl<K: aya::Pod, V: aya::Pod> IdleBuffer<K> for KernelHashMap<MapData, K, V> {
    type Value = V;
    fn key_list(&self) -> impl Iterator<Item = std::result::Result<K, aya::maps::MapError>> {
        self.keys()
    }
    fn read(&self, key: &K) -> std::result::Result<Self::Value, aya::maps::MapError> {
        self.get(key, 0)
    }
    fn delete(&mut self, key: &K) -> std::result::Result<(), aya::maps::MapError> {
        self.remove(key)
    }
}

/// Reads and deletes every entry of an idle buffer. Read, then delete, then hand out: if
/// either step fails the entry stays in the buffer and is drained the next time this buffer
/// is idle, never lost nor counted twice.
fn take_all<K, B: IdleBuffer<K>>(
    map: &mut B,
    name: &'static str,
    problems: &mut Vec<Error>,
) -> Vec<(K, B::Value)> {
    let mut keys = Vec::new();
    for key in map.key_list() {
        match key {
            Ok(k) => keys.push(k),
            Err(e) => {
                problems.push(map_io(name)(e));
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let value = match map.read(&key) {
            Ok(v) => v,
            // Deleted under us cannot happen (we are the only deleter); skip defensively.
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => {
                problems.push(map_io(name)(e));
                continue;
            }
        };
        if let Err(e) = map.delete(&key) {
            problems.push(map_io(name)(e));
            continue;
        }
        out.push((key, value));
    }
    out
}

/// The error for a failed operation on map `map`.
fn map_io<E: std::fmt::Display>(map: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::MapIo {
        map,
        detail: e.to_string(),
    }
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map {
        map: name,
        detail: "not in object".into(),
    })?;
    T::try_from(map).map_err(|e| Error::Map {
        map: name,
        detail: e.to_string(),
    })
}

/// The trace ring buffer the programs write to while a tracer is attached (read by
/// `trace::read_ring`, not by the drainer: it is a stream, not a table).
pub fn take_trace_ring(ebpf: &mut aya::Ebpf) -> Result<aya::maps::RingBuf<MapData>> {
    take(ebpf, maps::TRACE_EVENTS)
}

impl Drainer {
    pub fn new(ebpf: &mut aya::Ebpf, grace: Duration) -> Result<Self> {
        Ok(Self {
            buffers: [take(ebpf, maps::FLOWS_0)?, take(ebpf, maps::FLOWS_1)?],
            nat: [take(ebpf, maps::NAT_0)?, take(ebpf, maps::NAT_1)?],
            latency: [take(ebpf, maps::LATENCY_0)?, take(ebpf, maps::LATENCY_1)?],
            drops: [take(ebpf, maps::DROPS_0)?, take(ebpf, maps::DROPS_1)?],
            drops_lost: take(ebpf, maps::DROPS_LOST)?,
            cache: take(ebpf, maps::CACHE)?,
            control: take(ebpf, maps::CONTROL)?,
            counters: take(ebpf, maps::COUNTERS)?,
            grace,
        })
    }

    /// Sets latency sampling: one packet in `rate` (a power of two), 0 = off.
    pub fn set_latency_sampling(&mut self, rate: u32) -> Result<()> {
        self.control
            .set(CONTROL_LATENCY_SAMPLE, rate, 0)
            .map_err(map_io(maps::CONTROL))
    }

    fn active(&self) -> Result<u32> {
        self.control
            .get(&CONTROL_ACTIVE_BUFFER, 0)
            .map_err(map_io(maps::CONTROL))
    }

    /// Whether the programs write trace events now.
    pub fn tracing(&self) -> Result<bool> {
        Ok(self.active()? & CONTROL_TRACING != 0)
    }

    /// Turns the programs' trace events on or off (the `CONTROL_TRACING` bit of the word
    /// that also names the active buffer; only this drainer writes that word).
    pub fn set_tracing(&mut self, on: bool) -> Result<()> {
        let word = self.active()?;
        let word = if on {
            word | CONTROL_TRACING
        } else {
            word & !CONTROL_TRACING
        };
        self.control
            .set(CONTROL_ACTIVE_BUFFER, word, 0)
            .map_err(map_io(maps::CONTROL))
    }

    /// Flips the buffers and returns every flow of the one that was active.
    pub async fn drain(&mut self) -> Result<Drained> {
        let word = self.active()?;
        let old = word & 1;
        self.control
            .set(
                CONTROL_ACTIVE_BUFFER,
                (1 - old) | (word & CONTROL_TRACING),
                0,
            )
            .map_err(map_io(maps::CONTROL))?;
        tokio::time::sleep(self.grace).await;
        let mut merged: HashMap<FlowKey, FlowStats> = HashMap::new();
        let mut problems = Vec::new();
        self.drain_cache(old, &mut merged, &mut problems);
        let name = maps::FLOWS[usize::from(old != 0)];
        for (key, per_cpu) in take_all(&mut self.buffers[old as usize], name, &mut problems) {
            let stats = merged.entry(key).or_default();
            for cpu in per_cpu.iter() {
                stats.merge(cpu);
            }
        }
        let nat = self.drain_nat(old, &mut problems);
        let lname = maps::LATENCY[usize::from(old != 0)];
        let latency = take_all(&mut self.latency[old as usize], lname, &mut problems)
            .into_iter()
            .filter_map(|(key, per_cpu)| {
                let mut hist = LatencyHist::default();
                for cpu in per_cpu.iter() {
                    hist.merge(cpu);
                }
                (hist.count > 0).then_some(DrainedLatency { key, hist })
            })
            .collect();
        let dname = maps::DROPS[usize::from(old != 0)];
        let drops = take_all(&mut self.drops[old as usize], dname, &mut problems)
            .into_iter()
            .filter(|(_, stats)| stats.packets > 0)
            .map(|(key, stats)| DrainedDrop { key, stats })
            .collect();
        Ok(Drained {
            drops,
            flows: merged
                .into_iter()
                .filter(|(_, stats)| stats.packets > 0)
                .map(|(key, stats)| DrainedFlow { key, stats })
                .collect(),
            nat,
            latency,
            problems,
        })
    }

    /// Reads and clears the idle NAT buffer, key by key like the flow buffer.
    fn drain_nat(&mut self, half: u32, problems: &mut Vec<Error>) -> Vec<DrainedNat> {
        let name = maps::NAT[usize::from(half != 0)];
        let mut out = Vec::new();
        for (original, per_cpu) in take_all(&mut self.nat[half as usize], name, problems) {
            let mut record = NatRecord::default();
            for cpu in per_cpu.iter() {
                merge_nat(&mut record, cpu);
            }
            if record.sightings > 0 {
                out.push(DrainedNat { original, record });
            }
        }
        out
    }

    /// Collects and clears the idle half (`half`) of the per-CPU flow cache. A slot whose
    /// clearing fails is not counted now: it is read again next time.
    fn drain_cache(
        &mut self,
        half: u32,
        into: &mut HashMap<FlowKey, FlowStats>,
        problems: &mut Vec<Error>,
    ) {
        let io = map_io::<aya::maps::MapError>(maps::CACHE);
        for index in half * CACHE_SLOTS..(half + 1) * CACHE_SLOTS {
            let per_cpu = match self.cache.get(&index, 0) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(io(e));
                    continue;
                }
            };
            if !per_cpu.iter().any(|s| s.valid != 0) {
                continue;
            }
            let cleared = PerCpuValues::try_from(vec![CacheSlot::default(); per_cpu.len()])
                .map_err(map_io(maps::CACHE))
                .and_then(|zeros| self.cache.set(index, zeros, 0).map_err(&io));
            if let Err(e) = cleared {
                problems.push(e);
                continue;
            }
            for slot in per_cpu.iter().filter(|s| s.valid != 0) {
                into.entry(slot.key).or_default().merge(&slot.stats);
            }
        }
    }

    /// Drops the kernel could not record because the drop buffer was full, by reason code
    /// (the last slot: that code and every larger one), since the programs were loaded.
    pub fn drops_lost(&self) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for reason in 0..flowtrace_common::drops::LOST_REASON_SLOTS {
            let n = self
                .drops_lost
                .get(&reason, 0)
                .map_err(map_io(maps::DROPS_LOST))?;
            if n > 0 {
                out.push((reason, n));
            }
        }
        Ok(out)
    }

    /// Kernel-side counters (packets seen and every loss), summed over CPUs.
    pub fn counters(&self) -> Result<[u64; COUNTER_SLOTS as usize]> {
        let mut out = [0u64; COUNTER_SLOTS as usize];
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_io(maps::COUNTERS))?;
            out[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
