//! The map page (flowtrace/src/server/assets/map.html) in a headless Chromium: no root, no
//! cluster. The maps are built from flowtrace's own types (a SockShop-shaped application
//! over three nodes, and a synthetic one of about a hundred vertices) and serialized as the
//! API serializes them.
//!
//! - static: the page with the map inlined (`static_map_page`), opened from a file: the DOM
//!   holds exactly the map's vertices and edges, nothing overlaps, a real click on an edge
//!   shows its paths hop by hop (NAT and drop included) and filters the table, a click on a
//!   vertex filters the table to its edges, and nothing from the data runs as markup;
//! - live: the page served over HTTP with `v1/map` beside it: it fetches, refreshes, sends
//!   its window and stops refreshing while paused;
//! - large: about a hundred vertices still lay out without overlaps.
//!
//! Screenshots and the pages go to `$FLOWTRACE_TEST_OUTPUT` or `target/test-output/page`
//! (printed). Chromium missing is a failure that says to run scripts/setup.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use flowtrace::{
    model::{
        wire::MissingNode, Direction, Endpoint, EndpointKind, ServiceRef, TupleView, Workload,
    },
    query::{
        map::{Edge, MapAnswer, Vertex, VertexKind},
        path::{LatencySummary, Leg, PathRecord, Segment, Step},
    },
    server::page::{static_map_page, MAP_PAGE},
};
use flowtrace_tests::browser::Browser;
use serde_json::{json, Value};

const NS: &str = "sock-shop";
const GENERATED: u64 = 1_764_000_000_000_000_000;
const HOSTILE: &str =
    "dial tcp: </script><script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">";

