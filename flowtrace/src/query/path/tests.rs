use super::*;
use crate::{
    model::{
        wire::{NatState, Translation},
        EndpointKind, HookView, HopRecord, Workload,
    },
    testutil::tcp as t,
};

pub(crate) fn pod(name: &str, workload: &str, node: &str) -> Endpoint {
    Endpoint {
        kind: EndpointKind::Pod,
        namespace: Some("default".into()),
        name: name.into(),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: workload.into(),
        }),
        node: Some(node.into()),
    }
}

pub(crate) fn flow(
    tuple: FlowTuple,
    hops: &[(&str, Direction, u64)],
    nat: Option<(FlowTuple, FlowTuple)>,
) -> FlowRecord {
    let ends = |ip: std::net::IpAddr| match ip.to_string().as_str() {
        "10.244.1.2" => Some(pod("pod-a", "client", "node1")),
        "10.244.2.3" => Some(pod("pod-b", "backend", "node2")),
        _ => None,
    };
    FlowRecord {
        protocol: "tcp".into(),
        protocol_number: 6,
        ip_version: 4,
        src: tuple.src,
        dst: tuple.dst,
        src_port: tuple.src_port,
        dst_port: tuple.dst_port,
        packets: 10,
        bytes: 1000,
        payload_bytes: 600,
        hops: hops
            .iter()
            .map(|(i, d, first)| HopRecord {
                interface: i.to_string(),
                ifindex: 1,
                direction: *d,
                packets: 10,
                bytes: 1000,
                payload_bytes: 600,
                first_seen_unix_ns: *first,
                last_seen_unix_ns: 1_000_000_000,
                tcp_flags: "SAF".into(),
                dropped_after: 0,
            })
            .collect(),
        src_endpoint: ends(tuple.src),
        dst_endpoint: ends(tuple.dst),
        service: nat.map(|_| ServiceRef {
            namespace: "default".into(),
            name: "svc-demo".into(),
            port_name: None,
        }),
        nat: nat.map(|(o, x)| Translation {
            original: o.into(),
            translated: x.into(),
            rewrote: if o.src == x.src { "dst" } else { "src" }.into(),
            between: None,
            state: NatState::Confirmed,
            source: "kernel+conntrack".into(),
            kernel_sightings: 1,
            service: None,
        }),
        src_peer: None,
        dst_peer: None,
        drops: Vec::new(),
        dropped: 0,
        retransmits: 0,
    }
}

pub(crate) fn lat(
    kind: LatencyKind,
    tuple: FlowTuple,
    from: Option<(&str, Direction)>,
    to: (&str, Direction),
    ns: &[u64],
) -> LatencyRecord {
    let mut h = LatencyHist::default();
    for n in ns {
        h.add(*n);
    }
    crate::model::hist::record(
        kind,
        tuple.into(),
        from.map(|(i, d)| HookView {
            interface: i.into(),
            direction: d,
        }),
        HookView {
            interface: to.0.into(),
            direction: to.1,
        },
        &h,
    )
}

pub(crate) use Direction::{Egress as E, Ingress as I};

/// pod-a on node1 -> Service VIP -> (DNAT on node1) -> pod-b on node2, and back.
pub(crate) fn service_across_nodes(
    sport: u16,
) -> (
    Vec<FlowRecord>,
    Vec<FlowRecord>,
    Vec<LatencyRecord>,
    Vec<LatencyRecord>,
) {
    let req = t("10.244.1.2", sport, "10.96.0.10", 80);
    let req2 = t("10.244.1.2", sport, "10.244.2.3", 8080);
    let rep2 = req2.reversed();
    let rep = req.reversed();
    let node1 = vec![
        flow(req, &[("veth-a", I, 100)], Some((req, req2))),
        flow(req2, &[("flannel.1", E, 110)], Some((req, req2))),
        flow(rep2, &[("flannel.1", I, 300)], Some((rep2, rep))),
        flow(rep, &[("veth-a", E, 310)], Some((rep2, rep))),
    ];
    let node2 = vec![
        flow(req2, &[("flannel.1", I, 50), ("veth-b", E, 55)], None),
        flow(rep2, &[("veth-b", I, 90), ("flannel.1", E, 95)], None),
    ];
    let l1 = vec![
        lat(
            LatencyKind::Handshake,
            req,
            None,
            ("veth-a", E),
            &[2_100_000],
        ),
        lat(
            LatencyKind::Handshake,
            req2,
            None,
            ("flannel.1", I),
            &[2_080_000],
        ),
        lat(
            LatencyKind::Hop,
            req2,
            Some(("veth-a", I)),
            ("flannel.1", E),
            &[10_000],
        ),
        lat(
            LatencyKind::Response,
            req,
            None,
            ("veth-a", E),
            &[22_100_000],
        ),
        lat(
            LatencyKind::Response,
            req2,
            None,
            ("flannel.1", I),
            &[22_080_000],
        ),
    ];
    let l2 = vec![
        lat(
            LatencyKind::Handshake,
            req2,
            None,
            ("flannel.1", E),
            &[60_000],
        ),
        lat(LatencyKind::Handshake, req2, None, ("veth-b", I), &[40_000]),
        lat(
            LatencyKind::Response,
            req2,
            None,
            ("flannel.1", E),
            &[20_060_000],
        ),
        lat(
            LatencyKind::Response,
            req2,
            None,
            ("veth-b", I),
            &[20_040_000],
        ),
    ];
    (node1, node2, l1, l2)
}

