//! Live tracing (`/v1/trace`, `flowtrace trace`): the sampled packets and every TCP SYN, hook
//! by hook, as they happen.
//!
//! While at least one tracer is attached the agent sets the `CONTROL_TRACING` bit and the
//! programs write one event per such packet per hook to the `TRACE_EVENTS` ring buffer.
//! With no tracer the bit is clear and the programs only test it. The reader task here
//! joins the events of one packet by its packet id (the fields NAT does not change, the
//! same id latency sampling uses), waits [`JOIN_WINDOW_NS`] for the packet's later hooks,
//! and hands the joined packet to every tracer; each tracer names it, applies its filter
//! and streams it as one JSON line.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use flowtrace_common::{PacketId, TraceEvent, DIR_INGRESS};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::warn;

use crate::{
    filter::FlowFilter,
    flows::{protocol_name, tcp_flags_string, Direction, FlowRecord, FlowTuple, HopRecord},
    k8s::{Endpoint, MetaCache, ServiceRef},
    nat::{NatTable, TupleView},
};

/// How long a packet waits for its later hooks before it is handed to the tracers. The
/// hooks of one node see a packet microseconds apart; this also covers a busy CPU.
pub const JOIN_WINDOW_NS: u64 = 20_000_000;

/// Two events of one packet id further apart than this are two packets (a retransmission
/// of the same segment with the same IP id, say).
const JOIN_MAX_GAP_NS: u64 = 10_000_000;

/// Latency sampling used while tracing when the agent runs with `--latency-sample 0`
/// (tracing needs sampled packets; SYNs are traced either way).
pub const TRACE_SAMPLE_WHEN_OFF: u32 = 64;

/// Joined packets waiting in a tracer's queue; a slower tracer loses the oldest and is told.
const TRACER_QUEUE: usize = 4096;

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
    fn from_event(e: &TraceEvent) -> Self {
        Self {
            ts_ns: e.ts_ns,
            ifindex: e.ifindex,
            direction: if e.direction == DIR_INGRESS {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            tuple: FlowTuple::from_tuple(&e.tuple),
            tcp_flags: e.tcp_flags,
            bytes: e.bytes,
        }
    }
}

/// One packet at every hook of this node that saw it, in time order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracedPacket {
    pub hops: Vec<Sighting>,
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

/// The agent's tracers: how many are attached and the channel joined packets go out on.
pub struct TraceHub {
    tx: broadcast::Sender<Arc<TracedPacket>>,
    tracers: AtomicUsize,
    /// Events the ring buffer held that were too short to be events (never expected).
    pub bad_events: AtomicU64,
    /// Joined packets handed to the tracers.
    pub packets: AtomicU64,
}

impl Default for TraceHub {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceHub {
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(TRACER_QUEUE).0,
            tracers: AtomicUsize::new(0),
            bad_events: AtomicU64::new(0),
            packets: AtomicU64::new(0),
        }
    }

    /// Attached tracers.
    pub fn tracers(&self) -> usize {
        self.tracers.load(Ordering::SeqCst)
    }

    /// Registers a tracer. The caller then makes the kernel state follow
    /// [`TraceHub::tracers`] (the agent's `apply_tracing`), and again once the
    /// returned guard is dropped.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TracedPacket>> {
        self.tracers.fetch_add(1, Ordering::SeqCst);
        self.tx.subscribe()
    }

    /// Unregisters a tracer (see [`TraceHub::subscribe`]).
    pub fn unsubscribe(&self) {
        let _ = self
            .tracers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn publish(&self, p: TracedPacket) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        // No receiver: the last tracer left while packets were in flight.
        let _ = self.tx.send(Arc::new(p));
    }
}

