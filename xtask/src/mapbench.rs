//! `cargo xtask bench-map`: what the relay's `/v1/map` costs for a large application, in
//! process (no root): the time `query::map::map` takes and the memory the relay holds for it.
//!
//! The views are what the agents' `/v1/pathdata` would serve for `--workloads` workloads
//! (one pod each, spread over `--nodes` nodes, 20 namespaces) calling each other along
//! `--edges` edges, each edge `--connections` connections from the client's pod through the
//! server's Service (DNAT on the client's node), across nodes with VXLAN when the pods are on
//! different nodes: per connection the request and reply tuples at every hook, the NAT
//! translation, and a handshake round trip at the client's veth. The views go through JSON
//! once (as they reach the relay) before the map is built from them.
//!
//! Printed: the flow records and latency records in the views; the heap they take once
//! decoded; the map's build time (median of `--rounds`) and the heap it allocates on top of
//! the views at its peak; the answer's JSON size.

use std::{net::IpAddr, time::Instant};

use anyhow::{Context, Result};
use flowtrace::{
    model::{
        wire::{NatState, PathDataResponse, Translation},
        Direction, Endpoint, EndpointKind, FlowRecord, FlowTuple, HookView, HopRecord, LatencyKind,
        ServiceRef, Workload,
    },
    query::{
        map::{map, MapFilter},
        path::NodeView,
    },
};

use crate::metabench::{live, peak, reset_peak};

#[derive(clap::Args)]
pub struct MapBenchArgs {
    /// Workloads (one pod each).
    #[arg(long, default_value_t = 1_000)]
    workloads: usize,
    /// Edges between them (at most ten per client workload).
    #[arg(long, default_value_t = 10_000)]
    edges: usize,
    /// Connections per edge.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Nodes the pods are spread over.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Rounds; the median time is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn pod_ip(w: usize) -> IpAddr {
    IpAddr::from([10, 64 + (w / 250) as u8, (w % 250) as u8, 10])
}

fn vip(w: usize) -> IpAddr {
    IpAddr::from([10, 96, (w / 250) as u8, (w % 250) as u8 + 1])
}

fn namespace(w: usize) -> String {
    format!("team-{}", w % 20)
}

fn pod(w: usize, node: &str) -> Endpoint {
    Endpoint {
        kind: EndpointKind::Pod,
        namespace: Some(namespace(w)),
        name: format!("svc-{w}-6d4f8b-x2k9p"),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: format!("svc-{w}"),
        }),
        node: Some(node.to_string()),
    }
}

fn service(w: usize) -> ServiceRef {
    ServiceRef {
        namespace: namespace(w),
        name: format!("svc-{w}"),
        port_name: Some("http".into()),
    }
}

fn service_end(w: usize) -> Endpoint {
    Endpoint {
        kind: EndpointKind::Service,
        namespace: Some(namespace(w)),
        name: format!("svc-{w}"),
        workload: None,
        node: None,
    }
}

fn hop(interface: &str, direction: Direction, packets: u64, bytes: u64, t: u64) -> HopRecord {
    HopRecord {
        interface: interface.to_string(),
        ifindex: 1,
        direction,
        packets,
        bytes,
        payload_bytes: bytes.saturating_sub(packets * 52),
        first_seen_unix_ns: t,
        last_seen_unix_ns: t + 40_000_000,
        tcp_flags: "SAPF".into(),
        dropped_after: 0,
    }
}

struct Flow<'a> {
    tuple: FlowTuple,
    hops: Vec<HopRecord>,
    src: Endpoint,
    dst: Endpoint,
    service: Option<ServiceRef>,
    nat: Option<&'a Translation>,
}

fn record(f: Flow<'_>) -> FlowRecord {
    let mut r = FlowRecord::new(&f.tuple, f.hops, Some(f.src), Some(f.dst));
    r.service = f.service;
    r.nat = f.nat.cloned();
    r
}