pub(crate) fn views(
    node1: Vec<FlowRecord>,
    node2: Vec<FlowRecord>,
    l1: Vec<LatencyRecord>,
    l2: Vec<LatencyRecord>,
) -> Vec<NodeView> {
    let tunnels: HashSet<String> = ["flannel.1".to_string()].into();
    vec![
        // node2 first: the order agents are given in must not matter.
        NodeView {
            node: "node2".into(),
            flows: node2,
            latency: l2,
            tunnels: tunnels.clone(),
        },
        NodeView {
            node: "node1".into(),
            flows: node1,
            latency: l1,
            tunnels,
        },
    ]
}

pub(crate) fn hops_of(leg: &Leg) -> Vec<String> {
    leg.steps
        .iter()
        .map(|s| match s {
            // A drop says how many and where, beyond `Step::label`.
            Step::Drop {
                node,
                reason,
                device,
                packets,
                ..
            } => format!("{node} drop {packets} {reason} at {device}"),
            other => other.label(),
        })
        .collect()
}

/// Packets dropped on node2 after the overlay (a FORWARD rule) show where the path ends
/// and why, after the last hop that saw them; two connections dropped alike add up.
#[test]
fn a_drop_is_a_step_after_the_last_hop_that_saw_the_packets() {
    let mut flows1 = Vec::new();
    let mut flows2 = Vec::new();
    for sport in [40001, 40002] {
        let (n1, mut n2, _, _) = service_across_nodes(sport);
        let req2 = n2[0].clone();
        n2[0].hops.truncate(1);
        n2[0].drops = vec![crate::model::wire::DropRecord {
            reason: "NETFILTER_DROP".into(),
            reason_code: 12,
            packets: 3,
            bytes: 300,
            device: "flannel.1".into(),
            ifindex: 7,
            netns: crate::model::wire::DropNetns::Node,
            pod_veth: None,
            after: None,
            location: None,
            last_seen_unix_ns: req2.hops[0].last_seen_unix_ns,
        }];
        n2.truncate(1);
        flows1.extend(n1.into_iter().take(2));
        flows2.extend(n2);
    }
    let v = views(flows1, flows2, Vec::new(), Vec::new());
    let ps = paths(
        &v,
        &PathEnd::parse("workload/default/client").unwrap(),
        &PathEnd::parse("svc/default/svc-demo").unwrap(),
        0,
        0,
    );
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert_eq!(ps[0].connections, 2);
    assert_eq!(
        hops_of(&ps[0].request),
        [
            "node1 veth-a ingress",
            "node1 nat dst",
            "node1 flannel.1 egress",
            "node2 flannel.1 ingress",
            "node2 drop 6 NETFILTER_DROP at flannel.1"
        ]
    );
}

