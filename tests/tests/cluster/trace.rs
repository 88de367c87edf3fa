//! `flowtrace trace` on the emulated cluster, against the agents and standalone. Ground
//! truth: the source ports the client used (from its own sockets), `conntrack -L` for the
//! backend each Service connection went to, the topology the test built for the hooks, and
//! `bpftool`/`tc` for what is attached. Needs root.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use flowtrace::{
    model::wire::StatsResponse,
    model::Direction,
    model::{TraceLine, TracePacket},
};
use flowtrace_tests::{
    conntrack_list, finish, flowtrace_bin, flowtrace_program_ids, ftgen_bg, ftgen_bin, Bed,
    ChildGuard, Cluster, ClusterOptions, Node, Pod,
};

/// A `flowtrace trace` process and its output lines, each with the moment it arrived.
struct Tracer {
    guard: ChildGuard,
    pid: u32,
    started: Instant,
    lines: mpsc::Receiver<(Instant, String)>,
}

fn tracer(netns: &str, args: &[&str]) -> Tracer {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(flowtrace_bin().unwrap())
        .arg("trace")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Tracer {
        guard: ChildGuard::new(child, format!("flowtrace trace {args:?} in {netns}")),
        pid,
        started,
        lines,
    }
}

impl Tracer {
    /// The next packet line within `timeout`, with when it arrived.
    fn next_packet(&self, timeout: Duration) -> Option<(Instant, TracePacket)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, line) = self.lines.recv_timeout(left).ok()?;
            if let Ok(TraceLine::Packet(p)) = serde_json::from_str::<TraceLine>(&line) {
                return Some((at, *p));
            }
        }
    }

    /// Waits for the process to end by itself; returns its packets (JSON mode) and stderr.
    fn finish(self) -> (Vec<TracePacket>, String) {
        let out = self.guard.wait_output(Duration::from_secs(30)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "flowtrace trace failed: {stderr}");
        let packets = rest(&self.lines)
            .into_iter()
            .filter_map(|l| match serde_json::from_str::<TraceLine>(&l) {
                Ok(TraceLine::Packet(p)) => Some(*p),
                _ => None,
            })
            .collect();
        (packets, stderr)
    }
}

/// The remaining lines, once the reader has seen the end of the output.
fn rest(lines: &mpsc::Receiver<(Instant, String)>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok((_, l)) = lines.recv_timeout(Duration::from_secs(5)) {
        out.push(l);
    }
    out
}

fn hops(p: &TracePacket) -> Vec<(String, Direction)> {
    p.hops
        .iter()
        .map(|h| (h.interface.clone(), h.direction))
        .collect()
}

fn is_syn(p: &TracePacket) -> bool {
    p.tcp_flags.contains('S') && !p.tcp_flags.contains('A')
}

fn stats(bed: &Bed, node: usize) -> StatsResponse {
    bed.agent(node).get("/v1/stats").unwrap()
}

/// Waits until the agent of `node` reports `tracers` tracers and the kernel bit agrees.
fn wait_tracers(bed: &Bed, node: usize, tracers: usize) -> StatsResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(bed, node);
        if s.tracers == tracers && s.kernel_tracing == (tracers > 0) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "node{node}: tracers {} (want {tracers}), kernel_tracing {}",
            s.tracers,
            s.kernel_tracing
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Client source port -> backend address, from `conntrack -L` of the client's node.
fn conntrack_backends(node: &Node, client: &Pod) -> std::collections::HashMap<u16, String> {
    let client = std::net::IpAddr::from(client.ipv4);
    conntrack_list(node, &["-p", "tcp", "-d", "10.96.0.10"])
        .unwrap()
        .into_iter()
        .filter(|(original, _)| original.1 == client)
        // The reply's source is the backend.
        .map(|(original, reply)| (original.2, reply.1.to_string()))
        .collect()
}

/// A sink on port 8080 of `pod` taking connections until none comes for 3 s.
fn sink(pod: &Pod, echo_bytes: &str) -> ChildGuard {
    ftgen_bg(
        pod,
        &[
            "tcp-sink",
            "--bind",
            "0.0.0.0:8080",
            "--connections",
            "1000",
            "--timeout-ms",
            "60000",
            "--idle-timeout-ms",
            "3000",
            "--echo-bytes",
            echo_bytes,
        ],
    )
    .unwrap()
}

/// Traffic that keeps running: a new connection from `pod` to `to` every 100 ms.
fn steady_client(pod: &Pod, to: &str, connections: &str) -> ChildGuard {
    let ftgen = ftgen_bin().unwrap().display().to_string();
    pod.spawn_guarded(&[
        ftgen.as_str(),
        "tcp-send",
        "--to",
        to,
        "--bytes",
        "100",
        "--connections",
        connections,
        "--interval-ms",
        "100",
    ])
    .unwrap()
}

