//! Paths: the ordered hops each direction of a connection crossed, node after node, with
//! the NAT step where the tuple changed and the latency the kernel programs measured.
//!
//! Built from what agents serve (`/v1/flows`, `/v1/latency`, `/v1/interfaces`), so the
//! CLI can join the views of several nodes; nothing here needs synchronised clocks.
//!
//! - On one node, a tuple's hops are ordered by first sighting (one clock). Where the
//!   agent saw a translation of that tuple, a NAT step follows and the path goes on with
//!   the translated tuple's hops: kube-proxy rewrites in netfilter, which runs after the
//!   TC ingress hooks and before the TC egress hooks of the node.
//! - Across nodes, the path goes on at a node that has the same tuple and met it first at
//!   an ingress hook. The first node is the one where the tuple starts with an egress
//!   hook (it left that node's own stack) or with an ingress hook on an interface that is
//!   not a tunnel (it came from a pod).
//! - Which way is the request: the tuple whose SYN the kernel saw (handshakes are keyed by
//!   it); without a handshake, the tuple from the higher port (clients use ephemeral ports).
//! - Latency per hop: the one-way time from the previous hook on the same node (`hop`
//!   histograms), and the round trips (`handshake`, `response`) seen at the hook. The
//!   round trip of the segment between two consecutive hooks is the difference of their
//!   mean round trips; at the last hook of the request it is the server's own time.

use std::collections::{BTreeMap, HashMap, HashSet};

use flowtrace_common::{LatencyHist, LATENCY_BUCKETS};
use serde::{Deserialize, Serialize};

use crate::{
    model::{
        wire::{FlowsResponse, InterfacesResponse, LatencyKind, LatencyRecord, LatencyResponse},
        Direction, Endpoint, FlowRecord, FlowTuple, ServiceRef, TupleView,
    },
    query::filter::parse_object,
};

/// What one agent served, as the path builder needs it.
#[derive(Debug, Default)]
pub struct NodeView {
    pub node: String,
    pub flows: Vec<FlowRecord>,
    pub latency: Vec<LatencyRecord>,
    /// Names of the node's tunnel devices (VXLAN, Geneve): an ingress there came from
    /// another node.
    pub tunnels: HashSet<String>,
}

impl NodeView {
    /// One agent's view from its API answers (`/v1/flows`, `/v1/latency`, `/v1/interfaces`).
    pub fn from_api(
        flows: FlowsResponse,
        latency: LatencyResponse,
        interfaces: InterfacesResponse,
    ) -> Self {
        NodeView {
            node: flows.node,
            flows: flows.flows,
            latency: latency.latency,
            tunnels: interfaces
                .interfaces
                .into_iter()
                .filter(|i| matches!(i.kind.as_deref(), Some("vxlan" | "geneve")))
                .map(|i| i.name)
                .collect(),
        }
    }
}

impl NodeView {
    /// One agent's view from its `/v1/pathdata` answer.
    pub fn from_pathdata(d: crate::model::wire::PathDataResponse) -> Self {
        NodeView {
            node: d.node,
            flows: d.flows,
            latency: d.latency,
            tunnels: d.tunnels.into_iter().collect(),
        }
    }
}

/// The relay's `/v1/path`: the paths joined over the nodes that answered, and the nodes
/// that did not (a path through a missing node lacks its hops there).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PathAnswer {
    pub paths: Vec<PathRecord>,
    /// The nodes whose views were joined.
    pub nodes: Vec<String>,
    pub missing: Vec<crate::model::wire::MissingNode>,
}

/// One end of `flowtrace path`: an address, a pod, a workload or a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathEnd {
    Ip(std::net::IpAddr),
    Pod {
        namespace: String,
        name: String,
    },
    Workload {
        namespace: String,
        name: String,
    },
    Service {
        namespace: String,
        name: String,
    },
    /// Every source or destination (the map's query: all connections).
    Any,
}

