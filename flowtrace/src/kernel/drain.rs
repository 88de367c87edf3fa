//! Draining the kernel's flow data without losing updates.
//!
//! Every packet is counted in the active half of the per-CPU flow cache (named by
//! `CONTROL[active]`). A slot taken by another flow goes to user space through the event
//! ring, which also carries NAT rewrites and latency samples; the ring is read as it fills
//! (`EventRing::pump`, woken by the ring, under a lock of its own so that a drain in
//! progress never holds it up) and its records are summed here until the next drain. A drain flips `active`, waits for programs that already read the old value to
//! finish (TC programs run with bottom halves disabled and take microseconds; the grace
//! period is milliseconds), reads what the ring holds, then reads and clears the cache half
//! that now has no writer. An update is therefore in the ring, in the drained half or in the
//! other half, never lost between a read and a clear. The residual risk is a program run
//! stalled for longer than the grace period (e.g. a preempted vCPU) writing into a slot
//! between our read and clear of it; clearing slot by slot keeps that window to one syscall.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use aya::maps::{Array, HashMap as KernelHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use flowtrace_common::{
    drops::{DropKey, DropStats},
    latency_control, CacheSlot, Counter, FlowKey, FlowStats, LatencyEvent, LatencyHist, LatencyKey,
    NatEvent, NatRecord, Tuple, CONTROL_ACTIVE_BUFFER, CONTROL_LATENCY_SAMPLE, CONTROL_TRACING,
    COUNTER_SLOTS, EVENT_FLOW, EVENT_LATENCY, EVENT_NAT,
};

use flowtrace_common::maps;

use crate::{
    error::{Error, Result},
    util::FastHash,
};

/// Default wait between flipping the active buffer and reading the old one.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(5);

/// One flow's counters at one hook, summed over the records that were folded together. A
/// drain may hold a flow at a hook more than once (see `FlowFold`): readers add them up.
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

/// What one drain produced: the flows, the rewrites, the latency samples, the drops, how
/// full the kernel's buffers were, and the map errors met on the way (each left its entry in
/// place for the next drain).
#[derive(Debug, Default)]
pub struct Drained {
    pub flows: Vec<DrainedFlow>,
    pub nat: Vec<DrainedNat>,
    pub latency: Vec<DrainedLatency>,
    pub drops: Vec<DrainedDrop>,
    pub fill: BufferFill,
    pub problems: Vec<Error>,
}

/// How full the kernel's buffers were during one drain period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferFill {
    /// Slots of the drained cache half that held a flow, over all CPUs.
    pub cache_slots_used: usize,
    /// The most bytes the event ring held at one read (its backlog), since the last drain.
    pub ring_backlog_bytes: usize,
    /// Event records that were not a known kind or size (never expected).
    pub bad_records: u64,
}

/// The kernel buffers' sizes, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSizes {
    /// Slots per cache half on each CPU.
    pub cache_slots: u32,
    /// Possible CPUs (each has its own cache).
    pub cpus: u32,
    /// Bytes of the event ring.
    pub ring_bytes: u32,
}

/// Slots of `FlowFold`'s index of recent keys at the start of a period: 512 KiB, which stays
/// in the CPU's cache.
const RECENT_SLOTS: usize = 1 << 16;

/// The most slots a compaction grows the index to (8 MiB).
const RECENT_SLOTS_MAX: usize = 1 << 20;

/// One key in this many (by hash) is followed exactly by `FlowFold`, to estimate how many of
/// its entries repeat a key.
const REPEAT_SAMPLE: u64 = 64;

/// The flow records of one period, in the order they came, each folded into an earlier
/// record of the same flow and hook when the index of recent keys still points at it.
///
/// Not a hash table of every key: in a flood of new tuples, where each record is a new key,
/// such a table is hundreds of megabytes probed at random (a cache and TLB miss per
/// record, several hundred nanoseconds). Here a record costs a hash, a look at a small
/// direct-mapped index and an append. A flow whose records keep coming (a busy flow that
/// loses its cache slot again and again) finds its last record through the index and is
/// summed there; a key pushed out of the index by another starts a new entry, so a drain
/// can hold a flow at a hook more than once, and every reader sums (`DrainedFlow`).
///
/// Where more busy keys than the index holds keep coming back (a node with 100 000 active
/// flows thrashing the kernel's cache), entries would grow with records rather than keys. So
/// one key in `REPEAT_SAMPLE` is followed exactly, and each time the vector has doubled it
/// is compacted (summed per key through a hash table, once) if the sample says a quarter or
/// more of its entries repeat a key, and the index grows to twice the keys it then holds (up
/// to `RECENT_SLOTS_MAX`), so that their next records find them. In a flood, where entries do
/// not repeat, it never is.
#[derive(Debug)]
struct FlowFold {
    flows: Vec<DrainedFlow>,
    /// (the key's hash's high half, its entry's position + 1), 0 for an empty slot.
    recent: Box<[(u32, u32)]>,
    hasher: FastHash,
    /// The hashes of the sampled keys pushed this period.
    sampled: std::collections::HashSet<u64, FastHash>,
    /// Sampled keys pushed since the last compaction, and those of them that were pushed
    /// before (their entry repeats one already in the vector).
    sample_pushes: u64,
    sample_repeats: u64,
    /// The length at which the repeats are next looked at.
    next_check: usize,
    compactions: u32,
}

