//! The application's map: who talks to whom, drawn from the connections the kernel saw.
//!
//! Vertices are workloads (a pod's top controller), bare pods, Services, nodes and
//! addresses without metadata. An edge is the connections from one vertex to another on
//! one protocol and server port, through one Service or none: the paths of
//! [`crate::query::path`] (every connection, request and reply joined over the nodes),
//! grouped by their ends. Each edge carries what those paths measured, summed:
//! connections, bytes and packets each way (at the client's first hook), the handshake and
//! response round trips at that hook, the server's own time (the response round trip at the
//! last hook before it), the network's (their difference), the nodes the request crossed,
//! and the paths themselves, hop by hop, for a reader who asks where an edge goes.

use std::collections::{BTreeMap, BTreeSet};

use flowtrace_common::LatencyHist;
use serde::{Deserialize, Serialize};

use crate::{
    model::{wire::MissingNode, Endpoint, EndpointKind, ServiceRef},
    query::path::{
        groups, mean, merge_hist, rendered, summary, LatencySummary, NodeView, PathEnd, PathRecord,
        RawStep, Step,
    },
};

/// What a vertex of the map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VertexKind {
    /// A Deployment, StatefulSet, DaemonSet... (the top of a pod's owner chain).
    Workload,
    /// A pod without a controller.
    Pod,
    Service,
    /// A node's own address (its host network).
    Node,
    /// An address the metadata does not name.
    External,
}

/// A vertex of the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vertex {
    /// `workload/NS/NAME`, `pod/NS/NAME`, `svc/NS/NAME`, `node/NAME` or `ip/ADDR`: what
    /// the edges name as `from` and `to`, and what `flowtrace path` takes as an end.
    pub id: String,
    pub kind: VertexKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Deployment, StatefulSet...: the workload's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_kind: Option<String>,
    /// The cluster nodes its pods were seen on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// The connections from one vertex to another (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// `FROM -> [svc/NS/NAME ->] TO PROTOCOL/PORT`.
    pub id: String,
    pub from: String,
    pub to: String,
    /// The Service the connections were sent to (its cluster IP or node port), which
    /// kube-proxy translated to `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    pub protocol: String,
    /// The server's port (after the Service's translation).
    pub port: u16,
    /// Connections: for TCP, the handshakes seen at the client's first hook when there are
    /// more of them than tuples (a client that reuses a port for a new connection makes one
    /// tuple of several connections); else the tuples.
    pub connections: u64,
    /// Distinct request tuples (what conntrack holds an entry for).
    pub tuples: u64,
    /// Layer-3 packets and bytes from the client, at its first hook, and the payload among
    /// them (what the client's application sent).
    pub request_packets: u64,
    pub request_bytes: u64,
    pub request_payload_bytes: u64,
    /// Layer-3 packets and bytes of the answers, at the server's first hook, and their
    /// payload (what the server's application sent).
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub reply_payload_bytes: u64,
    /// Both ways, over the time the edge was active (first to last sighting, at least 1 s).
    pub bytes_per_s: f64,
    pub packets_per_s: f64,
    pub first_seen_unix_ns: u64,
    pub last_seen_unix_ns: u64,
    /// SYN to SYN-ACK at the client's first hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_rtt: Option<LatencySummary>,
    /// Request to answer at the client's first hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_rtt: Option<LatencySummary>,
    /// Request to answer at the server's last hook: the server's own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time: Option<LatencySummary>,
    /// The round trip's part spent between the client's first hook and the server's last
    /// (response round trips, else handshakes), mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_time_ns: Option<i64>,
    /// The cluster nodes the requests crossed, in order.
    pub nodes: Vec<String>,
    /// The busiest path's request steps, e.g. `node1 veth1a2b ingress`, `node1 nat dst`.
    pub hops: Vec<String>,
    /// Every path the connections took (what `flowtrace path` prints), busiest first.
    pub paths: Vec<PathRecord>,
}

/// Which edges a map keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFilter {
    /// Edges with an end (or their Service) in one of these namespaces; empty: all.
    pub namespaces: Vec<String>,
    /// Edges with an end that is one of these workloads (`NS/NAME`); empty: all.
    pub workloads: Vec<(String, String)>,
}