impl PathEnd {
    /// `IP`, `pod/NS/NAME`, `workload/NS/NAME` (or `deploy/`, `ds/`, `sts/`...: any
    /// workload kind) or `svc/NS/NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(PathEnd::Ip(ip));
        }
        let usage = "expected an IP address, pod/NAMESPACE/NAME, workload/NAMESPACE/NAME \
                     or svc/NAMESPACE/NAME";
        let mut parts = s.splitn(3, '/');
        let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{s:?}: {usage}"));
        };
        parse_object("path", &format!("{ns}/{name}")).map_err(|e| format!("{s:?}: {e}"))?;
        let (namespace, name) = (ns.to_string(), name.to_string());
        match kind {
            "pod" | "po" => Ok(PathEnd::Pod { namespace, name }),
            "svc" | "service" => Ok(PathEnd::Service { namespace, name }),
            "workload" | "deploy" | "deployment" | "ds" | "daemonset" | "sts" | "statefulset"
            | "job" | "cronjob" => Ok(PathEnd::Workload { namespace, name }),
            other => Err(format!("{s:?}: unknown kind {other:?}; {usage}")),
        }
    }

    fn is_endpoint(&self, addr: &std::net::IpAddr, e: Option<&Endpoint>) -> bool {
        match self {
            PathEnd::Any => true,
            PathEnd::Ip(ip) => ip == addr,
            PathEnd::Pod { namespace, name } => e.is_some_and(|e| {
                e.kind == crate::model::EndpointKind::Pod
                    && e.namespace.as_deref() == Some(namespace)
                    && &e.name == name
            }),
            PathEnd::Workload { namespace, name } => e.is_some_and(|e| {
                e.namespace.as_deref() == Some(namespace)
                    && e.workload.as_ref().is_some_and(|w| &w.name == name)
            }),
            PathEnd::Service { namespace, name } => e.is_some_and(|e| {
                e.kind == crate::model::EndpointKind::Service
                    && e.namespace.as_deref() == Some(namespace)
                    && &e.name == name
            }),
        }
    }

    fn is_service(&self, s: Option<&ServiceRef>) -> bool {
        match self {
            PathEnd::Service { namespace, name } => {
                s.is_some_and(|s| &s.namespace == namespace && &s.name == name)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for PathEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathEnd::Ip(ip) => write!(f, "{ip}"),
            PathEnd::Pod { namespace, name } => write!(f, "pod/{namespace}/{name}"),
            PathEnd::Workload { namespace, name } => write!(f, "workload/{namespace}/{name}"),
            PathEnd::Service { namespace, name } => write!(f, "svc/{namespace}/{name}"),
            PathEnd::Any => write!(f, "*"),
        }
    }
}

/// Latency figures of one histogram (nanoseconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub mean_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
}

/// One step of a path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "lowercase")]
pub enum Step {
    /// A hook the packets crossed.
    Hop {
        node: String,
        interface: String,
        direction: Direction,
        /// The tuple the packets had there.
        tuple: TupleView,
        packets: u64,
        bytes: u64,
        /// The applications' bytes among them (after the IP and transport headers).
        #[serde(default)]
        payload_bytes: u64,
        /// One-way time from the previous hook of the same node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_previous: Option<LatencySummary>,
        /// SYN to SYN-ACK as seen at this hook.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handshake_rtt: Option<LatencySummary>,
        /// Request data to the answering data as seen at this hook.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response_rtt: Option<LatencySummary>,
    },
    /// The tuple changed between the previous hop and the next (kube-proxy's NAT).
    Nat {
        node: String,
        from: TupleView,
        to: TupleView,
        /// "dst", "src" or "src+dst".
        rewrote: String,
    },
    /// Packets that died after the previous hop: where and why (the kernel's reason).
    Drop {
        node: String,
        reason: String,
        /// The device they were at ("" inside a pod or without one).
        device: String,
        /// Inside a pod: the host side of its veth.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod_veth: Option<String>,
        packets: u64,
        bytes: u64,
    },
}

