//! `cargo xtask demo`: the emulated cluster, one agent per node, a little traffic of every kind
//! (and some that a firewall rule drops), and what `flowtrace flows` shows on each node
//! afterwards; then the SockShop scenario on three nodes under Locust's shoppers, the
//! application's map through the relay (`flowtrace map`), and the map page written to a file
//! with a screenshot of it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowtrace::model::{Direction, FlowRecord};
use flowtrace_tests::{ftgen_json, Agent, ChildGuard, Cluster, ClusterOptions, Pod};

use crate::proc;

const SAME_NODE_UDP_PORT: u16 = 7001;
const CROSS_TCP_PORT: u16 = 7002;
const CROSS_UDP4_PORT: u16 = 7003;
const CROSS_UDP6_PORT: u16 = 7004;
const SERVICE_IP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const UDP_COUNT: u64 = 100;
const UDP_SIZE: u64 = 200;
const CROSS_UDP_COUNT: u64 = 50;
const TCP_BYTES: u64 = 1 << 20;
const SERVICE_CONNECTIONS: u64 = 20;
const PINGS: u64 = 3;
const DROPPED_UDP_PORT: u16 = 7005;
const DROPPED_UDP_COUNT: u64 = 30;

pub fn run() -> Result<()> {
    let started = Instant::now();
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    for tool in ["ip", "iptables", "ping", "ethtool"] {
        proc::require_tool(tool)?;
    }
    let bins = crate::build::release_binaries()?;
    eprintln!("xtask: bringing the emulated cluster up");
    // Declared before the agents, so on an early return the agents are killed first and the
    // cluster's namespaces are deleted after (Drop runs in reverse declaration order).
    let cluster = Cluster::up(&ClusterOptions::default()).context(
        "bringing the emulated cluster up (needs root, iproute2, iptables; see scripts/setup.sh)",
    )?;
    // No API server can run here: the test bed's fixture serves the cluster's Pods,
    // Services, EndpointSlices, Nodes and ReplicaSets over the real list + watch protocol,
    // and the agents reach it through a kubeconfig, as in production.
    let netns: Vec<&str> = cluster.nodes.iter().map(|n| n.netns.as_str()).collect();
    let api = flowtrace_tests::ApiServer::start_in(
        &netns,
        flowtrace_tests::apiserver::cluster_objects(&cluster),
    )
    .context("starting the fixture Kubernetes API server")?;
    let kubeconfig = api.kubeconfig().display().to_string();
    let mut agents = Vec::new();
    for node in &cluster.nodes {
        eprintln!(
            "xtask: starting the flowtrace agent in {} (names from {kubeconfig})",
            node.name
        );
        agents.push(
            Agent::start(&node.netns, &["--kubeconfig", &kubeconfig])
                .with_context(|| format!("starting the agent in {}", node.name))?,
        );
    }

    let traffic = Traffic { cluster: &cluster };
    let results = traffic.drive()?;

    print_header(&cluster, &results);
    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        println!(
            "\n=== {} ===\n$ ip netns exec {} {} flows",
            node.name,
            node.netns,
            bins.flowtrace.display()
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(&bins.flowtrace)
            .arg("flows")
            .output()
            .with_context(|| format!("running `flowtrace flows` in {}", node.netns))?;
        if !out.status.success() {
            bail!(
                "`flowtrace flows` in {} failed ({}): {}\nagent log:\n{}",
                node.netns,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                agent.log_text()
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }

    let mut per_node = Vec::new();
    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        per_node.push((
            node.name.clone(),
            agent
                .flows()
                .with_context(|| format!("reading flows from the agent in {}", node.name))?,
        ));
    }
    println!("\nSummary (what each node's agent saw, per traffic kind):");
    print!("{}", summarize(&cluster, &results, &per_node)?);

    println!(
        "\nService NAT (GET /v1/nat: rewrites the kernel programs saw, checked against conntrack):"
    );
    let mut disagreements = 0;
    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        let nat: flowtrace::model::wire::NatResponse = agent
            .get("/v1/nat")
            .with_context(|| format!("reading NAT translations from the agent in {}", node.name))?;
        let c = nat.counters;
        println!(
            "  {}: {} translation(s); confirmed {}, from conntrack only {}, disagreements {} (mismatch {}, not in conntrack {}, missed {})",
            node.name,
            nat.translations.len(),
            c.confirmed,
            c.conntrack_only,
            nat.disagreements,
            c.mismatch,
            c.not_in_conntrack,
            c.missed
        );
        disagreements += nat.disagreements;
        for t in nat.translations.iter().take(4) {
            let (o, x) = (&t.original, &t.translated);
            let svc = t
                .service
                .as_ref()
                .map(|s| format!("svc {}/{}: ", s.namespace, s.name))
                .unwrap_or_default();
            println!(
                "    {svc}{}:{} -> {}:{}  =>  {}:{} -> {}:{}  ({:?}, {})",
                o.src,
                o.src_port,
                o.dst,
                o.dst_port,
                x.src,
                x.src_port,
                x.dst,
                x.dst_port,
                t.state,
                t.source
            );
        }
        if nat.translations.len() > 4 {
            println!("    ... ({} more)", nat.translations.len() - 4);
        }
    }
    if disagreements > 0 {
        anyhow::bail!(
            "flowtrace and conntrack disagree on {disagreements} NAT translation(s): see above"
        );
    }

    println!("\nDrops (GET /v1/drops: packets the kernel dropped, with its reason and where on the path):");
    println!(
        "  (d) {} datagrams sent to node2/pod-a:{DROPPED_UDP_PORT}; node2's DROP rule counted {}",
        results.dropped_sent, results.dropped_by_rule
    );
    let node2_drops: flowtrace::model::wire::DropsResponse = agents[1]
        .get(&format!("/v1/drops?port={DROPPED_UDP_PORT}"))
        .context("reading drops from the agent in node2")?;
    let mut seen = 0;
    for d in &node2_drops.drops {
        seen += d.drop.packets;
        let after = d
            .drop
            .after
            .as_ref()
            .map(|h| format!(", after {} {}", h.interface, h.direction.as_str()))
            .unwrap_or_default();
        println!(
            "  node2: {} packets {} at {} ({}{after}): {}:{} -> {}:{}",
            d.drop.packets,
            d.drop.reason,
            if d.drop.device.is_empty() {
                "-"
            } else {
                &d.drop.device
            },
            if d.drop.netns == flowtrace::model::wire::DropNetns::Node {
                "node namespace"
            } else {
                "pod namespace"
            },
            d.flow.src,
            d.flow.src_port,
            d.flow.dst,
            d.flow.dst_port
        );
    }
    if seen != results.dropped_by_rule || results.dropped_by_rule != results.dropped_sent {
        anyhow::bail!(
            "drops: {} sent, the rule counted {}, flowtrace on node2 recorded {seen}",
            results.dropped_sent,
            results.dropped_by_rule
        );
    }
    println!("  node2's agent recorded every one ({seen}), with the rule's reason and place");

    let unnamed: usize = cluster
        .nodes
        .iter()
        .zip(&agents)
        .map(|(_, a)| {
            a.flows().map(|fs| {
                fs.iter()
                    .filter(|f| cluster.pod_by_ip(f.src).is_some() && f.src_endpoint.is_none())
                    .count()
            })
        })
        .sum::<flowtrace_tests::Result<usize>>()
        .context("reading flows")?;
    if unnamed > 0 {
        anyhow::bail!("{unnamed} flow(s) from emulated pods carry no pod name");
    }
    for agent in agents {
        let ns = agent.netns.clone();
        agent
            .stop()
            .with_context(|| format!("stopping the agent in {ns} with SIGTERM"))?;
    }
    cluster
        .down()
        .context("tearing the emulated cluster down")?;
    sockshop()?;
    eprintln!(
        "xtask: demo done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the traffic step reports back (from the sinks' own JSON).
struct Results {
    udp_received: u64,
    ping_ok: bool,
    tcp_received: u64,
    udp4_received: u64,
    udp6_received: u64,
    /// (backend pod's IPv4, connections it accepted)
    service_backends: Vec<(IpAddr, u64)>,
    service_sent: u64,
    /// (d) datagrams sent into the DROP rule, and what the rule's own counter says.
    dropped_sent: u64,
    dropped_by_rule: u64,
}

/// The demo's traffic. ftgen is the release build (`build::release_binaries` points
/// `FTGEN_BIN` at it).
struct Traffic<'a> {
    cluster: &'a Cluster,
}

impl Traffic<'_> {
    /// Starts an ftgen sink in `pod` and waits until it is bound.
    fn sink(&self, pod: &Pod, args: &[&str]) -> Result<ChildGuard> {
        flowtrace_tests::ftgen_bg(pod, args).with_context(|| {
            format!(
                "starting ftgen {} in {}",
                args.first().copied().unwrap_or(""),
                pod.netns
            )
        })
    }

    fn send(&self, pod: &Pod, args: &[&str]) -> Result<serde_json::Value> {
        proc::check_interrupted()?;
        flowtrace_tests::ftgen(pod, args)
            .with_context(|| format!("ftgen {} in {}", args.join(" "), pod.netns))
    }

    fn drive(&self) -> Result<Results> {
        let c = self.cluster;
        let (a1, b1, a2) = (c.pod(1, "pod-a")?, c.pod(1, "pod-b")?, c.pod(2, "pod-a")?);
        let b2 = c.pod(2, "pod-b")?;
        let n = |v: u64| v.to_string();

        // (a) Same node: UDP and ping, node1/pod-a -> node1/pod-b.
        eprintln!("xtask: (a) same node: {UDP_COUNT} UDP datagrams of {UDP_SIZE} B and {PINGS} pings, node1/pod-a -> node1/pod-b");
        let sink = self.sink(
            b1,
            &[
                "udp-sink",
                "--bind",
                &format!("0.0.0.0:{SAME_NODE_UDP_PORT}"),
                "--count",
                &n(UDP_COUNT),
                "--timeout-ms",
                "10000",
            ],
        )?;
        self.send(
            a1,
            &[
                "udp-send",
                "--to",
                &format!("{}:{SAME_NODE_UDP_PORT}", b1.ipv4),
                "--count",
                &n(UDP_COUNT),
                "--size",
                &n(UDP_SIZE),
                "--interval-us",
                "200",
            ],
        )?;
        let out = sink.wait_output(Duration::from_secs(15))?;
        let udp_received = u64_field(
            &ftgen_json(&out.stdout, "udp-sink on node1/pod-b")?,
            "received",
        );
        let ping_ok = a1
            .exec(&[
                "ping",
                "-c",
                &n(PINGS),
                "-i",
                "0.2",
                "-W",
                "2",
                &b1.ipv4.to_string(),
            ])
            .is_ok();

        // (b) Across nodes: TCP 1 MiB, UDP over IPv4 and IPv6, node1/pod-a -> node2/pod-a.
        eprintln!("xtask: (b) across nodes: TCP {TCP_BYTES} B, UDP IPv4 and IPv6 ({CROSS_UDP_COUNT} x {UDP_SIZE} B each), node1/pod-a -> node2/pod-a");
        let sink = self.sink(
            a2,
            &[
                "tcp-sink",
                "--bind",
                &format!("0.0.0.0:{CROSS_TCP_PORT}"),
                "--timeout-ms",
                "20000",
            ],
        )?;
        self.send(
            a1,
            &[
                "tcp-send",
                "--to",
                &format!("{}:{CROSS_TCP_PORT}", a2.ipv4),
                "--bytes",
                &n(TCP_BYTES),
            ],
        )?;
        let out = sink.wait_output(Duration::from_secs(25))?;
        let tcp_received = u64_field(
            &ftgen_json(&out.stdout, "tcp-sink on node2/pod-a")?,
            "received_bytes",
        );

        let mut udp_cross = Vec::new();
        for (tag, bind, to) in [
            (
                "udp4-cross",
                format!("0.0.0.0:{CROSS_UDP4_PORT}"),
                format!("{}:{CROSS_UDP4_PORT}", a2.ipv4),
            ),
            (
                "udp6-cross",
                format!("[::]:{CROSS_UDP6_PORT}"),
                format!("[{}]:{CROSS_UDP6_PORT}", a2.ipv6),
            ),
        ] {
            let sink = self.sink(
                a2,
                &[
                    "udp-sink",
                    "--bind",
                    &bind,
                    "--count",
                    &n(CROSS_UDP_COUNT),
                    "--timeout-ms",
                    "10000",
                ],
            )?;
            self.send(
                a1,
                &[
                    "udp-send",
                    "--to",
                    &to,
                    "--count",
                    &n(CROSS_UDP_COUNT),
                    "--size",
                    &n(UDP_SIZE),
                    "--interval-us",
                    "200",
                ],
            )?;
            let out = sink.wait_output(Duration::from_secs(15))?;
            udp_cross.push(u64_field(
                &ftgen_json(&out.stdout, &format!("udp-sink ({tag}) on node2/pod-a"))?,
                "received",
            ));
        }

        // (c) The Service: 20 connections from node1/pod-a to 10.96.0.10:80; kube-proxy spreads
        // them over pod-b on both nodes, port 8080.
        eprintln!("xtask: (c) Service: {SERVICE_CONNECTIONS} TCP connections node1/pod-a -> {SERVICE_IP}:{SERVICE_PORT} (backends: pod-b on both nodes, :{BACKEND_PORT})");
        let mut sinks = Vec::new();
        for pod in [b1, b2] {
            let g = self.sink(
                pod,
                &[
                    "tcp-sink",
                    "--bind",
                    &format!("0.0.0.0:{BACKEND_PORT}"),
                    "--connections",
                    &n(SERVICE_CONNECTIONS),
                    "--idle-timeout-ms",
                    "1500",
                    "--timeout-ms",
                    "20000",
                    "--echo-bytes",
                    "64",
                ],
            )?;
            sinks.push((pod, g));
        }
        let sent = self.send(
            a1,
            &[
                "tcp-send",
                "--to",
                &format!("{SERVICE_IP}:{SERVICE_PORT}"),
                "--bytes",
                "100",
                "--connections",
                &n(SERVICE_CONNECTIONS),
            ],
        )?;
        let service_sent = u64_field(&sent, "connections");
        let mut service_backends = Vec::new();
        for (pod, g) in sinks {
            // A backend that got no connection at all only stops at its overall timeout; it is
            // given a few seconds after the other one finished and then killed.
            let accepted = match g.wait_output(Duration::from_secs(6)) {
                Ok(out) => u64_field(
                    &ftgen_json(
                        &out.stdout,
                        &format!("tcp-sink on {}/{}", pod.node, pod.name),
                    )?,
                    "connections",
                ),
                Err(_) => 0,
            };
            service_backends.push((IpAddr::V4(pod.ipv4), accepted));
        }
        // (d) A firewall: an iptables DROP rule on node2's FORWARD chain for one UDP port, as a
        // NetworkPolicy would put there; the datagrams die after node2's overlay device.
        eprintln!("xtask: (d) drops: {DROPPED_UDP_COUNT} UDP datagrams node1/pod-a -> node2/pod-a:{DROPPED_UDP_PORT}, dropped by an iptables rule on node2's FORWARD chain");
        let node2 = c.node(2)?;
        let comment = format!("ftdemo-drop-{}", std::process::id());
        let rule = |op: &str| -> Vec<String> {
            [
                "iptables",
                "-w",
                op,
                "FORWARD",
                "-p",
                "udp",
                "--dport",
                &DROPPED_UDP_PORT.to_string(),
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "DROP",
            ]
            .map(String::from)
            .to_vec()
        };
        node2
            .exec(&rule("-I"))
            .context("adding the demo's DROP rule on node2")?;
        let sent = self.send(
            a1,
            &[
                "udp-send",
                "--to",
                &format!("{}:{DROPPED_UDP_PORT}", a2.ipv4),
                "--count",
                &n(DROPPED_UDP_COUNT),
                "--size",
                &n(UDP_SIZE),
                "--interval-us",
                "200",
            ],
        );
        let counted = node2.exec(&["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"]);
        node2
            .exec(&rule("-D"))
            .context("removing the demo's DROP rule on node2")?;
        let dropped_sent = u64_field(&sent?, "sent");
        let dropped_by_rule = String::from_utf8_lossy(&counted?.stdout)
            .lines()
            .find(|l| l.contains(&comment))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Results {
            dropped_sent,
            dropped_by_rule,
            udp_received,
            ping_ok,
            tcp_received,
            udp4_received: udp_cross.first().copied().unwrap_or(0),
            udp6_received: udp_cross.get(1).copied().unwrap_or(0),
            service_backends,
            service_sent,
        })
    }
}

