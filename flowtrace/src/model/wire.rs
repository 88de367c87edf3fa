//! The JSON the agent's HTTP API serves (docs/api.md), shared by the server that writes it
//! and the client commands that read it. Plain data: no behaviour beyond formatting.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    names::{Endpoint, ServiceRef},
    tuple::{Direction, FlowTuple, HookView, TupleView},
};

/// A flow as the API serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// "tcp", "udp", "icmp", "icmpv6", "sctp" or the protocol number.
    pub protocol: String,
    pub protocol_number: u8,
    pub ip_version: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// For ICMP: the echo identifier (0 for other types).
    pub src_port: u16,
    /// For ICMP: `type << 8 | code`.
    pub dst_port: u16,
    /// Largest packet count over the hops (the flow's packets, if every hop saw them).
    pub packets: u64,
    /// Largest layer-3 byte count over the hops.
    pub bytes: u64,
    /// Largest payload byte count over the hops (what the applications sent, without the
    /// IP and transport headers).
    #[serde(default)]
    pub payload_bytes: u64,
    /// Hops in the order they first saw the flow.
    pub hops: Vec<HopRecord>,
    /// Who sent: pod, Service, node or pod network (absent without metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint>,
    /// Who received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint>,
    /// The Service this flow reaches (or answers for): by its cluster IP or NodePort, or
    /// through the NAT translation on the backend side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// The NAT translation this flow is the original or the translated side of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Translation>,
    /// Who really sent, when `src_endpoint` is a Service address the source was un-DNATed
    /// to (a reply): the backend it came from. Absent when that is `src_endpoint` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_peer: Option<Endpoint>,
    /// Who really received, when `dst_endpoint` is a Service address kube-proxy DNATs (a
    /// request before the rewrite): the backend it was sent to. Absent when that is
    /// `dst_endpoint` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_peer: Option<Endpoint>,
    /// Packets of this tuple the kernel dropped on this node, by where and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<DropRecord>,
    /// Their total, in packets.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// TCP segments the sender on this node retransmitted on this tuple.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retransmits: u64,
}

/// For `skip_serializing_if`: counters that are zero are left out.
pub fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Which network namespace of the node a packet died in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropNetns {
    /// The node's own (forwarding, routing, the overlay, the host's sockets).
    Node,
    /// A pod's (its sockets, its own routing and filtering).
    Pod,
}

/// A hook of a flow, named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopRef {
    pub interface: String,
    pub direction: Direction,
}

/// Packets of one flow that died at one place for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    /// The kernel's `enum skb_drop_reason`, without `SKB_DROP_REASON_` (`NETFILTER_DROP`).
    pub reason: String,
    pub reason_code: u32,
    pub packets: u64,
    /// Layer-3 bytes of those packets, as the hops count them.
    pub bytes: u64,
    /// The device the packet was at when it was freed ("" when it had none).
    pub device: String,
    pub ifindex: u32,
    pub netns: DropNetns,
    /// For a drop inside a pod: the host side of that pod's veth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_veth: Option<String>,
    /// The flow's last hop on this node before it died (absent when no hook saw the flow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<HopRef>,
    /// The address of the kernel code that freed it (`kfree_skb`'s caller), for
    /// `/proc/kallsyms` on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub last_seen_unix_ns: u64,
}

impl FlowRecord {
    /// The record of tuple `t` with these hops (in order) and ends, and nothing named or
    /// joined yet: the flow's packets and bytes are the largest over its hops.
    pub fn new(
        t: &FlowTuple,
        hops: Vec<HopRecord>,
        src_endpoint: Option<Endpoint>,
        dst_endpoint: Option<Endpoint>,
    ) -> Self {
        Self {
            protocol: super::tuple::protocol_name(t.protocol),
            protocol_number: t.protocol,
            ip_version: if t.src.is_ipv4() { 4 } else { 6 },
            src: t.src,
            dst: t.dst,
            src_port: t.src_port,
            dst_port: t.dst_port,
            packets: hops.iter().map(|h| h.packets).max().unwrap_or(0),
            bytes: hops.iter().map(|h| h.bytes).max().unwrap_or(0),
            payload_bytes: hops.iter().map(|h| h.payload_bytes).max().unwrap_or(0),
            hops,
            src_endpoint,
            dst_endpoint,
            service: None,
            nat: None,
            src_peer: None,
            dst_peer: None,
            drops: Vec::new(),
            dropped: 0,
            retransmits: 0,
        }
    }