impl Step {
    /// The step in a few words: `node1 veth1a2b ingress`, `node1 nat dst`,
    /// `node2 drop NETFILTER_DROP`.
    pub fn label(&self) -> String {
        match self {
            Step::Hop {
                node,
                interface,
                direction,
                ..
            } => format!("{node} {interface} {}", direction.as_str()),
            Step::Nat { node, rewrote, .. } => format!("{node} nat {rewrote}"),
            Step::Drop { node, reason, .. } => format!("{node} drop {reason}"),
        }
    }
}

/// Round trip spent between two consecutive hops of the request path: the mean round trip
/// at the earlier hop less the mean at the later one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub from: String,
    pub to: String,
    /// Both hops are on the same node.
    pub in_node: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_rtt_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_rtt_ns: Option<i64>,
}

/// The path of one direction of some connections that crossed the same hops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leg {
    /// The tuple as it left its source.
    pub tuple: TupleView,
    pub steps: Vec<Step>,
}

/// The paths of connections from SRC to DST that crossed the same hops, with latency
/// summed over them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathRecord {
    pub protocol: String,
    pub src_endpoint: Option<Endpoint>,
    pub dst_endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// How many connections (request tuples) took this path.
    pub connections: u64,
    pub request: Leg,
    /// The answer's path, when any answer was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Leg>,
    /// Round trip per segment of the request path.
    pub segments: Vec<Segment>,
    /// Round trip beyond the client's first hop less the round trip at the server's last
    /// hop: the time the network took (response round trips, else handshakes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_time_ns: Option<i64>,
    /// Response round trip at the last hop before the server: the server's own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time_ns: Option<u64>,
}

/// A hop before merging: histograms kept whole so connections can be summed. Built per
/// query and dropped with it, so the size of the `Hop` variant does not matter.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum RawStep {
    Hop {
        node: String,
        interface: String,
        direction: Direction,
        tuple: FlowTuple,
        packets: u64,
        bytes: u64,
        payload_bytes: u64,
        /// Earliest and latest sighting at this hook, over the merged connections.
        seen_unix_ns: (u64, u64),
        from_previous: Option<LatencyHist>,
        handshake: Option<LatencyHist>,
        response: Option<LatencyHist>,
    },
    Nat {
        node: String,
        from: FlowTuple,
        to: FlowTuple,
        rewrote: String,
    },
    Drop {
        node: String,
        reason: String,
        device: String,
        pod_veth: Option<String>,
        packets: u64,
        bytes: u64,
    },
}

impl RawStep {
    /// What makes two connections' steps the same step.
    fn shape(&self) -> (String, String, Option<Direction>) {
        match self {
            RawStep::Hop {
                node,
                interface,
                direction,
                ..
            } => (node.clone(), interface.clone(), Some(*direction)),
            RawStep::Nat { node, rewrote, .. } => (node.clone(), format!("nat {rewrote}"), None),
            RawStep::Drop {
                node,
                reason,
                device,
                pod_veth,
                ..
            } => (
                node.clone(),
                format!(
                    "drop {reason} {device} {}",
                    pod_veth.as_deref().unwrap_or("")
                ),
                None,
            ),
        }
    }

    fn merge(&mut self, other: &RawStep) {
        if let (
            RawStep::Drop { packets, bytes, .. },
            RawStep::Drop {
                packets: p2,
                bytes: b2,
                ..
            },
        ) = (&mut *self, other)
        {
            *packets += p2;
            *bytes += b2;
            return;
        }
        if let (
            RawStep::Hop {
                packets,
                bytes,
                payload_bytes,
                seen_unix_ns,
                from_previous,
                handshake,
                response,
                ..
            },
            RawStep::Hop {
                packets: p2,
                bytes: b2,
                payload_bytes: pb2,
                seen_unix_ns: s2,
                from_previous: f2,
                handshake: h2,
                response: r2,
                ..
            },
        ) = (self, other)
        {
            *packets += p2;
            *bytes += b2;
            *payload_bytes += pb2;
            *seen_unix_ns = (seen_unix_ns.0.min(s2.0), seen_unix_ns.1.max(s2.1));
            merge_hist(from_previous, f2);
            merge_hist(handshake, h2);
            merge_hist(response, r2);
        }
    }
}