fn output_dir() -> PathBuf {
    let dir = std::env::var_os("FLOWTRACE_TEST_OUTPUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("the target directory")
                .join("test-output")
        })
        .join("page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------- the fixture maps

fn lat(mean_ns: u64, samples: u64) -> LatencySummary {
    LatencySummary {
        samples,
        mean_ns,
        min_ns: mean_ns * 7 / 10,
        max_ns: mean_ns * 4,
        p50_ns: mean_ns,
        p90_ns: mean_ns * 16 / 10,
        p99_ns: mean_ns * 3,
    }
}

/// One end of an edge: its vertex, its endpoint, the node and address its packets have,
/// and the host interface they cross there (a pod's veth; none for a node's own stack).
#[derive(Clone)]
struct End {
    vertex: Vertex,
    endpoint: Option<Endpoint>,
    node: String,
    ip: IpAddr,
    iface: Option<String>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(ns: &str, workload: &str, kind: &str, node: &str, addr: &str) -> End {
    let pod_name = format!("{workload}-{}", addr.rsplit('.').next().unwrap());
    End {
        vertex: Vertex {
            id: format!("workload/{ns}/{workload}"),
            kind: VertexKind::Workload,
            namespace: Some(ns.into()),
            name: workload.into(),
            workload_kind: Some(kind.into()),
            nodes: vec![node.into()],
        },
        endpoint: Some(Endpoint {
            kind: EndpointKind::Pod,
            namespace: Some(ns.into()),
            name: pod_name,
            workload: Some(Workload {
                kind: kind.into(),
                name: workload.into(),
            }),
            node: Some(node.into()),
        }),
        node: node.into(),
        ip: ip(addr),
        iface: Some(format!("veth{}", &addr.replace('.', "")[4..])),
    }
}

fn host(node: &str, addr: &str) -> End {
    End {
        vertex: Vertex {
            id: format!("node/{node}"),
            kind: VertexKind::Node,
            namespace: None,
            name: node.into(),
            workload_kind: None,
            nodes: vec![node.into()],
        },
        endpoint: Some(Endpoint {
            kind: EndpointKind::Node,
            namespace: None,
            name: node.into(),
            workload: None,
            node: Some(node.into()),
        }),
        node: node.into(),
        ip: ip(addr),
        iface: None,
    }
}

fn external(addr: &str, entry_node: &str) -> End {
    End {
        vertex: Vertex {
            id: format!("ip/{addr}"),
            kind: VertexKind::External,
            namespace: None,
            name: addr.into(),
            workload_kind: None,
            nodes: Vec::new(),
        },
        endpoint: None,
        node: entry_node.into(),
        ip: ip(addr),
        iface: Some("eth0".into()),
    }
}

struct Svc {
    ns: &'static str,
    name: &'static str,
    vip: &'static str,
    port: u16,
}

/// How an edge behaves.
#[derive(Clone, Copy)]
struct Shape {
    protocol: &'static str,
    port: u16,
    conns: u64,
    req_bytes: u64,
    reply_bytes: u64,
    server_ns: u64,
    cross_rtt_ns: u64,
    /// NAT of a NodePort from outside: source and destination rewritten.
    masquerade: bool,
    /// Packets dropped on the server's node after the tunnel.
    drop: Option<(&'static str, u64)>,
}

fn shape(port: u16, conns: u64, req_bytes: u64, reply_bytes: u64, server_ms: f64) -> Shape {
    Shape {
        protocol: "tcp",
        port,
        conns,
        req_bytes,
        reply_bytes,
        server_ns: (server_ms * 1e6) as u64,
        cross_rtt_ns: 610_000,
        masquerade: false,
        drop: None,
    }
}

fn tuple(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> TupleView {
    TupleView {
        protocol: proto,
        src,
        src_port: sport,
        dst,
        dst_port: dport,
    }
}

fn hop(
    node: &str,
    iface: &str,
    direction: Direction,
    t: TupleView,
    packets: u64,
    bytes: u64,
) -> Step {
    Step::Hop {
        node: node.into(),
        interface: iface.into(),
        direction,
        tuple: t,
        packets,
        bytes,
        payload_bytes: bytes.saturating_sub(packets * 52),
        from_previous: None,
        handshake_rtt: None,
        response_rtt: None,
    }
}

/// The path of `conns` connections from `c` through `svc` (if any) to `s`, with its steps
/// each way, the round trips at each hook and the segments between them.
fn path(c: &End, svc: Option<&Svc>, s: &End, sh: &Shape, conns: u64, sport: u16) -> PathRecord {
    let proto = if sh.protocol == "udp" { 17 } else { 6 };
    let pkts = conns * 12;
    let (req_b, rep_b) = (conns * sh.req_bytes, conns * sh.reply_bytes);
    let first = tuple(
        proto,
        c.ip,
        sport,
        svc.map(|v| ip(v.vip)).unwrap_or(s.ip),
        svc.map(|v| v.port).unwrap_or(sh.port),
    );
    let src_after = if sh.masquerade {
        ip(&format!("10.244.{}.0", c.node.trim_start_matches("node")))
    } else {
        c.ip
    };
    let second = tuple(proto, src_after, sport, s.ip, sh.port);
    let mut req = Vec::new();
    if let Some(i) = &c.iface {
        req.push(hop(&c.node, i, Direction::Ingress, first, pkts, req_b));
    }
    if svc.is_some() {
        req.push(Step::Nat {
            node: c.node.clone(),
            from: first,
            to: second,
            rewrote: if sh.masquerade { "src+dst" } else { "dst" }.into(),
        });
    }
    if c.node != s.node {
        req.push(hop(
            &c.node,
            "flannel.1",
            Direction::Egress,
            second,
            pkts,
            req_b,
        ));
        req.push(hop(
            &s.node,
            "flannel.1",
            Direction::Ingress,
            second,
            pkts,
            req_b,
        ));
    }
    if let Some((reason, dropped)) = sh.drop {
        req.push(Step::Drop {
            node: s.node.clone(),
            reason: reason.into(),
            device: "flannel.1".into(),
            pod_veth: None,
            packets: dropped,
            bytes: dropped * 60,
        });
    }
    let server_if = s.iface.clone().unwrap_or_else(|| "cni0".into());
    req.push(hop(
        &s.node,
        &server_if,
        Direction::Egress,
        second,
        pkts,
        req_b,
    ));
    // Round trips: the server's time at its last hook, plus each segment's on the way back.
    let hop_nodes: Vec<String> = req
        .iter()
        .filter_map(|st| match st {
            Step::Hop { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect();
    let seg_rtt: Vec<u64> = hop_nodes
        .windows(2)
        .map(|w| {
            if w[0] == w[1] {
                18_000
            } else {
                sh.cross_rtt_ns
            }
        })
        .collect();
    let handshake = proto == 6;
    let mut k = 0;
    let mut prev_node: Option<String> = None;
    let mut hooks = Vec::new();
    for st in &mut req {
        if let Step::Hop {
            node,
            interface,
            direction,
            from_previous,
            handshake_rtt,
            response_rtt,
            ..
        } = st
        {
            let after: u64 = seg_rtt[k..].iter().sum();
            *response_rtt = Some(lat(sh.server_ns + after, conns * 5));
            *handshake_rtt = handshake.then(|| lat(25_000 + after, conns));
            if prev_node.as_deref() == Some(node.as_str()) {
                *from_previous = Some(lat(9_000, conns * 12));
            }
            prev_node = Some(node.clone());
            hooks.push((
                format!("{node}/{interface}/{}", direction.as_str()),
                node.clone(),
                handshake_rtt.as_ref().map(|l| l.mean_ns).unwrap_or(0),
                response_rtt.as_ref().map(|l| l.mean_ns).unwrap_or(0),
            ));
            k += 1;
        }
    }
    let segments = hooks
        .windows(2)
        .map(|w| Segment {
            from: w[0].0.clone(),
            to: w[1].0.clone(),
            in_node: w[0].1 == w[1].1,
            handshake_rtt_ns: handshake.then(|| w[0].2 as i64 - w[1].2 as i64),
            response_rtt_ns: Some(w[0].3 as i64 - w[1].3 as i64),
        })
        .collect();
    let (first_hook, last_hook) = (&hooks[0], &hooks[hooks.len() - 1]);
    let back = second.reversed_view();
    let back_first = first.reversed_view();
    let mut rep = vec![hop(
        &s.node,
        &server_if,
        Direction::Ingress,
        back,
        pkts,
        rep_b,
    )];
    if c.node != s.node {
        rep.push(hop(
            &s.node,
            "flannel.1",
            Direction::Egress,
            back,
            pkts,
            rep_b,
        ));
        rep.push(hop(
            &c.node,
            "flannel.1",
            Direction::Ingress,
            back,
            pkts,
            rep_b,
        ));
    }
    if svc.is_some() {
        rep.push(Step::Nat {
            node: c.node.clone(),
            from: back,
            to: back_first,
            rewrote: if sh.masquerade { "src+dst" } else { "src" }.into(),
        });
    }
    if let Some(i) = &c.iface {
        rep.push(hop(&c.node, i, Direction::Egress, back_first, pkts, rep_b));
    }
    PathRecord {
        protocol: sh.protocol.into(),
        src_endpoint: c.endpoint.clone(),
        dst_endpoint: s.endpoint.clone(),
        service: svc.map(|v| ServiceRef {
            namespace: v.ns.into(),
            name: v.name.into(),
            port_name: None,
        }),
        connections: conns,
        request: Leg {
            tuple: first,
            steps: req,
        },
        reply: Some(Leg {
            tuple: back,
            steps: rep,
        }),
        segments,
        network_time_ns: Some((first_hook.3 - last_hook.3) as i64),
        server_time_ns: Some(last_hook.3),
    }
}

trait Reverse {
    fn reversed_view(&self) -> TupleView;
}
impl Reverse for TupleView {
    fn reversed_view(&self) -> TupleView {
        tuple(
            self.protocol,
            self.dst,
            self.dst_port,
            self.src,
            self.src_port,
        )
    }
}

/// The edge of `c` to the pods `servers` (one path each, connections split evenly).
fn edge(c: &End, svc: Option<&Svc>, servers: &[&End], sh: Shape) -> Edge {
    let per = sh.conns / servers.len() as u64;
    let paths: Vec<PathRecord> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            path(
                c,
                svc,
                s,
                &sh,
                per + u64::from(i == 0) * (sh.conns % servers.len() as u64),
                40_000 + i as u16 * 7,
            )
        })
        .collect();
    let first = servers[0];
    let mut nodes = Vec::new();
    for p in &paths {
        for st in &p.request.steps {
            if let Step::Hop { node, .. } = st {
                if !nodes.contains(node) {
                    nodes.push(node.clone());
                }
            }
        }
    }
    let hops = paths[0].request.steps.iter().map(Step::label).collect();
    let first_hop = |p: &PathRecord| {
        p.request.steps.iter().find_map(|st| match st {
            Step::Hop {
                handshake_rtt,
                response_rtt,
                ..
            } => Some((handshake_rtt.clone(), response_rtt.clone())),
            _ => None,
        })
    };
    let (hs, resp) = first_hop(&paths[0]).unwrap();
    let span_s = 289.0;
    let (req_b, rep_b) = (sh.conns * sh.req_bytes, sh.conns * sh.reply_bytes);
    let via = svc
        .map(|v| format!(" -> svc/{}/{}", v.ns, v.name))
        .unwrap_or_default();
    Edge {
        id: format!(
            "{}{via} -> {} {}/{}",
            c.vertex.id, first.vertex.id, sh.protocol, sh.port
        ),
        from: c.vertex.id.clone(),
        to: first.vertex.id.clone(),
        service: svc.map(|v| ServiceRef {
            namespace: v.ns.into(),
            name: v.name.into(),
            port_name: None,
        }),
        protocol: sh.protocol.into(),
        port: sh.port,
        connections: sh.conns,
        tuples: sh.conns,
        request_packets: sh.conns * 12,
        request_bytes: req_b,
        request_payload_bytes: req_b.saturating_sub(sh.conns * 12 * 52),
        reply_packets: sh.conns * 12,
        reply_bytes: rep_b,
        reply_payload_bytes: rep_b.saturating_sub(sh.conns * 12 * 52),
        bytes_per_s: (req_b + rep_b) as f64 / span_s,
        packets_per_s: (sh.conns * 24) as f64 / span_s,
        first_seen_unix_ns: GENERATED - 290_000_000_000,
        last_seen_unix_ns: GENERATED - 1_000_000_000,
        handshake_rtt: hs,
        response_rtt: resp,
        server_time: Some(lat(paths[0].server_time_ns.unwrap(), sh.conns * 5)),
        network_time_ns: paths[0].network_time_ns,
        nodes,
        hops,
        paths,
    }
}

fn service_vertex(v: &Svc) -> Vertex {
    Vertex {
        id: format!("svc/{}/{}", v.ns, v.name),
        kind: VertexKind::Service,
        namespace: Some(v.ns.into()),
        name: v.name.into(),
        workload_kind: None,
        nodes: Vec::new(),
    }
}

/// The map out of its edges: every end and Service a vertex, pods of one workload merged.
fn answer(nodes: &[&str], edges: Vec<Edge>, services: &[&Svc], ends: &[&End]) -> MapAnswer {
    let mut vertices: Vec<Vertex> = Vec::new();
    for e in ends {
        match vertices.iter_mut().find(|v| v.id == e.vertex.id) {
            Some(v) => {
                for n in &e.vertex.nodes {
                    if !v.nodes.contains(n) {
                        v.nodes.push(n.clone());
                    }
                }
            }
            None => vertices.push(e.vertex.clone()),
        }
    }
    let used: BTreeSet<&str> = edges
        .iter()
        .flat_map(|e| [e.from.as_str(), e.to.as_str()])
        .collect();
    vertices.retain(|v| used.contains(v.id.as_str()));
    for s in services {
        let v = service_vertex(s);
        if edges.iter().any(|e| {
            e.service
                .as_ref()
                .is_some_and(|r| r.name == s.name && r.namespace == s.ns)
        }) {
            vertices.push(v);
        }
    }
    vertices.sort_by(|a, b| a.id.cmp(&b.id));
    MapAnswer {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        missing: Vec::new(),
        window_s: 300,
        generated_unix_ns: GENERATED,
        vertices,
        edges,
    }
}

/// SockShop over three nodes, with the cluster's DNS, a Prometheus scraping pods directly,
/// a client from outside through a NodePort, a kubelet probe and one agent missing.
fn sockshop() -> MapAnswer {
    let fe = pod(NS, "front-end", "Deployment", "node1", "10.244.1.10");
    let cat = pod(NS, "catalogue", "Deployment", "node2", "10.244.2.11");
    let catdb = pod(NS, "catalogue-db", "StatefulSet", "node3", "10.244.3.12");
    let carts_a = pod(NS, "carts", "Deployment", "node2", "10.244.2.13");
    let carts_b = pod(NS, "carts", "Deployment", "node3", "10.244.3.13");
    let cartsdb = pod(NS, "carts-db", "StatefulSet", "node3", "10.244.3.14");
    let orders = pod(NS, "orders", "Deployment", "node3", "10.244.3.15");
    let ordersdb = pod(NS, "orders-db", "StatefulSet", "node1", "10.244.1.16");
    let user = pod(NS, "user", "Deployment", "node1", "10.244.1.17");
    let userdb = pod(NS, "user-db", "StatefulSet", "node2", "10.244.2.18");
    let payment = pod(NS, "payment", "Deployment", "node2", "10.244.2.19");
    let shipping = pod(NS, "shipping", "Deployment", "node3", "10.244.3.20");
    let qm = pod(NS, "queue-master", "Deployment", "node1", "10.244.1.21");
    let rabbit = pod(NS, "rabbitmq", "StatefulSet", "node2", "10.244.2.22");
    let session = pod(NS, "session-db", "Deployment", "node1", "10.244.1.23");
    let prom = pod(
        "monitoring",
        "prometheus",
        "StatefulSet",
        "node3",
        "10.244.3.30",
    );
    let dns = pod(
        "kube-system",
        "coredns",
        "Deployment",
        "node1",
        "10.244.1.2",
    );
    let kubelet = host("node2", "192.168.56.12");
    let outside = external("203.0.113.7", "node3");
    let s = |name: &'static str, vip: &'static str, port: u16| Svc {
        ns: NS,
        name,
        vip,
        port,
    };
    let s_fe = s("front-end", "10.96.0.80", 30001);
    let s_cat = s("catalogue", "10.96.0.81", 80);
    let s_catdb = s("catalogue-db", "10.96.0.82", 3306);
    let s_carts = s("carts", "10.96.0.83", 80);
    let s_cartsdb = s("carts-db", "10.96.0.84", 27017);
    let s_orders = s("orders", "10.96.0.85", 80);
    let s_ordersdb = s("orders-db", "10.96.0.86", 27017);
    let s_user = s("user", "10.96.0.87", 80);
    let s_userdb = s("user-db", "10.96.0.88", 27017);
    let s_pay = s("payment", "10.96.0.89", 80);
    let s_ship = s("shipping", "10.96.0.90", 80);
    let s_rabbit = s("rabbitmq", "10.96.0.91", 5672);
    let s_session = s("session-db", "10.96.0.92", 6379);
    let s_dns = Svc {
        ns: "kube-system",
        name: "kube-dns",
        vip: "10.96.0.10",
        port: 53,
    };
    let udp = |conns| Shape {
        protocol: "udp",
        ..shape(53, conns, 70, 120, 0.3)
    };
    let edges = vec![
        edge(
            &outside,
            Some(&s_fe),
            &[&fe],
            Shape {
                masquerade: true,
                ..shape(8079, 420, 900, 24_000, 11.0)
            },
        ),
        edge(&kubelet, None, &[&fe], shape(8079, 58, 180, 200, 0.6)),
        edge(&fe, Some(&s_cat), &[&cat], shape(80, 1310, 420, 9_800, 4.2)),
        edge(
            &fe,
            Some(&s_carts),
            &[&carts_a, &carts_b],
            shape(80, 860, 700, 2_100, 18.0),
        ),
        edge(
            &fe,
            Some(&s_orders),
            &[&orders],
            shape(80, 310, 1_100, 1_900, 140.0),
        ),
        edge(
            &fe,
            Some(&s_user),
            &[&user],
            shape(80, 530, 400, 1_300, 7.5),
        ),
        edge(
            &fe,
            Some(&s_session),
            &[&session],
            shape(6379, 2400, 120, 300, 0.2),
        ),
        edge(&fe, Some(&s_dns), &[&dns], udp(900)),
        edge(
            &cat,
            Some(&s_catdb),
            &[&catdb],
            Shape {
                cross_rtt_ns: 2_400_000,
                ..shape(3306, 1310, 300, 7_000, 2.5)
            },
        ),
        edge(
            &carts_a,
            Some(&s_cartsdb),
            &[&cartsdb],
            shape(27017, 1700, 350, 900, 1.8),
        ),
        edge(
            &orders,
            Some(&s_ordersdb),
            &[&ordersdb],
            shape(27017, 600, 800, 400, 2.2),
        ),
        edge(
            &orders,
            Some(&s_pay),
            &[&payment],
            Shape {
                drop: Some(("NETFILTER_DROP", 14)),
                cross_rtt_ns: 4_800_000,
                ..shape(80, 310, 300, 200, 35.0)
            },
        ),
        edge(
            &orders,
            Some(&s_ship),
            &[&shipping],
            shape(80, 300, 500, 150, 9.0),
        ),
        edge(
            &orders,
            Some(&s_user),
            &[&user],
            shape(80, 310, 300, 800, 6.0),
        ),
        edge(
            &orders,
            Some(&s_carts),
            &[&carts_b],
            shape(80, 310, 300, 1_500, 12.0),
        ),
        edge(
            &user,
            Some(&s_userdb),
            &[&userdb],
            shape(27017, 840, 300, 700, 1.4),
        ),
        edge(
            &shipping,
            Some(&s_rabbit),
            &[&rabbit],
            shape(5672, 300, 600, 80, 0.9),
        ),
        edge(
            &qm,
            Some(&s_rabbit),
            &[&rabbit],
            shape(5672, 40, 100, 5_000, 0.7),
        ),
        edge(&prom, None, &[&fe], shape(8079, 29, 250, 48_000, 3.0)),
        edge(&prom, None, &[&cat], shape(80, 29, 250, 21_000, 2.0)),
        edge(&prom, None, &[&orders], shape(80, 29, 250, 30_000, 2.4)),
        edge(&orders, Some(&s_dns), &[&dns], udp(320)),
    ];
    let ends = [
        &fe, &cat, &catdb, &carts_a, &carts_b, &cartsdb, &orders, &ordersdb, &user, &userdb,
        &payment, &shipping, &qm, &rabbit, &session, &prom, &dns, &kubelet, &outside,
    ];
    let services = [
        &s_fe,
        &s_cat,
        &s_catdb,
        &s_carts,
        &s_cartsdb,
        &s_orders,
        &s_ordersdb,
        &s_user,
        &s_userdb,
        &s_pay,
        &s_ship,
        &s_rabbit,
        &s_session,
        &s_dns,
    ];
    let mut map = answer(&["node1", "node2", "node3"], edges, &services, &ends);
    map.missing.push(MissingNode {
        agent: "https://10.0.0.4:9443".into(),
        node: Some("node4".into()),
        error: HOSTILE.into(),
    });
    map
}

/// About a hundred vertices: nine namespaces of a web front calling a few others, each with
/// its database, an ingress controller in front of every web, and a shared platform
/// namespace every front calls.
fn large() -> MapAnswer {
    let nodes = ["node1", "node2", "node3", "node4", "node5"];
    let mut edges = Vec::new();
    let mut ends: Vec<End> = Vec::new();
    let mut services: Vec<Svc> = Vec::new();
    let name = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let platform: Vec<End> = (0..4)
        .map(|i| {
            pod(
                "platform",
                ["auth", "config", "audit", "flags"][i],
                "Deployment",
                nodes[i],
                &format!("10.244.9.{}", 10 + i),
            )
        })
        .collect();
    let psvc: Vec<Svc> = (0..4)
        .map(|i| Svc {
            ns: "platform",
            name: ["auth", "config", "audit", "flags"][i],
            vip: name(format!("10.96.9.{}", 10 + i)),
            port: 443,
        })
        .collect();
    let ingress = pod(
        "ingress",
        "ingress-nginx",
        "DaemonSet",
        "node1",
        "10.244.8.10",
    );
    for t in 0..9 {
        let ns = name(format!("team-{t}"));
        let node = |i: usize| nodes[(t + i) % nodes.len()];
        let ws: Vec<End> = (0..5)
            .map(|i| {
                pod(
                    ns,
                    ["web", "api", "worker", "cache", "db"][i],
                    "Deployment",
                    node(i),
                    &format!("10.244.{}.{}", 20 + t, 10 + i),
                )
            })
            .collect();
        let ss: Vec<Svc> = (0..5)
            .map(|i| Svc {
                ns,
                name: ["web", "api", "worker", "cache", "db"][i],
                vip: name(format!("10.96.{}.{}", 20 + t, 10 + i)),
                port: 80,
            })
            .collect();
        edges.push(edge(
            &ingress,
            Some(&ss[0]),
            &[&ws[0]],
            shape(80, 300 + 40 * t as u64, 800, 12_000, 4.0),
        ));
        let calls = [(0, 1), (0, 3), (1, 2), (1, 4), (2, 4), (1, 3)];
        for (k, &(a, b)) in calls.iter().enumerate() {
            edges.push(edge(
                &ws[a],
                Some(&ss[b]),
                &[&ws[b]],
                shape(
                    80,
                    50 + 30 * k as u64 * (t as u64 + 1),
                    400,
                    2_000 + 900 * t as u64,
                    1.0 + (t * k) as f64,
                ),
            ));
        }
        edges.push(edge(
            &ws[0],
            Some(&psvc[t % 4]),
            &[&platform[t % 4]],
            shape(443, 80, 300, 600, 2.0),
        ));
        edges.push(edge(
            &ws[1],
            Some(&psvc[(t + 1) % 4]),
            &[&platform[(t + 1) % 4]],
            shape(443, 40, 300, 600, 3.0),
        ));
        ends.extend(ws);
        services.extend(ss);
    }
    ends.extend(platform);
    ends.push(ingress);
    services.extend(psvc);
    let end_refs: Vec<&End> = ends.iter().collect();
    let svc_refs: Vec<&Svc> = services.iter().collect();
    answer(&nodes, edges, &svc_refs, &end_refs)
}

// ---------------------------------------------------------------- in the browser

fn ids(map: &MapAnswer) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        map.vertices.iter().map(|v| v.id.clone()).collect(),
        map.edges.iter().map(|e| e.id.clone()).collect(),
    )
}

fn drawn(b: &mut Browser) -> (Vec<String>, Vec<String>) {
    let v = b
        .eval(
            "({v: [...document.querySelectorAll('#map g.vertex')].map(g => g.dataset.id), \
               e: [...document.querySelectorAll('#map g.edge')].map(g => g.dataset.id)})",
        )
        .unwrap();
    let list = |k: &str| -> Vec<String> { serde_json::from_value(v[k].clone()).unwrap() };
    (list("v"), list("e"))
}

/// The DOM holds exactly the map's vertices and edges, each once.
fn assert_exactly(b: &mut Browser, map: &MapAnswer) {
    let (v, e) = drawn(b);
    let (want_v, want_e) = ids(map);
    assert_eq!(v.len(), want_v.len(), "vertices drawn: {v:?}");
    assert_eq!(e.len(), want_e.len(), "edges drawn: {e:?}");
    assert_eq!(v.into_iter().collect::<BTreeSet<_>>(), want_v);
    assert_eq!(e.into_iter().collect::<BTreeSet<_>>(), want_e);
}

/// What a reader would call a broken drawing: vertices over vertices, labels over
/// vertices or labels, a vertex outside its namespace's box, namespace boxes overlapping.
const LAYOUT_PROBLEMS: &str = r#"(() => {
  const r = (e) => e.getBoundingClientRect();
  const over = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
  const inside = (a, b) => a.left >= b.left - 0.5 && a.right <= b.right + 0.5 && a.top >= b.top - 0.5 && a.bottom <= b.bottom + 0.5;
  const vs = [...document.querySelectorAll('#map g.vertex')].map(g => ({ id: g.dataset.id, r: r(g.querySelector('.shape')) }));
  const ls = [...document.querySelectorAll('#map g.elabel')].map(g => ({ id: g.dataset.edge, r: r(g.querySelector('rect')) }));
  const ns = [...document.querySelectorAll('#map g.ns')].map(g => ({ ns: g.dataset.ns, r: r(g.querySelector('rect')) }));
  const byId = new Map(window.__mapVertices.map(v => [v.id, v]));
  const out = [];
  for (let i = 0; i < vs.length; i++) for (let j = i + 1; j < vs.length; j++) if (over(vs[i].r, vs[j].r)) out.push('vertices ' + vs[i].id + ' and ' + vs[j].id + ' overlap');
  for (let i = 0; i < ls.length; i++) {
    for (let j = i + 1; j < ls.length; j++) if (over(ls[i].r, ls[j].r)) out.push('labels of ' + ls[i].id + ' and ' + ls[j].id + ' overlap');
    for (const v of vs) if (over(ls[i].r, v.r)) out.push('label of ' + ls[i].id + ' covers ' + v.id);
  }
  for (let i = 0; i < ns.length; i++) for (let j = i + 1; j < ns.length; j++) if (over(ns[i].r, ns[j].r)) out.push('namespace boxes ' + ns[i].ns + ' and ' + ns[j].ns + ' overlap');
  for (const v of vs) {
    const box = ns.find(n => n.ns === (byId.get(v.id).namespace || ''));
    if (!box) out.push(v.id + ' has no namespace box');
    else if (!inside(v.r, box.r)) out.push(v.id + ' lies outside the box of ' + box.ns);
    for (const n of ns) if (n !== box && over(v.r, n.r)) out.push(v.id + ' overlaps the box of ' + n.ns);
  }
  const svg = r(document.getElementById('map'));
  for (const v of vs) if (!inside(v.r, svg)) out.push(v.id + ' lies outside the drawing');
  return out;
})()"#;

fn assert_layout(b: &mut Browser, map: &MapAnswer) {
    let vertices = serde_json::to_string(&map.vertices).unwrap();
    b.eval(&format!("window.__mapVertices = {vertices}; true"))
        .unwrap();
    let problems = b.eval(LAYOUT_PROBLEMS).unwrap();
    assert_eq!(problems, json!([]), "the drawing has problems");
}

/// A point of the edge's hit path where a click lands on that edge (what a person would
/// click), in viewport pixels, after scrolling the map into view.
fn click_point(b: &mut Browser, edge_id: &str) -> (f64, f64) {
    b.edge_click_point(edge_id)
        .unwrap()
        .unwrap_or_else(|| panic!("no point of {edge_id}'s path can be clicked (all covered)"))
}

fn center_of(b: &mut Browser, selector_js: &str) -> (f64, f64) {
    let p = b
        .eval(&format!(
            "(() => {{ const e = {selector_js}; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
               return {{ x: r.left + r.width / 2, y: r.top + r.height / 2 }}; }})()"
        ))
        .unwrap();
    (p["x"].as_f64().unwrap(), p["y"].as_f64().unwrap())
}