    /// The flow's 5-tuple.
    pub fn tuple(&self) -> FlowTuple {
        FlowTuple {
            protocol: self.protocol_number,
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }
}

/// One hop of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopRecord {
    pub interface: String,
    pub ifindex: u32,
    pub direction: Direction,
    /// Wire packets (a GSO/GRO aggregate counts as its segments).
    pub packets: u64,
    /// Layer-3 bytes (IP header onwards) of those packets.
    pub bytes: u64,
    /// Their payload: the bytes after the IP and transport headers.
    #[serde(default)]
    pub payload_bytes: u64,
    pub first_seen_unix_ns: u64,
    pub last_seen_unix_ns: u64,
    /// Union of TCP flags seen, e.g. "SA.F" style letters: F S R P A U E C.
    pub tcp_flags: String,
    /// Packets of the flow that died after this hop and before the next.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_after: u64,
}

/// Where a translation stands after the last cross-check (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatState {
    /// Not checked yet (recorded since the last conntrack dump).
    Pending,
    Confirmed,
    Mismatch,
    NotInConntrack,
    ConntrackOnly,
    Missed,
}

/// Counters of the cross-check, for the API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatCounters {
    /// Rewrites recorded by the kernel programs (one per translation per drain).
    pub kernel_records: u64,
    pub confirmed: u64,
    pub conntrack_only: u64,
    /// Disagreements: a different translation in conntrack.
    pub mismatch: u64,
    /// Disagreements: a rewrite conntrack does not know.
    pub not_in_conntrack: u64,
    /// Disagreements: conntrack translated, both tuples were traced, the programs saw nothing.
    pub missed: u64,
    /// Cross-checks against conntrack (one per drain).
    pub conntrack_checks: u64,
    /// Conntrack dumps that failed.
    pub conntrack_errors: u64,
}

impl NatCounters {
    /// Every disagreement between the kernel programs and conntrack.
    pub fn disagreements(&self) -> u64 {
        self.mismatch + self.not_in_conntrack + self.missed
    }
}

/// One translation as the API serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    pub original: TupleView,
    pub translated: TupleView,
    /// What changed: "dst", "src" or "src+dst".
    pub rewrote: String,
    /// Interface and direction before and after the rewrite, when the programs saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub between: Option<[HookView; 2]>,
    pub state: NatState,
    /// "kernel", "conntrack" or "kernel+conntrack".
    pub source: String,
    pub kernel_sightings: u64,
    /// The Service whose address was translated (filled in from metadata by the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
}

/// What a latency entry measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencyKind {
    /// One way, from one hook to the next, for the same packet on this node.
    Hop,
    /// At one interface: SYN to SYN-ACK (the round trip beyond the interface).
    Handshake,
    /// At one interface: request data to the answering data (round trip beyond the
    /// interface, including the peer's time to answer).
    Response,
}

impl LatencyKind {
    /// The kind byte of the kernel's latency records: the one place it is decoded (a value
    /// the programs never write reads as a response round trip, as it always has).
    pub fn from_kernel(kind: u8) -> Self {
        match flowtrace_common::LatencyKind::from_raw(kind) {
            Some(flowtrace_common::LatencyKind::Hop) => LatencyKind::Hop,
            Some(flowtrace_common::LatencyKind::Handshake) => LatencyKind::Handshake,
            _ => LatencyKind::Response,
        }
    }

    /// `hop`, `handshake` or `response`, as labels and JSON write it.
    pub fn as_str(self) -> &'static str {
        match self {
            LatencyKind::Hop => "hop",
            LatencyKind::Handshake => "handshake",
            LatencyKind::Response => "response",
        }
    }
}