impl Default for FlowFold {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl FlowFold {
    fn with_capacity(flows: usize) -> Self {
        Self {
            flows: Vec::with_capacity(flows),
            recent: vec![(0, 0); RECENT_SLOTS].into_boxed_slice(),
            hasher: FastHash::default(),
            sampled: std::collections::HashSet::default(),
            sample_pushes: 0,
            sample_repeats: 0,
            next_check: 2 * RECENT_SLOTS,
            compactions: 0,
        }
    }

    fn len(&self) -> usize {
        self.flows.len()
    }

    /// A key's hash's slot in the index and the tag kept there.
    fn place(&self, hash: u64) -> (usize, u32) {
        (hash as usize & (self.recent.len() - 1), (hash >> 32) as u32)
    }

    /// Adds one record of a flow at a hook (nothing for a record without packets).
    fn add(&mut self, key: &FlowKey, stats: &FlowStats) {
        if stats.packets == 0 {
            return;
        }
        let hash = self.hasher.hash_one(key);
        let (slot, tag) = self.place(hash);
        let (seen_tag, at) = self.recent[slot];
        if at != 0 && seen_tag == tag {
            if let Some(f) = self
                .flows
                .get_mut(at as usize - 1)
                .filter(|f| f.key == *key)
            {
                f.stats.merge(stats);
                return;
            }
        }
        self.flows.push(DrainedFlow {
            key: *key,
            stats: *stats,
        });
        // Past 4G entries the index stops pointing (they are still appended and summed).
        if let Ok(at) = u32::try_from(self.flows.len()) {
            self.recent[slot] = (tag, at);
        }
        if (hash >> 16).is_multiple_of(REPEAT_SAMPLE) {
            self.sample_pushes += 1;
            if !self.sampled.insert(hash) {
                self.sample_repeats += 1;
            }
        }
        if self.flows.len() >= self.next_check {
            if self.sample_repeats * 4 >= self.sample_pushes {
                self.compact();
            }
            self.next_check = 2 * self.flows.len().max(RECENT_SLOTS);
        }
    }

    /// Sums the entries per key, once each, in their order of first arrival.
    fn compact(&mut self) {
        let mut at: HashMap<FlowKey, usize, FastHash> =
            HashMap::with_capacity_and_hasher(self.flows.len() / 2, self.hasher.clone());
        let mut kept: Vec<DrainedFlow> = Vec::with_capacity(self.flows.len() / 2);
        for f in self.flows.drain(..) {
            match at.entry(f.key) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    kept[*e.get()].stats.merge(&f.stats);
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(kept.len());
                    kept.push(f);
                }
            }
        }
        self.flows = kept;
        // The positions moved: the index is rebuilt, with room for the keys it now knows.
        let slots = (2 * self.flows.len())
            .next_power_of_two()
            .clamp(self.recent.len(), RECENT_SLOTS_MAX);
        if slots > self.recent.len() {
            self.recent = vec![(0, 0); slots].into_boxed_slice();
        } else {
            self.recent.fill((0, 0));
        }
        for i in 0..self.flows.len() {
            let (slot, tag) = self.place(self.hasher.hash_one(self.flows[i].key));
            if let Ok(at) = u32::try_from(i + 1) {
                self.recent[slot] = (tag, at);
            }
        }
        self.sample_pushes = 0;
        self.sample_repeats = 0;
        self.compactions += 1;
    }
}

/// The ring's records summed since the last drain.
#[derive(Debug, Default)]
struct Pending {
    flows: FlowFold,
    nat: HashMap<Tuple, NatRecord, FastHash>,
    latency: HashMap<LatencyKey, LatencyHist, FastHash>,
    backlog_bytes: usize,
    bad: u64,
}

