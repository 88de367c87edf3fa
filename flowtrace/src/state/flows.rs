//! The agent's flow table: one entry per 5-tuple, each with the hops it was seen on.
//!
//! The kernel reports (5-tuple, hop) counters; this module folds drains into flows and
//! renders them for the API. Times are kept as CLOCK_MONOTONIC nanoseconds (what the kernel
//! records) and converted to Unix time only for output.

use std::{
    collections::{HashMap, HashSet},
    hash::BuildHasher,
    net::IpAddr,
    sync::Arc,
};

use flowtrace_common::FlowStats;

use crate::{
    kernel::drain::DrainedFlow,
    model::{
        tcp_flags_string, Direction, Endpoint, EndpointKind, FlowRecord, FlowTuple, Hop, HopRecord,
    },
    util::FastHash,
};

/// Names an address (the metadata cache's `resolve`); `None` when nobody is known to hold it.
pub type Resolver<'a> = &'a dyn Fn(&IpAddr) -> Option<Arc<Endpoint>>;

#[derive(Clone, Debug, Default)]
struct HopCounters {
    /// Shared by every hop on this interface (see `FlowTable::interfaces`).
    interface: Arc<str>,
    stats: FlowStats,
}

/// One flow's counters. Kept small: a node holds up to `--max-flows` of them. Hops are a
/// short vector (a path has a few), not a map, and interface names are shared, not copied.
#[derive(Clone, Debug, Default)]
struct FlowEntry {
    hops: Vec<(Hop, HopCounters)>,
    last_seen_ns: u64,
    /// Who the addresses belonged to when the flow last had packets (a pod deleted later,
    /// or an address reused by a new pod, does not rename past traffic).
    src_name: Option<Arc<Endpoint>>,
    dst_name: Option<Arc<Endpoint>>,
}

/// Flows of one agent, bounded in size and age.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowTuple, FlowEntry, FastHash>,
    /// Interface names, one allocation each, shared by the hops that name them.
    interfaces: HashMap<String, Arc<str>>,
    max_flows: usize,
    idle_timeout_ns: u64,
    evicted: u64,
    expired: u64,
}

impl FlowTable {
    pub fn new(max_flows: usize, idle_timeout_ns: u64) -> Self {
        Self {
            flows: HashMap::default(),
            interfaces: HashMap::new(),
            max_flows,
            idle_timeout_ns,
            evicted: 0,
            expired: 0,
        }
    }

    /// Folds one drain in. `names` resolves an ifindex to its interface name at drain time,
    /// so a hop keeps its name after the interface is gone; `resolve` names the addresses
    /// of the flows that had packets.
    pub fn merge(
        &mut self,
        drained: &[DrainedFlow],
        names: &dyn Fn(u32) -> Option<String>,
        resolve: Resolver<'_>,
    ) {
        self.merge_except(drained, &[], names, resolve);
    }

