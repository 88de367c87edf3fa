//! NAT translations: what the kernel programs saw rewritten between two hooks, checked
//! against the kernel's conntrack table.
//!
//! A translation maps the tuple a packet had at an earlier hook (before kube-proxy's DNAT,
//! before the un-DNAT of a reply, before masquerade) to the tuple it had at a later one.
//! Each drain brings the rewrites the TC programs recorded; after it the agent dumps
//! conntrack and settles every translation into one of:
//!
//! - `confirmed`: seen by the kernel programs and conntrack agrees;
//! - `mismatch`: conntrack translates the same tuple to something else (a disagreement);
//! - `not_in_conntrack`: the programs saw a rewrite conntrack does not know, two checks in
//!   a row (a disagreement);
//! - `conntrack_only`: conntrack translated a connection whose tuple before the rewrite no
//!   traced hook sees (e.g. a NodePort reached through the node's uplink, which flowtrace
//!   does not trace by default), so the translation is completed from conntrack (explained,
//!   not a disagreement);
//! - `missed`: both tuples crossed traced hooks but the programs recorded no rewrite, two
//!   checks in a row (a disagreement: e.g. the hooks ran on different CPUs).
//!
//! Only TCP, UDP and SCTP are recorded and checked, what Services carry (ICMP packets have too
//! little per-packet identity to pair reliably, and conntrack's ICMP identifiers are not ports).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use crate::{
    host::conntrack::CtEntry,
    kernel::drain::DrainedNat,
    model::{
        wire::{NatCounters, NatState, Translation},
        Direction, FlowTuple, HookView, Hop,
    },
    util::FastHash,
};

#[derive(Clone, Debug)]
struct NatEntry {
    translated: FlowTuple,
    /// The hooks around the rewrite, when the kernel programs saw it.
    hops: Option<(Hop, Hop)>,
    kernel_sightings: u64,
    /// What conntrack translates the original tuple to, at the last dump that had it.
    conntrack: Option<FlowTuple>,
    state: NatState,
    /// Cross-checks this entry stayed undecided through.
    undecided_checks: u32,
    /// Last time (monotonic ns) the kernel or conntrack reported it.
    last_seen_ns: u64,
}

/// All translations of one agent, by the tuple before the rewrite.
#[derive(Debug)]
pub struct NatTable {
    entries: HashMap<FlowTuple, NatEntry, FastHash>,
    /// Translated tuple -> original tuple, rebuilt after every change to `entries`, so
    /// naming a flow by its translation is one hash probe.
    originals: HashMap<FlowTuple, FlowTuple, FastHash>,
    /// Every side of every translation in both directions (original, translated and their
    /// replies), rebuilt with `originals`: whether a flow has anything to do with a
    /// translation is then one hash probe, not four.
    sides: HashSet<FlowTuple, FastHash>,
    /// One bit per hash of a side (`side_bit`), set for every side: a tuple whose bit is
    /// clear is no side, found without probing `sides`, which outgrows the caches when a node
    /// holds many translations (a cache miss per drained entry asked). Rebuilt with `sides`.
    side_bits: Vec<u64>,
    counters: NatCounters,
    idle_timeout_ns: u64,
}

/// `t`'s word and bit in a `side_bits` of `words` words, from the hash `sides` gives it
/// (`None` for no words).
fn side_bit(
    sides: &HashSet<FlowTuple, FastHash>,
    words: usize,
    t: &FlowTuple,
) -> Option<(usize, u64)> {
    let bits = words * 64;
    if bits == 0 {
        return None;
    }
    let i = (sides.hasher().hash_one(t) as usize) & (bits - 1);
    Some((i / 64, 1 << (i % 64)))
}

fn hop(ifindex: u32, direction: u8) -> Hop {
    Hop {
        ifindex,
        direction: Direction::from_kernel(direction),
    }
}

impl NatTable {
    /// An empty table whose translations are forgotten after `idle_timeout_ns` without news
    /// from either source (the agent uses the flows' idle timeout).
    pub fn new(idle_timeout_ns: u64) -> Self {
        Self {
            entries: HashMap::default(),
            originals: HashMap::default(),
            sides: HashSet::default(),
            side_bits: Vec::new(),
            counters: NatCounters::default(),
            idle_timeout_ns,
        }
    }