impl Pending {
    /// Adds one record of the event ring.
    fn add(&mut self, bytes: &[u8]) {
        let Some(kind) = bytes
            .get(..4)
            .map(|k| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]))
        else {
            self.bad += 1;
            return;
        };
        match kind {
            EVENT_FLOW => match decode::<CacheSlot>(bytes) {
                Some(slot) => self.flows.add(&slot.key, &slot.stats),
                None => self.bad += 1,
            },
            EVENT_NAT => match decode::<NatEvent>(bytes) {
                Some(e) => {
                    let seen = NatRecord {
                        translated: e.translated,
                        from_ifindex: e.from_ifindex,
                        to_ifindex: e.to_ifindex,
                        from_direction: e.from_direction,
                        to_direction: e.to_direction,
                        _pad0: 0,
                        sightings: 1,
                        first_seen_ns: e.seen_ns,
                        last_seen_ns: e.seen_ns,
                    };
                    merge_nat(self.nat.entry(e.original).or_default(), &seen);
                }
                None => self.bad += 1,
            },
            EVENT_LATENCY => match decode::<LatencyEvent>(bytes) {
                Some(e) => self.latency.entry(e.key).or_default().add(e.ns),
                None => self.bad += 1,
            },
            _ => self.bad += 1,
        }
    }
}

impl Pending {
    fn with_flow_capacity(flows: usize) -> Self {
        Self {
            flows: FlowFold::with_capacity(flows),
            nat: HashMap::default(),
            latency: HashMap::default(),
            backlog_bytes: 0,
            bad: 0,
        }
    }

    /// What was summed, as a drain hands it on (the cache's and the drop buffers' parts
    /// added by the drain).
    fn into_drained(self) -> Drained {
        Drained {
            flows: self.flows.flows,
            nat: self
                .nat
                .into_iter()
                .map(|(original, record)| DrainedNat { original, record })
                .collect(),
            latency: self
                .latency
                .into_iter()
                .map(|(key, hist)| DrainedLatency { key, hist })
                .collect(),
            fill: BufferFill {
                ring_backlog_bytes: self.backlog_bytes,
                bad_records: self.bad,
                ..BufferFill::default()
            },
            ..Drained::default()
        }
    }
}

/// Folds event-ring records into what one drain returns, exactly as records read from the
/// ring are (for benchmarks and tests of the agent's side; the kernel's side is not involved).
/// `capacity` is the room for flow entries to start with (the agent uses the last period's count).
pub fn fold_records<'a>(records: impl IntoIterator<Item = &'a [u8]>, capacity: usize) -> Drained {
    let mut pending = Pending::with_flow_capacity(capacity);
    for r in records {
        pending.add(r);
    }
    pending.into_drained()
}

/// A record of the ring as `T` (plain old data), if it is long enough.
fn decode<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; the event types are plain old data (any bit pattern is
    // a value) and read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
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

/// The event ring and the records read from it since the last drain (`Drainer::ring`).
pub struct EventRing {
    events: RingBuf<MapData>,
    /// The ring's size: the most one pump reads (see `pump`).
    ring_bytes: usize,
    pending: Pending,
}

/// What one `EventRing::pump` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pumped {
    pub records: usize,
    /// It stopped at its bound: the ring may hold more (or, if the bound fell on its last
    /// record, nothing: the next pump then reads none).
    pub more: bool,
}

impl EventRing {
    /// Reads the records the event ring holds now and sums them into what the next drain
    /// returns: at most the ring's size in bytes (all it can hold when the pump begins), so
    /// that a pump ends even while the programs write as fast as it reads; `more` says it
    /// left records behind for the next one.
    pub fn pump(&mut self) -> Pumped {
        let (mut records, mut bytes) = (0, 0);
        let mut more = false;
        while let Some(item) = self.events.next() {
            records += 1;
            bytes += item.len() + 8;
            self.pending.add(&item);
            if bytes >= self.ring_bytes {
                more = true;
                break;
            }
        }
        self.pending.backlog_bytes = self.pending.backlog_bytes.max(bytes);
        Pumped { records, more }
    }

    /// Everything read so far and what the ring held when the drain began (one pump: what
    /// the programs write meanwhile goes to the next drain).
    /// The next period's flows start with room for this one's: under a sustained burst the
    /// vector fills without growing step by step (each step copies it and, meanwhile, holds
    /// it twice); after the burst the next hint is small again.
    fn take(&mut self) -> Pending {
        self.pump();
        let hint = self.pending.flows.len();
        std::mem::replace(&mut self.pending, Pending::with_flow_capacity(hint))
    }
}