/// One histogram as the API serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyRecord {
    pub kind: LatencyKind,
    /// The flow at the later hook (round trips: the direction of the SYN or request).
    pub tuple: TupleView,
    /// The earlier hook (hop latency only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<HookView>,
    /// The later hook; for a round trip, the interface and direction where the answer
    /// passed (the question passed the same interface the other way).
    pub to: HookView,
    pub samples: u64,
    pub mean_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Percentiles estimated from the log2 buckets (upper bound of the bucket, capped by max).
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    /// Non-empty buckets as (upper bound in ns, samples).
    pub buckets: Vec<(u64, u64)>,
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
    /// A packet the kernel dropped on this node, live.
    Drop(Box<TraceDrop>),
    /// A TCP segment a socket on this node retransmitted, live.
    Retransmit(Box<TraceDrop>),
    /// The tracer read too slowly and this many packets were skipped.
    Lost {
        packets: u64,
    },
}

/// One drop or retransmission as it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceDrop {
    pub node: String,
    pub ts_unix_ns: u64,
    /// Drops: the kernel's reason (`NETFILTER_DROP`); absent for retransmissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub reason_code: u32,
    /// Absent when the packet's headers could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuple: Option<TupleView>,
    /// Drops: the device it was at ("" when none or inside a pod).
    #[serde(default)]
    pub device: String,
    pub netns: DropNetns,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_veth: Option<String>,
    /// Bytes of the dropped skb (of the retransmitted one).
    pub bytes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
}

/// The flow a drop belongs to, as `/v1/drops` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropFlow {
    pub protocol: String,
    pub protocol_number: u8,
    pub ip_version: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
}

impl DropFlow {
    pub fn of(f: &FlowRecord) -> Self {
        Self {
            protocol: f.protocol.clone(),
            protocol_number: f.protocol_number,
            ip_version: f.ip_version,
            src: f.src,
            dst: f.dst,
            src_port: f.src_port,
            dst_port: f.dst_port,
            src_endpoint: f.src_endpoint.clone(),
            dst_endpoint: f.dst_endpoint.clone(),
            service: f.service.clone(),
        }
    }
}

/// One line of `/v1/drops`' `drops`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEntry {
    #[serde(flatten)]
    pub flow: DropFlow,
    #[serde(flatten)]
    pub drop: DropRecord,
}

/// One line of `/v1/drops`' `retransmits`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetransmitEntry {
    #[serde(flatten)]
    pub flow: DropFlow,
    pub segments: u64,
    pub last_seen_unix_ns: u64,
}

/// What the kernel saw but flowtrace could not keep or place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropLoss {
    /// Drops and retransmissions the kernel could not record (its drop buffer was full).
    pub map_full: u64,
    /// Those drops by reason: what the per-flow records miss, so the reasons' totals stay
    /// exact in a flood (in every namespace the kernel saw: they could not be placed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub map_full_by_reason: BTreeMap<String, u64>,
    /// Drops and retransmissions of new tuples the agent's table (as large as `--max-flows`)
    /// had no room for: in `by_reason`, not listed per flow.
    #[serde(default)]
    pub table_full: u64,
    /// Drops and retransmissions in network namespaces this agent could not place on its
    /// node (on a real node: a pod namespace not yet mounted where --netns-dir points; in an
    /// emulated cluster sharing one kernel: the other nodes').
    pub unplaced: u64,
}

/// The relay's `/v1/drops`: every node's answer, and the nodes that did not answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayDropsResponse {
    pub nodes: Vec<DropsResponse>,
    pub missing: Vec<MissingNode>,
}

/// `/v1/drops`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropsResponse {
    pub node: String,
    /// Whether the drop programs are attached on this node.
    pub available: bool,
    /// Why not, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    pub drops: Vec<DropEntry>,
    pub retransmits: Vec<RetransmitEntry>,
    /// Packets dropped on this node since the agent started, by reason (also those whose
    /// headers could not be read).
    pub by_reason: BTreeMap<String, u64>,
    /// Segments retransmitted on this node since the agent started.
    pub retransmitted_segments: u64,
    /// More drops (or retransmissions) matched than `limit`: these are the largest.
    #[serde(default)]
    pub truncated: bool,
    pub lost: DropLoss,
    /// Why pod namespaces could not be listed, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_problem: Option<String>,
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
    /// Who really sent, when `src_endpoint` (at the first hook) is a Service address the source was un-DNATed
    /// to (a reply): the backend it came from. Absent when that is `src_endpoint` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_peer: Option<Endpoint>,
    /// Who really received, when `dst_endpoint` (at the first hook) is a Service address kube-proxy DNATs (a
    /// request before the rewrite): the backend it was sent to. Absent when that is
    /// `dst_endpoint` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_peer: Option<Endpoint>,
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