fn u64_field(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

fn print_header(cluster: &Cluster, r: &Results) {
    println!("\nflowtrace demo: emulated 2-node cluster (network namespaces, cni0 bridge, flannel.1 VXLAN over eth0, kube-proxy iptables)");
    println!("\nPods (HOST VETH is the pod's interface in the node namespace, where flowtrace attaches):");
    println!(
        "  {:<6} {:<6} {:<13} {:<20} HOST VETH",
        "NODE", "POD", "IPv4", "IPv6"
    );
    for p in cluster.pods() {
        println!(
            "  {:<6} {:<6} {:<13} {:<20} {}",
            p.node,
            p.name,
            p.ipv4.to_string(),
            p.ipv6.to_string(),
            p.host_veth
        );
    }
    for n in &cluster.nodes {
        println!(
            "  {:<6} underlay eth0 {}, flannel.1 {} (VXLAN UDP 8472)",
            n.name,
            n.underlay_ip,
            n.vtep_v4()
        );
    }
    println!("  Service {SERVICE_IP}:{SERVICE_PORT}/TCP -> pod-b:{BACKEND_PORT} on both nodes (kube-proxy DNAT)");
    let ok = |b: bool| if b { "ok" } else { "FAILED" };
    println!("\nTraffic sent (all from node1/pod-a):");
    println!("  (a) same node   -> node1/pod-b: {UDP_COUNT} UDP datagrams x {UDP_SIZE} B to :{SAME_NODE_UDP_PORT} (sink received {}), {PINGS} pings ({})", r.udp_received, ok(r.ping_ok));
    println!("  (b) cross node  -> node2/pod-a: TCP {TCP_BYTES} B to :{CROSS_TCP_PORT} (sink received {}), UDP IPv4 {CROSS_UDP_COUNT} x {UDP_SIZE} B to :{CROSS_UDP4_PORT} (received {}), UDP IPv6 {CROSS_UDP_COUNT} x {UDP_SIZE} B to :{CROSS_UDP6_PORT} (received {})", r.tcp_received, r.udp4_received, r.udp6_received);
    let split: Vec<String> = r
        .service_backends
        .iter()
        .map(|(ip, k)| {
            format!(
                "{} got {k}",
                cluster
                    .pod_by_ip(*ip)
                    .map(|p| format!("{}/{}", p.node, p.name))
                    .unwrap_or_else(|| ip.to_string())
            )
        })
        .collect();
    println!("  (c) Service     -> {SERVICE_IP}:{SERVICE_PORT}: {} TCP connections of 100 B each, 64 B answers ({})", r.service_sent, split.join(", "));
    println!("  (d) drops       -> node2/pod-a: {DROPPED_UDP_COUNT} UDP datagrams x {UDP_SIZE} B to :{DROPPED_UDP_PORT}, dropped by an iptables DROP rule on node2's FORWARD chain (rule counted {})", r.dropped_by_rule);
}

/// One line per traffic kind: how many matching flows each node saw and their hops.
fn summarize(
    cluster: &Cluster,
    r: &Results,
    per_node: &[(String, Vec<FlowRecord>)],
) -> Result<String> {
    let a1 = cluster.pod(1, "pod-a")?;
    let b1 = cluster.pod(1, "pod-b")?;
    let a2 = cluster.pod(2, "pod-a")?;
    let names: HashMap<String, String> = cluster
        .pods()
        .map(|p| (p.host_veth.clone(), format!("{}({})", p.host_veth, p.name)))
        .collect();
    let svc: IpAddr = SERVICE_IP.parse().context("parsing the Service IP")?;
    let v4 = |p: &Pod| IpAddr::V4(p.ipv4);
    let v6 = |p: &Pod| IpAddr::V6(p.ipv6);
    let wire_udp = UDP_SIZE + 8 + 20;

    struct Kind<'k> {
        label: String,
        pred: Box<dyn Fn(&FlowRecord) -> bool + 'k>,
        /// Packets every hop should show (summed over the kind's flows), if known.
        expect: Option<u64>,
    }
    let kinds = vec![
        Kind {
            label: format!("(a) UDP same node, {UDP_COUNT} x {wire_udp} B on the wire"),
            pred: Box::new(|f| {
                f.protocol_number == 17
                    && f.src == v4(a1)
                    && f.dst == v4(b1)
                    && f.dst_port == SAME_NODE_UDP_PORT
            }),
            expect: Some(UDP_COUNT),
        },
        Kind {
            label: format!("(a) ping same node, {PINGS} echo requests"),
            pred: Box::new(|f| f.protocol_number == 1 && f.src == v4(a1) && f.dst == v4(b1)),
            expect: Some(PINGS),
        },
        Kind {
            label: format!("(b) TCP cross node, {TCP_BYTES} B payload (data direction)"),
            pred: Box::new(|f| {
                f.protocol_number == 6
                    && f.src == v4(a1)
                    && f.dst == v4(a2)
                    && f.dst_port == CROSS_TCP_PORT
            }),
            expect: None,
        },
        Kind {
            label: format!("(b) UDP IPv4 cross node, {CROSS_UDP_COUNT} x {wire_udp} B"),
            pred: Box::new(|f| {
                f.protocol_number == 17
                    && f.src == v4(a1)
                    && f.dst == v4(a2)
                    && f.dst_port == CROSS_UDP4_PORT
            }),
            expect: Some(CROSS_UDP_COUNT),
        },
        Kind {
            label: format!(
                "(b) UDP IPv6 cross node, {CROSS_UDP_COUNT} x {} B",
                UDP_SIZE + 8 + 40
            ),
            pred: Box::new(|f| {
                f.protocol_number == 17
                    && f.src == v6(a1)
                    && f.dst == v6(a2)
                    && f.dst_port == CROSS_UDP6_PORT
            }),
            expect: Some(CROSS_UDP_COUNT),
        },
        Kind {
            label: format!("(c) Service, before DNAT: -> {SERVICE_IP}:{SERVICE_PORT}"),
            pred: Box::new(move |f| {
                f.protocol_number == 6
                    && f.src == v4(a1)
                    && f.dst == svc
                    && f.dst_port == SERVICE_PORT
            }),
            expect: None,
        },
    ];
    let mut kinds = kinds;
    for (ip, accepted) in &r.service_backends {
        let ip = *ip;
        let who = cluster
            .pod_by_ip(ip)
            .map(|p| format!("{}/{}", p.node, p.name))
            .unwrap_or_else(|| ip.to_string());
        kinds.push(Kind {
            label: format!("(c) Service, after DNAT: -> {who} {ip}:{BACKEND_PORT} ({accepted} connections accepted)"),
            pred: Box::new(move |f| f.protocol_number == 6 && f.src == v4(a1) && f.dst == ip && f.dst_port == BACKEND_PORT),
            expect: None,
        });
    }
    for (from, to) in [(1usize, 2usize), (2, 1)] {
        let (src, dst) = (
            IpAddr::V4(cluster.node(from)?.underlay_ip),
            IpAddr::V4(cluster.node(to)?.underlay_ip),
        );
        kinds.push(Kind {
            label: format!("VXLAN underlay node{from} -> node{to} (outer UDP {src} -> {dst}:{}, all inner flows)", flowtrace_tests::cluster::VXLAN_PORT),
            pred: Box::new(move |f| {
                f.protocol_number == 17 && f.src == src && f.dst == dst && f.dst_port == flowtrace_tests::cluster::VXLAN_PORT
            }),
            expect: None,
        });
    }

    let mut out = String::new();
    for k in &kinds {
        let _ = writeln!(out, "  {}", k.label);
        // (packets, bytes) of every hop on every node, to spot hops that disagree.
        let mut all_hops: Vec<(String, u64, u64)> = Vec::new();
        for (node, flows) in per_node {
            let matching: Vec<&FlowRecord> = flows.iter().filter(|f| (k.pred)(f)).collect();
            if matching.is_empty() {
                let _ = writeln!(out, "      {node}: no flow");
                continue;
            }
            let (hops, total_bytes) = merge_hops(&matching, &names);
            let mismatch = k
                .expect
                .is_some_and(|e| hops.iter().any(|(_, p, _)| *p != e));
            let hop_txt: Vec<String> = hops
                .iter()
                .map(|(h, p, b)| format!("{h} {p}p/{b}B"))
                .collect();
            all_hops.extend(hops.iter().map(|(h, p, b)| (format!("{node} {h}"), *p, *b)));
            let _ = writeln!(
                out,
                "      {node}: {} flow(s), max {} B per hop; {}{}",
                matching.len(),
                total_bytes,
                hop_txt.join(" > "),
                match k.expect {
                    Some(e) if mismatch => format!("  << expected {e} packets on every hop"),
                    Some(_) => "  (counts match)".to_string(),
                    None => String::new(),
                }
            );
        }
        let same_packets = all_hops.windows(2).all(|w| w[0].1 == w[1].1);
        let same_bytes = all_hops.windows(2).all(|w| w[0].2 == w[1].2);
        if all_hops.len() > 1 && same_packets && !same_bytes {
            let list: Vec<String> = all_hops
                .iter()
                .map(|(h, _, b)| format!("{h} {b}B"))
                .collect();
            let _ = writeln!(
                out,
                "      << every hop saw {} packets but the bytes differ: {}",
                all_hops[0].1,
                list.join(", ")
            );
        }
    }
    Ok(out)
}

