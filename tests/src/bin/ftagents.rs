//! `ftagents`: simulated flowtrace agents for `cargo xtask bench-relay`, many in one process.
//!
//! Each simulated agent is the agent's own mutual-TLS data listener
//! (`flowtrace::server::mtls::serve`, the code behind `--api-listen`: a certificate from the
//! CA naming `flowtrace-relay` required) on its own loopback address (127.1.X.Y, port 9652 as
//! in the DaemonSet), holding a flow table of `--flows` records built deterministically from
//! the node's number: pods of ten namespaces, 2 to 4 hops, Services with their NAT translation
//! on a fifth of the flows, heavy-tailed byte counts. It answers:
//!
//! - `GET /v1/flows?<filter>&limit=N` as the agent does: `FlowQuery::from_query`, then
//!   `FlowFilter::matches` on each record (for the fields generated here, namespace, port,
//!   ip, proto, iface, pod, workload, that is the agent's `flow_selected`; a `service=`
//!   filter would also need the agent's backend lookup, which this does not do), the `limit`
//!   largest by (bytes, packets) (the agent's `largest`), serialised to JSON on every request
//!   (never cached). Unlike the agent it does not drain kernel maps or snapshot and name its
//!   table per request: it filters the held records by reference.
//! - `GET /v1/status`.
//!
//! A plain-HTTP control listener (`--control`) serves `/stats` (every request's server time,
//! from the handler's start to the encoded body, and its size), `/reset`, and
//! `/cost?<flows query>` (one answer of the first agent timed step by step: the agent's
//! encode, the relay's decode and re-encode of it). When every
//! listener is bound, one JSON line goes to stdout: `{"agents":[url...],"control":addr,...}`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{Context, Result};
use axum::{
    extract::{RawQuery, State},
    http::{header::CONTENT_TYPE, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use clap::Parser;
use flowtrace::{
    model::{
        protocol_name,
        wire::{FlowsResponse, NodeFlow, RelayFlowsResponse},
        Direction, Endpoint, EndpointKind, FlowRecord, HookView, HopRecord, NatState, ServiceRef,
        Translation, TupleView, Workload,
    },
    query::filter::FlowQuery,
    server::mtls,
    tls::{server_config, Reloading, TlsFiles, RELAY_NAME},
};
use serde::Serialize;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ftagents",
    about = "Simulated flowtrace agents (mTLS data API) for bench-relay"
)]
struct Cli {
    /// Directory written by `flowtrace certs --out` (agent.crt, agent.key, ca.crt).
    #[arg(long)]
    certs: PathBuf,
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Flows in each agent's table.
    #[arg(long, default_value_t = 10_000)]
    flows: usize,
    /// Port of every agent's data API (each agent has its own address).
    #[arg(long, default_value_t = 9652)]
    port: u16,
    /// Plain-HTTP control listener (/stats, /reset, /cost).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Seed of the tables (each node's table depends on it and the node's number).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The namespaces of the simulated cluster; flows stay within theirs four times in five.
const NAMESPACES: [&str; 10] = [
    "default",
    "kube-system",
    "monitoring",
    "payments",
    "checkout",
    "catalog",
    "search",
    "auth",
    "ingress",
    "batch",
];
/// Workloads of each namespace.
const APPS: [&str; 4] = ["api", "web", "worker", "db"];
/// Pods on each node.
const PODS_PER_NODE: u32 = 40;
/// Services of each namespace: name and port.
const SERVICES: [(&str, u16); 4] = [("api", 8080), ("web", 80), ("cache", 6379), ("db", 5432)];

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// In (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

fn node_name(n: u32) -> String {
    format!("node-{n:03}")
}

/// Pod `j` of node `m`: address, namespace index, endpoint.
struct Pod {
    ip: IpAddr,
    ns: usize,
    endpoint: Endpoint,
    veth: String,
    ifindex: u32,
}

fn pod(m: u32, j: u32) -> Pod {
    let ns = ((m * 3 + j) % NAMESPACES.len() as u32) as usize;
    let app = APPS[(j % APPS.len() as u32) as usize];
    let deploy = app.to_string();
    let ip = IpAddr::V4(Ipv4Addr::new(
        10,
        244 + (m / 256) as u8,
        (m % 256) as u8,
        10 + j as u8,
    ));
    Pod {
        ip,
        ns,
        endpoint: Endpoint {
            kind: EndpointKind::Pod,
            namespace: Some(NAMESPACES[ns].to_string()),
            name: format!("{deploy}-7d9f8c6b5-{m:03}{j:02}x"),
            workload: Some(Workload {
                kind: "Deployment".into(),
                name: deploy,
            }),
            node: Some(node_name(m)),
        },
        veth: format!("veth{:08x}", (m << 8) | j),
        ifindex: 10 + j,
    }
}

fn service(ns: usize, k: usize) -> (IpAddr, u16, Endpoint, ServiceRef) {
    let (name, port) = SERVICES[k];
    let ip = IpAddr::V4(Ipv4Addr::new(10, 96, ns as u8, 10 + k as u8));
    (
        ip,
        port,
        Endpoint {
            kind: EndpointKind::Service,
            namespace: Some(NAMESPACES[ns].to_string()),
            name: name.to_string(),
            workload: None,
            node: None,
        },
        ServiceRef {
            namespace: NAMESPACES[ns].to_string(),
            name: name.to_string(),
            port_name: Some(if port == 80 { "http" } else { "tcp" }.to_string()),
        },
    )
}

fn hop(
    (iface, ifindex): (&str, u32),
    dir: Direction,
    packets: u64,
    bytes: u64,
    t0: u64,
    t1: u64,
    flags: &str,
) -> HopRecord {
    HopRecord {
        interface: iface.to_string(),
        ifindex,
        direction: dir,
        packets,
        bytes,
        payload_bytes: bytes.saturating_sub(packets * 52),
        first_seen_unix_ns: t0,
        last_seen_unix_ns: t1,
        tcp_flags: flags.to_string(),
        dropped_after: 0,
    }
}

/// Node `n`'s flow table: `count` flows from or to its pods.
fn table(n: u32, nodes: u32, count: usize, seed: u64, now_ns: u64) -> Vec<FlowRecord> {
    let mut rng = Rng(seed ^ (u64::from(n) + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut flows = Vec::with_capacity(count);
    const FLANNEL: (&str, u32) = ("flannel.1", 4);
    for _ in 0..count {
        let local = pod(n, rng.below(u64::from(PODS_PER_NODE)) as u32);
        // The other end: a pod of the same namespace four times in five.
        let other_node = if rng.below(3) == 0 {
            n
        } else {
            rng.below(u64::from(nodes)) as u32
        };
        let peer_j = if rng.below(5) == 0 {
            rng.below(u64::from(PODS_PER_NODE)) as u32
        } else {
            // The pods of node m in namespace k are j = (k - 3m) mod 10, + 10, + 20, + 30.
            let first = (local.ns as u32 + 10 - (other_node * 3) % 10) % 10;
            first + 10 * rng.below(u64::from(PODS_PER_NODE / 10)) as u32
        };
        let peer = pod(other_node, peer_j);
        let kind = rng.below(10);
        let udp = rng.below(12) == 0;
        let proto: u8 = if udp { 17 } else { 6 };
        let flags = if udp {
            ""
        } else {
            ["SA", "SPA", "FSPA", "FSPA", "RSPA"][rng.below(5) as usize]
        };
        // Heavy tail: most flows are small, a few carry most bytes.
        let bytes = ((180.0 / rng.unit().powf(1.1)) as u64).min(50_000_000_000);
        let packets = bytes / 900 + 1;
        let t1 = now_ns - rng.below(120_000_000_000);
        let t0 = t1 - rng.below(600_000_000_000);
        let sport = 32768 + rng.below(28000) as u16;
        let dport = SERVICES[rng.below(4) as usize].1;
        let mut f = FlowRecord {
            protocol: protocol_name(proto),
            protocol_number: proto,
            ip_version: 4,
            src: local.ip,
            dst: peer.ip,
            src_port: sport,
            dst_port: if udp { 53 } else { dport },
            packets,
            bytes,
            payload_bytes: bytes.saturating_sub(packets * 52),
            hops: Vec::new(),
            src_endpoint: Some(local.endpoint.clone()),
            dst_endpoint: Some(peer.endpoint.clone()),
            service: None,
            nat: None,
            src_peer: None,
            dst_peer: None,
            drops: Vec::new(),
            dropped: 0,
            retransmits: 0,
        };
        let remote = other_node != n;
        match kind {
            // Through a Service: the ClusterIP, DNATed to the peer pod (3 or 4 hops).
            0 | 1 => {
                let (vip, vport, svc_ep, svc) = service(peer.ns, rng.below(4) as usize);
                let original = TupleView {
                    protocol: proto,
                    src: local.ip,
                    src_port: sport,
                    dst: vip,
                    dst_port: vport,
                };
                let translated = TupleView {
                    dst: peer.ip,
                    dst_port: f.dst_port,
                    ..original
                };
                f.dst = vip;
                f.dst_port = vport;
                f.dst_endpoint = Some(svc_ep);
                f.dst_peer = Some(peer.endpoint.clone());
                f.service = Some(svc.clone());
                let out = if remote {
                    FLANNEL
                } else {
                    (peer.veth.as_str(), peer.ifindex)
                };
                f.nat = Some(Translation {
                    original,
                    translated,
                    rewrote: "dst".into(),
                    between: Some([
                        HookView {
                            interface: local.veth.clone(),
                            direction: Direction::Ingress,
                        },
                        HookView {
                            interface: out.0.to_string(),
                            direction: Direction::Egress,
                        },
                    ]),
                    state: NatState::Confirmed,
                    source: "kernel+conntrack".into(),
                    kernel_sightings: 1 + rng.below(40),
                    service: Some(svc),
                });
                f.hops.push(hop(
                    (&local.veth, local.ifindex),
                    Direction::Ingress,
                    packets,
                    bytes,
                    t0,
                    t1,
                    flags,
                ));
                f.hops.push(hop(
                    out,
                    Direction::Egress,
                    packets,
                    bytes,
                    t0 + 20_000,
                    t1,
                    flags,
                ));
                f.hops.push(hop(
                    (&local.veth, local.ifindex),
                    Direction::Egress,
                    packets / 2 + 1,
                    bytes / 3 + 60,
                    t0 + 90_000,
                    t1,
                    flags,
                ));
                if kind == 1 {
                    f.hops.push(hop(
                        out,
                        Direction::Ingress,
                        packets / 2 + 1,
                        bytes / 3 + 60,
                        t0 + 80_000,
                        t1,
                        flags,
                    ));
                }
            }
            // Coming in from another node's pod.
            2 | 3 if remote => {
                std::mem::swap(&mut f.src, &mut f.dst);
                std::mem::swap(&mut f.src_endpoint, &mut f.dst_endpoint);
                f.hops.push(hop(
                    FLANNEL,
                    Direction::Ingress,
                    packets,
                    bytes,
                    t0,
                    t1,
                    flags,
                ));
                f.hops.push(hop(
                    (&local.veth, local.ifindex),
                    Direction::Egress,
                    packets,
                    bytes,
                    t0 + 15_000,
                    t1,
                    flags,
                ));
                if kind == 3 {
                    f.hops.push(hop(
                        (&local.veth, local.ifindex),
                        Direction::Ingress,
                        packets / 2 + 1,
                        bytes / 4 + 60,
                        t0 + 50_000,
                        t1,
                        flags,
                    ));
                }
            }
            // To a pod, on this node or across the overlay.
            _ => {
                let out = if remote {
                    FLANNEL
                } else {
                    (peer.veth.as_str(), peer.ifindex)
                };
                f.hops.push(hop(
                    (&local.veth, local.ifindex),
                    Direction::Ingress,
                    packets,
                    bytes,
                    t0,
                    t1,
                    flags,
                ));
                f.hops.push(hop(
                    out,
                    Direction::Egress,
                    packets,
                    bytes,
                    t0 + 12_000,
                    t1,
                    flags,
                ));
                if kind >= 8 {
                    f.hops.push(hop(
                        out,
                        Direction::Ingress,
                        packets / 2 + 1,
                        bytes / 4 + 60,
                        t0 + 70_000,
                        t1,
                        flags,
                    ));
                }
                if kind == 9 {
                    f.hops.push(hop(
                        (&local.veth, local.ifindex),
                        Direction::Egress,
                        packets / 2 + 1,
                        bytes / 4 + 60,
                        t0 + 80_000,
                        t1,
                        flags,
                    ));
                }
            }
        }
        flows.push(f);
    }
    flows
}

/// Requests served, per route: server seconds and body bytes of each.
#[derive(Default)]
struct Stats {
    flows: Mutex<Vec<(f64, usize)>>,
    status: Mutex<Vec<(f64, usize)>>,
    refused: AtomicU64,
}

fn record(into: &Mutex<Vec<(f64, usize)>>, started: Instant, bytes: usize) {
    let s = started.elapsed().as_secs_f64();
    match into.lock() {
        Ok(mut g) => g.push((s, bytes)),
        Err(p) => p.into_inner().push((s, bytes)),
    }
}

struct SimAgent {
    node: String,
    table: Vec<FlowRecord>,
    stats: Arc<Stats>,
}

/// The agent's `FlowsResponse`, over borrowed records (the same JSON).
#[derive(Serialize)]
struct FlowsAnswer<'a> {
    node: &'a str,
    flows: Vec<&'a FlowRecord>,
    matched: usize,
    truncated: bool,
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

async fn flows(State(a): State<Arc<SimAgent>>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let q = match FlowQuery::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return bad_request(e.to_string()),
    };
    let mut flows: Vec<&FlowRecord> = a.table.iter().filter(|f| q.filter.matches(f)).collect();
    let matched = flows.len();
    // The agent's `largest`: the `limit` largest by (bytes, packets), sorted when cut.
    if matched > q.limit {
        let key =
            |a: &&FlowRecord, b: &&FlowRecord| (b.bytes, b.packets).cmp(&(a.bytes, a.packets));
        flows.select_nth_unstable_by(q.limit, key);
        flows.truncate(q.limit);
        flows.sort_by(key);
    }
    let answer = FlowsAnswer {
        node: &a.node,
        truncated: matched > flows.len(),
        matched,
        flows,
    };
    match serde_json::to_vec(&answer) {
        Ok(body) => {
            record(&a.stats.flows, started, body.len());
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")).into_response(),
    }
}

async fn status(State(a): State<Arc<SimAgent>>) -> Response {
    let started = Instant::now();
    let body = json!({
        "node": a.node, "version": env!("CARGO_PKG_VERSION"), "ready": true,
        "interfaces_synced": true, "metadata_synced": true,
    })
    .to_string();
    record(&a.stats.status, started, body.len());
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

fn summary(v: &Mutex<Vec<(f64, usize)>>, reset: bool) -> serde_json::Value {
    let mut g = match v.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let out = json!({
        "server_s": g.iter().map(|x| x.0).collect::<Vec<_>>(),
        "bytes": g.iter().map(|x| x.1).collect::<Vec<_>>(),
    });
    if reset {
        g.clear();
    }
    out
}

/// `/cost?<flows query>`: what one answer of the first agent costs at each step, timed here
/// on a quiet process (median of 5): the agent's filter + limit + encode, the relay's decode
/// of it into `FlowsResponse`, and the relay's re-encode of those flows with their node.
fn cost(a: &SimAgent, query: &str) -> Result<serde_json::Value> {
    let q = FlowQuery::from_query(query).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut enc, mut dec, mut reenc) = (Vec::new(), Vec::new(), Vec::new());
    let (mut size, mut reencoded) = (0, 0);
    for _ in 0..5 {
        let t = Instant::now();
        let mut flows: Vec<&FlowRecord> = a.table.iter().filter(|f| q.filter.matches(f)).collect();
        let matched = flows.len();
        if matched > q.limit {
            let key =
                |a: &&FlowRecord, b: &&FlowRecord| (b.bytes, b.packets).cmp(&(a.bytes, a.packets));
            flows.select_nth_unstable_by(q.limit, key);
            flows.truncate(q.limit);
        }
        let body = serde_json::to_vec(&FlowsAnswer {
            node: &a.node,
            truncated: false,
            matched,
            flows,
        })?;
        enc.push(t.elapsed().as_secs_f64());
        size = body.len();
        let t = Instant::now();
        let r: FlowsResponse = serde_json::from_slice(&body)?;
        dec.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let node = r.node.clone();
        let merged = RelayFlowsResponse {
            flows: r
                .flows
                .into_iter()
                .map(|flow| NodeFlow {
                    node: node.clone(),
                    flow,
                })
                .collect(),
            ..RelayFlowsResponse::default()
        };
        let out = serde_json::to_vec(&merged)?;
        reenc.push(t.elapsed().as_secs_f64());
        reencoded = out.len();
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(json!({
        "answer_bytes": size,
        "reencoded_bytes": reencoded,
        "agent_encode_s": med(&mut enc),
        "relay_decode_s": med(&mut dec),
        "relay_reencode_s": med(&mut reenc),
    }))
}

fn control(stats: Arc<Stats>, first: Arc<SimAgent>) -> Router {
    let (s1, s2) = (stats.clone(), stats);
    Router::new()
        .route(
            "/cost",
            get(move |RawQuery(q): RawQuery| async move {
                match cost(&first, q.as_deref().unwrap_or("")) {
                    Ok(v) => Json(v).into_response(),
                    Err(e) => bad_request(e.to_string()),
                }
            }),
        )
        .route(
            "/stats",
            get(move || async move {
                Json(json!({
                    "flows": summary(&s1.flows, false),
                    "status": summary(&s1.status, false),
                    "refused": s1.refused.load(Ordering::Relaxed),
                }))
            }),
        )
        .route(
            "/reset",
            get(move || async move {
                summary(&s2.flows, true);
                summary(&s2.status, true);
                "reset\n"
            }),
        )
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let files = TlsFiles {
        cert: cli.certs.join("agent.crt"),
        key: cli.certs.join("agent.key"),
        ca: cli.certs.join("ca.crt"),
    };
    let tls = Reloading::load(files, server_config).with_context(|| {
        format!(
            "loading the agents' certificates from {}",
            cli.certs.display()
        )
    })?;
    let allowed = Arc::new(vec![RELAY_NAME.to_string()]);
    let stats = Arc::new(Stats::default());
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .context("the clock is before 1970")?;
    let nodes = u32::try_from(cli.agents).context("--agents: too many")?;
    if nodes == 0 || nodes > 250 * 250 {
        anyhow::bail!("--agents must be 1 to 62500");
    }
    let built = Instant::now();
    let mut urls = Vec::new();
    let mut held = 0usize;
    let mut first = None;
    for n in 0..nodes {
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8)),
            cli.port,
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding simulated agent {n} on {addr}"))?;
        let agent = Arc::new(SimAgent {
            node: node_name(n),
            table: table(n, nodes, cli.flows, cli.seed, now_ns),
            stats: stats.clone(),
        });
        held += agent.table.len();
        first.get_or_insert_with(|| agent.clone());
        let app = Router::new()
            .route("/v1/flows", get(flows))
            .route("/v1/status", get(status))
            .with_state(agent);
        let s = stats.clone();
        let count: mtls::Count = Arc::new(move |_| {
            s.refused.fetch_add(1, Ordering::Relaxed);
        });
        tokio::spawn(mtls::serve(
            listener,
            tls.clone(),
            allowed.clone(),
            app,
            count,
        ));
        urls.push(format!("https://{addr}"));
    }
    let ctl = tokio::net::TcpListener::bind(cli.control)
        .await
        .with_context(|| format!("binding the control listener {}", cli.control))?;
    let ctl_addr = ctl.local_addr().context("control listener address")?;
    let first = first.context("no agent")?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(ctl, control(stats, first)).await {
            eprintln!("ftagents: control listener stopped: {e}");
        }
    });
    println!(
        "{}",
        json!({
            "agents": urls,
            "control": ctl_addr.to_string(),
            "flows_held": held,
            "build_s": built.elapsed().as_secs_f64(),
        })
    );
    // Until killed (the bench stops it) or stdin closes.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    })
    .await
    .context("waiting on stdin")?;
    Ok(())
}
