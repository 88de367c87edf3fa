//! Draining the kernel's flow buffers without losing updates.
//!
//! The kernel writes every update into the buffer named by `CONTROL[active]`. A drain
//! flips `active`, waits for programs that already read the old value to finish (TC
//! programs run with bottom halves disabled and take microseconds; the grace period is
//! milliseconds), then reads and deletes every entry of the buffer that now has no
//! writer. An update is therefore either in the drained buffer before it is read or in
//! the other buffer, never lost between a read and a delete. The residual risk is a
//! program run stalled for longer than the grace period (e.g. a preempted vCPU); the
//! update then lands in the drained buffer after our read and is deleted with it; a
//! per-key lookup-then-delete keeps that window to one syscall per key.

use std::time::Duration;

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use flowtrace_common::{Counter, FlowKey, FlowStats, CONTROL_ACTIVE_BUFFER, COUNTER_SLOTS};

use crate::error::{Error, Result};

/// Default wait between flipping the active buffer and reading the old one.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(5);

/// One drained flow at one hook, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainedFlow {
    pub key: FlowKey,
    pub stats: FlowStats,
}

/// The maps the agent reads, taken out of the loaded object.
pub struct Drainer {
    buffers: [PerCpuHashMap<MapData, FlowKey, FlowStats>; 2],
    control: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    grace: Duration,
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Map { map: name, detail: "not in object".into() })?;
    T::try_from(map).map_err(|e| Error::Map { map: name, detail: e.to_string() })
}

impl Drainer {
    pub fn new(ebpf: &mut aya::Ebpf, grace: Duration) -> Result<Self> {
        Ok(Self {
            buffers: [take(ebpf, "FLOWS_0")?, take(ebpf, "FLOWS_1")?],
            control: take(ebpf, "CONTROL")?,
            counters: take(ebpf, "COUNTERS")?,
            grace,
        })
    }

    fn active(&self) -> Result<u32> {
        self.control
            .get(&CONTROL_ACTIVE_BUFFER, 0)
            .map_err(|e| Error::MapIo { map: "CONTROL", detail: e.to_string() })
    }

    /// Flips the buffers and returns every flow of the one that was active.
    pub async fn drain(&mut self) -> Result<Vec<DrainedFlow>> {
        let old = self.active()? & 1;
        self.control
            .set(CONTROL_ACTIVE_BUFFER, 1 - old, 0)
            .map_err(|e| Error::MapIo { map: "CONTROL", detail: e.to_string() })?;
        tokio::time::sleep(self.grace).await;
        let map = &mut self.buffers[old as usize];
        let name = if old == 0 { "FLOWS_0" } else { "FLOWS_1" };
        let keys: Vec<FlowKey> = map
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::MapIo { map: name, detail: e.to_string() })?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let per_cpu = match map.get(&key, 0) {
                Ok(v) => v,
                // Deleted under us cannot happen (we are the only deleter); skip defensively.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(Error::MapIo { map: name, detail: e.to_string() }),
            };
            map.remove(&key).map_err(|e| Error::MapIo { map: name, detail: e.to_string() })?;
            let mut stats = FlowStats::default();
            for cpu in per_cpu.iter() {
                stats.merge(cpu);
            }
            if stats.packets > 0 {
                out.push(DrainedFlow { key, stats });
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
                .map_err(|e| Error::MapIo { map: "COUNTERS", detail: e.to_string() })?;
            out[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
