//! One flow, one name: `/v1/flows`, `/v1/trace` and `/metrics` attribute the same traffic to
//! the same pods, workloads, Service, NAT step and hops, on both nodes of the emulated
//! cluster: Service connections (with the hook before kube-proxy's DNAT and the reply after
//! the un-DNAT), a same-node flow and a cross-node flow. Ground truth for the Service's
//! backends: `conntrack -L` on the client's node. Needs root.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use flowtrace::model::{
    wire::{InterfacesResponse, StatsResponse},
    Endpoint, EndpointKind, FlowRecord, TraceLine, TracePacket, TupleView,
};
use flowtrace_tests::{
    conntrack_list, finish, flowtrace_bin, ftgen, ftgen_bg, http_get, parse_exposition,
    service_connections, Bed, ChildGuard,
};

const SERVICE: &str = "10.96.0.10";

/// `flowtrace trace --json` against the node's agent, its lines collected as they come.
struct Tracer {
    _guard: ChildGuard,
    lines: mpsc::Receiver<String>,
}

fn tracer(netns: &str) -> Tracer {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(flowtrace_bin().unwrap())
        .args(["trace", "--json", "--proto", "tcp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Tracer {
        _guard: ChildGuard::new(child, format!("flowtrace trace in {netns}")),
        lines,
    }
}

/// Waits until the agent has the tracer attached and the kernel writes trace events.
fn wait_traced(agent: &flowtrace_tests::Agent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s: StatsResponse = agent.get("/v1/stats").unwrap();
        if s.tracers >= 1 && s.kernel_tracing {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tracer never attached: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Tracer {
    /// The SYNs traced until `quiet` passes with no line.
    fn syns(&self, quiet: Duration) -> Vec<TracePacket> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(quiet) {
                Ok(l) if l.trim().is_empty() => continue,
                Ok(l) => {
                    if let Ok(TraceLine::Packet(p)) = serde_json::from_str::<TraceLine>(&l) {
                        if p.tcp_flags == "S" {
                            out.push(*p);
                        }
                    }
                }
                Err(_) => break,
            }
        }
        out
    }
}

/// (namespace, workload, pod) as `/metrics` labels a pod at `--metrics-level pod`.
fn pod_labels(e: &Endpoint) -> Option<[String; 3]> {
    (e.kind == EndpointKind::Pod).then(|| {
        [
            e.namespace.clone().unwrap_or_default(),
            e.workload
                .as_ref()
                .map(|w| w.name.clone())
                .unwrap_or_else(|| e.name.clone()),
            e.name.clone(),
        ]
    })
}

/// Who really sent and received: the peer behind a Service address, else the address's own.
fn ends(f: &FlowRecord) -> (Option<&Endpoint>, Option<&Endpoint>) {
    (
        f.src_peer.as_ref().or(f.src_endpoint.as_ref()),
        f.dst_peer.as_ref().or(f.dst_endpoint.as_ref()),
    )
}

fn ends_of_packet(p: &TracePacket) -> (Option<&Endpoint>, Option<&Endpoint>) {
    (
        p.src_peer.as_ref().or(p.src_endpoint.as_ref()),
        p.dst_peer.as_ref().or(p.dst_endpoint.as_ref()),
    )
}

/// The hop class `/metrics` labels an interface with.
fn hop_class(kind: Option<&str>, name: &str) -> String {
    match kind {
        Some("veth") => "pod".into(),
        Some("vxlan") | Some("geneve") => "overlay".into(),
        _ => name.into(),
    }
}

#[test]
fn flows_trace_and_metrics_name_every_flow_the_same() {
    let bed = Bed::with_metadata_and(&["--metrics-level", "pod"]).unwrap();
    let cluster = &bed.cluster;
    let client = cluster.pod(1, "pod-a").unwrap();
    let local = cluster.pod(1, "pod-c").unwrap();
    let remote = cluster.pod(2, "pod-c").unwrap();
    let tracers: Vec<Tracer> = cluster.nodes.iter().map(|n| tracer(&n.netns)).collect();
    for a in &bed.agents {
        wait_traced(a);
    }

    // Traffic: Service connections (backends pod-b on both nodes), pod-a -> pod-c on its
    // node, pod-a -> pod-c across the nodes.
    let connections = 12u64;
    service_connections(cluster, client, connections).unwrap();
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:9090",
        "--connections",
        "2",
        "--timeout-ms",
        "30000",
    ];
    let sinks = [
        ftgen_bg(local, &sink_args).unwrap(),
        ftgen_bg(remote, &sink_args).unwrap(),
    ];
    for to in [local, remote] {
        let sent = ftgen(
            client,
            &[
                "tcp-send",
                "--to",
                &format!("{}:9090", to.ipv4),
                "--bytes",
                "2000",
                "--connections",
                "1",
            ],
        )
        .unwrap();
        assert_eq!(sent["connections"], 1, "{sent}");
    }
    for s in sinks {
        finish(s).unwrap();
    }
    let traced: Vec<Vec<TracePacket>> = tracers
        .iter()
        .map(|t| t.syns(Duration::from_secs(3)))
        .collect();

    // Ground truth for the Service: the backend conntrack DNATed each client port to.
    let backend_of: HashMap<u16, IpAddr> = conntrack_list(
        cluster.node(1).unwrap(),
        &["-p", "tcp", "-d", SERVICE, "-s", &client.ipv4.to_string()],
    )
    .unwrap()
    .iter()
    .map(|(orig, reply)| (orig.2, reply.1))
    .collect();
    assert_eq!(backend_of.len() as u64, connections, "{backend_of:?}");
    let pod_at: HashMap<IpAddr, String> = cluster
        .nodes
        .iter()
        // The fixture API server names pod `pod-b` of node1 `pod-b-node1`.
        .flat_map(|n| {
            n.pods
                .iter()
                .map(|p| (IpAddr::V4(p.ipv4), format!("{}-{}", p.name, p.node)))
        })
        .collect();

    let mut service_flows_checked = 0;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let agent = &bed.agents[i];
        // /v1/flows drains; the scrape that follows sees the same drain.
        let flows = agent.flows().unwrap();
        let (status, text) = http_get(&node.netns, "/metrics").unwrap();
        assert_eq!(status, 200);
        let ifaces: InterfacesResponse = agent.get("/v1/interfaces").unwrap();
        let kind: HashMap<String, Option<String>> = ifaces
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), i.kind.clone()))
            .collect();

        // 1. /v1/flows and /metrics: every pod-to-pod series is exactly the sum of the flows
        //    the flow table attributes to its labels.
        let mut expected: BTreeMap<Vec<String>, (f64, f64)> = BTreeMap::new();
        for f in &flows {
            let (Some(src), Some(dst)) = ends(f) else {
                continue;
            };
            let (Some(s), Some(d)) = (pod_labels(src), pod_labels(dst)) else {
                continue;
            };
            for h in &f.hops {
                let k = kind.get(&h.interface).cloned().flatten();
                let mut labels: Vec<String> = s.iter().chain(d.iter()).cloned().collect();
                labels.push(
                    f.service
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                );
                labels.push(hop_class(k.as_deref(), &h.interface));
                labels.push(format!("{:?}", h.direction).to_lowercase());
                labels.push(f.protocol.clone());
                let e = expected.entry(labels).or_default();
                e.0 += h.packets as f64;
                e.1 += h.bytes as f64;
            }
        }
        let key = [
            "src_namespace",
            "src_workload",
            "src_pod",
            "dst_namespace",
            "dst_workload",
            "dst_pod",
            "service",
            "hop",
            "direction",
            "protocol",
        ];
        let mut scraped: BTreeMap<Vec<String>, (f64, f64)> = BTreeMap::new();
        for s in parse_exposition(&text).unwrap() {
            let which = match s.name.as_str() {
                "flowtrace_packets_total" => 0,
                "flowtrace_bytes_total" => 1,
                _ => continue,
            };
            if s.label("src_pod").is_empty() || s.label("dst_pod").is_empty() {
                continue;
            }
            let labels: Vec<String> = key.iter().map(|k| s.label(k).to_string()).collect();
            let e = scraped.entry(labels).or_default();
            if which == 0 {
                e.0 = s.value;
            } else {
                e.1 = s.value;
            }
        }
        assert!(!expected.is_empty(), "no pod-to-pod flow on {}", node.name);
        assert_eq!(
            expected, scraped,
            "{}: /metrics and /v1/flows attribute traffic differently",
            node.name
        );

        // 2. The Service connections in /v1/flows: every tuple of each connection names the
        //    Service (on the client's node) and the backend conntrack chose.
        for f in flows.iter().filter(|f| f.protocol == "tcp") {
            let client_port = if f.src == IpAddr::V4(client.ipv4) {
                f.src_port
            } else if f.dst == IpAddr::V4(client.ipv4) {
                f.dst_port
            } else {
                continue;
            };
            let Some(backend) = backend_of.get(&client_port) else {
                continue;
            };
            // The client's node saw the rewrite and names the Service on every tuple; the
            // backend's node saw only pod addresses and cannot (nor does it guess).
            let want = (i == 0).then_some("default/svc-demo");
            assert_eq!(
                f.service.as_ref().map(|s| s.to_string()).as_deref(),
                want,
                "{}: {f:?}",
                node.name
            );
            let (src, dst) = ends(f);
            let far = if f.src == IpAddr::V4(client.ipv4) {
                dst
            } else {
                src
            };
            assert_eq!(
                far.map(|e| e.name.as_str()),
                pod_at.get(backend).map(String::as_str),
                "{}: the peer of {f:?} is not conntrack's backend {backend}",
                node.name
            );
            if i == 0 {
                let nat = f
                    .nat
                    .as_ref()
                    .unwrap_or_else(|| panic!("no NAT step on {f:?}"));
                assert!(
                    nat.original.dst.to_string() == SERVICE
                        || nat.translated.src.to_string() == SERVICE,
                    "{nat:?}"
                );
            }
            service_flows_checked += 1;
        }

        // 3. /v1/trace and /v1/flows: each traced SYN is named as the flows of its tuples
        //    are, and each hook it crossed is a hop of the flow with the tuple it had there.
        let by_tuple: HashMap<String, &FlowRecord> = flows
            .iter()
            .map(|f| (format!("{:?}", TupleView::from(f.tuple())), f))
            .collect();
        let ours: Vec<&TracePacket> = traced[i]
            .iter()
            .filter(|p| {
                p.tuple.src == IpAddr::V4(client.ipv4) || p.tuple.dst == IpAddr::V4(client.ipv4)
            })
            .collect();
        // node1 sees every SYN; node2 those to its pods.
        assert!(
            ours.len() as u64 >= if i == 0 { connections + 2 } else { 2 },
            "{}: {} SYNs traced",
            node.name,
            ours.len()
        );
        for p in ours {
            let f = by_tuple
                .get(&format!("{:?}", p.tuple))
                .unwrap_or_else(|| panic!("{}: no flow for traced {:?}", node.name, p.tuple));
            assert_eq!(p.service, f.service, "{}: {:?}", node.name, p.tuple);
            let (ps, pd) = ends_of_packet(p);
            let (fs, fd) = ends(f);
            assert_eq!((ps, pd), (fs, fd), "{}: {:?}", node.name, p.tuple);
            let mut tuple = p.tuple;
            for h in &p.hops {
                if let Some(step) = &h.nat {
                    tuple = step.after;
                    // The NAT step the trace saw is the flow table's translation.
                    let nat = f
                        .nat
                        .as_ref()
                        .expect("a traced rewrite has a NAT step in /v1/flows");
                    assert_eq!((nat.original, nat.translated), (step.before, step.after));
                }
                let at = by_tuple
                    .get(&format!("{tuple:?}"))
                    .unwrap_or_else(|| panic!("{}: no flow for {tuple:?}", node.name));
                assert!(
                    at.hops
                        .iter()
                        .any(|x| x.interface == h.interface && x.direction == h.direction),
                    "{}: {tuple:?} crossed {} {:?} in the trace but not in /v1/flows",
                    node.name,
                    h.interface,
                    h.direction
                );
            }
        }
    }
    // Both directions of every connection on node1, and the backends' on node2.
    assert!(
        service_flows_checked as u64 >= 2 * connections,
        "{service_flows_checked} Service flows checked"
    );
}
