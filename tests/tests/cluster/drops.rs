//! Packet drops (the kernel's `skb:kfree_skb`, with its drop reason) and TCP retransmissions
//! (`tcp:tcp_retransmit_skb`) joined to flows, on the emulated cluster with an agent per node.
//!
//! Each test makes the kernel drop the packets of one flow for one reason, and checks what
//! the agent of the node where they died says about that flow. Ground truth comes from the
//! test's own setup, never from flowtrace: ftgen's counts of what it sent and what a sink
//! finally read, the test's iptables rule and its own packet counter, the receiving socket's
//! drop count (`/proc/net/udp`), the namespaces' SNMP counters (`Udp NoPorts`,
//! `IpExt InNoRoutes`), the client's `TCP_INFO` (`tcpi_total_retrans`), the kernel's own
//! numbering of drop reasons (its BTF), and the topology the test bed built (which hooks a
//! packet crosses before it dies, on which device and in which namespace).
//!
//! Where each packet dies on this kernel (seen with the tracepoint itself, `location` and
//! `skb->dev`, while these tests were written):
//!
//! | case | reason | location | `skb->dev` | namespace |
//! |---|---|---|---|---|
//! | iptables (nf_tables) `DROP` in node2's `FORWARD` | `NETFILTER_DROP` | `nft_do_chain` | `flannel.1` | node2 |
//! | full receive buffer | `SOCKET_RCVBUFF` | `udp_queue_rcv_one_skb` | `eth0` | the pod |
//! | closed UDP port | `NO_SOCKET` | `__udp4_lib_rcv` | `eth0` | the pod |
//! | no route on the node | `IP_INNOROUTES` | `ip_error` | `cni0` | node1 |
//!
//! Drop `bytes` are checked as layer-3 bytes (IP header onwards), as hops count them; the
//! kernel's `skb->len` at the drop is not that in the pod's namespace (the UDP layer has
//! pulled the IP header, or the UDP header too, by then). Needs root.