/// Reads the trace ring buffer for the agent's lifetime, joining and publishing packets.
/// With no tracer attached the programs write nothing and this task sleeps in `poll`.
pub async fn read_ring(ring: RingBuf<MapData>, hub: Arc<TraceHub>) {
    // Only readable: the ring buffer is written by the programs, never by us.
    // SAFETY: the RingBuf owns its map fd, which stays open and the same until the RingBuf,
    // owned by the AsyncFd, is dropped with it.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot poll the trace ring buffer; live tracing is unavailable");
            return;
        }
    };
    let mut asm = Assembler::default();
    let tick = Duration::from_nanos(JOIN_WINDOW_NS / 2);
    loop {
        let ready = if asm.is_empty() {
            Some(ring.readable_mut().await)
        } else {
            tokio::time::timeout(tick, ring.readable_mut()).await.ok()
        };
        match ready {
            Some(Ok(mut guard)) => {
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let Some(event) = decode(&item) else {
                        hub.bad_events.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if let Some(done) = asm.push(&event.id, Sighting::from_event(&event)) {
                        hub.publish(done);
                    }
                }
                guard.clear_ready();
            }
            Some(Err(e)) => {
                warn!(error = %e, "polling the trace ring buffer failed; live tracing stops");
                return;
            }
            None => {}
        }
        for p in asm.flush(crate::agent::monotonic_ns()) {
            hub.publish(p);
        }
    }
}

fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() < std::mem::size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: the length is checked; TraceEvent is plain old data (any bit pattern is a
    // value) and read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) })
}

/// One line of the `/v1/trace` stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TraceLine {
    /// First line: the stream is live.
    Start {
        node: String,
        /// One packet in this many is traced (plus every SYN).
        sample: u32,
    },
    Packet(Box<TracePacket>),
    /// The tracer read too slowly and this many packets were skipped.
    Lost {
        packets: u64,
    },
}

/// A packet across this node's hooks, named.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TracePacket {
    pub node: String,
    /// When the first hook saw it.
    pub ts_unix_ns: u64,
    pub protocol: String,
    pub protocol_number: u8,
    /// At the first hook.
    pub tcp_flags: String,
    /// Layer-3 bytes at the first hook (a GSO/GRO aggregate counts whole).
    pub bytes: u32,
    /// The tuple at the first hook.
    pub tuple: TupleView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint>,
    /// The Service this packet goes to or answers for, when this node can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    pub hops: Vec<TraceHop>,
    /// From the first hook to the last on this node.
    pub node_time_ns: u64,
}

/// The packet at one hook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceHop {
    pub interface: String,
    pub ifindex: u32,
    pub direction: Direction,
    pub ts_unix_ns: u64,
    /// Time since the previous hook (0 at the first).
    pub since_previous_ns: u64,
    /// Set where the tuple differs from the previous hook's: the NAT step between them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatStep>,
}

/// A rewrite between two hooks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatStep {
    /// "dst", "src" or "src+dst".
    pub rewrote: String,
    pub before: TupleView,
    pub after: TupleView,
    /// Who the rewritten address is now (the backend pod of a DNAT, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_endpoint: Option<Endpoint>,
}

/// What naming and filtering a packet needs from the agent.
pub struct Namer<'a> {
    pub node: &'a str,
    pub meta: &'a MetaCache,
    pub nat: &'a NatTable,
    pub iface: &'a dyn Fn(u32) -> String,
    pub mono_to_unix_ns: i128,
}

