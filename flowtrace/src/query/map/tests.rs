use super::*;
use crate::{
    model::{Direction, FlowRecord, LatencyKind},
    query::path::tests::{flow, lat, service_across_nodes, views, E, I},
    testutil::tcp as t,
};

fn two_connections_through_the_service() -> Vec<NodeView> {
    let (mut n1, mut n2, mut l1, mut l2) = service_across_nodes(40000);
    let (m1, m2, k1, k2) = service_across_nodes(40001);
    n1.extend(m1);
    n2.extend(m2);
    l1.extend(k1);
    l2.extend(k2);
    views(n1, n2, l1, l2)
}

#[test]
fn connections_through_a_service_are_one_edge_between_the_workloads() {
    let m = map(
        &two_connections_through_the_service(),
        &MapFilter::default(),
        0,
        0,
    );
    let ids: Vec<&str> = m.vertices.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "svc/default/svc-demo",
            "workload/default/backend",
            "workload/default/client"
        ]
    );
    let backend = &m.vertices[1];
    assert_eq!(
        (backend.kind, backend.workload_kind.as_deref()),
        (VertexKind::Workload, Some("Deployment"))
    );
    assert_eq!(backend.nodes, ["node2"]);
    assert_eq!(m.nodes, ["node1", "node2"]);
    assert_eq!(m.edges.len(), 1, "{:#?}", m.edges);
    let e = &m.edges[0];
    assert_eq!(
        e.id,
        "workload/default/client -> svc/default/svc-demo -> workload/default/backend tcp/8080"
    );
    assert_eq!(
        (e.from.as_str(), e.to.as_str()),
        ("workload/default/client", "workload/default/backend")
    );
    assert_eq!(
        e.service.as_ref().map(ToString::to_string).as_deref(),
        Some("default/svc-demo")
    );
    assert_eq!((e.protocol.as_str(), e.port), ("tcp", 8080));
    assert_eq!((e.connections, e.tuples), (2, 2));
    // Each connection: 10 packets, 1000 bytes at the client's veth, and as many back.
    assert_eq!((e.request_packets, e.request_bytes), (20, 2000));
    assert_eq!((e.reply_packets, e.reply_bytes), (20, 2000));
    assert_eq!(
        (e.request_payload_bytes, e.reply_payload_bytes),
        (1200, 1200)
    );
    // First sighting 50 ns (node2's clock), last 1 s: the rate is over at least a second.
    assert_eq!(e.bytes_per_s, 4000.0);
    assert_eq!(e.nodes, ["node1", "node2"]);
    assert_eq!(
        e.hops,
        [
            "node1 veth-a ingress",
            "node1 nat dst",
            "node1 flannel.1 egress",
            "node2 flannel.1 ingress",
            "node2 veth-b egress"
        ]
    );
    // The client's first hook saw handshakes of 2.1 ms and answers of 22.1 ms; the server's
    // last hook answers of 20.04 ms: 2.06 ms of the round trip is the network's.
    let hs = e.handshake_rtt.as_ref().unwrap();
    assert_eq!((hs.samples, hs.mean_ns), (2, 2_100_000));
    assert_eq!(e.server_time.as_ref().unwrap().mean_ns, 20_040_000);
    assert_eq!(e.network_time_ns, Some(2_060_000));
    assert_eq!(e.paths.len(), 1);
    assert_eq!(e.paths[0].connections, 2);
}

#[test]
fn filters_keep_the_edges_of_a_namespace_or_a_workload() {
    let v = two_connections_through_the_service();
    let mut f = MapFilter::default();
    assert!(f.take_pair("namespace", "other").unwrap());
    assert!(map(&v, &f, 0, 0).edges.is_empty());
    f.take_pair("namespace", "default").unwrap();
    assert_eq!(map(&v, &f, 0, 0).edges.len(), 1);
    let mut f = MapFilter::default();
    f.take_pair("workload", "default/backend").unwrap();
    assert_eq!(map(&v, &f, 0, 0).edges.len(), 1);
    let mut f = MapFilter::default();
    f.take_pair("workload", "default/nobody").unwrap();
    let m = map(&v, &f, 0, 0);
    assert!(m.edges.is_empty() && m.vertices.is_empty(), "{m:#?}");
    assert_eq!(
        f.to_query(),
        "workload=default%2Fnobody",
        "what the CLI sends is what the API reads"
    );
    assert!(!f.take_pair("window_s", "5").unwrap());
    assert!(f.take_pair("workload", "nobody").is_err());
    assert!(f.take_pair("namespace", "Not_A_Namespace").is_err());
}

#[test]
fn addresses_without_metadata_are_their_own_vertices_and_old_connections_leave() {
    // 10.0.0.9 is nobody the metadata knows; one UDP exchange on node1, last seen at 1 s.
    let req = t("10.244.1.2", 5000, "10.0.0.9", 53);
    let mut f: FlowRecord = flow(req, &[("veth-a", I, 100)], None);
    f.protocol = "udp".into();
    let mut back = flow(req.reversed(), &[("veth-a", E, 200)], None);
    back.protocol = "udp".into();
    let v = views(
        Vec::new(),
        vec![f, back],
        Vec::new(),
        vec![lat(
            LatencyKind::Hop,
            req,
            Some(("x", Direction::Ingress)),
            ("y", E),
            &[1],
        )],
    );
    let m = map(&v, &MapFilter::default(), 0, 0);
    assert_eq!(m.edges.len(), 1, "{:#?}", m.edges);
    assert_eq!(m.edges[0].to, "ip/10.0.0.9");
    assert_eq!(m.edges[0].port, 53);
    assert!(m.vertices.iter().any(|v| v.kind == VertexKind::External));
    // Seen last at 1 s: within a 5 s window at 3 s, not within 1 s at 3 s.
    assert_eq!(
        map(&v, &MapFilter::default(), 5_000_000_000, 3_000_000_000)
            .edges
            .len(),
        1
    );
    assert!(map(&v, &MapFilter::default(), 1_000_000_000, 3_000_000_000)
        .edges
        .is_empty());
}

#[test]
fn map_queries_parse_or_say_what_is_wrong() {
    let (f, w) =
        map_query("window_s=30&namespace=sock-shop&workload=sock-shop%2Ffront-end").unwrap();
    assert_eq!(w, std::time::Duration::from_secs(30));
    assert_eq!(f.namespaces, ["sock-shop"]);
    assert_eq!(
        f.workloads,
        [("sock-shop".to_string(), "front-end".to_string())]
    );
    assert_eq!(
        map_query(&f.to_query()).unwrap().0,
        f,
        "what the CLI sends is what the API reads"
    );
    assert!(map_query("window_s=soon").unwrap_err().contains("window_s"));
    assert!(map_query("colour=red")
        .unwrap_err()
        .contains("unknown parameter"));
    assert!(map_query("workload=front-end")
        .unwrap_err()
        .contains("NAMESPACE/NAME"));
}