pub(super) fn merge_hist(into: &mut Option<LatencyHist>, from: &Option<LatencyHist>) {
    match (into.as_mut(), from) {
        (Some(a), Some(b)) => a.merge(b),
        (None, Some(b)) => *into = Some(*b),
        _ => {}
    }
}

/// The histogram a latency record was rendered from (bucket upper bounds back to
/// indexes; the sum from the mean, exact to a nanosecond per sample).
fn hist_of(r: &LatencyRecord) -> LatencyHist {
    let mut h = LatencyHist {
        count: u32::try_from(r.samples).unwrap_or(u32::MAX),
        sum_ns: r.mean_ns.saturating_mul(r.samples),
        min_ns: r.min_ns,
        max_ns: r.max_ns,
        ..LatencyHist::default()
    };
    for (upper, n) in &r.buckets {
        let i = (64 - upper.saturating_add(1).leading_zeros() as usize).saturating_sub(2);
        if let Some(b) = h.buckets.get_mut(i.min(LATENCY_BUCKETS - 1)) {
            *b = b.saturating_add(u32::try_from(*n).unwrap_or(u32::MAX));
        }
    }
    h
}

pub(super) fn summary(h: &LatencyHist) -> LatencySummary {
    let r = crate::model::hist::summarize(h);
    LatencySummary {
        samples: u64::from(h.count),
        mean_ns: r.0,
        min_ns: h.min_ns,
        max_ns: h.max_ns,
        p50_ns: r.1,
        p90_ns: r.2,
        p99_ns: r.3,
    }
}

pub(super) fn mean(h: &Option<LatencyHist>) -> Option<i64> {
    h.as_ref()
        .filter(|h| h.count > 0)
        .map(|h| (h.sum_ns / u64::from(h.count)) as i64)
}

/// The hops (and NAT steps) of a request and its reply, which connections are grouped by.
type Shape = Vec<(String, String, Option<Direction>)>;
/// A group's record and its merged steps (request, reply).
pub(super) type Group = (PathRecord, Vec<RawStep>, Option<Vec<RawStep>>);

type LatKey = (
    LatencyKind,
    FlowTuple,
    Option<(String, Direction)>,
    (String, Direction),
);

/// One node's data, indexed.
struct Indexed<'a> {
    view: &'a NodeView,
    flows: HashMap<FlowTuple, &'a FlowRecord>,
    latency: HashMap<LatKey, &'a LatencyRecord>,
    /// Original tuple -> translated tuple, for translations this node applied.
    nat: HashMap<FlowTuple, (FlowTuple, String)>,
    /// Tuples this node produced by translation.
    translated: HashSet<FlowTuple>,
}

fn tuple_of_view(t: &TupleView) -> FlowTuple {
    FlowTuple {
        protocol: t.protocol,
        src: t.src,
        dst: t.dst,
        src_port: t.src_port,
        dst_port: t.dst_port,
    }
}

fn tuple_of_flow(f: &FlowRecord) -> FlowTuple {
    FlowTuple {
        protocol: f.protocol_number,
        src: f.src,
        dst: f.dst,
        src_port: f.src_port,
        dst_port: f.dst_port,
    }
}