fn table_rows(b: &mut Browser) -> Vec<String> {
    serde_json::from_value(
        b.eval("[...document.querySelectorAll('tr.edge-row')].map(r => r.dataset.id)")
            .unwrap(),
    )
    .unwrap()
}

/// The steps a path's request leg shows in the panel, as (step, node, interface,
/// direction, text).
fn shown_steps(b: &mut Browser, path: usize) -> Vec<Value> {
    b.eval(&format!(
        "[...document.querySelectorAll('#edge-detail .path[data-path=\"{path}\"] .leg[data-leg=\"request\"] .step')]\
           .map(s => [s.dataset.step, s.dataset.node, s.dataset.interface || null, s.dataset.direction || null, s.textContent])"
    ))
    .unwrap()
    .as_array()
    .unwrap()
    .clone()
}

fn want_steps(p: &PathRecord) -> Vec<(String, String, Option<String>, Option<String>)> {
    p.request
        .steps
        .iter()
        .map(|st| match st {
            Step::Hop {
                node,
                interface,
                direction,
                ..
            } => (
                "hop".into(),
                node.clone(),
                Some(interface.clone()),
                Some(direction.as_str().into()),
            ),
            Step::Nat { node, .. } => ("nat".into(), node.clone(), None, None),
            Step::Drop { node, .. } => ("drop".into(), node.clone(), None, None),
        })
        .collect()
}