/// Sums the hops of several flows (e.g. the 20 Service connections) by interface and direction,
/// in the order they first appear. Returns (hop label, packets, bytes) and the largest byte sum.
fn merge_hops(
    flows: &[&FlowRecord],
    names: &HashMap<String, String>,
) -> (Vec<(String, u64, u64)>, u64) {
    let mut order: Vec<(String, Direction)> = Vec::new();
    let mut sums: HashMap<(String, Direction), (u64, u64)> = HashMap::new();
    for f in flows {
        for h in &f.hops {
            let key = (h.interface.clone(), h.direction);
            let e = sums.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                (0, 0)
            });
            e.0 += h.packets;
            e.1 += h.bytes;
        }
    }
    let hops: Vec<(String, u64, u64)> = order
        .iter()
        .map(|k| {
            let (p, b) = sums.get(k).copied().unwrap_or_default();
            let name = names.get(&k.0).cloned().unwrap_or_else(|| k.0.clone());
            let dir = if k.1 == Direction::Ingress {
                "in"
            } else {
                "out"
            };
            (format!("{name}/{dir}"), p, b)
        })
        .collect();
    let max_bytes = hops.iter().map(|(_, _, b)| *b).max().unwrap_or(0);
    (hops, max_bytes)
}

/// The demo's second part: the SockShop scenario (`flowtrace_tests::sockshop`) on three nodes
/// with an agent each and the relay, Locust's shoppers for 20 s, then the map as
/// `flowtrace map --relay` prints it, and the page written to `target/demo/` with a
/// screenshot taken in headless Chromium.
fn sockshop() -> Result<()> {
    use flowtrace_tests::{
        relay::{RelayBed, RelayOptions},
        sockshop,
    };
    eprintln!(
        "xtask: (e) the SockShop scenario: 3 nodes, {} workloads behind {} ClusterIP Services, \
         Locust's shoppers for 20 s",
        sockshop::WORKLOADS.len(),
        sockshop::WORKLOADS
            .iter()
            .filter(|w| w.service_port.is_some())
            .count()
    );
    let cluster = sockshop::cluster().context("bringing the SockShop cluster up")?;
    let objects = sockshop::objects(&cluster)?;
    let bed = RelayBed::up_on(cluster, objects, &RelayOptions::default())
        .context("starting the agents and the relay")?;
    let relay = bed.relay()?;
    relay.wait_nodes_ok(&["node1", "node2", "node3"], Duration::from_secs(30))?;
    let shop = sockshop::start(&bed.cluster).context("starting the shop's services")?;
    let summary = sockshop::load(&bed.cluster, 6, 20).context("running Locust")?;
    let counts = shop.stop()?;
    if let Some(line) = summary
        .lines()
        .find(|l| l.trim_start().starts_with("Aggregated"))
    {
        eprintln!(
            "xtask: Locust: {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    // The agents drain every 500 ms: wait until every call of the graph is an edge.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let v = relay.get_json("/v1/map?window_s=0")?;
        let m: flowtrace::query::map::MapAnswer =
            serde_json::from_value(v.clone()).context("decoding the relay's map")?;
        if m.edges.len() >= sockshop::CALLS.len() || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let out = relay.cli("map", &["--window-s", "0"])?;
    println!(
        "\n=== the application's map ===\n$ flowtrace map --relay http://127.0.0.1:9660 --window-s 0"
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    // Against what the shop's own processes counted.
    let id = |w: &str| format!("workload/{}/{w}", sockshop::NAMESPACE);
    let mut exact = 0;
    for (c, s) in sockshop::CALLS {
        let truth = if c == "load-test" {
            let ip = bed
                .cluster
                .pods()
                .find(|p| p.name == "load-test")
                .map(|p| p.ipv4.to_string())
                .unwrap_or_default();
            counts.served(s, &ip)
        } else {
            counts.calls(c, s)
        };
        let e = answer
            .edges
            .iter()
            .find(|e| e.from == id(c) && e.to == id(s));
        if e.is_some_and(|e| {
            (
                e.request_payload_bytes,
                e.reply_payload_bytes,
                e.connections,
            ) == truth
        }) {
            exact += 1;
        } else {
            println!(
                "  {c} -> {s}: the applications counted {truth:?} (request, reply, connections), \
                 flowtrace {:?}",
                e.map(|e| (
                    e.request_payload_bytes,
                    e.reply_payload_bytes,
                    e.connections
                ))
            );
        }
    }
    println!(
        "{exact} of {} edges carry exactly the bytes and connections the shop's processes counted",
        sockshop::CALLS.len()
    );
    let dir = crate::build::workspace_root()?.join("target/demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let html = dir.join("sockshop-map.html");
    let json = serde_json::to_string(&answer).context("encoding the map")?;
    std::fs::write(&html, flowtrace::server::page::static_map_page(&json))
        .with_context(|| format!("writing {}", html.display()))?;
    let png = dir.join("sockshop-map.png");
    let shot = (|| -> Result<usize> {
        let mut b = flowtrace_tests::browser::Browser::launch()?;
        b.navigate(&format!("file://{}", html.display()))?;
        b.wait_for(
            "document.body.dataset.ready === '1'",
            Duration::from_secs(20),
        )?;
        Ok(b.screenshot(&png)?)
    })();
    println!(
        "\nThe map page: open file://{} in a browser",
        html.display()
    );
    match shot {
        Ok(bytes) => println!("  a screenshot of it: {} ({bytes} bytes)", png.display()),
        Err(e) => println!("  no screenshot ({e:#}); scripts/setup.sh installs chromium"),
    }
    println!(
        "  live, the relay and every agent serve it at /map (e.g. kubectl port-forward to the \
         relay's 9660, then http://127.0.0.1:9660/map)"
    );
    drop(bed);
    Ok(())
}