fn opposite(d: Direction) -> Direction {
    match d {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

impl<'a> Indexed<'a> {
    fn new(view: &'a NodeView) -> Self {
        let mut nat = HashMap::new();
        let mut translated = HashSet::new();
        for f in &view.flows {
            if let Some(n) = &f.nat {
                let (o, t) = (tuple_of_view(&n.original), tuple_of_view(&n.translated));
                if o != t {
                    nat.insert(o, (t, n.rewrote.clone()));
                    translated.insert(t);
                }
            }
        }
        Self {
            view,
            flows: view.flows.iter().map(|f| (tuple_of_flow(f), f)).collect(),
            latency: view
                .latency
                .iter()
                .map(|r| {
                    (
                        (
                            r.kind,
                            tuple_of_view(&r.tuple),
                            r.from.as_ref().map(|h| (h.interface.clone(), h.direction)),
                            (r.to.interface.clone(), r.to.direction),
                        ),
                        r,
                    )
                })
                .collect(),
            nat,
            translated,
        }
    }

    fn hist(&self, key: LatKey) -> Option<LatencyHist> {
        self.latency.get(&key).map(|r| hist_of(r))
    }

    /// The first hop where this node met `t`.
    fn first_hop(&self, t: &FlowTuple) -> Option<(&str, Direction)> {
        self.flows
            .get(t)
            .and_then(|f| f.hops.first())
            .map(|h| (h.interface.as_str(), h.direction))
    }

    /// `t` entered this node from elsewhere than its own stack or a local pod.
    fn arrived_from_another_node(&self, t: &FlowTuple) -> bool {
        self.first_hop(t)
            .is_some_and(|(i, d)| d == Direction::Ingress && self.view.tunnels.contains(i))
    }

    /// The steps of `t` on this node, following its translations; returns the tuple the
    /// packets left with.
    fn chain(&self, t: FlowTuple, out: &mut Vec<RawStep>) -> FlowTuple {
        let mut t = t;
        let mut seen = HashSet::new();
        let mut prev: Option<(String, Direction)> = None;
        while seen.insert(t) {
            if let Some(f) = self.flows.get(&t) {
                for h in &f.hops {
                    let here = (h.interface.clone(), h.direction);
                    let rtt = |kind| {
                        self.hist((kind, t, None, (h.interface.clone(), opposite(h.direction))))
                    };
                    out.push(RawStep::Hop {
                        node: self.view.node.clone(),
                        interface: h.interface.clone(),
                        direction: h.direction,
                        tuple: t,
                        packets: h.packets,
                        bytes: h.bytes,
                        payload_bytes: h.payload_bytes,
                        seen_unix_ns: (h.first_seen_unix_ns, h.last_seen_unix_ns),
                        from_previous: prev
                            .clone()
                            .and_then(|p| self.hist((LatencyKind::Hop, t, Some(p), here.clone()))),
                        handshake: rtt(LatencyKind::Handshake),
                        response: rtt(LatencyKind::Response),
                    });
                    prev = Some(here);
                }
                for d in &f.drops {
                    out.push(RawStep::Drop {
                        node: self.view.node.clone(),
                        reason: d.reason.clone(),
                        device: d.device.clone(),
                        pod_veth: d.pod_veth.clone(),
                        packets: d.packets,
                        bytes: d.bytes,
                    });
                }
            }
            match self.nat.get(&t) {
                Some((next, rewrote)) => {
                    out.push(RawStep::Nat {
                        node: self.view.node.clone(),
                        from: t,
                        to: *next,
                        rewrote: rewrote.clone(),
                    });
                    t = *next;
                }
                None => break,
            }
        }
        t
    }
}

/// The whole path of `t` starting at node `start`, then at every node that met the tuple
/// the packets left with as an arrival; marks the (node, tuple) pairs it used.
fn walk(
    nodes: &[Indexed<'_>],
    start: usize,
    t: FlowTuple,
    used: &mut HashSet<(usize, FlowTuple)>,
) -> (Vec<RawStep>, FlowTuple, usize) {
    let mut steps = Vec::new();
    let (mut at, mut t) = (start, t);
    let mut visited = HashSet::new();
    loop {
        visited.insert(at);
        used.insert((at, t));
        let left = nodes[at].chain(t, &mut steps);
        let next = (0..nodes.len()).find(|&i| {
            !visited.contains(&i)
                && nodes[i]
                    .first_hop(&left)
                    .is_some_and(|(_, d)| d == Direction::Ingress)
        });
        match next {
            Some(n) => {
                at = n;
                t = left;
            }
            None => return (steps, left, at),
        }
    }
}

/// Every connection from `src` to `dst` the agents saw within the last `window_ns` (by
/// the newest hop sighting; 0 = all), grouped by the hops they crossed.
pub fn paths(
    views: &[NodeView],
    src: &PathEnd,
    dst: &PathEnd,
    window_ns: u64,
    now_unix_ns: u64,
) -> Vec<PathRecord> {
    let mut out: Vec<PathRecord> = groups(views, src, dst, window_ns, now_unix_ns)
        .into_iter()
        .map(|(r, request, reply)| rendered(r, &request, reply.as_deref()))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.connections));
    out
}

/// A group's record with its segments, times and steps filled in from its merged steps.
pub(super) fn rendered(
    mut r: PathRecord,
    request: &[RawStep],
    reply: Option<&[RawStep]>,
) -> PathRecord {
    finish(&mut r, request);
    r.request.steps = request.iter().map(render).collect();
    if let (Some(leg), Some(reply)) = (r.reply.as_mut(), reply) {
        leg.steps = reply.iter().map(render).collect();
    }
    r
}

/// The connections of [`paths`], grouped by the hops they crossed, with their steps'
/// counters and histograms merged (not rendered yet: the map merges them further).
pub(super) fn groups(
    views: &[NodeView],
    src: &PathEnd,
    dst: &PathEnd,
    window_ns: u64,
    now_unix_ns: u64,
) -> Vec<Group> {
    let nodes: Vec<Indexed<'_>> = views.iter().map(Indexed::new).collect();
    // Tuples that opened a TCP connection (the kernel keys handshakes by the SYN's tuple).
    let opened: HashSet<FlowTuple> = views
        .iter()
        .flat_map(|v| &v.latency)
        .filter(|r| r.kind == LatencyKind::Handshake)
        .map(|r| tuple_of_view(&r.tuple))
        .collect();
    // An answer is not a request of its own: the reverse opened the connection, or, with
    // no handshake seen either way, it comes from the lower port (a server's).
    let is_answer = |t: &FlowTuple| {
        if opened.contains(t) {
            false
        } else if opened.contains(&t.reversed()) {
            true
        } else {
            t.src_port < t.dst_port
        }
    };
    // Starting points: tuples that left their source at this node (not the product of a
    // translation here, not arrived through a tunnel), from SRC. Egress-first tuples go
    // first so that a tuple also met as an arrival elsewhere is walked from its origin.
    let mut starts: Vec<(bool, usize, FlowTuple, &FlowRecord)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for (t, f) in &n.flows {
            let recent = window_ns == 0
                || f.hops
                    .iter()
                    .map(|h| h.last_seen_unix_ns)
                    .max()
                    .is_some_and(|l| now_unix_ns.saturating_sub(l) <= window_ns);
            if !recent
                || n.translated.contains(t)
                || n.arrived_from_another_node(t)
                || is_answer(t)
                || !src.is_endpoint(&t.src, f.src_endpoint.as_ref())
            {
                continue;
            }
            let egress_first = n.first_hop(t).is_some_and(|(_, d)| d == Direction::Egress);
            starts.push((!egress_first, i, *t, f));
        }
    }
    starts.sort_by_key(|(ingress, i, t, _)| (*ingress, *i, *t));

    let mut used = HashSet::new();
    let mut groups: BTreeMap<Shape, Group> = BTreeMap::new();
    for (_, i, t, f) in starts {
        if used.contains(&(i, t)) {
            continue;
        }
        let (request, left, end) = walk(&nodes, i, t, &mut used);
        // The destination: the endpoint the packets reached, or the Service they were
        // sent to.
        let last_flow = nodes[end].flows.get(&left).copied();
        let dst_endpoint = last_flow.and_then(|l| l.dst_endpoint.clone());
        let service = f
            .service
            .clone()
            .or_else(|| last_flow.and_then(|l| l.service.clone()));
        let to_dst = dst.is_endpoint(&left.dst, dst_endpoint.as_ref())
            || dst.is_endpoint(&t.dst, f.dst_endpoint.as_ref())
            || dst.is_service(service.as_ref());
        if !to_dst {
            continue;
        }
        let answer = left.reversed();
        let reply = nodes[end]
            .flows
            .contains_key(&answer)
            .then(|| walk(&nodes, end, answer, &mut used).0);
        let mut shape: Vec<_> = request.iter().map(RawStep::shape).collect();
        shape.push(("reply".into(), String::new(), None));
        shape.extend(reply.iter().flatten().map(RawStep::shape));
        let record = PathRecord {
            protocol: f.protocol.clone(),
            src_endpoint: f.src_endpoint.clone(),
            dst_endpoint,
            service,
            connections: 0,
            request: Leg {
                tuple: t.into(),
                steps: Vec::new(),
            },
            reply: reply.as_ref().map(|_| Leg {
                tuple: answer.into(),
                steps: Vec::new(),
            }),
            segments: Vec::new(),
            network_time_ns: None,
            server_time_ns: None,
        };
        match groups.get_mut(&shape) {
            Some((r, req, rep)) => {
                r.connections += 1;
                for (a, b) in req.iter_mut().zip(&request) {
                    a.merge(b);
                }
                if let (Some(rep), Some(reply)) = (rep.as_mut(), reply.as_ref()) {
                    for (a, b) in rep.iter_mut().zip(reply) {
                        a.merge(b);
                    }
                }
            }
            None => {
                let mut r = record;
                r.connections = 1;
                groups.insert(shape, (r, request, reply));
            }
        }
    }
    groups.into_values().collect()
}