fn assert_png(path: &std::path::Path, min_bytes: usize) {
    let png = std::fs::read(path).unwrap();
    assert_eq!(
        &png[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert!(
        png.len() > min_bytes,
        "{} is only {} bytes",
        path.display(),
        png.len()
    );
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(
        width >= 1600 && height >= 600,
        "{}: {width}x{height}",
        path.display()
    );
    println!(
        "screenshot: {} ({width}x{height}, {} bytes)",
        path.display(),
        png.len()
    );
}

fn ready(b: &mut Browser) {
    b.wait_for(
        "document.body.dataset.ready === '1'",
        Duration::from_secs(15),
    )
    .unwrap();
}

#[test]
fn static_page_draws_the_map_and_follows_an_edge_hop_by_hop() {
    let map = sockshop();
    let json = serde_json::to_string(&map).unwrap();
    let out = output_dir();
    let file = out.join("map.html");
    std::fs::write(&file, static_map_page(&json)).unwrap();
    println!("static page: {}", file.display());
    let mut b = Browser::launch().unwrap();
    b.navigate(&format!("file://{}", file.display())).unwrap();
    ready(&mut b);
    assert_exactly(&mut b, &map);
    assert_layout(&mut b, &map);
    // Nothing from the data ran as markup; the missing agent shows, its error as text.
    assert_eq!(b.eval("typeof window.__pwned").unwrap(), "undefined");
    let warning = b
        .eval("document.getElementById('missing').textContent")
        .unwrap();
    assert!(warning.as_str().unwrap().contains(HOSTILE), "{warning}");
    assert!(warning.as_str().unwrap().contains("node4"), "{warning}");
    // A static page fetches nothing, so it is not live.
    assert_eq!(
        b.eval("document.getElementById('pause').hidden").unwrap(),
        true
    );
    assert_eq!(table_rows(&mut b).len(), map.edges.len());
    // Colour by the handshake's p50 (the payment edge's 4.9 ms is in 3-10 ms, yellow), width
    // by bytes/s (46 kB/s drawn wider than 76 B/s).
    let line = |b: &mut Browser, id: &str, attr: &str| -> String {
        let id = serde_json::to_string(id).unwrap();
        b.eval(&format!(
            "[...document.querySelectorAll('#map g.edge')].find(g => g.dataset.id === {id}).querySelector('path.line').getAttribute('{attr}')"
        ))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
    };
    let payment =
        "workload/sock-shop/orders -> svc/sock-shop/payment -> workload/sock-shop/payment tcp/80";
    assert_eq!(line(&mut b, payment, "stroke"), "#eab308");
    let busiest = "workload/sock-shop/front-end -> svc/sock-shop/catalogue -> workload/sock-shop/catalogue tcp/80";
    let lightest = "node/node2 -> workload/sock-shop/front-end tcp/8079";
    let width = |b: &mut Browser, id| line(b, id, "stroke-width").parse::<f64>().unwrap();
    assert!(width(&mut b, busiest) > width(&mut b, lightest) + 2.0);
    // The label chooser: connections on every label.
    b.eval("{ const l = document.getElementById('label'); l.value = 'connections'; l.dispatchEvent(new Event('change')); true }")
        .unwrap();
    let labels = b
        .eval("[...document.querySelectorAll('#map g.elabel:not(.drop) text')].map(t => t.textContent)")
        .unwrap();
    let labels: Vec<String> = serde_json::from_value(labels).unwrap();
    assert!(labels.len() >= map.edges.len() - 2, "{labels:?}");
    assert!(labels.iter().all(|l| l.ends_with(" conn")), "{labels:?}");
    assert!(labels.contains(&"1,310 conn".to_string()), "{labels:?}");
    // The filter, typed: the table keeps the edges of the matching vertices.
    let (x, y) = center_of(&mut b, "document.getElementById('filter')");
    b.click_at(x, y).unwrap();
    b.call("Input.insertText", json!({"text": "rabbitmq"}))
        .unwrap();
    b.wait_for(
        "document.querySelectorAll('tr.edge-row').length === 2",
        Duration::from_secs(5),
    )
    .unwrap();
    let rows: BTreeSet<String> = table_rows(&mut b).into_iter().collect();
    let want: BTreeSet<String> = map
        .edges
        .iter()
        .filter(|e| e.to == "workload/sock-shop/rabbitmq")
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(rows, want);
    assert_eq!(
        b.eval("document.querySelectorAll('#map g.edge.fo').length")
            .unwrap(),
        json!(map.edges.len() - 2)
    );
    b.eval("{ const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); \
            const l = document.getElementById('label'); l.value = 'throughput'; l.dispatchEvent(new Event('change')); true }")
        .unwrap();
    assert_eq!(table_rows(&mut b).len(), map.edges.len());
    b.screenshot(&out.join("map.png")).unwrap();
    assert_png(&out.join("map.png"), 40_000);

    // The edge through a Service, across nodes, with a drop: clicked where a person would.
    let e = map
        .edges
        .iter()
        .find(|e| e.id.contains("svc/sock-shop/payment"))
        .unwrap();
    let (x, y) = click_point(&mut b, &e.id);
    b.click_at(x, y).unwrap();
    let id = serde_json::to_string(&e.id).unwrap();
    b.wait_for(
        &format!("document.getElementById('edge-detail').dataset.edge === {id}"),
        Duration::from_secs(5),
    )
    .unwrap();
    let shown = shown_steps(&mut b, 0);
    let want = want_steps(&e.paths[0]);
    assert_eq!(shown.len(), want.len(), "steps shown: {shown:?}");
    for (s, w) in shown.iter().zip(&want) {
        assert_eq!(s[0], w.0, "{s:?} vs {w:?}");
        assert_eq!(s[1], w.1, "{s:?} vs {w:?}");
        assert_eq!(s[2].as_str().map(String::from), w.2, "{s:?} vs {w:?}");
        assert_eq!(s[3].as_str().map(String::from), w.3, "{s:?} vs {w:?}");
    }
    let nat = shown.iter().find(|s| s[0] == "nat").unwrap()[4]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        nat.contains("dst 10.96.0.89:80 → 10.244.2.19:80") && nat.contains("rewrote dst"),
        "the NAT step reads {nat:?}"
    );
    let drop = shown.iter().find(|s| s[0] == "drop").unwrap()[4]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        drop.contains("NETFILTER_DROP") && drop.contains("flannel.1"),
        "{drop:?}"
    );
    // The segment between the nodes is marked, with its round trip.
    let cross = b
        .eval("[...document.querySelectorAll('#edge-detail .path[data-path=\"0\"] .leg[data-leg=\"request\"] .seg.cross')].map(s => s.textContent)")
        .unwrap();
    assert_eq!(
        cross,
        json!(["⇣ round trip between node3 and node2 (the network): response 4.80 ms · handshake 4.80 ms"])
    );
    // Where the time goes: the network (4.84 ms, the segments) against the server (35 ms).
    let panel = b
        .eval("document.getElementById('edge-detail').textContent")
        .unwrap();
    for part in [
        "network 4.84 ms",
        "server 35.0 ms",
        "node3 ↔ node2 4.80 ms",
        "1 path, hop by hop",
    ] {
        assert!(
            panel.as_str().unwrap().contains(part),
            "no {part:?} in the panel: {panel}"
        );
    }
    assert_eq!(table_rows(&mut b), vec![e.id.clone()]);
    assert_eq!(
        b.eval("[...document.querySelectorAll('#map g.edge.sel')].map(g => g.dataset.id)")
            .unwrap(),
        json!([e.id])
    );
    b.screenshot(&out.join("map-edge.png")).unwrap();
    assert_png(&out.join("map-edge.png"), 40_000);

    // A vertex: the table keeps the edges from it, to it and through it.
    let v = "workload/sock-shop/carts";
    let (x, y) = center_of(
        &mut b,
        &format!("[...document.querySelectorAll('#map g.vertex')].find(g => g.dataset.id === '{v}').querySelector('.shape')"),
    );
    b.click_at(x, y).unwrap();
    b.wait_for(
        &format!("document.getElementById('edge-detail').dataset.vertex === '{v}'"),
        Duration::from_secs(5),
    )
    .unwrap();
    let rows: BTreeSet<String> = table_rows(&mut b).into_iter().collect();
    let want: BTreeSet<String> = map
        .edges
        .iter()
        .filter(|e| e.from == v || e.to == v)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows, want);

    // A row of the table selects its edge.
    let row_edge = map.edges.iter().find(|e| e.from == v).unwrap();
    let row = serde_json::to_string(&row_edge.id).unwrap();
    let (x, y) = center_of(
        &mut b,
        &format!("[...document.querySelectorAll('tr.edge-row')].find(r => r.dataset.id === {row})"),
    );
    b.click_at(x, y).unwrap();
    b.wait_for(
        &format!("document.getElementById('edge-detail').dataset.edge === {row}"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(table_rows(&mut b), vec![row_edge.id.clone()]);
    assert_eq!(b.page_errors().unwrap(), Vec::<String>::new());
}

#[test]
fn large_map_lays_out_without_overlaps() {
    let map = large();
    assert!(map.vertices.len() >= 90, "{} vertices", map.vertices.len());
    let out = output_dir();
    let file = out.join("map-large.html");
    std::fs::write(
        &file,
        static_map_page(&serde_json::to_string(&map).unwrap()),
    )
    .unwrap();
    let mut b = Browser::launch().unwrap();
    b.navigate(&format!("file://{}", file.display())).unwrap();
    ready(&mut b);
    assert_exactly(&mut b, &map);
    assert_layout(&mut b, &map);
    b.screenshot(&out.join("map-large.png")).unwrap();
    assert_png(&out.join("map-large.png"), 60_000);
    assert_eq!(b.page_errors().unwrap(), Vec::<String>::new());
}

// ---------------------------------------------------------------- live

/// `/map` and `/v1/map` on a loopback port, from a thread; what was asked is kept.
struct Server {
    port: u16,
    map: Arc<Mutex<String>>,
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(map: String) -> Server {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let map = Arc::new(Mutex::new(map));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, a, s) = (map.clone(), asked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (m, a) = (m.clone(), a.clone());
                        std::thread::spawn(move || answer_http(conn, &m, &a));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Server {
            port,
            map,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn asked_maps(&self) -> Vec<String> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.starts_with("/v1/map"))
            .cloned()
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the test server's map is set to for a 502 answer.
const BROKEN: &str = "502";

fn answer_http(mut conn: TcpStream, map: &Mutex<String>, asked: &Mutex<Vec<String>>) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return, // a preconnect that never asked
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
    asked.lock().unwrap().push(target.clone());
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match path {
        "/map" => ("200 OK", "text/html; charset=utf-8", MAP_PAGE.to_string()),
        "/v1/map" => match map.lock().unwrap().clone() {
            // The agents unreachable, as the relay answers it.
            broken if broken == BROKEN => (
                "502 Bad Gateway",
                "text/plain",
                "no agent answered".to_string(),
            ),
            json => ("200 OK", "application/json", json),
        },
        _ => ("404 Not Found", "text/plain", format!("no {path} here")),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[test]
fn live_page_fetches_refreshes_and_pauses() {
    let full = sockshop();
    let mut before = full.clone();
    let added = before.edges.pop().unwrap();
    before.vertices.retain(|v| {
        before
            .edges
            .iter()
            .any(|e| e.from == v.id || e.to == v.id || e.id.contains(&format!(" -> {} -> ", v.id)))
    });
    let server = Server::start(serde_json::to_string(&before).unwrap());
    let mut b = Browser::launch().unwrap();
    b.navigate(&format!("http://127.0.0.1:{}/map?refresh_s=1", server.port))
        .unwrap();
    ready(&mut b);
    assert_exactly(&mut b, &before);
    assert_eq!(server.asked_maps()[0], "/v1/map?window_s=300");
    assert!(b
        .eval("document.getElementById('updated').textContent")
        .unwrap()
        .as_str()
        .unwrap()
        .starts_with("live · updated "));

    // One more edge on the server: the page shows it after its refresh.
    *server.map.lock().unwrap() = serde_json::to_string(&full).unwrap();
    let id = serde_json::to_string(&added.id).unwrap();
    b.wait_for(
        &format!("[...document.querySelectorAll('#map g.edge')].some(g => g.dataset.id === {id})"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_exactly(&mut b, &full);
    let renders: u64 = b
        .eval("Number(document.body.dataset.renders)")
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(renders >= 2, "{renders} renders");

    // The new edge selected and its reply path opened: a refresh keeps both.
    let (x, y) = click_point(&mut b, &added.id);
    b.click_at(x, y).unwrap();
    b.wait_for(
        &format!("document.getElementById('edge-detail').dataset.edge === {id}"),
        Duration::from_secs(5),
    )
    .unwrap();
    b.eval("document.querySelector('#edge-detail details[data-k=\"reply0\"]').open = true")
        .unwrap();
    b.wait_for(
        &format!("Number(document.body.dataset.renders) > {renders}"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        b.eval("document.querySelector('#edge-detail details[data-k=\"reply0\"]').open")
            .unwrap(),
        true,
        "the refresh closed the reply path"
    );
    assert_eq!(table_rows(&mut b), vec![added.id.clone()]);

    // The window goes to the API.
    b.eval("{ const w = document.getElementById('window'); w.value = '60'; w.dispatchEvent(new Event('change')); true }")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        server
            .asked_maps()
            .iter()
            .any(|p| p == "/v1/map?window_s=60"),
        "{:?}",
        server.asked_maps()
    );

    // Paused (a real click on the button), the page asks nothing and keeps its map.
    let (x, y) = center_of(&mut b, "document.getElementById('pause')");
    b.click_at(x, y).unwrap();
    b.wait_for(
        "document.getElementById('pause').textContent === 'Resume'",
        Duration::from_secs(5),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let asked = server.asked_maps().len();
    *server.map.lock().unwrap() = serde_json::to_string(&before).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(server.asked_maps().len(), asked, "it fetched while paused");
    assert_exactly(&mut b, &full);
    // Resumed, it catches up.
    b.click_at(x, y).unwrap();
    b.wait_for(
        &format!("![...document.querySelectorAll('#map g.edge')].some(g => g.dataset.id === {id})"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_exactly(&mut b, &before);

    // The API failing: the page says what failed, keeps its map, and recovers.
    *server.map.lock().unwrap() = BROKEN.into();
    b.wait_for(
        "[...document.querySelectorAll('#warnings .err')].some(e => e.textContent.startsWith('Refresh failed: GET v1/map?window_s=60: HTTP 502 no agent answered'))",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_exactly(&mut b, &before);
    *server.map.lock().unwrap() = serde_json::to_string(&full).unwrap();
    b.wait_for(
        "document.querySelectorAll('#warnings .err').length === 0",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_exactly(&mut b, &full);
    assert_eq!(b.page_errors().unwrap(), Vec::<String>::new());
}
