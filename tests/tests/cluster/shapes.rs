//! The node shapes people try a tool on first: flannel (pod veths on the `cni0` bridge,
//! VXLAN between nodes), Calico/Cilium style routed veths (no bridge, /32 and /128 routes,
//! `vxlan.calico`), and kind's kindnet (ptp veths carrying the gateway address, no overlay,
//! nodes routed over `eth0`). In all three the node's uplink `eth0` is itself a veth into
//! another namespace with the node's address, as on kind, k3d and minikube-with-docker.
//!
//! On each, the agent must trace exactly the pod veths and the overlay (never the uplink),
//! and `/metrics` must count a cross-node UDP flow once per real hop. Ground truth: the
//! cluster's own wiring (which veths it created for pods, which overlay) and the datagrams
//! the sender sent and the sink received. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use flowtrace_tests::{
    http_get, parse_exposition, udp_all_received, Agent, Cluster, ClusterOptions, Cni,
};

const COUNT: u64 = 211;
const PAYLOAD: u64 = 64;
const PORT: u16 = 7411;

/// The interfaces the cluster wired for pods on node `i`, plus its overlay device.
fn expected_interfaces(cluster: &Cluster, i: usize) -> BTreeSet<String> {
    let node = cluster.node(i).unwrap();
    let mut v: BTreeSet<String> = node.pods.iter().map(|p| p.host_veth.clone()).collect();
    v.extend(cluster.cni.overlay().map(String::from));
    v
}

fn traced(agent: &Agent) -> BTreeSet<String> {
    agent
        .interfaces()
        .unwrap()
        .interfaces
        .into_iter()
        .map(|i| i.name)
        .collect()
}

/// UDP packets in `/metrics` of the agent in `netns`, by (hop, direction).
fn udp_packets_by_hop(netns: &str) -> BTreeMap<(String, String), f64> {
    let (status, body) = http_get(netns, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let mut out = BTreeMap::new();
    for s in parse_exposition(&body).unwrap() {
        if s.name == "flowtrace_packets_total" && s.label("protocol") == "udp" {
            *out.entry((s.label("hop").to_string(), s.label("direction").to_string()))
                .or_insert(0.0) += s.value;
        }
    }
    out
}

fn hops(pairs: &[(&str, &str)]) -> BTreeMap<(String, String), f64> {
    pairs
        .iter()
        .map(|(h, d)| ((h.to_string(), d.to_string()), COUNT as f64))
        .collect()
}

fn check_shape(cni: Cni) {
    let mut cluster = Cluster::up(&ClusterOptions {
        nodes: 2,
        pods_per_node: vec!["pod-a".into(), "pod-b".into()],
        cni,
        ..ClusterOptions::default()
    })
    .unwrap();
    let agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&cluster.node(i).unwrap().netns, &[]).unwrap())
        .collect();

    for (i, agent) in agents.iter().enumerate() {
        let node = i + 1;
        let listed = agent.interfaces().unwrap();
        assert_eq!(
            traced(agent),
            expected_interfaces(&cluster, node),
            "{cni:?} node{node}: traced interfaces; the agent said {listed:#?}"
        );
        for rec in &listed.interfaces {
            let want = if Some(rec.name.as_str()) == cni.overlay() {
                "overlay"
            } else {
                "pod"
            };
            assert_eq!(rec.role, want, "{cni:?} node{node}: {rec:?}");
        }
        // The uplink is a veth whose peer is in another namespace: named as the uplink, with
        // its address as the evidence.
        let eth0 = listed
            .not_traced
            .iter()
            .find(|r| r.name == "eth0")
            .unwrap_or_else(|| panic!("{cni:?} node{node}: eth0 not listed: {listed:#?}"));
        assert_eq!(eth0.role, "uplink", "{cni:?} node{node}: {eth0:?}");
        assert!(
            eth0.why.contains("192.168.50."),
            "{cni:?} node{node}: {eth0:?}"
        );
    }

    // A pod created while the agents run: on the routed shapes its route comes after the
    // veth is up, and the veth is traced once the route says it is a pod's.
    let late = cluster.add_pod(2, "pod-late").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !traced(&agents[1]).contains(&late.host_veth) {
        assert!(
            Instant::now() < deadline,
            "{cni:?}: {} of a pod added later is not traced after 5 s: {:#?}",
            late.host_veth,
            agents[1].interfaces().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(traced(&agents[1]), expected_interfaces(&cluster, 2));

    let (from, to) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(2, "pod-late").unwrap(),
    );
    udp_all_received(from, to, PORT, COUNT, PAYLOAD).unwrap();

    // Once per real hop: the sender's veth and the overlay on node1, the overlay and the
    // receiver's veth on node2; kindnet has no overlay, so one hop per node.
    let (want1, want2) = match cni.overlay() {
        Some(_) => (
            hops(&[("pod", "ingress"), ("overlay", "egress")]),
            hops(&[("overlay", "ingress"), ("pod", "egress")]),
        ),
        None => (hops(&[("pod", "ingress")]), hops(&[("pod", "egress")])),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut got1, mut got2);
    loop {
        got1 = udp_packets_by_hop(&agents[0].netns);
        got2 = udp_packets_by_hop(&agents[1].netns);
        if (got1 == want1 && got2 == want2) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        got1, want1,
        "{cni:?} node1: UDP packets by (hop, direction)"
    );
    assert_eq!(
        got2, want2,
        "{cni:?} node2: UDP packets by (hop, direction)"
    );
    // Still exact a drain later: nothing (the encapsulated copies on eth0) arrives late.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        udp_packets_by_hop(&agents[0].netns),
        want1,
        "{cni:?} node1, later"
    );
    assert_eq!(
        udp_packets_by_hop(&agents[1].netns),
        want2,
        "{cni:?} node2, later"
    );

    for a in agents {
        a.stop().unwrap();
    }
    cluster.down().unwrap();
}

#[test]
fn flannel_bridge_and_vxlan() {
    check_shape(Cni::Flannel);
}

#[test]
fn calico_routed_veths_and_vxlan() {
    check_shape(Cni::Calico);
}

#[test]
fn kindnet_ptp_veths_without_overlay() {
    check_shape(Cni::Kindnet);
}
