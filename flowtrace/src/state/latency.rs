//! Latency the kernel programs measured: one-way time between two hooks of this node for
//! the same packet (`hop`), and TCP round trips seen at an interface (`handshake`: SYN to
//! SYN-ACK; `response`: a data segment to the data that acknowledges it, which includes the
//! peer application's time). Histograms are kept per flow tuple and segment, summed over
//! drains, and forgotten with the flow's idle timeout.

use std::collections::HashMap;

use flowtrace_common::LatencyHist;

use crate::{
    kernel::drain::DrainedLatency,
    model::{
        hist::record,
        wire::{LatencyKind, LatencyRecord},
        Direction, FlowTuple, HookView,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    tuple: FlowTuple,
    kind: LatencyKind,
    from: Option<(u32, Direction)>,
    to: (u32, Direction),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    hist: LatencyHist,
    last_seen_ns: u64,
}

/// Latency histograms of one agent.
#[derive(Debug)]
pub struct LatencyTable {
    entries: HashMap<Key, Entry>,
    idle_timeout_ns: u64,
}

impl LatencyTable {
    pub fn new(idle_timeout_ns: u64) -> Self {
        Self {
            entries: HashMap::new(),
            idle_timeout_ns,
        }
    }

    /// Folds one drain in.
    pub fn merge(&mut self, drained: &[DrainedLatency], now_ns: u64) {
        for d in drained {
            let k = &d.key;
            let kind = LatencyKind::from_kernel(k.kind);
            let key = Key {
                tuple: FlowTuple::from_tuple(&k.tuple),
                kind,
                from: (kind == LatencyKind::Hop)
                    .then_some((k.from_ifindex, Direction::from_kernel(k.from_direction))),
                to: (k.to_ifindex, Direction::from_kernel(k.to_direction)),
            };
            let e = self.entries.entry(key).or_insert(Entry {
                hist: LatencyHist::default(),
                last_seen_ns: now_ns,
            });
            e.hist.merge(&d.hist);
            e.last_seen_ns = now_ns;
        }
    }

    pub fn expire(&mut self, now_ns: u64) {
        let t = self.idle_timeout_ns;
        self.entries
            .retain(|_, e| now_ns.saturating_sub(e.last_seen_ns) <= t);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every histogram, hooks named by `names`.
    pub fn snapshot(&self, names: &dyn Fn(u32) -> String) -> Vec<LatencyRecord> {
        let hook = |(i, d): (u32, Direction)| HookView {
            interface: names(i),
            direction: d,
        };
        let mut out: Vec<LatencyRecord> = self
            .entries
            .iter()
            .map(|(k, e)| {
                record(
                    k.kind,
                    k.tuple.into(),
                    k.from.map(hook),
                    hook(k.to),
                    &e.hist,
                )
            })
            .collect();
        out.sort_by(|a, b| {
            (
                a.tuple.src,
                a.tuple.src_port,
                a.tuple.dst,
                a.tuple.dst_port,
                a.kind,
            )
                .cmp(&(
                    b.tuple.src,
                    b.tuple.src_port,
                    b.tuple.dst,
                    b.tuple.dst_port,
                    b.kind,
                ))
        });
        out
    }
}

/// The key of a drained histogram, for tests.
#[cfg(test)]
fn key(kind: u8, from: u32, to: u32) -> flowtrace_common::LatencyKey {
    flowtrace_common::LatencyKey {
        from_ifindex: from,
        to_ifindex: to,
        kind,
        ..flowtrace_common::LatencyKey::default()
    }
}

#[cfg(test)]
mod tests {
    use flowtrace_common::LAT_HOP;

    use super::*;

    #[test]
    fn histograms_merge_and_report_percentiles() {
        let mut h = LatencyHist::default();
        for ns in [1_000u64, 1_100, 1_200, 5_000_000] {
            h.add(ns);
        }
        let mut t = LatencyTable::new(1_000);
        t.merge(
            &[DrainedLatency {
                key: key(LAT_HOP, 3, 5),
                hist: h,
            }],
            10,
        );
        t.merge(
            &[DrainedLatency {
                key: key(LAT_HOP, 3, 5),
                hist: h,
            }],
            20,
        );
        let snap = t.snapshot(&|i| format!("if{i}"));
        assert_eq!(snap.len(), 1);
        let r = &snap[0];
        assert_eq!(
            (r.kind, r.samples, r.min_ns, r.max_ns),
            (LatencyKind::Hop, 8, 1_000, 5_000_000)
        );
        assert_eq!(r.mean_ns, (2 * (1_000 + 1_100 + 1_200 + 5_000_000)) / 8);
        // Six of eight samples are ~1 µs (bucket [1024, 2048) for 1100/1200, [512,1024) for 1000).
        assert!(r.p50_ns < 2_048, "{r:?}");
        assert_eq!(r.p99_ns, 5_000_000);
        assert_eq!(r.from.as_ref().unwrap().interface, "if3");
        t.expire(1_021);
        assert!(t.is_empty());
    }
}