/// The agents' views of the application (see the module documentation).
pub fn views(a: &MapBenchArgs, now: u64) -> Vec<NodeView> {
    let node = |w: usize| format!("node{}", w % a.nodes + 1);
    let veth = |w: usize| format!("veth{w:08x}");
    let mut views: Vec<NodeView> = (1..=a.nodes)
        .map(|n| NodeView {
            node: format!("node{n}"),
            flows: Vec::new(),
            latency: Vec::new(),
            tunnels: ["flannel.1".to_string()].into(),
        })
        .collect();
    let per_client = a.edges.div_ceil(a.workloads).max(1);
    let mut port = 32768u16;
    for e in 0..a.edges {
        let client = e % a.workloads;
        let server = (client + 1 + (e / a.workloads) * 37) % a.workloads;
        if server == client || e / a.workloads >= per_client.min(10) {
            continue;
        }
        let (cn, sn) = (client % a.nodes, server % a.nodes);
        for c in 0..a.connections {
            port = port.wrapping_add(1).max(32768);
            let t = now - 30_000_000_000 + (e * 1000 + c) as u64;
            let req = FlowTuple {
                protocol: 6,
                src: pod_ip(client),
                dst: vip(server),
                src_port: port,
                dst_port: 80,
            };
            let req2 = FlowTuple {
                dst: pod_ip(server),
                dst_port: 8080,
                ..req
            };
            let (rep, rep2) = (req.reversed(), req2.reversed());
            let dnat = Translation {
                original: req.into(),
                translated: req2.into(),
                rewrote: "dst".into(),
                between: None,
                state: NatState::Confirmed,
                source: "kernel+conntrack".into(),
                kernel_sightings: 1,
                service: Some(service(server)),
            };
            let undo = Translation {
                original: rep2.into(),
                translated: rep.into(),
                rewrote: "src".into(),
                ..dnat.clone()
            };
            let (cp, sp) = (pod(client, &node(client)), pod(server, &node(server)));
            let (req_b, rep_b) = (1_200 + (e % 7) as u64 * 100, 9_000 + (e % 13) as u64 * 500);
            let flows = |hops_req2: Vec<HopRecord>, hops_rep2: Vec<HopRecord>| {
                [
                    record(Flow {
                        tuple: req,
                        hops: vec![hop(&veth(client), Direction::Ingress, 8, req_b, t)],
                        src: cp.clone(),
                        dst: service_end(server),
                        service: Some(service(server)),
                        nat: Some(&dnat),
                    }),
                    record(Flow {
                        tuple: req2,
                        hops: hops_req2,
                        src: cp.clone(),
                        dst: sp.clone(),
                        service: Some(service(server)),
                        nat: Some(&dnat),
                    }),
                    record(Flow {
                        tuple: rep2,
                        hops: hops_rep2,
                        src: sp.clone(),
                        dst: cp.clone(),
                        service: Some(service(server)),
                        nat: Some(&undo),
                    }),
                    record(Flow {
                        tuple: rep,
                        hops: vec![hop(&veth(client), Direction::Egress, 8, rep_b, t + 900_000)],
                        src: service_end(server),
                        dst: cp.clone(),
                        service: Some(service(server)),
                        nat: Some(&undo),
                    }),
                ]
            };
            let handshake = flowtrace::model::hist::record(
                LatencyKind::Handshake,
                req.into(),
                None,
                HookView {
                    interface: veth(client),
                    direction: Direction::Egress,
                },
                &{
                    let mut h = flowtrace_common::LatencyHist::default();
                    h.add(150_000 + (e % 50) as u64 * 1000);
                    h
                },
            );
            if cn == sn {
                views[cn].flows.extend(flows(
                    vec![hop(&veth(server), Direction::Egress, 8, req_b, t + 20_000)],
                    vec![hop(
                        &veth(server),
                        Direction::Ingress,
                        8,
                        rep_b,
                        t + 800_000,
                    )],
                ));
            } else {
                views[cn].flows.extend(flows(
                    vec![hop("flannel.1", Direction::Egress, 8, req_b, t + 20_000)],
                    vec![hop("flannel.1", Direction::Ingress, 8, rep_b, t + 880_000)],
                ));
                views[sn].flows.push(record(Flow {
                    tuple: req2,
                    hops: vec![
                        hop("flannel.1", Direction::Ingress, 8, req_b, t + 60_000),
                        hop(&veth(server), Direction::Egress, 8, req_b, t + 70_000),
                    ],
                    src: cp.clone(),
                    dst: sp.clone(),
                    service: None,
                    nat: None,
                }));
                views[sn].flows.push(record(Flow {
                    tuple: rep2,
                    hops: vec![
                        hop(&veth(server), Direction::Ingress, 8, rep_b, t + 700_000),
                        hop("flannel.1", Direction::Egress, 8, rep_b, t + 710_000),
                    ],
                    src: sp,
                    dst: cp,
                    service: None,
                    nat: None,
                }));
            }
            views[cn].latency.push(handshake);
        }
    }
    views
}