    /// `merge`, leaving out the drain's entries that `refused` flags (`make_room`'s: one flag
    /// per entry, empty when none is refused).
    fn merge_except(
        &mut self,
        drained: &[DrainedFlow],
        refused: &[bool],
        names: &dyn Fn(u32) -> Option<String>,
        resolve: Resolver<'_>,
    ) {
        // A drain brings many flows of few addresses and interfaces: each is looked up once
        // per drain (a miss in the metadata walks the nodes' pod CIDRs).
        let mut named: HashMap<IpAddr, Option<Arc<Endpoint>>, FastHash> = HashMap::default();
        let mut interface_of: HashMap<u32, Arc<str>> = HashMap::new();
        for (entry_at, d) in drained.iter().enumerate() {
            if refused.get(entry_at).copied().unwrap_or(false) {
                continue;
            }
            let tuple = FlowTuple::from_key(&d.key);
            let hop = Hop {
                ifindex: d.key.ifindex,
                direction: Direction::from_kernel(d.key.direction),
            };
            // Room for two hops from the start (a pod's veth and the overlay, or two veths):
            // one allocation per flow rather than a second on its next hop.
            let entry = self.flows.entry(tuple).or_insert_with(|| FlowEntry {
                hops: Vec::with_capacity(2),
                ..FlowEntry::default()
            });
            let at = match entry.hops.iter().position(|(h, _)| *h == hop) {
                Some(i) => i,
                None => {
                    let interfaces = &mut self.interfaces;
                    let interface = interface_of
                        .entry(hop.ifindex)
                        .or_insert_with(|| {
                            let name =
                                names(hop.ifindex).unwrap_or_else(|| format!("if{}", hop.ifindex));
                            match interfaces.get(&name) {
                                Some(shared) => shared.clone(),
                                None => {
                                    let shared: Arc<str> = Arc::from(name.as_str());
                                    interfaces.insert(name, shared.clone());
                                    shared
                                }
                            }
                        })
                        .clone();
                    entry.hops.push((
                        hop,
                        HopCounters {
                            interface,
                            stats: FlowStats::default(),
                        },
                    ));
                    entry.hops.len() - 1
                }
            };
            entry.hops[at].1.stats.merge(&d.stats);
            entry.last_seen_ns = entry.last_seen_ns.max(d.stats.last_seen_ns);
            // An address nobody is known to hold (metadata away or not synced) keeps the
            // name it had; "somewhere in a node's pod network" is no name to keep: it is
            // asked again when the flow is read, by when the pod may be known. The name is
            // replaced only when it changed (a flow's later entries name it the same).
            for (ip, kept) in [
                (&tuple.src, &mut entry.src_name),
                (&tuple.dst, &mut entry.dst_name),
            ] {
                let name = named.entry(*ip).or_insert_with(|| resolve(ip));
                if let Some(n) = name.as_ref() {
                    let same = kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, n));
                    if n.kind != EndpointKind::PodNetwork && !same {
                        *kept = Some(n.clone());
                    }
                }
            }
        }
    }

    /// Folds one drain in at `now_mono_ns`, within the table's bounds: flows idle past the
    /// timeout go first (counted as expired), then room is made for the drain's new tuples
    /// (`make_room`), the drain is merged (`merge`) and whatever is still beyond the cap is
    /// evicted. Each flow is looked at once for idleness per drain: the merged ones have just
    /// been seen.
    pub fn fold(
        &mut self,
        drained: &[DrainedFlow],
        now_mono_ns: u64,
        names: &dyn Fn(u32) -> Option<String>,
        resolve: Resolver<'_>,
    ) {
        self.expire_idle(now_mono_ns);
        let refused = self.make_room(drained);
        self.merge_except(drained, &refused, names, resolve);
        self.enforce_cap();
    }

    /// Evicts, before `drained` is merged, the flows the cap would evict after it, and
    /// returns, one flag per entry of `drained`, whether its tuple is one the cap would evict
    /// as soon as it was merged (left out of the merge, counted as evicted; empty when none
    /// is). So a burst of new flows costs no more than the cap's worth of entries: the
    /// evicted flows' memory is free before the new ones take theirs, and a tuple that could
    /// not stay is never built.
    ///
    /// The cap leaves the `max_flows` most recently seen flows (`evict_oldest`). After the
    /// merge, the flows the drain touches are seen as recently as the drain saw them, later
    /// than any it does not touch; so the untouched go first, oldest first, as many as the
    /// drain brings new tuples beyond the room left. If the drain alone brings more tuples
    /// than the cap, the newest `max_flows` of them (each as seen in the table or the drain,
    /// whichever is later) stay and the rest are refused. Run after the idle flows expired
    /// (`fold`): the cap evicts only what the timeout left.
    fn make_room(&mut self, drained: &[DrainedFlow]) -> Vec<bool> {
        let room = self.max_flows.saturating_sub(self.flows.len());
        if drained.len() <= room {
            return Vec::new();
        }
        // The tuples the drain touches, numbered, each entry's tuple by number, and per tuple
        // when the drain last saw it.
        let Numbered { tuples, of_entry } = number_tuples(drained);
        let mut seen: Vec<u64> = vec![0; tuples.len()];
        for (d, &n) in drained.iter().zip(&of_entry) {
            let at = &mut seen[n as usize];
            *at = (*at).max(d.stats.last_seen_ns);
        }
        // When the table last saw each, if it holds it.
        let held: Vec<Option<u64>> = tuples
            .iter()
            .map(|t| self.flows.get(t).map(|f| f.last_seen_ns))
            .collect();
        let incoming = held.iter().filter(|h| h.is_none()).count();
        // The held flows the drain touches: they stay for the merge.
        let touched: HashSet<FlowTuple, FastHash> = tuples
            .iter()
            .zip(&held)
            .filter(|(_, h)| h.is_some())
            .map(|(t, _)| *t)
            .collect();
        self.evict_oldest(incoming.saturating_sub(room), |t| touched.contains(t));
        let over = (self.flows.len() + incoming).saturating_sub(self.max_flows);
        // Only flows the drain touches are left in the table (it held at most the cap
        // before: `fold` keeps it there).
        debug_assert!(over <= seen.len());
        let over = over.min(seen.len());
        if over == 0 {
            return Vec::new();
        }
        let mut ages: Vec<(u64, u32)> = seen
            .iter()
            .zip(&held)
            .enumerate()
            .map(|(n, (&s, h))| (h.map_or(s, |h| s.max(h)), n as u32))
            .collect();
        // Oldest first and, as `evict_oldest` after a merge would, ties by tuple.
        ages.select_nth_unstable_by(over - 1, |a, b| {
            (a.0, &tuples[a.1 as usize]).cmp(&(b.0, &tuples[b.1 as usize]))
        });
        let mut refused = vec![false; seen.len()];
        for &(_, n) in &ages[..over] {
            refused[n as usize] = true;
        }
        // The refused tuples the table holds go now; the others are never built.
        for (n, t) in tuples.iter().enumerate() {
            if refused[n] && held[n].is_some() {
                self.flows.remove(t);
            }
        }
        self.evicted += over as u64;
        of_entry.iter().map(|&n| refused[n as usize]).collect()
    }

    /// Drops flows idle for longer than the timeout, then the oldest beyond the size cap.
    pub fn expire(&mut self, now_mono_ns: u64) {
        self.expire_idle(now_mono_ns);
        self.enforce_cap();
    }

    /// Evicts the oldest flows beyond the size cap, and forgets interface names no hop uses.
    fn enforce_cap(&mut self) {
        if self.flows.len() > self.max_flows {
            self.evict_oldest(self.flows.len() - self.max_flows, |_| false);
        }
        // Names no hop uses any more (interfaces of pods gone with their flows).
        self.interfaces
            .retain(|_, shared| Arc::strong_count(shared) > 1);
    }

    /// Drops flows idle for longer than the timeout, counted as expired.
    fn expire_idle(&mut self, now_mono_ns: u64) {
        let timeout = self.idle_timeout_ns;
        let before = self.flows.len();
        self.flows
            .retain(|_, f| now_mono_ns.saturating_sub(f.last_seen_ns) <= timeout);
        self.expired += (before - self.flows.len()) as u64;
    }

    /// Removes the `n` flows seen least recently, leaving those `keep` names, counted as
    /// evicted.
    fn evict_oldest(&mut self, n: usize, keep: impl Fn(&FlowTuple) -> bool) {
        if n == 0 {
            return;
        }
        let mut ages: Vec<(u64, FlowTuple)> = self
            .flows
            .iter()
            .filter(|(t, _)| !keep(t))
            .map(|(t, f)| (f.last_seen_ns, *t))
            .collect();
        let n = n.min(ages.len());
        if n == 0 {
            return;
        }
        // The oldest `n`, in no order: a selection, not a sort of the whole table.
        ages.select_nth_unstable(n - 1);
        for (_, t) in ages.into_iter().take(n) {
            self.flows.remove(&t);
        }
        self.evicted += n as u64;
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether a flow with this tuple is in the table (crossed a traced hook).
    pub fn contains(&self, t: &FlowTuple) -> bool {
        self.flows.contains_key(t)
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows removed because the table was full (oldest first).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Flows removed because they were idle.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Renders every flow for the API. `mono_to_unix_ns` is added to kernel timestamps;
    /// addresses never named at drain time are named now if `resolve` can.
    pub fn snapshot(&self, mono_to_unix_ns: i128, resolve: Resolver<'_>) -> Vec<FlowRecord> {
        let unix = |mono: u64| (mono as i128 + mono_to_unix_ns).max(0) as u64;
        let mut out: Vec<FlowRecord> = self
            .flows
            .iter()
            .map(|(t, f)| {
                let mut hops: Vec<HopRecord> = f
                    .hops
                    .iter()
                    .map(|(hop, c)| HopRecord {
                        interface: c.interface.to_string(),
                        ifindex: hop.ifindex,
                        direction: hop.direction,
                        packets: c.stats.packets,
                        bytes: c.stats.bytes,
                        payload_bytes: c.stats.payload_bytes,
                        first_seen_unix_ns: unix(c.stats.first_seen_ns),
                        last_seen_unix_ns: unix(c.stats.last_seen_ns),
                        tcp_flags: tcp_flags_string(c.stats.tcp_flags),
                        dropped_after: 0,
                    })
                    .collect();
                // Order of first sighting is the order the packets met the hops.
                hops.sort_by_key(|h| (h.first_seen_unix_ns, h.ifindex, h.direction));
                FlowRecord::new(
                    t,
                    hops,
                    f.src_name
                        .clone()
                        .or_else(|| resolve(&t.src))
                        .map(|e| (*e).clone()),
                    f.dst_name
                        .clone()
                        .or_else(|| resolve(&t.dst))
                        .map(|e| (*e).clone()),
                )
            })
            .collect();
        out.sort_by_key(|f| (f.src, f.dst, f.protocol_number, f.src_port, f.dst_port));
        out
    }
}

/// The tuples of a drain, numbered: `tuples[n]` is tuple number `n`, `of_entry[i]` the number
/// of entry `i`'s tuple. The numbers follow no order the drain had.
struct Numbered {
    tuples: Vec<FlowTuple>,
    of_entry: Vec<u32>,
}

/// Entries per part that `number_tuples` aims at: one part's map (a few thousand tuples)
/// stays in the CPU's cache.
const ENTRIES_PER_PART: usize = 2048;

/// The most parts `number_tuples` cuts a drain into (4 096: past a few million entries the
/// parts grow instead).
const MAX_PART_BITS: u32 = 12;

/// Numbers a drain's tuples. A burst of new flows brings hundreds of thousands of tuples, and
/// one map of them all is tens of megabytes probed at random, a cache and TLB miss per entry
/// (150 ms per 1M entries in `bench-ingest`). So the entries' tuples are first copied into
/// parts by their hash, and each part is numbered through a small map, reused from part to
/// part, that stays in the cache; a tuple's entries all fall in one part.
fn number_tuples(drained: &[DrainedFlow]) -> Numbered {
    let parts = (drained.len() / ENTRIES_PER_PART)
        .max(1)
        .next_power_of_two();
    number_in_parts(drained, parts.trailing_zeros().min(MAX_PART_BITS))
}

/// `number_tuples` with `2^bits` parts.
fn number_in_parts(drained: &[DrainedFlow], bits: u32) -> Numbered {
    let Some(first) = drained.first() else {
        return Numbered {
            tuples: Vec::new(),
            of_entry: Vec::new(),
        };
    };
    let hasher = FastHash::default();
    // A tuple's part: the top `bits` bits of its hash.
    let part_of = |h: u64| h.checked_shr(64 - bits).unwrap_or(0) as usize;
    let parts = 1usize << bits;
    // Each entry's part, and where each part starts in the copy.
    let mut part: Vec<u32> = Vec::with_capacity(drained.len());
    let mut start = vec![0usize; parts + 1];
    for d in drained {
        let p = part_of(hasher.hash_one(FlowTuple::from_key(&d.key)));
        start[p + 1] += 1;
        part.push(p as u32);
    }
    for p in 0..parts {
        start[p + 1] += start[p];
    }
    // The entries' tuples and positions, part after part, each part in the drain's order.
    let mut copy = vec![(0u32, FlowTuple::from_key(&first.key)); drained.len()];
    let mut next = start.clone();
    for (i, (d, &p)) in drained.iter().zip(&part).enumerate() {
        let at = &mut next[p as usize];
        copy[*at] = (i as u32, FlowTuple::from_key(&d.key));
        *at += 1;
    }
    drop(part);
    let mut tuples: Vec<FlowTuple> = Vec::new();
    let mut of_entry = vec![0u32; drained.len()];
    // A hasher of its own (another seed): the map reads its tags from the top bits of the
    // hash, which the parting hasher's would give alike to every tuple of a part.
    let mut number: HashMap<FlowTuple, u32, FastHash> =
        HashMap::with_capacity_and_hasher(2 * ENTRIES_PER_PART, FastHash::default());
    for p in 0..parts {
        number.clear();
        for (i, t) in &copy[start[p]..start[p + 1]] {
            let n = *number.entry(*t).or_insert_with(|| {
                tuples.push(*t);
                (tuples.len() - 1) as u32
            });
            of_entry[*i as usize] = n;
        }
    }
    Numbered { tuples, of_entry }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use flowtrace_common::FlowKey;

    use super::*;

    fn key(src: [u8; 4], sport: u16, ifindex: u32, dir: u8) -> FlowKey {
        let mut k = FlowKey {
            src_port: sport,
            dst_port: 53,
            ifindex,
            direction: dir,
            ip_version: 4,
            protocol: 17,
            ..FlowKey::default()
        };
        k.src_addr = flowtrace_common::addr_from_bytes(&[
            src[0], src[1], src[2], src[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        k.dst_addr = flowtrace_common::addr_from_bytes(&[
            10, 244, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        k
    }

    fn stats(packets: u64, bytes: u64, first: u64, last: u64) -> FlowStats {
        FlowStats {
            packets,
            bytes,
            first_seen_ns: first,
            last_seen_ns: last,
            ..FlowStats::default()
        }
    }

    fn names(i: u32) -> Option<String> {
        Some(format!("dev{i}"))
    }

    #[test]
    fn hops_of_one_tuple_form_one_flow_in_first_seen_order() {
        let mut t = FlowTable::new(100, u64::MAX);
        t.merge(
            &[
                DrainedFlow {
                    key: key([10, 244, 1, 10], 4000, 7, 1),
                    stats: stats(3, 300, 20, 30),
                },
                DrainedFlow {
                    key: key([10, 244, 1, 10], 4000, 5, 0),
                    stats: stats(3, 300, 10, 29),
                },
            ],
            &names,
            &|_| None,
        );
        // A second drain adds to the same hop.
        t.merge(
            &[DrainedFlow {
                key: key([10, 244, 1, 10], 4000, 5, 0),
                stats: stats(2, 200, 40, 50),
            }],
            &names,
            &|_| None,
        );
        let snap = t.snapshot(1_000, &|_| None);
        assert_eq!(snap.len(), 1);
        let f = &snap[0];
        assert_eq!(f.src, "10.244.1.10".parse::<IpAddr>().unwrap());
        assert_eq!(f.protocol, "udp");
        assert_eq!(f.hops.len(), 2);
        assert_eq!(
            (
                f.hops[0].interface.as_str(),
                f.hops[0].direction,
                f.hops[0].packets,
                f.hops[0].bytes
            ),
            ("dev5", Direction::Ingress, 5, 500)
        );
        assert_eq!(f.hops[0].first_seen_unix_ns, 1_010);
        assert_eq!(f.hops[0].last_seen_unix_ns, 1_050);
        assert_eq!(
            (f.hops[1].ifindex, f.hops[1].direction),
            (7, Direction::Egress)
        );
        assert_eq!((f.packets, f.bytes), (5, 500));
    }

    #[test]
    fn idle_flows_expire_and_the_cap_evicts_the_oldest() {
        let mut t = FlowTable::new(2, 100);
        let drained: Vec<DrainedFlow> = (0..4u16)
            .map(|i| DrainedFlow {
                key: key([10, 0, 0, i as u8], i, 1, 0),
                stats: stats(1, 10, 1000 + i as u64, 1000 + i as u64),
            })
            .collect();
        t.merge(&drained, &names, &|_| None);
        t.expire(1050);
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted(), 2);
        let ports: Vec<u16> = t
            .snapshot(0, &|_| None)
            .iter()
            .map(|f| f.src_port)
            .collect();
        assert_eq!(ports, vec![2, 3]);
        t.expire(1103);
        assert_eq!(t.len(), 1);
        assert_eq!(t.expired(), 1);
    }

    #[test]
    fn room_is_made_before_a_drain_as_the_cap_would_after_it() {
        let flow = |i: u16, hop: u32, at: u64| DrainedFlow {
            key: key([10, 0, 0, i as u8], i, hop, 0),
            stats: stats(1, 10, at, at),
        };
        let mut t = FlowTable::new(3, 1_000_000);
        t.merge(
            &[flow(0, 1, 10), flow(1, 1, 20), flow(2, 1, 30)],
            &names,
            &|_| None,
        );
        // Two new tuples, one of them at two hops, and more of the oldest known one (0): two
        // evicted, the two least recent the drain does not touch (1 and 2), as merging
        // first and evicting after would.
        let next = [
            flow(0, 2, 40),
            flow(3, 1, 50),
            flow(3, 2, 51),
            flow(4, 1, 60),
        ];
        t.make_room(&next);
        assert_eq!((t.len(), t.evicted()), (1, 2));
        t.merge(&next, &names, &|_| None);
        t.expire(100);
        assert_eq!(
            (t.len(), t.evicted()),
            (3, 2),
            "nothing more for the cap to evict"
        );
        let flows = t.snapshot(0, &|_| None);
        let mut ports: Vec<u16> = flows.iter().map(|f| f.src_port).collect();
        ports.sort_unstable();
        assert_eq!(ports, vec![0, 3, 4]);
        let kept = flows.iter().find(|f| f.src_port == 0).map(|f| f.hops.len());
        assert_eq!(kept, Some(2), "the touched flow kept its first hop");
        // More new tuples than the cap: the newest three stay, the rest are refused before
        // the merge (never built), counted as evicted.
        let burst: Vec<DrainedFlow> = (10..15).map(|i| flow(i, 1, 100 + u64::from(i))).collect();
        let refused = t.make_room(&burst);
        let refusals = refused.iter().filter(|r| **r).count();
        assert_eq!((t.len(), t.evicted(), refusals), (0, 7, 2));
        t.merge_except(&burst, &refused, &names, &|_| None);
        t.expire(200);
        let mut ports: Vec<u16> = t
            .snapshot(0, &|_| None)
            .iter()
            .map(|f| f.src_port)
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, vec![12, 13, 14]);
        assert_eq!(t.evicted(), 7);
        // Room enough: nothing evicted.
        t.make_room(&[flow(14, 1, 300)]);
        assert_eq!((t.len(), t.evicted()), (3, 7));
        // Idle flows at the cap expire, they are not evicted: a timeout of 50, flows 12 and
        // 13 idle at 400 (14 refreshed), two new tuples.
        let mut t = FlowTable::new(3, 50);
        t.merge(
            &[flow(12, 1, 300), flow(13, 1, 310), flow(14, 1, 390)],
            &names,
            &|_| None,
        );
        let next = [flow(20, 1, 395), flow(21, 1, 396)];
        t.fold(&next, 400, &names, &|_| None);
        assert_eq!((t.len(), t.expired(), t.evicted()), (3, 2, 0));
    }

    #[test]
    fn fold_leaves_what_merging_everything_then_evicting_would() {
        // Random drains (some beyond the cap, tuples at one or two hops, old tuples coming
        // back): `fold` against merge-then-cap, flow by flow; times distinct, then tied
        // within a drain (the cap then chooses by tuple).
        fold_matches_merge_then_cap(false);
        fold_matches_merge_then_cap(true);
    }

    fn fold_matches_merge_then_cap(ties: bool) {
        let mut rand = crate::testutil::lcg(0x2545_f491);
        let (mut a, mut b) = (FlowTable::new(40, u64::MAX), FlowTable::new(40, u64::MAX));
        let mut at = 0;
        for round in 0..60 {
            let n = rand(if round % 5 == 0 { 120 } else { 30 });
            let base = at + 1;
            let drain: Vec<DrainedFlow> = (0..n)
                .map(|_| {
                    at += 1;
                    let at = if ties { base + rand(3) } else { at };
                    let i = rand(150) as u16;
                    DrainedFlow {
                        key: key([10, 0, 0, (i % 200) as u8], i, 1 + rand(2) as u32, 0),
                        stats: stats(1 + rand(3), 10, at, at),
                    }
                })
                .collect();
            // Later than every time of this drain: no tie across drains.
            at = at.max(base + 2);
            a.fold(&drain, at, &names, &|_| None);
            b.merge(&drain, &names, &|_| None);
            b.expire(at);
            let view = |t: &FlowTable| {
                let mut v: Vec<(u16, Vec<(u32, u64)>)> = t
                    .snapshot(0, &|_| None)
                    .iter()
                    .map(|f| {
                        let mut hops: Vec<(u32, u64)> =
                            f.hops.iter().map(|h| (h.ifindex, h.packets)).collect();
                        hops.sort_unstable();
                        (f.src_port, hops)
                    })
                    .collect();
                v.sort_unstable();
                v
            };
            assert_eq!(view(&a), view(&b), "round {round}");
            assert_eq!(a.evicted(), b.evicted(), "round {round}");
        }
        assert!(a.evicted() > 100, "the cap was reached: {}", a.evicted());
    }

    #[test]
    fn tuples_are_numbered_alike_in_one_part_or_many() {
        // 5 000 entries of 1 500 tuples at up to three hooks, in a scattered order; one
        // part, a few, and more parts than entries.
        let drain: Vec<DrainedFlow> = (0..5_000u32)
            .map(|i| {
                let t = (i * 7_919) % 1_500;
                DrainedFlow {
                    key: key(
                        [10, 0, (t / 200) as u8, (t % 200) as u8],
                        t as u16,
                        i % 3,
                        0,
                    ),
                    stats: stats(1, 10, 1, 1),
                }
            })
            .collect();
        for bits in [0, 3, MAX_PART_BITS] {
            let Numbered { tuples, of_entry } = number_in_parts(&drain, bits);
            assert_eq!(tuples.len(), 1_500, "bits {bits}");
            assert_eq!(of_entry.len(), drain.len(), "bits {bits}");
            for (d, &n) in drain.iter().zip(&of_entry) {
                assert_eq!(
                    tuples[n as usize],
                    FlowTuple::from_key(&d.key),
                    "bits {bits}"
                );
            }
            let distinct: HashSet<FlowTuple> = tuples.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                tuples.len(),
                "a tuple numbered twice, bits {bits}"
            );
        }
        assert_eq!(number_tuples(&[]).tuples.len(), 0);
    }

    #[test]
    fn ipv6_and_flags_render() {
        let mut k = key([0; 4], 1, 1, 0);
        k.ip_version = 6;
        k.protocol = 6;
        k.src_addr = flowtrace_common::addr_from_bytes(
            &"fd00:10:244:1::a".parse::<Ipv6Addr>().unwrap().octets(),
        );
        k.dst_addr = flowtrace_common::addr_from_bytes(
            &"fd00:10:244:2::b".parse::<Ipv6Addr>().unwrap().octets(),
        );
        let mut t = FlowTable::new(10, u64::MAX);
        let mut s = stats(1, 60, 1, 1);
        s.tcp_flags = 0x12;
        t.merge(&[DrainedFlow { key: k, stats: s }], &|_| None, &|_| None);
        let f = &t.snapshot(0, &|_| None)[0];
        assert_eq!(f.ip_version, 6);
        assert_eq!(f.dst.to_string(), "fd00:10:244:2::b");
        assert_eq!(f.hops[0].tcp_flags, "SA");
        assert_eq!(f.hops[0].interface, "if1");
    }
}
