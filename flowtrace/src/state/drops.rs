//! Drops and retransmissions per tuple, placed on this node: what the drains bring from
//! the drop buffers, kept until idle like the flows, and joined to them by tuple.

use std::collections::{BTreeMap, HashMap};

use flowtrace_common::drops::KIND_RETRANSMIT;

use crate::{host::netns::NsPlace, kernel::drain::DrainedDrop, model::FlowTuple};

/// Where on this node, and why, one group of packets died.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropSite {
    pub reason: u32,
    pub netns: NsPlace,
    /// The device's ifindex in that namespace (0: the skb had none).
    pub ifindex: u32,
    /// The kernel code address that freed them.
    pub location: u64,
}

/// Packets and bytes at one site, and when the latest died (monotonic ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCount {
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
}

impl DropCount {
    fn add(&mut self, packets: u64, bytes: u64, last: u64) {
        self.packets += packets;
        self.bytes += bytes;
        self.last_seen_ns = self.last_seen_ns.max(last);
    }
}

/// The drops of one tuple.
#[derive(Clone, Debug, Default)]
pub struct TupleDrops {
    pub sites: HashMap<DropSite, DropCount>,
    /// Retransmitted segments (the tuple is the sending socket's).
    pub retransmits: DropCount,
}

impl TupleDrops {
    fn last_seen(&self) -> u64 {
        self.sites
            .values()
            .map(|c| c.last_seen_ns)
            .chain([self.retransmits.last_seen_ns])
            .max()
            .unwrap_or(0)
    }

    pub fn dropped(&self) -> u64 {
        self.sites.values().map(|c| c.packets).sum()
    }
}

/// One drained aggregate placed on this node (for the metrics).
#[derive(Clone, Copy, Debug)]
pub struct PlacedDrop {
    /// `None` for a packet whose headers could not be read (not IP, or no network header).
    pub tuple: Option<FlowTuple>,
    pub retransmit: bool,
    pub site: DropSite,
    pub packets: u64,
}

/// Everything since the agent started that the tables cannot show per tuple.
#[derive(Clone, Debug, Default)]
pub struct DropTotals {
    /// Packets dropped, by reason code (placed ones, tuple or not).
    pub by_reason: BTreeMap<u32, u64>,
    /// Drops and retransmissions in namespaces that are not this node's.
    pub unplaced: u64,
    /// Segments retransmitted on this node.
    pub retransmits: u64,
    /// Drops and retransmissions of new tuples the table had no room for (counted by
    /// reason above, but not per tuple).
    pub table_full: u64,
}

/// The drops of every tuple on this node.
#[derive(Debug, Default)]
pub struct DropTable {
    tuples: HashMap<FlowTuple, TupleDrops>,
    totals: DropTotals,
    idle_ns: u64,
    /// Most tuples held: a flood of fresh tuples being dropped is counted, not stored.
    max_tuples: usize,
}

impl DropTable {
    pub fn new(idle_ns: u64, max_tuples: usize) -> Self {
        Self {
            idle_ns,
            max_tuples,
            ..Default::default()
        }
    }

    /// Adds one drain's aggregates. `place` says where a namespace inode is on this node;
    /// an aggregate in any other namespace is counted unplaced and not kept (on a real node
    /// every namespace is the node's; in an emulated cluster sharing one kernel, the others
    /// are other nodes'). Returns what was placed, for the metrics.
    pub fn merge(
        &mut self,
        drained: &[DrainedDrop],
        place: &dyn Fn(u32) -> Option<NsPlace>,
    ) -> Vec<PlacedDrop> {
        let mut placed = Vec::with_capacity(drained.len());
        for d in drained {
            let k = &d.key;
            let Some(netns) = place(k.netns) else {
                self.totals.unplaced += d.stats.packets;
                continue;
            };
            let retransmit = k.kind == KIND_RETRANSMIT;
            let site = DropSite {
                reason: k.reason,
                netns,
                ifindex: k.ifindex,
                location: k.location,
            };
            let tuple = (k.tuple.ip_version != 0).then(|| FlowTuple::from_tuple(&k.tuple));
            if retransmit {
                self.totals.retransmits += d.stats.packets;
            } else {
                *self.totals.by_reason.entry(k.reason).or_default() += d.stats.packets;
            }
            if let Some(t) = tuple {
                if !self.tuples.contains_key(&t) && self.tuples.len() >= self.max_tuples {
                    self.totals.table_full += d.stats.packets;
                    placed.push(PlacedDrop {
                        tuple: Some(t),
                        retransmit,
                        site,
                        packets: d.stats.packets,
                    });
                    continue;
                }
                let e = self.tuples.entry(t).or_default();
                let c = if retransmit {
                    &mut e.retransmits
                } else {
                    e.sites.entry(site).or_default()
                };
                c.add(d.stats.packets, d.stats.bytes, d.stats.last_ns);
            }
            placed.push(PlacedDrop {
                tuple,
                retransmit,
                site,
                packets: d.stats.packets,
            });
        }
        placed
    }