    pub fn counters(&self) -> NatCounters {
        self.counters
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Folds in the rewrites of one drain; returns the (original, translated) pairs that
    /// are new (a connection seen rewritten for the first time, or a tuple reused).
    pub fn merge_kernel(
        &mut self,
        drained: &[DrainedNat],
        now_ns: u64,
    ) -> Vec<(FlowTuple, FlowTuple)> {
        let mut new = Vec::new();
        for d in drained {
            let original = FlowTuple::from_tuple(&d.original);
            let translated = FlowTuple::from_tuple(&d.record.translated);
            let hops = Some((
                hop(d.record.from_ifindex, d.record.from_direction),
                hop(d.record.to_ifindex, d.record.to_direction),
            ));
            self.counters.kernel_records += 1;
            let e = self.entries.entry(original).or_insert_with(|| {
                new.push((original, translated));
                NatEntry {
                    translated,
                    hops,
                    kernel_sightings: 0,
                    conntrack: None,
                    state: NatState::Pending,
                    undecided_checks: 0,
                    last_seen_ns: now_ns,
                }
            });
            e.kernel_sightings += u64::from(d.record.sightings);
            e.hops = hops;
            e.last_seen_ns = now_ns;
            if e.translated != translated {
                // The rewrite changed (a new connection reused the tuple): check it afresh.
                new.push((original, translated));
                e.translated = translated;
                e.state = NatState::Pending;
                e.undecided_checks = 0;
            }
            if e.kernel_sightings > 0 && matches!(e.state, NatState::ConntrackOnly) {
                // Completed from conntrack earlier, now also seen by the programs.
                e.state = NatState::Pending;
            }
        }
        // `new` holds exactly the entries added or re-pointed: the index changes only then.
        if !new.is_empty() {
            self.reindex();
        }
        new
    }

    /// Rebuilds `originals` and `sides`; called after a change that added, re-pointed or
    /// removed entries (not on every drain).
    fn reindex(&mut self) {
        self.originals = self
            .entries
            .iter()
            .map(|(o, e)| (e.translated, *o))
            .collect();
        // Built anew, as `originals` is, so a burst's room is given back once it expired;
        // a connection recorded both ways (a DNAT and its reply's un-DNAT) has two entries
        // with the same four sides, hence two per entry to start with.
        let mut sides =
            HashSet::with_capacity_and_hasher(2 * self.entries.len(), FastHash::default());
        for (o, e) in &self.entries {
            let x = e.translated;
            sides.extend([*o, x, o.reversed(), x.reversed()]);
        }
        // Eight bits per side (about one tuple in nine that is no side finds its bit set).
        let words = if sides.is_empty() {
            0
        } else {
            (sides.len() * 8).next_power_of_two().div_ceil(64)
        };
        let mut bits = vec![0u64; words];
        for t in &sides {
            if let Some((w, bit)) = side_bit(&sides, words, t) {
                if let Some(word) = bits.get_mut(w) {
                    *word |= bit;
                }
            }
        }
        self.sides = sides;
        self.side_bits = bits;
    }

    /// Compares with a conntrack dump taken after the drain. `traced(t)` says whether a
    /// flow with tuple `t` crossed a traced hook (is in the flow table).
    pub fn cross_check(
        &mut self,
        conntrack: &[CtEntry],
        traced: &dyn Fn(&FlowTuple) -> bool,
        now_ns: u64,
    ) {
        self.counters.conntrack_checks += 1;
        let mut expected: HashMap<FlowTuple, FlowTuple> = HashMap::new();
        for ct in conntrack.iter().filter(|c| c.translated()) {
            for (before, after) in ct.rewrites() {
                expected.insert(before, after);
            }
        }
        let c = &mut self.counters;
        for (original, e) in self.entries.iter_mut() {
            if let Some(after) = expected.get(original) {
                e.conntrack = Some(*after);
                e.last_seen_ns = e.last_seen_ns.max(now_ns);
            }
            match e.state {
                NatState::Pending if e.kernel_sightings > 0 => match expected.get(original) {
                    Some(after) if *after == e.translated => {
                        e.state = NatState::Confirmed;
                        c.confirmed += 1;
                    }
                    Some(_) => {
                        e.state = NatState::Mismatch;
                        c.mismatch += 1;
                    }
                    None => {
                        e.undecided_checks += 1;
                        if e.undecided_checks >= 2 {
                            e.state = NatState::NotInConntrack;
                            c.not_in_conntrack += 1;
                        }
                    }
                },
                NatState::Pending => {
                    // Known from conntrack only, both tuples traced: the programs get one more
                    // drain to report the rewrite, then it counts as missed.
                    e.undecided_checks += 1;
                    if e.undecided_checks >= 2 {
                        e.state = NatState::Missed;
                        c.missed += 1;
                    }
                }
                _ => {}
            }
        }
        let before_count = self.entries.len();
        for (before, after) in expected {
            if self.entries.contains_key(&before) {
                continue;
            }
            let (seen_before, seen_after) = (traced(&before), traced(&after));
            if !seen_before && !seen_after {
                // Not traffic flowtrace saw (or not yet drained): nothing to say.
                continue;
            }
            let state = if seen_before && seen_after {
                NatState::Pending
            } else {
                self.counters.conntrack_only += 1;
                NatState::ConntrackOnly
            };
            self.entries.insert(
                before,
                NatEntry {
                    translated: after,
                    hops: None,
                    kernel_sightings: 0,
                    conntrack: Some(after),
                    state,
                    // This check counts: the next one without a kernel record decides.
                    undecided_checks: 1,
                    last_seen_ns: now_ns,
                },
            );
        }
        if self.entries.len() != before_count {
            self.reindex();
        }
    }

    /// A failed conntrack dump: counted; the entries stay pending for the next one.
    pub fn conntrack_failed(&mut self) {
        self.counters.conntrack_errors += 1;
    }

    /// Forgets translations neither source reported for the idle timeout.
    pub fn expire(&mut self, now_ns: u64) {
        let idle = self.idle_timeout_ns;
        let before_count = self.entries.len();
        self.entries
            .retain(|_, e| now_ns.saturating_sub(e.last_seen_ns) <= idle);
        if self.entries.len() != before_count {
            self.reindex();
        }
    }

    /// Every translation, ordered by original tuple.
    pub fn snapshot(&self, names: &dyn Fn(u32) -> String) -> Vec<Translation> {
        let mut out: Vec<(FlowTuple, Translation)> = self
            .entries
            .iter()
            .map(|(o, e)| (*o, view(o, e, names)))
            .collect();
        out.sort_by_key(|(o, _)| *o);
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// The original tuple whose translation is `t`.
    pub fn original_of(&self, t: &FlowTuple) -> Option<FlowTuple> {
        self.originals.get(t).copied()
    }

    /// Whether `t` or its reply is the original or the translated tuple of a translation.
    pub fn touches(&self, t: &FlowTuple) -> bool {
        side_bit(&self.sides, self.side_bits.len(), t).is_some_and(|(w, bit)| {
            self.side_bits.get(w).is_some_and(|word| word & bit != 0) && self.sides.contains(t)
        })
    }

    /// Whether `o` is the original tuple of a translation.
    pub fn has_original(&self, o: &FlowTuple) -> bool {
        self.entries.contains_key(o)
    }

    /// What original tuple `o` is rewritten to.
    pub fn translated_of(&self, o: &FlowTuple) -> Option<FlowTuple> {
        self.entries.get(o).map(|e| e.translated)
    }

    /// The translation of original tuple `o`.
    pub fn get(&self, o: &FlowTuple, names: &dyn Fn(u32) -> String) -> Option<Translation> {
        self.entries.get(o).map(|e| view(o, e, names))
    }
}

fn view(original: &FlowTuple, e: &NatEntry, names: &dyn Fn(u32) -> String) -> Translation {
    let t = &e.translated;
    let rewrote = match (
        original.src != t.src || original.src_port != t.src_port,
        original.dst != t.dst || original.dst_port != t.dst_port,
    ) {
        (true, true) => "src+dst",
        (true, false) => "src",
        _ => "dst",
    };
    let source = match (e.kernel_sightings > 0, e.conntrack.is_some()) {
        (true, true) => "kernel+conntrack",
        (true, false) => "kernel",
        _ => "conntrack",
    };
    Translation {
        original: (*original).into(),
        translated: (*t).into(),
        rewrote: rewrote.into(),
        between: e.hops.map(|(a, b)| {
            [
                HookView {
                    interface: names(a.ifindex),
                    direction: a.direction,
                },
                HookView {
                    interface: names(b.ifindex),
                    direction: b.direction,
                },
            ]
        }),
        state: e.state,
        source: source.into(),
        kernel_sightings: e.kernel_sightings,
        service: None,
    }
}

#[cfg(test)]
mod tests;