#[test]
fn a_service_connection_across_nodes_is_one_path_with_its_nat_and_reply() {
    let (n1, n2, l1, l2) = service_across_nodes(40000);
    let v = views(n1, n2, l1, l2);
    let ps = paths(
        &v,
        &PathEnd::parse("workload/default/client").unwrap(),
        &PathEnd::parse("svc/default/svc-demo").unwrap(),
        0,
        0,
    );
    assert_eq!(ps.len(), 1, "{ps:#?}");
    let p = &ps[0];
    assert_eq!(p.connections, 1);
    assert_eq!(
        hops_of(&p.request),
        [
            "node1 veth-a ingress",
            "node1 nat dst",
            "node1 flannel.1 egress",
            "node2 flannel.1 ingress",
            "node2 veth-b egress"
        ]
    );
    assert_eq!(
        hops_of(p.reply.as_ref().unwrap()),
        [
            "node2 veth-b ingress",
            "node2 flannel.1 egress",
            "node1 flannel.1 ingress",
            "node1 nat src",
            "node1 veth-a egress"
        ]
    );
    let segs: Vec<(bool, Option<i64>)> = p
        .segments
        .iter()
        .map(|s| (s.in_node, s.handshake_rtt_ns))
        .collect();
    assert_eq!(
        segs,
        [
            (true, Some(20_000)),
            (false, Some(2_020_000)),
            (true, Some(20_000))
        ]
    );
    assert_eq!(p.server_time_ns, Some(20_040_000));
    assert_eq!(p.network_time_ns, Some(2_060_000));
    let Step::Hop { from_previous, .. } = &p.request.steps[2] else {
        panic!()
    };
    assert_eq!(from_previous.as_ref().map(|s| s.mean_ns), Some(10_000));
    assert_eq!(
        p.dst_endpoint.as_ref().map(|e| e.name.as_str()),
        Some("pod-b")
    );
}

#[test]
fn connections_on_the_same_hops_are_summed_and_other_ends_left_out() {
    let (mut n1, mut n2, mut l1, mut l2) = service_across_nodes(40000);
    let (a, b, c, d) = service_across_nodes(40001);
    n1.extend(a);
    n2.extend(b);
    l1.extend(c);
    l2.extend(d);
    let v = views(n1, n2, l1, l2);
    let ps = paths(
        &v,
        &PathEnd::parse("pod/default/pod-a").unwrap(),
        &PathEnd::parse("workload/default/backend").unwrap(),
        0,
        0,
    );
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].connections, 2);
    let Step::Hop {
        packets,
        handshake_rtt,
        ..
    } = &ps[0].request.steps[0]
    else {
        panic!()
    };
    assert_eq!(*packets, 20);
    assert_eq!(
        handshake_rtt.as_ref().map(|h| (h.samples, h.mean_ns)),
        Some((2, 2_100_000))
    );
    // Nothing goes from the backend to the client as a request.
    let none = paths(
        &v,
        &PathEnd::parse("workload/default/backend").unwrap(),
        &PathEnd::parse("workload/default/client").unwrap(),
        0,
        0,
    );
    assert!(none.is_empty(), "{none:#?}");
    // A window that ends before the last sighting leaves everything out.
    let old = paths(
        &v,
        &PathEnd::parse("workload/default/client").unwrap(),
        &PathEnd::parse("svc/default/svc-demo").unwrap(),
        1,
        10_000_000_000,
    );
    assert!(old.is_empty());
}

#[test]
fn path_ends_parse_or_say_what_is_expected() {
    assert_eq!(
        PathEnd::parse("10.0.0.1").unwrap(),
        PathEnd::Ip("10.0.0.1".parse().unwrap())
    );
    assert!(matches!(
        PathEnd::parse("deploy/shop/frontend").unwrap(),
        PathEnd::Workload { .. }
    ));
    let e = PathEnd::parse("frontend").unwrap_err();
    assert!(e.contains("pod/NAMESPACE/NAME"), "{e}");
    let e = PathEnd::parse("gadget/a/b").unwrap_err();
    assert!(e.contains("unknown kind"), "{e}");
    assert!(PathEnd::parse("pod/Bad_NS/x").is_err());
}

#[test]
fn latency_records_turn_back_into_the_same_histograms() {
    let r = lat(
        LatencyKind::Hop,
        t("1.1.1.1", 1, "2.2.2.2", 2),
        None,
        ("x", I),
        &[1, 900, 5_000, 5_100, 70_000_000],
    );
    let h = hist_of(&r);
    let mut want = LatencyHist::default();
    for n in [1, 900, 5_000, 5_100, 70_000_000] {
        want.add(n);
    }
    assert_eq!(h.buckets, want.buckets);
    assert_eq!(
        (h.count, h.min_ns, h.max_ns),
        (want.count, want.min_ns, want.max_ns)
    );
}