use std::{
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use flowtrace_tests::{
    drops::{count, drop_reason_code, net_counter, stream_lines},
    finish, ftgen, ftgen_bg, ftgen_bg_in, http_get, parse_exposition, promtool, Agent, Bed,
    ChildGuard, Cluster, ClusterOptions, DropRule, JsonTuple, Pod, ReadyFile,
};
use serde_json::Value;

/// UDP payload of the test's datagrams.
const PAYLOAD: u64 = 100;

/// Layer-3 bytes of one of them (IPv4 and UDP headers, payload), as hops count bytes.
const DATAGRAM_BYTES: u64 = 20 + 8 + PAYLOAD;

/// How long an agent gets to show what the kernel did.
const SETTLE: Duration = Duration::from_secs(15);

/// How far a kernel time stamp turned into wall-clock time may stray from the test's own
/// clock readings around the event.
const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// Whether `ts` (unix ns) lies between `from` and `until`, give or take [`CLOCK_SLACK`].
fn within(ts: u64, from: u64, until: u64) -> bool {
    let slack = CLOCK_SLACK.as_nanos() as u64;
    (from.saturating_sub(slack)..=until + slack).contains(&ts)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Sends `count` datagrams of [`PAYLOAD`] bytes from `src` (bound to its pod address) to
/// `dst`:`port`; checks the sender sent every one (ftgen stops at the first failed send)
/// and returns their tuple.
fn send_udp(src: &Pod, dst: IpAddr, port: u16, count: u64) -> JsonTuple {
    let sent = ftgen(
        src,
        &[
            "udp-send",
            "--to",
            &format!("{dst}:{port}"),
            "--count",
            &count.to_string(),
            "--size",
            &PAYLOAD.to_string(),
            "--interval-us",
            "200",
            "--bind",
            &src.ipv4.to_string(),
        ],
    )
    .unwrap();
    assert_eq!(
        sent["sent"], count,
        "udp-send sent fewer than asked: {sent}"
    );
    JsonTuple {
        protocol: 17,
        src: src.ipv4.into(),
        src_port: sent["local_ports"][0].as_u64().unwrap() as u16,
        dst,
        dst_port: port,
    }
}

/// The flows of `agent` on port `port`, as the API writes them.
fn flows(agent: &Agent, port: u16) -> Vec<Value> {
    let v: Value = agent.get(&format!("/v1/flows?port={port}")).unwrap();
    v["flows"].as_array().cloned().unwrap_or_default()
}

/// Polls `agent`'s flows until the one with tuple `t` has `field` >= `want` (or
/// [`SETTLE`] passed: then it fails saying what the agent had) and returns it.
fn wait_flow(agent: &Agent, t: &JsonTuple, field: &str, want: u64) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let all = flows(agent, t.dst_port);
        if let Some(f) = all.iter().find(|f| t.matches(f)) {
            if count(f, field) >= want {
                return f.clone();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "{}: after {SETTLE:?} the flow {t} has {field} {} where the test caused {want}; \
                 the agent's flows on port {}: {:#}\nits /v1/drops: {}\nagent log:\n{}",
                agent.netns,
                all.iter()
                    .find(|f| t.matches(f))
                    .map(|f| count(f, field).to_string())
                    .unwrap_or_else(|| "(no such flow)".into()),
                t.dst_port,
                Value::from(all.clone()),
                agent
                    .get::<Value>("/v1/drops")
                    .map(|d| d.to_string())
                    .unwrap_or_else(|e| e.to_string()),
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The hop of `flow` at `iface` in `direction` (`ingress`/`egress`).
fn hop<'a>(flow: &'a Value, iface: &str, direction: &str) -> Option<&'a Value> {
    flow["hops"]
        .as_array()?
        .iter()
        .find(|h| h["interface"] == iface && h["direction"] == direction)
}

/// What the drops of one flow must be.
struct Expect<'a> {
    /// The node whose agent is asked, for messages.
    node: &'a str,
    /// The kernel's name of the reason, without `SKB_DROP_REASON_`.
    reason: &'a str,
    packets: u64,
    device: &'a str,
    /// ifindex of `device` in the namespace it is in.
    ifindex: u32,
    /// `node` or `pod`.
    netns: &'a str,
    /// The host-side veth of the pod the packets died in (netns `pod`).
    pod_veth: Option<&'a str>,
    /// The flow's last hop before the drop: interface and direction.
    after: (&'a str, &'a str),
    /// When the test started sending (unix ns): drops are not older.
    since_ns: u64,
}

/// Checks the drops of `flow` against `e`: every entry has that one reason (and the
/// kernel's number for it), device, namespace and last hop, was seen while the test sent,
/// and they add up to `e.packets` packets of [`DATAGRAM_BYTES`] each, which is also the
/// flow's `dropped`.
fn check_drops(flow: &Value, e: &Expect<'_>) {
    let node = e.node;
    let code = drop_reason_code(e.reason).unwrap();
    let entries = flow["drops"].as_array().cloned().unwrap_or_default();
    let until = now_ns();
    assert!(
        !entries.is_empty(),
        "{node}: no drops on the flow, the test caused {} {}: {flow:#}",
        e.packets,
        e.reason
    );
    for d in &entries {
        let what = |field: &str| {
            format!(
                "{node}: drop {field}: want {:?} for the {} drops the test caused; flowtrace \
                 said {d:#}\nthe flow: {flow:#}",
                match field {
                    "reason" => e.reason.to_string(),
                    "reason_code" => code.to_string(),
                    "device" => e.device.to_string(),
                    "ifindex" => e.ifindex.to_string(),
                    "netns" => e.netns.to_string(),
                    "pod_veth" => format!("{:?}", e.pod_veth),
                    "after" => format!("{:?}", e.after),
                    _ => format!(
                        "last seen between {} and {until} (give or take {CLOCK_SLACK:?})",
                        e.since_ns
                    ),
                },
                e.reason
            )
        };
        assert_eq!(d["reason"], e.reason, "{}", what("reason"));
        assert_eq!(d["reason_code"], code, "{}", what("reason_code"));
        assert_eq!(d["device"], e.device, "{}", what("device"));
        assert_eq!(d["ifindex"], e.ifindex, "{}", what("ifindex"));
        assert_eq!(d["netns"], e.netns, "{}", what("netns"));
        match e.pod_veth {
            Some(veth) => assert_eq!(d["pod_veth"], veth, "{}", what("pod_veth")),
            None => assert!(d.get("pod_veth").is_none(), "{}", what("pod_veth")),
        }
        assert_eq!(
            (&d["after"]["interface"], &d["after"]["direction"]),
            (&Value::from(e.after.0), &Value::from(e.after.1)),
            "{}",
            what("after")
        );
        let seen = count(d, "last_seen_unix_ns");
        assert!(
            within(seen, e.since_ns, until),
            "{}",
            what("last_seen_unix_ns")
        );
    }
    let packets: u64 = entries.iter().map(|d| count(d, "packets")).sum();
    let bytes: u64 = entries.iter().map(|d| count(d, "bytes")).sum();
    assert_eq!(
        (packets, bytes),
        (e.packets, e.packets * DATAGRAM_BYTES),
        "{node}: the test caused {} {} drops of {DATAGRAM_BYTES} layer-3 bytes each; flowtrace's \
         drops add up to {packets} packets, {bytes} bytes: {flow:#}",
        e.packets,
        e.reason
    );
    assert_eq!(
        count(flow, "dropped"),
        e.packets,
        "{node}: the flow's `dropped`, the test caused {}: {flow:#}",
        e.packets
    );
}

/// Checks that the flow's hop `after` saw all `sent` packets and that `dropped` of them
/// died after it (`dropped_after`).
fn check_dropped_after(node: &str, flow: &Value, after: (&str, &str), sent: u64, dropped: u64) {
    let h = hop(flow, after.0, after.1).unwrap_or_else(|| {
        panic!(
            "{node}: no hop {} {} on the flow: {flow:#}",
            after.0, after.1
        )
    });
    assert_eq!(
        (count(h, "packets"), count(h, "dropped_after")),
        (sent, dropped),
        "{node}: hop {} {}: want (packets, dropped_after) = ({sent}, {dropped}) as the test \
         sent and the kernel dropped after it; flowtrace said {h:#}",
        after.0,
        after.1
    );
}

/// Waits until the counter `group`/`field` of namespace `netns` has grown by `want` since
/// `before` (the kernel counts in softirq, after the sender returned), and returns the
/// growth, or what it was after 5 s.
fn counter_growth(netns: &str, group: &str, field: &str, before: u64, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let grown = net_counter(netns, group, field).unwrap() - before;
        if grown >= want || Instant::now() > deadline {
            return grown;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP sink on `pod`:`port` reading whatever comes for `timeout_ms`.
fn udp_sink(pod: &Pod, port: u16, timeout_ms: &str) -> ChildGuard {
    ftgen_bg(
        pod,
        &[
            "udp-sink",
            "--bind",
            &format!("0.0.0.0:{port}"),
            "--count",
            "100000",
            "--timeout-ms",
            timeout_ms,
        ],
    )
    .unwrap()
}

/// A DROP rule on node2's FORWARD chain for UDP to `dst`:`port`, named after the cluster.
fn forward_drop(cluster: &Cluster, dst: &Pod, port: u16) -> DropRule {
    DropRule::insert(
        &cluster.node(2).unwrap().netns,
        "FORWARD",
        &[
            "-p",
            "udp",
            "-d",
            &dst.ipv4.to_string(),
            "--dport",
            &port.to_string(),
        ],
        &format!("{}-drop-udp-{port}", cluster.prefix),
    )
    .unwrap()
}

/// The acceptance case of an iptables DROP, shared with the least-privilege test: `N`
/// datagrams from pod-a on node1 to pod-b on node2 dropped by a rule on node2's FORWARD
/// chain (after they came out of the overlay). Node2's flow has exactly those drops, with
/// reason NETFILTER_DROP, on `flannel.1` after its ingress hop and none at the destination
/// pod; node1 (where nothing died) has none; `/v1/drops` and `/metrics` count them.
pub(crate) fn netfilter_drop_is_counted(bed: &Bed, port: u16) {
    const N: u64 = 50;
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-b").unwrap());
    let n2 = c.node(2).unwrap();
    let rule = forward_drop(c, dst, port);
    let sink = udp_sink(dst, port, "1500");
    let since = now_ns();
    let t = send_udp(src, dst.ipv4.into(), port, N);
    let got = finish(sink).unwrap();
    assert_eq!(
        got["received"], 0,
        "the DROP rule let datagrams through: {got}"
    );
    assert_eq!(
        rule.packets().unwrap(),
        N,
        "the DROP rule's own counter on node2 (iptables -L -v -x), the sender sent {N}"
    );

    let flow = wait_flow(bed.agent(2), &t, "dropped", N);
    check_drops(
        &flow,
        &Expect {
            node: "node2",
            reason: "NETFILTER_DROP",
            packets: N,
            device: "flannel.1",
            ifindex: n2.ifindex("flannel.1").unwrap(),
            netns: "node",
            pod_veth: None,
            after: ("flannel.1", "ingress"),
            since_ns: since,
        },
    );
    check_dropped_after("node2", &flow, ("flannel.1", "ingress"), N, N);
    for dir in ["ingress", "egress"] {
        assert!(
            hop(&flow, &dst.host_veth, dir).is_none(),
            "node2: the datagrams died before the destination pod, yet the flow has a hop at \
             its veth {}: {flow:#}",
            dst.host_veth
        );
    }
    // Node1's agent sees the same kernel events (one kernel runs every node here) but
    // cannot place them on its node: its flow of the tuple has no drops.
    let f1 = wait_flow(bed.agent(1), &t, "packets", N);
    assert!(
        f1.get("drops").is_none() && count(&f1, "dropped") == 0,
        "node1: the datagrams died on node2, yet node1's flow has drops: {f1:#}"
    );
    for h in f1["hops"].as_array().unwrap() {
        assert_eq!(count(h, "dropped_after"), 0, "node1: {f1:#}");
    }

    // /v1/drops: the tuple's drops, the totals by reason, and the filter.
    let all: Value = bed.agent(2).get("/v1/drops").unwrap();
    assert_eq!(
        (&all["node"], &all["available"]),
        (&Value::from("node2"), &Value::from(true)),
        "/v1/drops on node2: {all:#}"
    );
    let of_tuple = |v: &Value| -> (u64, Vec<Value>) {
        let entries: Vec<Value> = v["drops"]
            .as_array()
            .unwrap_or_else(|| panic!("/v1/drops without a drops array: {v:#}"))
            .iter()
            .filter(|d| t.matches(d))
            .cloned()
            .collect();
        (entries.iter().map(|d| count(d, "packets")).sum(), entries)
    };
    let (packets, entries) = of_tuple(&all);
    assert_eq!(
        packets, N,
        "node2 /v1/drops for {t}: the test caused {N} drops: {entries:#?}"
    );
    for d in &entries {
        assert_eq!(
            (&d["reason"], &d["device"], &d["netns"]),
            (
                &Value::from("NETFILTER_DROP"),
                &Value::from("flannel.1"),
                &Value::from("node")
            ),
            "node2 /v1/drops: {d:#}"
        );
    }
    assert!(
        count(&all["by_reason"], "NETFILTER_DROP") >= N,
        "node2 /v1/drops by_reason: at least the test's {N} NETFILTER_DROP: {:#}",
        all["by_reason"]
    );
    assert_eq!(
        count(&all["lost"], "map_full"),
        0,
        "node2 lost drop events to a full map: {:#}",
        all["lost"]
    );
    assert!(
        all["lost"]["unplaced"].is_u64(),
        "/v1/drops lost.unplaced: {all:#}"
    );
    let filtered: Value = bed.agent(2).get(&format!("/v1/drops?port={port}")).unwrap();
    assert_eq!(
        of_tuple(&filtered).0,
        N,
        "node2 /v1/drops?port={port}: {filtered:#}"
    );
    for d in filtered["drops"].as_array().unwrap() {
        assert!(
            count(d, "src_port") == u64::from(port) || count(d, "dst_port") == u64::from(port),
            "/v1/drops?port={port} returned a drop on other ports: {d:#}"
        );
    }

    // /metrics: promtool accepts it and the counter has the test's drops.
    let (status, text) = http_get(&n2.netns, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let (ok, said) = promtool(&text).unwrap();
    assert!(ok, "promtool check metrics on node2: {said}");
    let samples: Vec<_> = parse_exposition(&text)
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "flowtrace_drops_total" && s.label("reason") == "NETFILTER_DROP")
        .collect();
    let total: f64 = samples.iter().map(|s| s.value).sum();
    assert!(
        total >= N as f64,
        "node2 flowtrace_drops_total{{reason=\"NETFILTER_DROP\"}} sums to {total}, the test \
         caused {N}: {samples:#?}"
    );
    for s in &samples {
        assert!(
            !s.label("hop").is_empty(),
            "a drop counter without hop: {s:?}"
        );
    }
    drop(rule);
}

#[test]
fn an_iptables_drop_on_the_forward_chain_is_netfilter_drop_after_the_overlay() {
    let bed = Bed::up().unwrap();
    netfilter_drop_is_counted(&bed, 47101);
}

/// A sink with a tiny receive buffer that does not read while the datagrams arrive: all but
/// the few that fit are dropped in the sink pod's namespace, SOCKET_RCVBUFF, after they
/// passed its veth.
#[test]
fn a_full_receive_buffer_is_socket_rcvbuff_in_the_pods_namespace() {
    const N: u64 = 200;
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-a").unwrap());
    let port = 47201;
    let hold = ReadyFile::new(&format!("{}-rcvbuf-hold", c.prefix));
    let sink = ftgen_bg(
        dst,
        &[
            "udp-sink",
            "--bind",
            &format!("0.0.0.0:{port}"),
            "--count",
            "100000",
            "--rcvbuf",
            "2048",
            "--hold-until",
            hold.arg().unwrap(),
            "--timeout-ms",
            "20000",
        ],
    )
    .unwrap();
    let since = now_ns();
    let t = send_udp(src, dst.ipv4.into(), port, N);
    // The last datagrams reach the socket (or its full buffer) before it reads.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(hold.path(), b"").unwrap();
    let got = finish(sink).unwrap();
    let read = got["received"].as_u64().unwrap();
    let lost = N - read;
    assert!(
        read > 0 && lost >= N / 2,
        "a receive buffer of {} bytes should hold a few of {N} datagrams: the sink read {read}: \
         {got}",
        got["rcvbuf"]
    );
    assert_eq!(
        got["socket_drops"], lost,
        "the sink's socket (/proc/net/udp drops), the sender sent {N} and the sink read {read}"
    );

    let flow = wait_flow(bed.agent(2), &t, "dropped", lost);
    check_drops(
        &flow,
        &Expect {
            node: "node2",
            reason: "SOCKET_RCVBUFF",
            packets: lost,
            // Inside a pod the agent cannot read the device's name (that needs entering the
            // pod's namespace); it says which pod through pod_veth, and the ifindex is eth0's.
            device: "",
            ifindex: dst.ifindex().unwrap(),
            netns: "pod",
            pod_veth: Some(dst.host_veth.as_str()),
            after: (dst.host_veth.as_str(), "egress"),
            since_ns: since,
        },
    );
    check_dropped_after("node2", &flow, (&dst.host_veth, "egress"), N, lost);
}

/// Datagrams to a port nothing listens on die in the destination pod's namespace, NO_SOCKET,
/// each counted by that pod's stack as `Udp NoPorts`.
#[test]
fn datagrams_to_a_closed_port_are_no_socket_in_the_pods_namespace() {
    const N: u64 = 50;
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-c").unwrap(), c.pod(2, "pod-c").unwrap());
    let port = 47301;
    let listening = dst.exec(&["ss", "-H", "-u", "-a", "-n"]).unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout).to_string();
    assert!(
        !listening
            .split_whitespace()
            .any(|w| w.ends_with(&format!(":{port}"))),
        "a UDP socket on port {port} in the destination pod: {listening}"
    );
    let before = net_counter(&dst.netns, "Udp", "NoPorts").unwrap();
    let since = now_ns();
    let t = send_udp(src, dst.ipv4.into(), port, N);
    let no_ports = counter_growth(&dst.netns, "Udp", "NoPorts", before, N);
    assert_eq!(
        no_ports, N,
        "the destination pod's Udp NoPorts grew by {no_ports}, the sender sent {N}"
    );

    let flow = wait_flow(bed.agent(2), &t, "dropped", N);
    check_drops(
        &flow,
        &Expect {
            node: "node2",
            reason: "NO_SOCKET",
            packets: N,
            // Inside a pod the agent cannot read the device's name (that needs entering the
            // pod's namespace); it says which pod through pod_veth, and the ifindex is eth0's.
            device: "",
            ifindex: dst.ifindex().unwrap(),
            netns: "pod",
            pod_veth: Some(dst.host_veth.as_str()),
            after: (dst.host_veth.as_str(), "egress"),
            since_ns: since,
        },
    );
    check_dropped_after("node2", &flow, (&dst.host_veth, "egress"), N, N);
}

/// An address of the cluster's own pod network (10.244.0.0/16) in the pod CIDR of a node
/// that does not exist: every node routes only its own and the other nodes' pod CIDRs, and
/// has no default route, so a packet to it dies on the sender's node.
const NO_ROUTE: &str = "10.244.250.10";

/// A pod sending to an address its node has no route for: the datagrams die in the node's
/// namespace after the pod's veth, with the routing reason this kernel gives
/// (IP_INNOROUTES, from `ip_error`), each counted by the node's stack as `IpExt InNoRoutes`.
#[test]
fn a_destination_without_a_route_is_ip_innoroutes_in_the_nodes_namespace() {
    const N: u64 = 20;
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let src = c.pod(1, "pod-a").unwrap();
    let n1 = c.node(1).unwrap();
    let port = 47401;
    match flowtrace_tests::netns::run(&["ip", "-n", &n1.netns, "route", "get", NO_ROUTE]) {
        Ok(out) => panic!(
            "node1 has a route to {NO_ROUTE}; the test needs an address it has none for: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => assert!(
            e.to_string().contains("unreachable"),
            "`ip route get {NO_ROUTE}` on node1 failed otherwise than unreachable: {e}"
        ),
    }
    let before = net_counter(&n1.netns, "IpExt", "InNoRoutes").unwrap();
    let since = now_ns();
    let t = send_udp(src, NO_ROUTE.parse().unwrap(), port, N);
    let no_routes = counter_growth(&n1.netns, "IpExt", "InNoRoutes", before, N);
    assert_eq!(
        no_routes, N,
        "node1's IpExt InNoRoutes grew by {no_routes}, the pod sent {N}"
    );

    let flow = wait_flow(bed.agent(1), &t, "dropped", N);
    check_drops(
        &flow,
        &Expect {
            node: "node1",
            reason: "IP_INNOROUTES",
            packets: N,
            device: "cni0",
            ifindex: n1.ifindex("cni0").unwrap(),
            netns: "node",
            pod_veth: None,
            after: (src.host_veth.as_str(), "ingress"),
            since_ns: since,
        },
    );
    check_dropped_after("node1", &flow, (&src.host_veth, "ingress"), N, N);
    let hops: Vec<(&Value, &Value)> = flow["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (&h["interface"], &h["direction"]))
        .collect();
    assert_eq!(
        hops.len(),
        1,
        "node1: the datagrams died after the pod's veth, the flow has hops {hops:?}: {flow:#}"
    );
}

/// The underlay relay losing frames: `ftgen delay-line --drop-every` between the nodes.
struct LossyLine {
    guard: ChildGuard,
    stop: ReadyFile,
}

impl LossyLine {
    fn start(cluster: &Cluster, drop_every: u64) -> Self {
        let stop = ReadyFile::new(&format!("{}-line-stop", cluster.prefix));
        let guard = ftgen_bg_in(
            &cluster.underlay_netns(),
            &[
                "delay-line",
                "--a",
                "ul1",
                "--b",
                "ul2",
                "--drop-every",
                &drop_every.to_string(),
                // Bursts of the transfer queue rather than overflow the relay's sockets:
                // the line loses the frames it is told to, not many more.
                "--socket-buffer",
                "8388608",
                "--stop-file",
                stop.arg().unwrap(),
            ],
        )
        .unwrap();
        LossyLine { guard, stop }
    }

    /// Stops the line; returns its account of what it relayed and dropped.
    fn stop(self) -> Value {
        std::fs::write(self.stop.path(), b"").unwrap();
        finish(self.guard).unwrap()
    }
}

/// A bulk transfer from pod-a on node1 to pod-a on node2 over an underlay that drops every
/// 50th VXLAN frame each way: the client's flow on node1 has exactly the retransmissions its
/// own socket counted (TCP_INFO `tcpi_total_retrans`, read before it closed). Node2's agent,
/// which does not hold the client's socket, has none on that tuple.
#[test]
fn retransmissions_over_a_lossy_underlay_equal_the_clients_tcp_info() {
    const BYTES: u64 = 2_000_000;
    let started = Instant::now();
    flowtrace_tests::require_root().unwrap();
    let cluster = Cluster::up(&ClusterOptions {
        underlay_relay: true,
        ..Default::default()
    })
    .unwrap();
    let line = LossyLine::start(&cluster, 50);
    let agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .map(|n| Agent::start(&n.netns, &[]).unwrap())
        .collect();
    let (client, server) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(2, "pod-a").unwrap(),
    );
    let port = 47501;
    // Retransmissions the client's kernel counted but could not transmit (the tracepoint's
    // view may differ from tcpi_total_retrans by these): printed beside a mismatch.
    let retrans_fail = || net_counter(&client.netns, "TcpExt", "TCPRetransFail").unwrap_or(0);
    let fail_before = retrans_fail();
    let sink = ftgen_bg(
        server,
        &[
            "tcp-sink",
            "--bind",
            &format!("0.0.0.0:{port}"),
            "--timeout-ms",
            "30000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        client,
        &[
            "tcp-send",
            "--to",
            &format!("{}:{port}", server.ipv4),
            "--bytes",
            &BYTES.to_string(),
            "--timeout-ms",
            "20000",
        ],
    )
    .unwrap();
    let got = finish(sink).unwrap();
    let held = line.stop();
    assert_eq!(got["received_bytes"], BYTES, "the server got {got}");
    let retrans = sent["total_retrans_per_connection"][0].as_u64().unwrap();
    assert!(
        held["a_to_b"]["dropped"].as_u64().unwrap() > 0 && retrans > 0,
        "the line should have dropped some of the client's frames and the client resent \
         them: line {held}, client {sent}"
    );
    let t = JsonTuple {
        protocol: 6,
        src: client.ipv4.into(),
        src_port: sent["local_ports"][0].as_u64().unwrap() as u16,
        dst: server.ipv4.into(),
        dst_port: port,
    };
    eprintln!(
        "transfer done {:?} after start; client {sent}; line {held}; client TcpExt \
         TCPRetransFail +{}",
        started.elapsed(),
        retrans_fail().saturating_sub(fail_before)
    );

    let f1 = wait_flow(&agents[0], &t, "retransmits", retrans);
    assert_eq!(
        count(&f1, "retransmits"),
        retrans,
        "node1: the client's socket retransmitted {retrans} segments (tcpi_total_retrans); \
         flowtrace's flow {t}: {f1:#}"
    );
    let f2 = wait_flow(&agents[1], &t, "packets", 1);
    assert_eq!(
        count(&f2, "retransmits"),
        0,
        "node2 does not hold the client's socket, yet its flow {t} has retransmits: {f2:#}"
    );

    let d: Value = agents[0].get(&format!("/v1/drops?port={port}")).unwrap();
    let segments: u64 = d["retransmits"]
        .as_array()
        .unwrap_or_else(|| panic!("node1 /v1/drops without a retransmits array: {d:#}"))
        .iter()
        .filter(|r| t.matches(r))
        .map(|r| count(r, "segments"))
        .sum();
    assert_eq!(
        segments, retrans,
        "node1 /v1/drops retransmits of {t}, the client counted {retrans}: {d:#}"
    );
    let (status, text) = http_get(&cluster.node(1).unwrap().netns, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let total: f64 = parse_exposition(&text)
        .unwrap()
        .iter()
        .filter(|s| s.name == "flowtrace_tcp_retransmits_total")
        .map(|s| s.value)
        .sum();
    assert!(
        total >= retrans as f64,
        "node1 flowtrace_tcp_retransmits_total is {total}, the client alone retransmitted \
         {retrans}"
    );
    drop(agents);
    cluster.down().unwrap();
}

/// A tracer on node2 (`/v1/trace`, as `flowtrace trace` reads it) sees each datagram the
/// FORWARD rule drops as one `drop` line, live.
#[test]
fn a_tracer_sees_each_dropped_datagram_as_a_drop_line() {
    const N: u64 = 30;
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-c").unwrap());
    let n2 = c.node(2).unwrap();
    let port = 47701;
    let code = drop_reason_code("NETFILTER_DROP").unwrap();
    let rule = forward_drop(c, dst, port);
    let lines = stream_lines(&n2.netns, "/v1/trace").unwrap();
    let first = lines.recv_timeout(Duration::from_secs(5)).unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["kind"], "start", "{first}");
    // The tracer is registered before the traffic starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.agent(2).stats().unwrap().tracers != 1 {
        assert!(Instant::now() < deadline, "node2 never counted the tracer");
        std::thread::sleep(Duration::from_millis(50));
    }

    let since = now_ns();
    let t = send_udp(src, dst.ipv4.into(), port, N);
    // Every drop line of the tuple until N arrived, then a second more for any extra.
    let mut drops = Vec::new();
    let mut deadline = Instant::now() + SETTLE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["kind"] == "drop" && t.matches(&v) {
            drops.push(v);
            if drops.len() as u64 == N {
                deadline = Instant::now() + Duration::from_secs(1);
            }
        }
    }
    let until = now_ns();
    assert_eq!(
        rule.packets().unwrap(),
        N,
        "the DROP rule's own counter, the sender sent {N}"
    );
    assert_eq!(
        drops.len() as u64,
        N,
        "node2's trace showed {} drop lines for {t}, the rule dropped {N}: {drops:#?}",
        drops.len()
    );
    for d in &drops {
        assert_eq!(
            (
                &d["node"],
                &d["reason"],
                &d["reason_code"],
                &d["device"],
                &d["bytes"]
            ),
            (
                &Value::from("node2"),
                &Value::from("NETFILTER_DROP"),
                &Value::from(code),
                &Value::from("flannel.1"),
                &Value::from(DATAGRAM_BYTES)
            ),
            "node2 trace line (want node2, NETFILTER_DROP = {code}, flannel.1, \
             {DATAGRAM_BYTES} layer-3 bytes): {d:#}"
        );
        let ts = count(d, "ts_unix_ns");
        assert!(
            within(ts, since, until),
            "drop line stamped {ts}, the test sent between {since} and {until} (give or take \
             {CLOCK_SLACK:?}): {d:#}"
        );
    }
    drop(rule);
}
