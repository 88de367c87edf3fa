//! Per-hop counters on the emulated cluster, checked against what the senders sent.
//!
//! Ground truth: ftgen's own count of datagrams/bytes sent and received, ping's count of
//! replies, and the topology the test bed built (which interfaces a packet must cross).

use std::{net::IpAddr, time::Duration};

use flowtrace::model::Direction::{Egress, Ingress};
use flowtrace_tests::{find, finish, ftgen, ftgen_bg, hop_names, hops, Bed, Pod};

const N: u64 = 200;
const PAYLOAD: u64 = 300;

/// Sends N UDP datagrams from `src` to `dst` on `port` and checks the receiver got them all.
fn send_udp(src: &Pod, dst: &Pod, v6: bool, port: u16) -> (IpAddr, IpAddr) {
    let (s, d, bind, to): (IpAddr, IpAddr, String, String) = if v6 {
        (
            src.ipv6.into(),
            dst.ipv6.into(),
            format!("[::]:{port}"),
            format!("[{}]:{port}", dst.ipv6),
        )
    } else {
        (
            src.ipv4.into(),
            dst.ipv4.into(),
            format!("0.0.0.0:{port}"),
            format!("{}:{port}", dst.ipv4),
        )
    };
    let sink = ftgen_bg(
        dst,
        &[
            "udp-sink",
            "--bind",
            &bind,
            "--count",
            &N.to_string(),
            "--timeout-ms",
            "20000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        src,
        &[
            "udp-send",
            "--to",
            &to,
            "--count",
            &N.to_string(),
            "--size",
            &PAYLOAD.to_string(),
            "--interval-us",
            "200",
            "--bind",
            &s.to_string(),
        ],
    )
    .unwrap();
    let got = finish(sink).unwrap();
    assert_eq!(sent["sent"], N, "sender: {sent}");
    assert_eq!(
        got["received"], N,
        "receiver got {got}, sender {sent}: the emulated network lost datagrams"
    );
    (s, d)
}

fn check_udp(same_node: bool, v6: bool, port: u16) {
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let src = c.pod(1, "pod-a").unwrap();
    let dst = if same_node {
        c.pod(1, "pod-c").unwrap()
    } else {
        c.pod(2, "pod-c").unwrap()
    };
    let (s, d) = send_udp(src, dst, v6, port);
    let l3_header = if v6 { 40 } else { 20 };
    let bytes = N * (l3_header + 8 + PAYLOAD);

    let f1 = find(&bed.agent(1).flows().unwrap(), 17, s, d, None, port)
        .expect("node1 agent has the flow");
    let f2 = find(&bed.agent(2).flows().unwrap(), 17, s, d, None, port);
    if same_node {
        assert_eq!(
            hop_names(&f1),
            hops(&[(&src.host_veth, Ingress), (&dst.host_veth, Egress)]),
            "{f1:#?}"
        );
        assert!(f2.is_none(), "node2 must not see a same-node flow: {f2:#?}");
    } else {
        assert_eq!(
            hop_names(&f1),
            hops(&[(&src.host_veth, Ingress), ("flannel.1", Egress)]),
            "{f1:#?}"
        );
        let f2 = f2.expect("node2 agent has the flow");
        assert_eq!(
            hop_names(&f2),
            hops(&[("flannel.1", Ingress), (&dst.host_veth, Egress)]),
            "{f2:#?}"
        );
        for h in &f2.hops {
            assert_eq!((h.packets, h.bytes), (N, bytes), "node2 hop {h:?}");
        }
    }
    for h in &f1.hops {
        assert_eq!((h.packets, h.bytes), (N, bytes), "node1 hop {h:?}");
        assert!(h.first_seen_unix_ns <= h.last_seen_unix_ns);
    }
    // Hops are listed in the order the packets met them.
    assert!(f1.hops[0].first_seen_unix_ns <= f1.hops[1].first_seen_unix_ns);
}

#[test]
fn udp_same_node_ipv4() {
    check_udp(true, false, 21001);
}

#[test]
fn udp_same_node_ipv6() {
    check_udp(true, true, 21002);
}

#[test]
fn udp_across_nodes_ipv4() {
    check_udp(false, false, 21003);
}

#[test]
fn udp_across_nodes_ipv6() {
    check_udp(false, true, 21004);
}

/// A bulk TCP transfer (GSO/GRO aggregates in play): the layer-3 bytes at every hop, less
/// the headers of the packets counted, equal the payload the client sent.
#[test]
fn tcp_transfer_bytes_match_what_the_client_sent() {
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-b").unwrap());
    const BYTES: u64 = 8 * 1024 * 1024;
    let port = 22001;
    let sink = ftgen_bg(
        dst,
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
        src,
        &[
            "tcp-send",
            "--to",
            &format!("{}:{port}", dst.ipv4),
            "--bytes",
            &BYTES.to_string(),
        ],
    )
    .unwrap();
    let got = finish(sink).unwrap();
    assert_eq!(sent["sent_bytes"], BYTES);
    assert_eq!(got["received_bytes"], BYTES);
    let sport = sent["local_ports"][0].as_u64().unwrap() as u16;
    // The sender's own count of what it sent twice: a busy machine drops and retransmits
    // segments, and each copy crosses (and is counted at) the hops before the drop.
    let resent = sent["retransmitted_bytes"].as_u64().unwrap() as i64;

    let f1 = find(
        &bed.agent(1).flows().unwrap(),
        6,
        src.ipv4.into(),
        dst.ipv4.into(),
        Some(sport),
        port,
    )
    .expect("node1 flow");
    let f2 = find(
        &bed.agent(2).flows().unwrap(),
        6,
        src.ipv4.into(),
        dst.ipv4.into(),
        Some(sport),
        port,
    )
    .expect("node2 flow");
    assert_eq!(
        hop_names(&f1),
        hops(&[(&src.host_veth, Ingress), ("flannel.1", Egress)]),
        "{f1:#?}"
    );
    assert_eq!(
        hop_names(&f2),
        hops(&[("flannel.1", Ingress), (&dst.host_veth, Egress)]),
        "{f2:#?}"
    );
    for h in f1.hops.iter().chain(f2.hops.iter()) {
        // Linux uses TCP timestamps: 20 (IPv4) + 32 (TCP with the timestamp option) bytes
        // of headers per segment; the SYN carries 8 more option bytes.
        let payload = h.bytes as i64 - h.packets as i64 * 52;
        let extra = payload - BYTES as i64;
        assert!(
            (0..=8 + resent + (BYTES as i64) / 100).contains(&extra),
            "hop {} {:?}: {} packets, {} bytes => {payload} payload bytes, client sent {BYTES} \
             and retransmitted {resent}",
            h.interface,
            h.direction,
            h.packets,
            h.bytes
        );
        // The payload flowtrace counts is the applications' bytes: exactly what the client
        // sent, and the copies it sent again that came this far.
        assert!(
            (BYTES..=BYTES + resent as u64).contains(&h.payload_bytes),
            "hop {} {:?}: {} payload bytes, client sent {BYTES} and retransmitted {resent}",
            h.interface,
            h.direction,
            h.payload_bytes
        );
        assert!(
            h.tcp_flags.contains('S') && h.tcp_flags.contains('F'),
            "flags {}",
            h.tcp_flags
        );
        assert!(
            h.packets >= BYTES / 1448,
            "{} wire packets cannot carry {BYTES} bytes at MSS 1398",
            h.packets
        );
    }
    // The reverse direction (ACKs) is its own flow, met at the mirror hops.
    let r2 = find(
        &bed.agent(2).flows().unwrap(),
        6,
        dst.ipv4.into(),
        src.ipv4.into(),
        Some(port),
        sport,
    )
    .expect("reply flow on node2");
    assert_eq!(
        hop_names(&r2),
        hops(&[(&dst.host_veth, Ingress), ("flannel.1", Egress)])
    );
}

/// Ping across nodes, IPv4 and IPv6: requests and replies counted on their own hops.
#[test]
fn icmp_echo_requests_and_replies() {
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-a").unwrap());
    const COUNT: u64 = 5;
    for v6 in [false, true] {
        let (s, d): (IpAddr, IpAddr) = if v6 {
            (src.ipv6.into(), dst.ipv6.into())
        } else {
            (src.ipv4.into(), dst.ipv4.into())
        };
        let out = src
            .exec(&[
                "ping",
                "-c",
                &COUNT.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                "-s",
                "100",
                &d.to_string(),
            ])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains(&format!("{COUNT} packets transmitted, {COUNT} received")),
            "{text}"
        );
        let (req, rep, proto, l3) = if v6 {
            (128u16 << 8, 129u16 << 8, 58u8, 40)
        } else {
            (8u16 << 8, 0, 1u8, 20)
        };
        let bytes = COUNT * (l3 + 8 + 100);
        std::thread::sleep(Duration::from_millis(100));
        let (n1, n2) = (bed.agent(1).flows().unwrap(), bed.agent(2).flows().unwrap());
        let q1 = find(&n1, proto, s, d, None, req).expect("request on node1");
        let q2 = find(&n2, proto, s, d, None, req).expect("request on node2");
        let r2 = find(&n2, proto, d, s, None, rep).expect("reply on node2");
        let r1 = find(&n1, proto, d, s, None, rep).expect("reply on node1");
        assert_eq!(
            hop_names(&q1),
            hops(&[(&src.host_veth, Ingress), ("flannel.1", Egress)])
        );
        assert_eq!(
            hop_names(&q2),
            hops(&[("flannel.1", Ingress), (&dst.host_veth, Egress)])
        );
        assert_eq!(
            hop_names(&r2),
            hops(&[(&dst.host_veth, Ingress), ("flannel.1", Egress)])
        );
        assert_eq!(
            hop_names(&r1),
            hops(&[("flannel.1", Ingress), (&src.host_veth, Egress)])
        );
        for f in [&q1, &q2, &r1, &r2] {
            assert_eq!(
                f.src_port, q1.src_port,
                "echo identifier is shared by request and reply"
            );
            for h in &f.hops {
                assert_eq!(
                    (h.packets, h.bytes),
                    (COUNT, bytes),
                    "{:?} {} {:?}",
                    f.dst_port,
                    h.interface,
                    h.direction
                );
            }
        }
    }
}