/// What the agent knows of conntrack's translated connections, as `/v1/nat` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtStats {
    /// Whether the NEW/DESTROY event subscription works (else: a dump after every drain).
    pub subscribed: bool,
    /// Events applied.
    pub events: u64,
    /// Times the kernel dropped events (each forces a resync dump).
    pub overflows: u64,
    /// Full table dumps (start, periodic resync, overflows, or every drain without events).
    pub dumps: u64,
    /// Translated connections held (live, and destroyed ones kept for the idle timeout).
    pub translated_connections: usize,
}

/// Sync state of one kind, as `/v1/metadata` reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KindStatus {
    /// A complete list was applied and no error has happened since.
    pub synced: bool,
    /// Complete lists applied (the first, then one after each failure or expired watch).
    pub lists: u64,
    /// Watch or list failures.
    pub errors: u64,
    /// Objects applied or deleted from watch events.
    pub events: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How programs are attached.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), clsact otherwise.
    Auto,
    /// bpf_link based TCX attachment; detached by the kernel when the agent dies.
    Tcx,
    /// Classic clsact qdisc + direct-action cls_bpf filter.
    Clsact,
}

/// Body of `GET /v1/flows`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub node: String,
    /// The flows (at most the request's `limit`, those with the most bytes).
    pub flows: Vec<FlowRecord>,
    /// Flows that matched the filter, `flows` or more.
    #[serde(default)]
    pub matched: usize,
    /// `matched` exceeded the limit: only the largest flows are in `flows`.
    #[serde(default)]
    pub truncated: bool,
}

/// `GET /v1/pathdata`: what the path builder needs from one node, from one drain.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PathDataResponse {
    pub node: String,
    pub flows: Vec<FlowRecord>,
    pub latency: Vec<LatencyRecord>,
    /// The node's tunnel devices (VXLAN, Geneve): an ingress there came from another node.
    pub tunnels: Vec<String>,
}

/// One entry of `GET /v1/interfaces`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InterfaceRecord {
    pub ifindex: u32,
    pub name: String,
    pub kind: Option<String>,
    /// `pod`, `overlay`, `uplink` or `other` (`host::roles`).
    #[serde(default)]
    pub role: String,
    /// The evidence for the role (a bridge, a route, an address), as `ip` would show it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

/// A loaded kernel program.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProgramRecord {
    pub name: String,
    pub id: u32,
}

/// Body of `GET /v1/interfaces`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InterfacesResponse {
    pub attach_mode: AttachMode,
    /// Kernel IDs of flowtrace's programs (see `bpftool prog show id N`).
    pub programs: Vec<ProgramRecord>,
    pub synced: bool,
    pub interfaces: Vec<InterfaceRecord>,
    /// Links that are not traced but could be mistaken for ones that should be: veths to
    /// another namespace that nothing ties to a pod, the uplink, each with its evidence.
    #[serde(default)]
    pub not_traced: Vec<InterfaceRecord>,
}

/// Body of `GET /v1/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Kernel counters by name (see `flowtrace_common::Counter`), summed over CPUs.
    pub kernel: BTreeMap<String, u64>,
    /// Sum of the counters of packets that were malformed or not flow-shaped.
    pub unparsed_packets: u64,
    pub flows: usize,
    pub flows_evicted: u64,
    pub flows_expired: u64,
    pub drains: u64,
    pub drain_errors: u64,
    pub attach_failures: u64,
    /// NAT cross-check counters (see `/v1/nat`).
    pub nat: NatCounters,
    /// Live tracers attached to `/v1/trace`.
    #[serde(default)]
    pub tracers: usize,
    /// Whether the kernel programs are writing trace events now (read back from the
    /// programs' control word: on exactly while `tracers` > 0).
    #[serde(default)]
    pub kernel_tracing: bool,
    /// Packets joined from trace events since the agent started.
    #[serde(default)]
    pub traced_packets: u64,
}

