//! Live tracing's state: the trace events of one packet joined into the packet, hook by hook
//! (`/v1/trace`, `flowtrace trace`).
//!
//! While at least one tracer is attached the agent sets the `CONTROL_TRACING` bit and the
//! programs write one event per such packet per hook to the `TRACE_EVENTS` ring buffer.
//! With no tracer the bit is clear and the programs only test it. The agent's reader task
//! (`agent::tasks`) reads the ring (`kernel::ring`); the [`Assembler`] here joins the events of one packet by its packet id (the fields NAT does not change, the
//! same id latency sampling uses), waits [`JOIN_WINDOW_NS`] for the packet's later hooks,
//! and hands the joined packet to every tracer; each tracer names it, applies its filter
//! and streams it as one JSON line.

use std::collections::HashMap;

use flowtrace_common::{PacketId, TraceEvent, DIR_DROPPED, DIR_RETRANSMITTED};

use crate::model::{Direction, FlowTuple};

/// How long a packet waits for its later hooks before it is handed to the tracers. The
/// hooks of one node see a packet microseconds apart; this also covers a busy CPU.
pub const JOIN_WINDOW_NS: u64 = 20_000_000;

/// Two events of one packet id further apart than this are two packets (a retransmission
/// of the same segment with the same IP id, say).
const JOIN_MAX_GAP_NS: u64 = 10_000_000;

/// Latency sampling used while tracing when the agent runs with `--latency-sample 0`
/// (tracing needs sampled packets; SYNs are traced either way).
pub const TRACE_SAMPLE_WHEN_OFF: u32 = 64;

/// One packet at one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub direction: Direction,
    pub tuple: FlowTuple,
    pub tcp_flags: u8,
    pub bytes: u32,
}

impl Sighting {
    pub fn from_event(e: &TraceEvent) -> Self {
        Self {
            ts_ns: e.ts_ns,
            ifindex: e.ifindex,
            direction: Direction::from_kernel(e.direction),
            tuple: FlowTuple::from_tuple(&e.tuple),
            tcp_flags: e.tcp_flags,
            bytes: e.bytes,
        }
    }
}

/// What goes out to the tracers: a packet joined across hooks, or a drop or
/// retransmission as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Traced {
    Packet(TracedPacket),
    Drop(TracedDrop),
}

/// One drop (`DIR_DROPPED`) or retransmission (`DIR_RETRANSMITTED`) from the trace ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracedDrop {
    pub ts_ns: u64,
    /// `None` when the kernel could not read the packet's headers.
    pub tuple: Option<FlowTuple>,
    /// Network namespace inode (the kernel puts it in the event's packet id, which drops
    /// do not need).
    pub netns: u32,
    pub ifindex: u32,
    pub reason: u32,
    pub bytes: u32,
    pub retransmit: bool,
}

impl TracedDrop {
    /// The drop an event describes, or `None` for a packet event.
    pub fn from_event(e: &TraceEvent) -> Option<Self> {
        let retransmit = match e.direction {
            DIR_DROPPED => false,
            DIR_RETRANSMITTED => true,
            _ => return None,
        };
        Some(Self {
            ts_ns: e.ts_ns,
            tuple: (e.tuple.ip_version != 0).then(|| FlowTuple::from_tuple(&e.tuple)),
            netns: e.id.ident,
            ifindex: e.ifindex,
            reason: e.reason,
            bytes: e.bytes,
            retransmit,
        })
    }
}

/// One packet at every hook of this node that saw it, in time order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracedPacket {
    pub hops: Vec<Sighting>,
}

impl TracedPacket {
    /// The distinct tuples the packet had, in the order of its hooks.
    pub fn tuples(&self) -> Vec<FlowTuple> {
        let mut out: Vec<FlowTuple> = Vec::new();
        for h in &self.hops {
            if !out.contains(&h.tuple) {
                out.push(h.tuple);
            }
        }
        out
    }
}

/// Joins the events of one packet (same packet id, close in time, each hook once).
#[derive(Debug, Default)]
pub struct Assembler {
    pending: HashMap<[u32; 4], TracedPacket>,
}

fn id_key(id: &PacketId) -> [u32; 4] {
    [id.ident, id.len_proto, id.l4_a, id.l4_b]
}

impl Assembler {
    /// Adds one event. Returns the packet it ends, if it cannot belong to the pending one
    /// with its id (its hook already saw that packet, or it comes too late).
    pub fn push(&mut self, id: &PacketId, s: Sighting) -> Option<TracedPacket> {
        let key = id_key(id);
        let mut finished = None;
        if let Some(p) = self.pending.get(&key) {
            let last = p.hops.iter().map(|h| h.ts_ns).max().unwrap_or(0);
            let repeats = p
                .hops
                .iter()
                .any(|h| h.ifindex == s.ifindex && h.direction == s.direction);
            if repeats || s.ts_ns.saturating_sub(last) > JOIN_MAX_GAP_NS {
                finished = self.pending.remove(&key);
            }
        }
        self.pending
            .entry(key)
            .or_insert_with(|| TracedPacket { hops: Vec::new() })
            .hops
            .push(s);
        finished.map(sorted)
    }

    /// The packets whose first hook is older than the join window at `now_ns`.
    pub fn flush(&mut self, now_ns: u64) -> Vec<TracedPacket> {
        let mut out = Vec::new();
        self.pending.retain(|_, p| {
            let first = p.hops.iter().map(|h| h.ts_ns).min().unwrap_or(0);
            if now_ns.saturating_sub(first) >= JOIN_WINDOW_NS {
                out.push(sorted(std::mem::replace(
                    p,
                    TracedPacket { hops: Vec::new() },
                )));
                false
            } else {
                true
            }
        });
        out.sort_by_key(|p| p.hops.first().map(|h| h.ts_ns));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

fn sorted(mut p: TracedPacket) -> TracedPacket {
    p.hops.sort_by_key(|h| h.ts_ns);
    p
}

#[cfg(test)]
mod tests;