pub fn run(a: &MapBenchArgs) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: xtask was built without optimizations (`cargo xtask`): the times are not \
             the relay's; run `cargo run --release -p xtask -- bench-map`"
        );
    }
    let now = flowtrace::util::unix_now_ns();
    // As the relay receives them: each node's pathdata in JSON, decoded.
    let wire: Vec<String> = views(a, now)
        .into_iter()
        .map(|v| {
            serde_json::to_string(&PathDataResponse {
                node: v.node,
                flows: v.flows,
                latency: v.latency,
                tunnels: v.tunnels.into_iter().collect(),
            })
        })
        .collect::<std::result::Result<_, _>>()
        .context("encoding the views")?;
    let wire_bytes: usize = wire.iter().map(String::len).sum();
    let before = live();
    let views: Vec<NodeView> = wire
        .iter()
        .map(|w| serde_json::from_str::<PathDataResponse>(w).map(NodeView::from_pathdata))
        .collect::<std::result::Result<_, _>>()
        .context("decoding the views")?;
    let views_heap = live().saturating_sub(before);
    drop(wire);
    let flows: usize = views.iter().map(|v| v.flows.len()).sum();
    let latency: usize = views.iter().map(|v| v.latency.len()).sum();
    let mut times = Vec::new();
    let (mut extra, mut answer_bytes, mut edges, mut vertices) = (0, 0, 0, 0);
    for _ in 0..a.rounds.max(1) {
        let base = live();
        reset_peak();
        let started = Instant::now();
        let m = map(&views, &MapFilter::default(), 0, now);
        times.push(started.elapsed());
        let json = serde_json::to_vec(&m).context("encoding the map")?;
        extra = extra.max(peak().saturating_sub(base));
        answer_bytes = json.len();
        (edges, vertices) = (m.edges.len(), m.vertices.len());
    }
    times.sort();
    let median = times[times.len() / 2];
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "map of {} workloads and {} Services over {} nodes: {edges} edges ({} connections each), {vertices} vertices",
        a.workloads,
        vertices.saturating_sub(a.workloads),
        a.nodes,
        a.connections
    );
    println!(
        "views: {flows} flow records, {latency} latency records; {:.1} MiB of JSON from the agents, {:.1} MiB decoded",
        mib(wire_bytes),
        mib(views_heap)
    );
    println!(
        "map build: median {:.1} ms over {} rounds (min {:.1}, max {:.1}); heap on top of the views at its peak (with the answer's JSON): {:.1} MiB; answer {:.1} MiB of JSON",
        median.as_secs_f64() * 1e3,
        times.len(),
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        mib(extra),
        mib(answer_bytes)
    );
    println!(
        "relay memory for one /v1/map: {:.1} MiB (decoded views + build peak)",
        mib(views_heap + extra)
    );
    Ok(())
}