/// The maps the agent reads, taken out of the loaded object.
pub struct Drainer {
    ring: Arc<tokio::sync::Mutex<EventRing>>,
    /// A copy of the event ring's descriptor, to poll.
    ring_fd: OwnedFd,
    sizes: BufferSizes,
    drops: [KernelHashMap<MapData, DropKey, DropStats>; 2],
    drops_lost: Array<MapData, u64>,
    cache: PerCpuArray<MapData, CacheSlot>,
    control: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    grace: Duration,
}

/// What a drain does to an idle buffer: list its keys, read an entry, delete it.
trait IdleBuffer<K> {
    type Value;
    fn key_list(&self) -> impl Iterator<Item = std::result::Result<K, aya::maps::MapError>>;
    fn read(&self, key: &K) -> std::result::Result<Self::Value, aya::maps::MapError>;
    fn delete(&mut self, key: &K) -> std::result::Result<(), aya::maps::MapError>;
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
    pub fn new(ebpf: &mut aya::Ebpf, sizes: BufferSizes, grace: Duration) -> Result<Self> {
        let events: RingBuf<MapData> = take(ebpf, maps::EVENTS)?;
        let ring_fd = events
            .as_fd()
            .try_clone_to_owned()
            .map_err(map_io(maps::EVENTS))?;
        Ok(Self {
            ring: Arc::new(tokio::sync::Mutex::new(EventRing {
                events,
                ring_bytes: sizes.ring_bytes as usize,
                pending: Pending::default(),
            })),
            ring_fd,
            sizes,
            drops: [take(ebpf, maps::DROPS_0)?, take(ebpf, maps::DROPS_1)?],
            drops_lost: take(ebpf, maps::DROPS_LOST)?,
            cache: take(ebpf, maps::CACHE)?,
            control: take(ebpf, maps::CONTROL)?,
            counters: take(ebpf, maps::COUNTERS)?,
            grace,
        })
    }

    /// Sets latency sampling: one packet in `rate` (a power of two), 0 = off; of those, at
    /// most one per flow and hook in each window of 2^`window_shift` ns (0: no cap).
    pub fn set_latency_sampling(&mut self, rate: u32, window_shift: u32) -> Result<()> {
        self.control
            .set(
                CONTROL_LATENCY_SAMPLE,
                latency_control(rate, window_shift),
                0,
            )
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

    /// The kernel buffers' sizes.
    pub fn sizes(&self) -> BufferSizes {
        self.sizes
    }

    /// A file descriptor of the event ring that polls readable when records wait (for the
    /// task that calls [`EventRing::pump`]).
    pub fn ring_wakeups(&self) -> Result<OwnedFd> {
        self.ring_fd.try_clone().map_err(map_io(maps::EVENTS))
    }

    /// The event ring, for the task that reads it as it fills. A drain takes its lock only
    /// to take what was read, never across the grace period or the cache's reading.
    pub fn ring(&self) -> Arc<tokio::sync::Mutex<EventRing>> {
        self.ring.clone()
    }

    /// Flips the buffers and returns every flow of the one that was active, with what the
    /// event ring brought since the last drain.
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
        let mut pending = self.ring.lock().await.take();
        let mut problems = Vec::new();
        let cache_slots_used = self.drain_cache(old, &mut pending.flows, &mut problems);
        let dname = maps::DROPS[usize::from(old != 0)];
        let drops = take_all(&mut self.drops[old as usize], dname, &mut problems)
            .into_iter()
            .filter(|(_, stats)| stats.packets > 0)
            .map(|(key, stats)| DrainedDrop { key, stats })
            .collect();
        let mut drained = pending.into_drained();
        drained.drops = drops;
        drained.fill.cache_slots_used = cache_slots_used;
        drained.problems = problems;
        Ok(drained)
    }