    /// Forgets tuples with nothing new for the idle timeout.
    pub fn expire(&mut self, now_ns: u64) {
        let idle = self.idle_ns;
        self.tuples
            .retain(|_, d| now_ns.saturating_sub(d.last_seen()) <= idle);
    }

    pub fn get(&self, t: &FlowTuple) -> Option<&TupleDrops> {
        self.tuples.get(t)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowTuple, &TupleDrops)> {
        self.tuples.iter()
    }

    pub fn totals(&self) -> &DropTotals {
        &self.totals
    }
}

#[cfg(test)]
mod tests {
    use flowtrace_common::{
        drops::{DropKey, DropStats, KIND_DROP},
        Tuple,
    };

    use super::*;

    fn drained(netns: u32, kind: u8, reason: u32, packets: u64, last: u64) -> DrainedDrop {
        let tuple = Tuple {
            src_addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            dst_addr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            src_port: 1000,
            dst_port: 53,
            ip_version: 4,
            protocol: 17,
            _pad: 0,
        };
        DrainedDrop {
            key: DropKey {
                tuple,
                netns,
                ifindex: 3,
                reason,
                kind,
                ..Default::default()
            },
            stats: DropStats {
                packets,
                bytes: packets * 100,
                last_ns: last,
            },
        }
    }

    #[test]
    fn drops_are_placed_summed_and_other_namespaces_counted_apart() {
        let mut t = DropTable::new(1_000, 10);
        let place = |ns: u32| (ns == 7).then_some(NsPlace::Node);
        let placed = t.merge(
            &[
                drained(7, KIND_DROP, 12, 3, 10),
                drained(7, KIND_DROP, 12, 2, 20),
                drained(8, KIND_DROP, 12, 5, 20),
                drained(7, KIND_RETRANSMIT, 0, 4, 20),
            ],
            &place,
        );
        assert_eq!(placed.len(), 3);
        assert_eq!(t.totals().unplaced, 5);
        assert_eq!(t.totals().by_reason.get(&12), Some(&5));
        assert_eq!(t.totals().retransmits, 4);
        let (_, d) = t.iter().next().expect("one tuple");
        assert_eq!(d.dropped(), 5);
        assert_eq!(d.retransmits.packets, 4);
        t.expire(1_020);
        assert_eq!(t.iter().count(), 1);
        t.expire(2_021);
        assert_eq!(t.iter().count(), 0);
        assert_eq!(
            t.totals().by_reason.get(&12),
            Some(&5),
            "totals outlive the tuples"
        );
    }

    #[test]
    fn a_full_table_counts_new_tuples_instead_of_keeping_them() {
        let mut t = DropTable::new(1_000, 1);
        let place = |_: u32| Some(NsPlace::Node);
        let mut other = drained(7, KIND_DROP, 12, 4, 10);
        other.key.tuple.src_port = 2000;
        t.merge(&[drained(7, KIND_DROP, 12, 3, 10), other], &place);
        assert_eq!(t.iter().count(), 1);
        assert_eq!(t.totals().table_full, 4);
        assert_eq!(
            t.totals().by_reason.get(&12),
            Some(&7),
            "both count by reason"
        );
    }
}