#[test]
fn trace_shows_running_traffic_within_a_second_and_follows_the_service_across_the_nat() {
    let bed = Bed::with_metadata().unwrap();
    let c = &bed.cluster;
    let (c1, b1, b2) = (
        c.pod(1, "pod-c").unwrap(),
        c.pod(1, "pod-b").unwrap(),
        c.pod(2, "pod-b").unwrap(),
    );
    let (n1, n2) = (c.node(1).unwrap(), c.node(2).unwrap());
    let sinks = [sink(b1, "10"), sink(b2, "10")];
    // Traffic that runs before, during and after the trace: a new connection to the
    // Service every 100 ms for 8 s.
    let client = steady_client(c1, "10.96.0.10:80", "80");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(stats(&bed, 1).tracers, 0);
    assert!(!stats(&bed, 1).kernel_tracing, "no tracer, no trace events");

    let svc = [
        "--service",
        "default/svc-demo",
        "--json",
        "--duration-s",
        "4",
    ];
    let t1 = tracer(&n1.netns, &svc);
    let t2 = tracer(&n2.netns, &svc);
    let none = tracer(&n1.netns, &["--port", "9", "--json", "--duration-s", "3"]);
    let (first_at, _) = t1
        .next_packet(Duration::from_secs(5))
        .expect("no packet traced on node1");
    let shown_after = first_at - t1.started;
    eprintln!("first packet shown {shown_after:?} after `flowtrace trace` started");
    assert!(
        shown_after <= Duration::from_secs(1),
        "the first packet took {shown_after:?}"
    );
    let s = wait_tracers(&bed, 1, 2);
    assert!(s.kernel_tracing);

    let (p1, _) = t1.finish();
    let (p2, _) = t2.finish();
    let (p_none, _) = none.finish();
    let sent = finish(client).unwrap();
    for s in sinks {
        finish(s).unwrap();
    }
    wait_tracers(&bed, 1, 0);
    wait_tracers(&bed, 2, 0);

    let client_ports: Vec<u16> = sent["local_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect();
    let backends = conntrack_backends(n1, c1);
    let (ig, eg) = (Direction::Ingress, Direction::Egress);
    let veth = |p: &Pod, d| (p.host_veth.clone(), d);
    let overlay = |d| ("flannel.1".to_string(), d);

    // Node1: the SYNs leave the client for the cluster IP and are rewritten to the backend
    // conntrack names, between the client's veth and the backend's veth or the overlay.
    let syns: Vec<&TracePacket> = p1
        .iter()
        .filter(|p| is_syn(p) && p.tuple.src == std::net::IpAddr::from(c1.ipv4))
        .collect();
    assert!(syns.len() >= 20, "{} SYNs traced in 4 s", syns.len());
    let mut traced_ports = Vec::new();
    for p in &syns {
        let port = p.tuple.src_port;
        traced_ports.push(port);
        assert_eq!(p.tuple.dst.to_string(), "10.96.0.10", "{p:?}");
        assert_eq!(p.tuple.dst_port, 80);
        let svc = p.service.as_ref().expect("the Service is named");
        assert_eq!(
            (svc.namespace.as_str(), svc.name.as_str()),
            ("default", "svc-demo")
        );
        assert_eq!(
            p.src_endpoint.as_ref().unwrap().name,
            format!("{}-{}", c1.name, c1.node),
            "{p:?}"
        );
        let backend = backends
            .get(&port)
            .unwrap_or_else(|| panic!("conntrack has no connection from port {port}"));
        let step = p.hops[1].nat.as_ref().expect("the DNAT step");
        assert_eq!(step.rewrote, "dst");
        assert_eq!(&step.after.dst.to_string(), backend, "{p:?}");
        assert_eq!(step.after.dst_port, 8080);
        let want = if *backend == b1.ipv4.to_string() {
            vec![veth(c1, ig), veth(b1, eg)]
        } else {
            assert_eq!(*backend, b2.ipv4.to_string());
            vec![veth(c1, ig), overlay(eg)]
        };
        assert_eq!(hops(p), want, "{p:?}");
        assert!(p.hops[1].since_previous_ns > 0);
        assert_eq!(p.node_time_ns, p.hops[1].since_previous_ns);
    }
    // Every connection the client opened while the trace ran shows, none twice: the
    // traced ports are a run of the client's ports without gaps.
    let at = client_ports
        .iter()
        .position(|p| *p == traced_ports[0])
        .expect("the first traced port is one of the client's");
    assert_eq!(
        traced_ports,
        client_ports[at..at + traced_ports.len()],
        "traced SYNs vs the client's connections"
    );
    // The answers come back through the un-DNAT, named as the Service again.
    let answers: Vec<&TracePacket> = p1
        .iter()
        .filter(|p| {
            p.tcp_flags == "SA" && p.hops.last().map(|h| &h.interface) == Some(&c1.host_veth)
        })
        .collect();
    assert!(!answers.is_empty());
    for p in &answers {
        let last = p.hops.last().unwrap();
        let step = last.nat.as_ref().expect("the un-DNAT step");
        assert_eq!(step.rewrote, "src");
        assert_eq!(step.after.src.to_string(), "10.96.0.10");
        assert_eq!(last.direction, eg);
    }

    // Node2 never sees the cluster IP: its SYNs are the ones conntrack sent to pod-b there,
    // followed by the Service filter through the backend address.
    let syns2: Vec<&TracePacket> = p2.iter().filter(|p| is_syn(p)).collect();
    let to_b2: BTreeSet<u16> = traced_ports
        .iter()
        .filter(|p| backends[*p] == b2.ipv4.to_string())
        .copied()
        .collect();
    assert!(!to_b2.is_empty(), "no connection went to node2's backend");
    for p in &syns2 {
        assert_eq!(p.tuple.dst.to_string(), b2.ipv4.to_string(), "{p:?}");
        assert_eq!(hops(p), vec![overlay(ig), veth(b2, eg)], "{p:?}");
        assert!(p.hops.iter().all(|h| h.nat.is_none()));
        assert_eq!(backends[&p.tuple.src_port], b2.ipv4.to_string());
    }
    let seen2: BTreeSet<u16> = syns2.iter().map(|p| p.tuple.src_port).collect();
    // Both tracers ran over nearly the same 4 s: node2 saw most of the SYNs node1 sent it.
    let common = to_b2.intersection(&seen2).count();
    assert!(
        common * 10 >= to_b2.len() * 7,
        "node2 traced {seen2:?}, node1 sent {to_b2:?}"
    );

    assert!(p_none.is_empty(), "port 9 matched {p_none:?}");

    // A Service that does not exist is refused with the reason, before anything runs.
    let out = Command::new("ip")
        .args(["netns", "exec", &n1.netns])
        .arg(flowtrace_bin().unwrap())
        .args(["trace", "--service", "default/nope"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("service default/nope does not exist"), "{err}");
}

/// flowtrace programs loaded now that were not in `before`: the standalone trace's. This
/// bpftool lists neither TCX links nor the processes holding programs; a program attached
/// through a TCX link stays loaded while the link exists, so "unloaded" also means
/// "attached nowhere".
fn new_programs(before: &[u64]) -> Vec<u64> {
    flowtrace_program_ids()
        .unwrap()
        .into_iter()
        .filter(|i| !before.contains(i))
        .collect()
}

fn assert_detached(node: &Node, ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let loaded: Vec<u64> = flowtrace_program_ids()
            .unwrap()
            .into_iter()
            .filter(|i| ids.contains(i))
            .collect();
        let qdiscs = String::from_utf8_lossy(&node.exec(&["tc", "qdisc", "show"]).unwrap().stdout)
            .to_string();
        let filters: Vec<String> = node
            .pods
            .iter()
            .flat_map(|p| {
                ["ingress", "egress"].map(|d| {
                    String::from_utf8_lossy(
                        &node
                            .exec(&["tc", "filter", "show", "dev", &p.host_veth, d])
                            .unwrap()
                            .stdout,
                    )
                    .to_string()
                })
            })
            .filter(|f| f.contains("flowtrace"))
            .collect();
        if loaded.is_empty() && !qdiscs.contains("clsact") && filters.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: programs {loaded:?}, qdiscs {qdiscs}, filters {filters:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn standalone_trace_attaches_while_it_runs_and_leaves_nothing_after_ctrl_c_or_count() {
    flowtrace_tests::require_root().unwrap();
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let (a1, b1) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(1, "pod-b").unwrap(),
    );
    let n1 = cluster.node(1).unwrap();
    let before = flowtrace_program_ids().unwrap();
    let sink = sink(b1, "0");
    let client = steady_client(a1, &format!("{}:8080", b1.ipv4), "150");

    // Stopped by Ctrl-C (SIGINT), as an operator would.
    let t = tracer(&n1.netns, &["--standalone", "--port", "8080", "--json"]);
    let (_, p) = t
        .next_packet(Duration::from_secs(30))
        .expect("the standalone trace showed no packet");
    assert_eq!(p.tuple.dst.to_string(), b1.ipv4.to_string(), "{p:?}");
    assert_eq!(
        hops(&p),
        vec![
            (a1.host_veth.clone(), Direction::Ingress),
            (b1.host_veth.clone(), Direction::Egress)
        ],
        "{p:?}"
    );
    let ids = new_programs(&before);
    // Its two TC programs, their tail-called slow path and its two raw tracepoint programs
    // (drops, retransmissions).
    assert_eq!(ids.len(), 5, "the standalone trace's programs: {ids:?}");
    let kill = Command::new("kill")
        .args(["-INT", &t.pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    t.finish();
    assert_detached(n1, &ids);

    // Stopped by --count.
    let mut t = tracer(
        &n1.netns,
        &["--standalone", "--port", "8080", "--count", "3"],
    );
    // Its programs, seen while it runs (it may end before all five are seen: then only the
    // qdisc and filter checks below apply to it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ids = new_programs(&before);
    while ids.len() < 5 && Instant::now() < deadline && !t.guard.has_exited() {
        std::thread::sleep(Duration::from_millis(20));
        ids = new_programs(&before);
    }
    let out = t.guard.wait_output(Duration::from_secs(60)).unwrap();
    let text = rest(&t.lines);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = text.iter().filter(|l| l.contains(" tcp ")).count();
    assert_eq!(headers, 3, "{text:#?}");
    assert!(text[0].starts_with("# tracing on"), "{text:#?}");
    assert_detached(n1, &ids);

    drop(client);
    drop(sink);
}