/// Sends `flows * rounds` 20-byte UDP datagrams from `src` to `dst:port`, round-robin over
/// `flows` sockets (one flow each), checks they all arrived, and returns ftgen's report.
fn send_interleaved_flows(
    src: &Pod,
    dst: &Pod,
    port: u16,
    flows: u64,
    rounds: u64,
) -> serde_json::Value {
    let total = (flows * rounds).to_string();
    let bind = format!("0.0.0.0:{port}");
    let to = format!("{}:{port}", dst.ipv4);
    let sink = ftgen_bg(
        dst,
        &[
            "udp-sink",
            "--bind",
            &bind,
            "--count",
            &total,
            "--timeout-ms",
            "30000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        src,
        &[
            "udp-send",
            "--to",
            &to,
            "--count",
            &total,
            "--size",
            "20",
            "--sockets",
            &flows.to_string(),
            "--interval-us",
            "100",
            "--bind",
            &src.ipv4.to_string(),
        ],
    )
    .unwrap();
    assert_eq!(finish(sink).unwrap()["received"], flows * rounds);
    sent
}

/// Many interleaved flows through one hook: more flows than the per-CPU cache has slots, so
/// counters move between cache and hash map and across drains; every flow must still be exact.
#[test]
fn many_interleaved_flows_are_each_counted_exactly() {
    let bed = Bed::up().unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-b").unwrap());
    const FLOWS: u64 = 600;
    const ROUNDS: u64 = 5;
    let sent = send_interleaved_flows(src, dst, 25001, FLOWS, ROUNDS);
    let ports: Vec<u16> = sent["local_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect();
    assert_eq!(ports.len() as u64, FLOWS);
    let (n1, n2) = (bed.agent(1).flows().unwrap(), bed.agent(2).flows().unwrap());
    for port in ports {
        for (flows, node) in [(&n1, 1), (&n2, 2)] {
            let f = find(
                flows,
                17,
                src.ipv4.into(),
                dst.ipv4.into(),
                Some(port),
                25001,
            )
            .unwrap_or_else(|| panic!("node{node} lacks flow from port {port}"));
            assert_eq!(f.hops.len(), 2, "{f:#?}");
            for h in &f.hops {
                assert_eq!(
                    (h.packets, h.bytes),
                    (ROUNDS, ROUNDS * (20 + 8 + 20)),
                    "node{node} port {port} {h:?}"
                );
            }
        }
    }
}

/// The flow table and the kernel counters describing the same packets. Background chatter
/// (IPv6 neighbour discovery, MLD) may cross a hook at any moment, so the table is taken
/// between two identical counter readings.
fn quiet_snapshot(
    agent: &flowtrace_tests::Agent,
) -> (
    Vec<flowtrace::model::FlowRecord>,
    flowtrace::model::wire::StatsResponse,
) {
    (0..20)
        .find_map(|_| {
            let s1 = agent.stats().unwrap();
            let flows = agent.flows().unwrap();
            let s2 = agent.stats().unwrap();
            (s1.kernel["packets_seen"] == s2.kernel["packets_seen"]).then_some((flows, s2))
        })
        .expect("the hooks never went quiet")
}

/// An event ring the agent does not read (it is stopped) while more flows come than the
/// per-CPU cache holds: what the full ring cannot take is counted as lost, packet for
/// packet. Every packet that entered a hook is accounted for exactly once: counted in a flow,
/// lost to the full ring, unparsed, or not IP.
#[test]
fn a_full_event_ring_counts_every_lost_packet() {
    flowtrace_tests::require_root().unwrap();
    let cluster =
        flowtrace_tests::Cluster::up(&flowtrace_tests::ClusterOptions::default()).unwrap();
    let agent = flowtrace_tests::Agent::start(
        &cluster.node(1).unwrap().netns,
        &["--event-ring-mib", "1", "--drain-interval-ms", "600000"],
    )
    .unwrap();
    let (src, dst) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(1, "pod-c").unwrap(),
    );
    // 12 000 flows x 2 hops take turns in a cache of 4 096 slots per CPU: some 20 000 hand
    // overs of 104 bytes, twice what a 1 MiB ring holds.
    const FLOWS: u64 = 12_000;
    const ROUNDS: u64 = 1;
    let all_packets = |flows: &[flowtrace::model::FlowRecord]| -> u64 {
        flows
            .iter()
            .flat_map(|f| f.hops.iter().map(|h| h.packets))
            .sum()
    };
    let (flows_before, before) = quiet_snapshot(&agent);
    let counted_before = all_packets(&flows_before);
    agent.pause().unwrap();
    let sent = send_interleaved_flows(src, dst, 25002, FLOWS, ROUNDS);
    agent.resume().unwrap();
    let ports: Vec<u64> = sent["local_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    let (flows, after) = quiet_snapshot(&agent);
    let counted: u64 = flows
        .iter()
        .filter(|f| f.dst_port == 25002 && ports.contains(&(f.src_port as u64)))
        .flat_map(|f| f.hops.iter().map(|h| h.packets))
        .sum();
    let delta = |k: &str| after.kernel[k] - before.kernel[k];
    let lost = delta("flow_map_full");
    assert!(
        lost > 0,
        "a 1 MiB ring cannot hold the hand-overs of {FLOWS} flows x 2 hops"
    );
    // Ours: 2 hooks per datagram; each is either counted in our flows or lost.
    assert!(
        counted <= FLOWS * ROUNDS * 2 && counted + lost >= FLOWS * ROUNDS * 2,
        "counted {counted}, lost {lost}"
    );
    // Everything (ours and the namespace's background chatter) balances exactly.
    let counted_all = all_packets(&flows) - counted_before;
    let unparsed = after.unparsed_packets - before.unparsed_packets;
    assert_eq!(
        counted_all + lost + unparsed + delta("non_ip"),
        delta("packets_seen"),
        "counted {counted_all} lost {lost} unparsed {unparsed}"
    );
    drop(agent);
    cluster.down().unwrap();
}

/// With the uplink traced (`--include-iface eth0`), the encapsulated packets are their own
/// flow (node to node, UDP 8472). Each carries exactly one inner packet plus the outer IPv4,
/// UDP, VXLAN and inner Ethernet headers (50 bytes), GSO/GRO aggregates included, and both
/// ends of the underlay count the same.
#[test]
fn vxlan_outer_flow_on_the_uplink_matches_the_inner_flow() {
    flowtrace_tests::require_root().unwrap();
    let cluster =
        flowtrace_tests::Cluster::up(&flowtrace_tests::ClusterOptions::default()).unwrap();
    let a1 = flowtrace_tests::Agent::start(
        &cluster.node(1).unwrap().netns,
        &["--include-iface", "eth0"],
    )
    .unwrap();
    let a2 = flowtrace_tests::Agent::start(
        &cluster.node(2).unwrap().netns,
        &["--include-iface", "eth0"],
    )
    .unwrap();
    let (src, dst) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(2, "pod-b").unwrap(),
    );
    let sink = ftgen_bg(
        dst,
        &[
            "tcp-sink",
            "--bind",
            "0.0.0.0:26001",
            "--timeout-ms",
            "30000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        src,
        &[
            "tcp-send",
            "--to",
            &format!("{}:26001", dst.ipv4),
            "--bytes",
            "4000000",
        ],
    )
    .unwrap();
    assert_eq!(finish(sink).unwrap()["received_bytes"], 4_000_000);
    let sport = sent["local_ports"][0].as_u64().unwrap() as u16;
    let (n1, n2) = (a1.flows().unwrap(), a2.flows().unwrap());
    let inner = find(&n1, 6, src.ipv4.into(), dst.ipv4.into(), Some(sport), 26001).unwrap();
    let inner_out = inner
        .hops
        .iter()
        .find(|h| h.interface == "flannel.1")
        .unwrap();
    let (u1, u2): (IpAddr, IpAddr) = (
        cluster.node(1).unwrap().underlay_ip.into(),
        cluster.node(2).unwrap().underlay_ip.into(),
    );
    let outer = n1
        .iter()
        .find(|f| {
            f.protocol_number == 17
                && f.src == u1
                && f.dst == u2
                && f.dst_port == 8472
                && f.packets == inner_out.packets
        })
        .unwrap_or_else(|| {
            panic!(
                "no outer flow with {} packets: {:#?}",
                inner_out.packets,
                n1.iter().filter(|f| f.dst_port == 8472).collect::<Vec<_>>()
            )
        });
    assert_eq!(hop_names(outer), hops(&[("eth0", Egress)]));
    assert_eq!(
        outer.bytes,
        inner_out.bytes + 50 * inner_out.packets,
        "outer {outer:#?} inner {inner_out:?}"
    );
    let far = find(&n2, 17, u1, u2, Some(outer.src_port), 8472).unwrap();
    assert_eq!(hop_names(&far), hops(&[("eth0", Ingress)]));
    if sent["retransmitted_bytes"] == 0 {
        assert_eq!(
            (far.packets, far.bytes),
            (outer.packets, outer.bytes),
            "both ends of the underlay"
        );
    } else {
        // The sender resent segments, so some were dropped, possibly between the two ends
        // of the underlay: the far end can only have seen fewer.
        assert!(
            far.packets <= outer.packets && far.bytes <= outer.bytes,
            "far end {far:#?} saw more than the near end sent {outer:#?}"
        );
    }
}
