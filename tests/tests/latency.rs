//! Hop latency and TCP round trips measured by the kernel programs on the emulated
//! cluster. Ground truth: the topology the test built (which hooks a packet crosses) and the
//! delay the test's own server adds before answering. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::net::IpAddr;

use flowtrace::{
    api::LatencyResponse,
    flows::Direction,
    latency::{LatencyKind, LatencyRecord},
};
use flowtrace_tests::{finish, ftgen, ftgen_bg, Agent, Cluster, ClusterOptions, Pod};

fn latency(agent: &Agent) -> Vec<LatencyRecord> {
    let r: LatencyResponse = agent.get("/v1/latency").unwrap();
    assert_eq!(r.sample_rate, 1);
    r.latency
}

/// `connections` request/answer exchanges from `client` to `server`:8080, the server
/// answering `delay_ms` after the request.
fn exchanges(client: &Pod, server: &Pod, connections: u32, delay_ms: u32) {
    let sink = ftgen_bg(
        server,
        &[
            "tcp-sink",
            "--bind",
            "0.0.0.0:8080",
            "--connections",
            &connections.to_string(),
            "--timeout-ms",
            "30000",
            "--echo-bytes",
            "200",
            "--reply-delay-ms",
            &delay_ms.to_string(),
        ],
    )
    .unwrap();
    let to = format!("{}:8080", server.ipv4);
    let sent = ftgen(
        client,
        &[
            "tcp-send",
            "--to",
            &to,
            "--bytes",
            "1000",
            "--connections",
            &connections.to_string(),
        ],
    )
    .unwrap();
    assert_eq!(
        sent["received_bytes"],
        u64::from(connections) * 200,
        "{sent}"
    );
    assert_eq!(finish(sink).unwrap()["connections"], connections);
}

/// Samples, mean and largest max over the connections from `src` to `dst` (one record per
/// connection: each has its own source port).
#[derive(Debug)]
struct Agg {
    connections: usize,
    samples: u64,
    mean_ns: u64,
}

fn find(
    l: &[LatencyRecord],
    kind: LatencyKind,
    src: IpAddr,
    dst: IpAddr,
    from: Option<(&str, Direction)>,
    to: (&str, Direction),
) -> Agg {
    let rs: Vec<&LatencyRecord> = l
        .iter()
        .filter(|r| {
            r.kind == kind
                && r.tuple.src == src
                && r.tuple.dst == dst
                && r.from.as_ref().map(|h| (h.interface.as_str(), h.direction)) == from
                && (r.to.interface.as_str(), r.to.direction) == to
        })
        .collect();
    let samples: u64 = rs.iter().map(|r| r.samples).sum();
    let total: u64 = rs.iter().map(|r| r.mean_ns * r.samples).sum();
    Agg {
        connections: rs.len(),
        samples,
        mean_ns: total.checked_div(samples).unwrap_or(0),
    }
}

#[test]
fn hops_are_microseconds_and_a_slow_server_is_server_time() {
    common::assert_root();
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let agents: Vec<Agent> = cluster
        .nodes
        .iter()
        .map(|n| Agent::start(&n.netns, &["--latency-sample", "1"]).unwrap())
        .collect();
    let a1 = cluster.pod(1, "pod-a").unwrap();
    let b1 = cluster.pod(1, "pod-b").unwrap();
    let a2 = cluster.pod(2, "pod-a").unwrap();
    let (ig, eg) = (Direction::Ingress, Direction::Egress);

    // Same node, the server answers at once.
    exchanges(a1, b1, 5, 0);
    // Across nodes, the server waits 20 ms before answering.
    exchanges(a1, a2, 5, 20);

    let l1 = latency(&agents[0]);
    let l2 = latency(&agents[1]);
    let src: IpAddr = a1.ipv4.into();
    let same: IpAddr = b1.ipv4.into();
    let cross: IpAddr = a2.ipv4.into();
    let (va1, vb1, va2) = (
        a1.host_veth.as_str(),
        b1.host_veth.as_str(),
        a2.host_veth.as_str(),
    );

    // Same node: client veth ingress -> server veth egress, one way, microseconds.
    let hop = find(&l1, LatencyKind::Hop, src, same, Some((va1, ig)), (vb1, eg));
    assert_eq!(hop.connections, 5, "{l1:#?}");
    // SYN, data, FIN and ACKs of 5 connections: at least 3 sampled packets each.
    assert!(hop.samples >= 15, "{hop:?}");
    assert!(
        hop.mean_ns < 1_000_000,
        "in-node hop should be microseconds: {hop:?}"
    );
    // Nothing on a segment these packets did not cross.
    let none = find(
        &l1,
        LatencyKind::Hop,
        src,
        same,
        Some((va1, ig)),
        ("flannel.1", eg),
    );
    assert_eq!(none.connections, 0);
    // Cross node on node1: client veth ingress -> flannel.1 egress.
    let hop = find(
        &l1,
        LatencyKind::Hop,
        src,
        cross,
        Some((va1, ig)),
        ("flannel.1", eg),
    );
    assert_eq!(hop.connections, 5, "{l1:#?}");
    assert!(hop.mean_ns < 1_000_000, "{hop:?}");
    // Node2: flannel.1 ingress -> server veth egress.
    let hop = find(
        &l2,
        LatencyKind::Hop,
        src,
        cross,
        Some(("flannel.1", ig)),
        (va2, eg),
    );
    assert_eq!(hop.connections, 5, "{l2:#?}");
    assert!(hop.mean_ns < 1_000_000, "{hop:?}");

    // Round trips of the cross-node exchanges, at each interface where the answer passed
    // (client veth egress towards the client, server veth ingress from the server). The handshake is network only (kernels
    // answer SYNs at once) and shorter the closer to the server it is seen.
    let hs_client = find(&l1, LatencyKind::Handshake, src, cross, None, (va1, eg));
    let hs_server = find(&l2, LatencyKind::Handshake, src, cross, None, (va2, ig));
    assert_eq!(
        (hs_client.samples, hs_server.samples),
        (5, 5),
        "{hs_client:?} {hs_server:?}"
    );
    assert!(hs_client.mean_ns < 5_000_000, "{hs_client:?}");
    assert!(
        hs_server.mean_ns < hs_client.mean_ns,
        "{hs_server:?} {hs_client:?}"
    );
    // The response includes the server's 20 ms, at the server's veth as well as at the
    // client's: that is server time; the difference is the network's share.
    let rs_client = find(&l1, LatencyKind::Response, src, cross, None, (va1, eg));
    let rs_server = find(&l2, LatencyKind::Response, src, cross, None, (va2, ig));
    assert_eq!(
        (rs_client.samples, rs_server.samples),
        (5, 5),
        "{rs_client:?} {rs_server:?}"
    );
    // 20 ms plus up to a few ms of the sink's own accept loop (it polls every 2 ms).
    let server_time = rs_server.mean_ns;
    assert!(
        (20_000_000..26_000_000).contains(&server_time),
        "server time {server_time} ns: {rs_server:?}"
    );
    let network = rs_client.mean_ns.saturating_sub(server_time);
    assert!(
        network < 5_000_000,
        "network share {network} ns: {rs_client:?} {rs_server:?}"
    );
    drop(agents);
    cluster.down().unwrap();
}