/// Segments, network and server time of a request path.
fn finish(r: &mut PathRecord, request: &[RawStep]) {
    let hops: Vec<(&String, String, &Option<LatencyHist>, &Option<LatencyHist>)> = request
        .iter()
        .filter_map(|s| match s {
            RawStep::Hop {
                node,
                interface,
                direction,
                handshake,
                response,
                ..
            } => Some((
                node,
                format!("{node}/{interface}/{}", direction.as_str()),
                handshake,
                response,
            )),
            RawStep::Nat { .. } | RawStep::Drop { .. } => None,
        })
        .collect();
    for w in hops.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let diff = |x: &Option<LatencyHist>, y: &Option<LatencyHist>| Some(mean(x)? - mean(y)?);
        r.segments.push(Segment {
            from: a.1.clone(),
            to: b.1.clone(),
            in_node: a.0 == b.0,
            handshake_rtt_ns: diff(a.2, b.2),
            response_rtt_ns: diff(a.3, b.3),
        });
    }
    if let (Some(first), Some(last)) = (hops.first(), hops.last()) {
        r.server_time_ns = mean(last.3).map(|m| m.max(0) as u64);
        r.network_time_ns = match (mean(first.3), mean(last.3)) {
            (Some(a), Some(b)) if hops.len() > 1 => Some(a - b),
            _ => match (mean(first.2), mean(last.2)) {
                (Some(a), Some(b)) if hops.len() > 1 => Some(a - b),
                _ => None,
            },
        };
    }
}

fn render(s: &RawStep) -> Step {
    match s {
        RawStep::Hop {
            node,
            interface,
            direction,
            tuple,
            packets,
            bytes,
            payload_bytes,
            from_previous,
            handshake,
            response,
            ..
        } => Step::Hop {
            node: node.clone(),
            interface: interface.clone(),
            direction: *direction,
            tuple: (*tuple).into(),
            packets: *packets,
            bytes: *bytes,
            payload_bytes: *payload_bytes,
            from_previous: from_previous.as_ref().map(summary),
            handshake_rtt: handshake.as_ref().map(summary),
            response_rtt: response.as_ref().map(summary),
        },
        RawStep::Nat {
            node,
            from,
            to,
            rewrote,
        } => Step::Nat {
            node: node.clone(),
            from: (*from).into(),
            to: (*to).into(),
            rewrote: rewrote.clone(),
        },
        RawStep::Drop {
            node,
            reason,
            device,
            pod_veth,
            packets,
            bytes,
        } => Step::Drop {
            node: node.clone(),
            reason: reason.clone(),
            device: device.clone(),
            pod_veth: pod_veth.clone(),
            packets: *packets,
            bytes: *bytes,
        },
    }
}

#[cfg(test)]
pub(super) mod tests;