impl MapFilter {
    /// Takes one `namespace=NS` or `workload=NS/NAME` pair (repeatable), as the API and the
    /// CLI give them; returns false for any other key (the caller's).
    pub fn take_pair(&mut self, key: &str, value: &str) -> crate::error::Result<bool> {
        match key {
            "namespace" => {
                self.namespaces
                    .push(crate::query::filter::parse_namespace(value)?);
                Ok(true)
            }
            "workload" => {
                let o = crate::query::filter::parse_object("workload", value)?;
                self.workloads.push((o.namespace, o.name));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The filter as query parameters (`namespace=..&workload=..`), the inverse of
    /// [`MapFilter::take_pair`].
    pub fn to_query(&self) -> String {
        use crate::query::filter::percent_encode;
        self.namespaces
            .iter()
            .map(|n| format!("namespace={}", percent_encode(n)))
            .chain(
                self.workloads
                    .iter()
                    .map(|(n, w)| format!("workload={}", percent_encode(&format!("{n}/{w}")))),
            )
            .collect::<Vec<_>>()
            .join("&")
    }

    fn keeps(&self, from: &Vertex, to: &Vertex, service: Option<&ServiceRef>) -> bool {
        let in_ns = |v: &Vertex| {
            v.namespace
                .as_ref()
                .is_some_and(|n| self.namespaces.contains(n))
        };
        let ns_ok = self.namespaces.is_empty()
            || in_ns(from)
            || in_ns(to)
            || service.is_some_and(|s| self.namespaces.contains(&s.namespace));
        let is_workload = |v: &Vertex| {
            v.kind == VertexKind::Workload
                && self
                    .workloads
                    .iter()
                    .any(|(n, w)| v.namespace.as_deref() == Some(n) && &v.name == w)
        };
        let wl_ok = self.workloads.is_empty() || is_workload(from) || is_workload(to);
        ns_ok && wl_ok
    }
}

/// `window_s=`, `namespace=` and `workload=` of a `/v1/map` request (agent or relay).
pub fn map_query(query: &str) -> Result<(MapFilter, std::time::Duration), String> {
    let mut filter = MapFilter::default();
    let mut window = std::time::Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = crate::query::filter::percent_decode(value);
        if key == "window_s" {
            let s: u64 = value.parse().map_err(|_| {
                format!("window_s `{value}` is not a number of seconds (0: everything held)")
            })?;
            window = std::time::Duration::from_secs(s);
            continue;
        }
        match filter.take_pair(key, &value) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "unknown parameter `{pair}`: /v1/map takes window_s, namespace and workload"
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((filter, window))
}

/// The map over the nodes that answered (`/v1/map` of an agent or of the relay).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapAnswer {
    /// The cluster nodes whose views were joined.
    pub nodes: Vec<String>,
    /// Agents that did not answer (the relay's map lacks what only they saw).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingNode>,
    /// Connections seen in the last this many seconds (0: all the agents hold).
    pub window_s: u64,
    pub generated_unix_ns: u64,
    pub vertices: Vec<Vertex>,
    pub edges: Vec<Edge>,
}

/// The vertex an endpoint is (`ip` when the metadata does not name it).
fn vertex(e: Option<&Endpoint>, ip: std::net::IpAddr) -> Vertex {
    let external = || Vertex {
        id: format!("ip/{ip}"),
        kind: VertexKind::External,
        namespace: None,
        name: ip.to_string(),
        workload_kind: None,
        nodes: Vec::new(),
    };
    let Some(e) = e else {
        return external();
    };
    let ns = e.namespace.clone().unwrap_or_default();
    match e.kind {
        EndpointKind::Pod => {
            let (kind, id, name, workload_kind) = match &e.workload {
                Some(w) if w.kind != "Pod" => (
                    VertexKind::Workload,
                    format!("workload/{ns}/{}", w.name),
                    w.name.clone(),
                    Some(w.kind.clone()),
                ),
                _ => (
                    VertexKind::Pod,
                    format!("pod/{ns}/{}", e.name),
                    e.name.clone(),
                    None,
                ),
            };
            Vertex {
                id,
                kind,
                namespace: Some(ns),
                name,
                workload_kind,
                nodes: e.node.iter().cloned().collect(),
            }
        }
        EndpointKind::Service => Vertex {
            id: format!("svc/{ns}/{}", e.name),
            kind: VertexKind::Service,
            namespace: Some(ns),
            name: e.name.clone(),
            workload_kind: None,
            nodes: Vec::new(),
        },
        EndpointKind::Node => Vertex {
            id: format!("node/{}", e.name),
            kind: VertexKind::Node,
            namespace: None,
            name: e.name.clone(),
            workload_kind: None,
            nodes: vec![e.name.clone()],
        },
        EndpointKind::PodNetwork => external(),
    }
}

fn service_vertex(s: &ServiceRef) -> Vertex {
    Vertex {
        id: format!("svc/{}/{}", s.namespace, s.name),
        kind: VertexKind::Service,
        namespace: Some(s.namespace.clone()),
        name: s.name.clone(),
        workload_kind: None,
        nodes: Vec::new(),
    }
}

/// An edge while its paths are merged.
struct Building {
    from: String,
    to: String,
    service: Option<ServiceRef>,
    protocol: String,
    port: u16,
    connections: u64,
    request: (u64, u64, u64),
    reply: (u64, u64, u64),
    seen: (u64, u64),
    handshake: Option<LatencyHist>,
    response: Option<LatencyHist>,
    server: Option<LatencyHist>,
    nodes: Vec<String>,
    paths: Vec<PathRecord>,
    hops: Vec<String>,
}

/// A hook of a leg's steps: (packets, bytes, payload, seen, handshake, response).
type HookFacts<'a> = (
    u64,
    u64,
    u64,
    (u64, u64),
    &'a Option<LatencyHist>,
    &'a Option<LatencyHist>,
);

fn hooks(steps: &[RawStep]) -> Vec<HookFacts<'_>> {
    steps
        .iter()
        .filter_map(|s| match s {
            RawStep::Hop {
                packets,
                bytes,
                payload_bytes,
                seen_unix_ns,
                handshake,
                response,
                ..
            } => Some((
                *packets,
                *bytes,
                *payload_bytes,
                *seen_unix_ns,
                handshake,
                response,
            )),
            _ => None,
        })
        .collect()
}