/// Body of `GET /v1/latency`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyResponse {
    pub node: String,
    /// One packet in `sample_rate` is measured (0: latency tracking is off).
    pub sample_rate: u32,
    /// Of those, a flow gives each hook at most one per window of this many nanoseconds
    /// (`--latency-per-flow-ms`, rounded up to a power of two; 0: no cap).
    #[serde(default)]
    pub sample_window_ns: u64,
    pub latency: Vec<LatencyRecord>,
}

/// Body of `GET /v1/metadata`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetadataResponse {
    /// `none`, `in-cluster`, `kubeconfig PATH` or `file PATH`.
    pub source: String,
    /// Every followed kind is synced (always true with no source).
    pub synced: bool,
    pub kinds: BTreeMap<String, KindStatus>,
    /// Objects held, by kind.
    pub objects: BTreeMap<String, usize>,
    /// Objects skipped because a field was missing or malformed, by kind.
    pub skipped: BTreeMap<String, u64>,
}

/// Body of `GET /v1/nat`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NatResponse {
    pub node: String,
    /// Whether the agent reads conntrack (off with `--no-conntrack`).
    pub conntrack: bool,
    /// How conntrack is followed: events, dumps, translated connections held.
    pub conntrack_source: CtStats,
    pub counters: NatCounters,
    /// Sum of the disagreement counters (mismatch + not_in_conntrack + missed).
    pub disagreements: u64,
    pub translations: Vec<Translation>,
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /v1/status`: who this agent is and whether it is ready (what the relay's
/// `/v1/nodes` reports for each node).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusResponse {
    pub node: String,
    pub version: String,
    pub ready: bool,
    /// Why it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    pub interfaces_synced: bool,
    pub metadata_synced: bool,
}

/// A node the relay could not hear from for one answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingNode {
    /// The agent's URL.
    pub agent: String,
    /// Its node, when the relay has heard from it before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub error: String,
}

/// One agent's share of a relay answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeAnswer {
    pub node: String,
    pub agent: String,
    /// Flows it returned (after its own filter and limit).
    pub flows: usize,
    /// It had more matching flows than the limit.
    #[serde(default)]
    pub truncated: bool,
    pub elapsed_ms: u64,
}

/// A flow of the relay's `/v1/flows`: an agent's flow record and the node it came from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFlow {
    pub node: String,
    #[serde(flatten)]
    pub flow: FlowRecord,
}

/// The relay's `GET /v1/flows`: every answering node's flows, and the nodes missing.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RelayFlowsResponse {
    pub nodes: Vec<NodeAnswer>,
    pub missing: Vec<MissingNode>,
    pub flows: Vec<NodeFlow>,
    /// Some node, or the relay's own limit, left flows out.
    pub truncated: bool,
}

/// One entry of the relay's `GET /v1/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node, from the agent's answer or its EndpointSlice (absent for a static agent
    /// never heard from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub agent: String,
    /// How the relay knows this agent: `static` (--agents) or `endpointslice`.
    pub source: String,
    /// The agent answered its status request.
    pub ok: bool,
    /// The rest of its `/v1/status` answer (absent when it did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces_synced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_synced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ok_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A line of the relay's `/v1/trace`: an agent's line with its node, or news of a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RelayTraceLine {
    /// The stream started: these agents were asked.
    Start { agents: usize },
    /// An agent's stream is open (again).
    Joined {
        agent: String,
        node: String,
        sample: u32,
    },
    /// An agent's stream failed or could not open; retried.
    Missing(MissingNode),
    /// A packet, as the agent described it (its `node` says where).
    Packet(Box<TracePacket>),
    /// A drop, as the agent described it.
    Drop(Box<TraceDrop>),
    /// A retransmission, as the agent described it.
    Retransmit(Box<TraceDrop>),
    /// An agent dropped packets for this slow stream.
    Lost { node: String, packets: u64 },
}