impl Namer<'_> {
    /// The packet named, if it passes `filter` at any of its hooks.
    pub fn describe(&self, p: &TracedPacket, filter: &FlowFilter) -> Option<TracePacket> {
        let first = p.hops.first()?;
        let unix = |mono: u64| (mono as i128 + self.mono_to_unix_ns).max(0) as u64;
        let service = p
            .hops
            .iter()
            .find_map(|h| self.service_of(&h.tuple))
            .or_else(|| {
                p.hops.iter().find_map(|h| {
                    let t = self
                        .nat
                        .original_of(&h.tuple)
                        .or_else(|| self.nat.original_of(&h.tuple.reversed()))?;
                    self.service_of(&t)
                })
            });
        let mut hops = Vec::with_capacity(p.hops.len());
        let mut prev: Option<&Sighting> = None;
        for h in &p.hops {
            let nat = prev.filter(|b| b.tuple != h.tuple).map(|b| {
                let (src, dst) = (
                    b.tuple.src != h.tuple.src || b.tuple.src_port != h.tuple.src_port,
                    b.tuple.dst != h.tuple.dst || b.tuple.dst_port != h.tuple.dst_port,
                );
                NatStep {
                    rewrote: match (src, dst) {
                        (true, true) => "src+dst",
                        (true, false) => "src",
                        _ => "dst",
                    }
                    .into(),
                    before: b.tuple.into(),
                    after: h.tuple.into(),
                    after_endpoint: if dst {
                        self.meta.resolve(&h.tuple.dst).map(|e| (*e).clone())
                    } else {
                        self.meta.resolve(&h.tuple.src).map(|e| (*e).clone())
                    },
                }
            });
            hops.push(TraceHop {
                interface: (self.iface)(h.ifindex),
                ifindex: h.ifindex,
                direction: h.direction,
                ts_unix_ns: unix(h.ts_ns),
                since_previous_ns: prev.map_or(0, |b| h.ts_ns.saturating_sub(b.ts_ns)),
                nat,
            });
            prev = Some(h);
        }
        let resolve = |ip| self.meta.resolve(ip).map(|e| (*e).clone());
        let out = TracePacket {
            node: self.node.to_string(),
            ts_unix_ns: unix(first.ts_ns),
            protocol: protocol_name(first.tuple.protocol),
            protocol_number: first.tuple.protocol,
            tcp_flags: tcp_flags_string(first.tcp_flags),
            bytes: first.bytes,
            tuple: first.tuple.into(),
            src_endpoint: resolve(&first.tuple.src),
            dst_endpoint: resolve(&first.tuple.dst),
            service,
            node_time_ns: p
                .hops
                .last()
                .map_or(0, |l| l.ts_ns.saturating_sub(first.ts_ns)),
            hops,
        };
        self.passes(p, &out, filter).then_some(out)
    }

    /// The Service at the tuple's destination (a request) or source (a reply).
    fn service_of(&self, t: &FlowTuple) -> Option<ServiceRef> {
        self.meta
            .service_at(&t.dst, t.dst_port, t.protocol)
            .or_else(|| self.meta.service_at(&t.src, t.src_port, t.protocol))
    }

    /// Whether the filter matches the packet at any hook. A Service filter also matches
    /// a packet to or from one of the Service's backends: on the server's node the
    /// translation happened on the client's node, so only the backend address is seen.
    fn passes(&self, p: &TracedPacket, named: &TracePacket, filter: &FlowFilter) -> bool {
        let hop_records: Vec<HopRecord> = named
            .hops
            .iter()
            .map(|h| HopRecord {
                interface: h.interface.clone(),
                ifindex: h.ifindex,
                direction: h.direction,
                packets: 1,
                bytes: u64::from(named.bytes),
                first_seen_unix_ns: h.ts_unix_ns,
                last_seen_unix_ns: h.ts_unix_ns,
                tcp_flags: named.tcp_flags.clone(),
            })
            .collect();
        let mut seen: Vec<FlowTuple> = Vec::new();
        for h in &p.hops {
            if seen.contains(&h.tuple) {
                continue;
            }
            seen.push(h.tuple);
            let t = h.tuple;
            let service = named.service.clone().or_else(|| {
                if filter.services.is_empty() {
                    return None;
                }
                let backed: Vec<String> = self
                    .meta
                    .services_backed_by(&t.dst)
                    .into_iter()
                    .chain(self.meta.services_backed_by(&t.src))
                    .collect();
                filter
                    .services
                    .iter()
                    .find(|s| backed.contains(&s.to_string()))
                    .map(|s| ServiceRef {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        port_name: None,
                    })
            });
            let record = FlowRecord {
                protocol: named.protocol.clone(),
                protocol_number: t.protocol,
                ip_version: if t.src.is_ipv4() { 4 } else { 6 },
                src: t.src,
                dst: t.dst,
                src_port: t.src_port,
                dst_port: t.dst_port,
                packets: 1,
                bytes: u64::from(named.bytes),
                hops: hop_records.clone(),
                src_endpoint: self.meta.resolve(&t.src).map(|e| (*e).clone()),
                dst_endpoint: self.meta.resolve(&t.dst).map(|e| (*e).clone()),
                service,
                nat: None,
            };
            if filter.matches(&record) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests;