fn step_nodes(steps: &[RawStep], into: &mut Vec<String>) {
    for s in steps {
        if let RawStep::Hop { node, .. } = s {
            if !into.contains(node) {
                into.push(node.clone());
            }
        }
    }
}

/// The last destination port of a request's steps (the server's, after any DNAT).
fn server_port(steps: &[RawStep], fallback: u16) -> u16 {
    steps
        .iter()
        .rev()
        .find_map(|s| match s {
            RawStep::Hop { tuple, .. } => Some(tuple.dst_port),
            _ => None,
        })
        .unwrap_or(fallback)
}

/// The map of every connection the views hold, seen within the last `window_ns` (0: all).
pub fn map(views: &[NodeView], filter: &MapFilter, window_ns: u64, now_unix_ns: u64) -> MapAnswer {
    let mut vertices: BTreeMap<String, Vertex> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String, String, String, u16), Building> = BTreeMap::new();
    for (record, request, reply) in
        groups(views, &PathEnd::Any, &PathEnd::Any, window_ns, now_unix_ns)
    {
        let from = vertex(record.src_endpoint.as_ref(), record.request.tuple.src);
        let last_dst = request
            .iter()
            .rev()
            .find_map(|s| match s {
                RawStep::Hop { tuple, .. } => Some(tuple.dst),
                _ => None,
            })
            .unwrap_or(record.request.tuple.dst);
        let to = vertex(record.dst_endpoint.as_ref(), last_dst);
        if !filter.keeps(&from, &to, record.service.as_ref()) {
            continue;
        }
        let port = server_port(&request, record.request.tuple.dst_port);
        let key = (
            from.id.clone(),
            record
                .service
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            to.id.clone(),
            record.protocol.clone(),
            port,
        );
        for v in [&from, &to] {
            let into = vertices.entry(v.id.clone()).or_insert_with(|| {
                let mut fresh = v.clone();
                fresh.nodes.clear();
                fresh
            });
            for n in &v.nodes {
                if !into.nodes.contains(n) {
                    into.nodes.push(n.clone());
                }
            }
        }
        if let Some(s) = &record.service {
            vertices
                .entry(service_vertex(s).id)
                .or_insert_with(|| service_vertex(s));
        }
        let e = edges.entry(key).or_insert_with(|| Building {
            from: from.id.clone(),
            to: to.id.clone(),
            service: record.service.clone(),
            protocol: record.protocol.clone(),
            port,
            connections: 0,
            request: (0, 0, 0),
            reply: (0, 0, 0),
            seen: (u64::MAX, 0),
            handshake: None,
            response: None,
            server: None,
            nodes: Vec::new(),
            paths: Vec::new(),
            hops: Vec::new(),
        });
        e.connections += record.connections;
        let req = hooks(&request);
        if let Some(&(packets, bytes, payload, seen, handshake, response)) = req.first() {
            e.request.0 += packets;
            e.request.1 += bytes;
            e.request.2 += payload;
            e.seen = (e.seen.0.min(seen.0), e.seen.1.max(seen.1));
            merge_hist(&mut e.handshake, handshake);
            merge_hist(&mut e.response, response);
        }
        if let Some(&(_, _, _, _, _, response)) = req.last().filter(|_| req.len() > 1) {
            merge_hist(&mut e.server, response);
        }
        if let Some(&(packets, bytes, payload, seen, _, _)) =
            reply.as_deref().map(hooks).unwrap_or_default().first()
        {
            e.reply.0 += packets;
            e.reply.1 += bytes;
            e.reply.2 += payload;
            e.seen = (e.seen.0.min(seen.0), e.seen.1.max(seen.1));
        }
        step_nodes(&request, &mut e.nodes);
        let busiest = e.paths.iter().all(|p| p.connections < record.connections);
        let path = rendered(record, &request, reply.as_deref());
        if busiest {
            e.hops = path.request.steps.iter().map(Step::label).collect();
        }
        e.paths.push(path);
    }
    let edges = edges
        .into_values()
        .map(|mut b| {
            b.paths.sort_by_key(|p| std::cmp::Reverse(p.connections));
            let (first, last) = if b.seen.0 == u64::MAX { (0, 0) } else { b.seen };
            let span_s = (last.saturating_sub(first) as f64 / 1e9).max(1.0);
            let network_time_ns = match (mean(&b.response), mean(&b.server)) {
                (Some(a), Some(s)) => Some(a - s),
                _ => None,
            };
            let via = b
                .service
                .as_ref()
                .map(|s| format!(" -> svc/{s}"))
                .unwrap_or_default();
            let handshakes = b.handshake.map_or(0, |h| u64::from(h.count));
            Edge {
                id: format!("{}{via} -> {} {}/{}", b.from, b.to, b.protocol, b.port),
                from: b.from,
                to: b.to,
                service: b.service,
                protocol: b.protocol,
                port: b.port,
                connections: b.connections.max(handshakes),
                tuples: b.connections,
                request_packets: b.request.0,
                request_bytes: b.request.1,
                request_payload_bytes: b.request.2,
                reply_packets: b.reply.0,
                reply_bytes: b.reply.1,
                reply_payload_bytes: b.reply.2,
                bytes_per_s: (b.request.1 + b.reply.1) as f64 / span_s,
                packets_per_s: (b.request.0 + b.reply.0) as f64 / span_s,
                first_seen_unix_ns: first,
                last_seen_unix_ns: last,
                handshake_rtt: b.handshake.as_ref().map(summary),
                response_rtt: b.response.as_ref().map(summary),
                server_time: b.server.as_ref().map(summary),
                network_time_ns,
                nodes: b.nodes,
                hops: b.hops,
                paths: b.paths,
            }
        })
        .collect();
    MapAnswer {
        nodes: views
            .iter()
            .map(|v| v.node.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        missing: Vec::new(),
        window_s: window_ns / 1_000_000_000,
        generated_unix_ns: now_unix_ns,
        vertices: vertices.into_values().collect(),
        edges,
    }
}

#[cfg(test)]
mod tests;