    /// Collects and clears the idle half (`half`) of the per-CPU flow cache; returns how
    /// many slots held a flow. A slot whose clearing fails is not counted now: it is read
    /// again next time.
    fn drain_cache(&mut self, half: u32, into: &mut FlowFold, problems: &mut Vec<Error>) -> usize {
        let io = map_io::<aya::maps::MapError>(maps::CACHE);
        let slots = self.sizes.cache_slots;
        let mut used = 0;
        for index in half * slots..(half + 1) * slots {
            let per_cpu = match self.cache.get(&index, 0) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(io(e));
                    continue;
                }
            };
            if !per_cpu.iter().any(|s| s.kind != 0) {
                continue;
            }
            let cleared = PerCpuValues::try_from(vec![CacheSlot::default(); per_cpu.len()])
                .map_err(map_io(maps::CACHE))
                .and_then(|zeros| self.cache.set(index, zeros, 0).map_err(&io));
            if let Err(e) = cleared {
                problems.push(e);
                continue;
            }
            for slot in per_cpu.iter().filter(|s| s.kind != 0) {
                used += 1;
                into.add(&slot.key, &slot.stats);
            }
        }
        used
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, ifindex: u32) -> FlowKey {
        FlowKey {
            src_port: port,
            dst_port: 80,
            ifindex,
            ip_version: 4,
            protocol: 6,
            ..FlowKey::default()
        }
    }

    fn stats(packets: u64, first: u64, last: u64) -> FlowStats {
        FlowStats {
            packets,
            bytes: packets * 100,
            first_seen_ns: first,
            last_seen_ns: last,
            ..FlowStats::default()
        }
    }

    /// Per (key), the sums over every entry of the fold.
    fn sums(f: &FlowFold) -> HashMap<FlowKey, (u64, u64, u64, u64)> {
        let mut out: HashMap<FlowKey, (u64, u64, u64, u64)> = HashMap::new();
        for d in &f.flows {
            let e = out.entry(d.key).or_insert((0, 0, u64::MAX, 0));
            e.0 += d.stats.packets;
            e.1 += d.stats.bytes;
            e.2 = e.2.min(d.stats.first_seen_ns);
            e.3 = e.3.max(d.stats.last_seen_ns);
        }
        out
    }

    #[test]
    fn records_of_one_flow_and_hook_are_summed_in_one_entry() {
        let mut f = FlowFold::default();
        for i in 0..1000 {
            f.add(&key(1, 7), &stats(2, 10 + i, 20 + i));
            f.add(&key(1, 8), &stats(1, 5, 6));
        }
        f.add(&key(1, 7), &stats(0, 1, 1));
        assert_eq!(f.len(), 2);
        let s = sums(&f);
        assert_eq!(s[&key(1, 7)], (2000, 200_000, 10, 1019));
        assert_eq!(s[&key(1, 8)], (1000, 100_000, 5, 6));
    }

    #[test]
    fn keys_beyond_the_index_keep_every_count() {
        // Four times as many keys as the index has slots, each seen three times, interleaved:
        // entries repeat where keys pushed each other out, and nothing is lost.
        let n = RECENT_SLOTS * 4;
        let mut f = FlowFold::with_capacity(16);
        for round in 0..3u64 {
            for k in 0..n {
                let k = key((k % 60_000) as u16, (k / 60_000) as u32);
                f.add(&k, &stats(1, round, round));
            }
        }
        assert!(f.len() >= n && f.len() <= 3 * n, "{} entries", f.len());
        let s = sums(&f);
        assert_eq!(s.len(), n);
        assert!(s.values().all(|v| *v == (3, 300, 0, 2)));
    }

    #[test]
    fn busy_keys_beyond_the_index_are_compacted_and_a_flood_is_not() {
        // 200 000 busy keys, each coming back ten times: compacted as the vector doubles, so
        // it stays near the keys' count, not the records'.
        let n = 200_000usize;
        let mut f = FlowFold::default();
        for round in 0..10u64 {
            for k in 0..n {
                let k = key((k % 60_000) as u16, (k / 60_000) as u32);
                f.add(&k, &stats(1, round, round));
            }
        }
        assert!(f.compactions > 0);
        assert!(f.len() <= 4 * n, "{} entries for {n} keys", f.len());
        let s = sums(&f);
        assert_eq!(s.len(), n);
        assert!(s.values().all(|v| *v == (10, 1000, 0, 9)));
        // 1 000 000 keys, each once: nothing repeats, nothing is compacted.
        let mut f = FlowFold::default();
        for k in 0..1_000_000usize {
            let k = key((k % 60_000) as u16, (k / 60_000) as u32);
            f.add(&k, &stats(1, 1, 1));
        }
        assert_eq!((f.len(), f.compactions), (1_000_000, 0));
    }

    #[test]
    fn a_record_without_packets_adds_no_entry() {
        let mut f = FlowFold::default();
        f.add(&key(1, 1), &stats(0, 1, 1));
        assert_eq!(f.len(), 0);
    }
}
