//! `/metrics` on the emulated cluster, read by a real Prometheus server (Debian's
//! `prometheus` package, started by the test in node1's namespace and scraping the agents of
//! both nodes) and checked by `promtool check metrics`. Ground truth: what ftgen sent and
//! received (datagrams and their sizes), the client's own count of connections, and
//! `conntrack -L` for the connections kube-proxy's DNAT sent to the Service's backends. The
//! Kubernetes names come from the fixture API server (a real HTTP server speaking the API's
//! list/watch protocol; the real API server cannot run here). Needs root.

use std::time::{Duration, Instant};

use flowtrace_tests::{http_get, promtool, service_connections, udp_all_received, Bed, Prometheus};

const UDP_COUNT: u64 = 300;
const UDP_PAYLOAD: u64 = 100;
const CONNECTIONS: u64 = 40;

#[test]
fn prometheus_scrapes_both_agents_and_its_answers_match_what_was_sent() {
    // /metrics on the node address as the DaemonSet serves it; the data API stays on loopback.
    let bed = Bed::with_metadata_and(&["--metrics-listen", "0.0.0.0:9651"]).unwrap();
    let c = &bed.cluster;
    let (n1, n2) = (c.node(1).unwrap(), c.node(2).unwrap());
    let prom = Prometheus::start(
        &n1.netns,
        &[
            ("127.0.0.1:9651".to_string(), "node1"),
            (format!("{}:9651", n2.underlay_ip), "node2"),
        ],
    )
    .unwrap();
    // Both agents scraped: `up` is 1 for each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prom.query("up == 1").unwrap();
        if up.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both agents: up = {up:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // UDP between two workloads across the nodes: client (pod-a, node1) -> agent (pod-c, node2).
    let (a1, c2) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-c").unwrap());
    udp_all_received(a1, c2, 7100, UDP_COUNT, UDP_PAYLOAD).unwrap();
    // Connections through the Service, to its backends on both nodes; conntrack's count of
    // them DNATed from the Service address.
    let through_service = service_connections(c, a1, CONNECTIONS).unwrap();

    // promtool accepts both agents' output.
    for n in [n1, n2] {
        let (status, text) = http_get(&n.netns, "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        let (ok, said) = promtool(&text).unwrap();
        assert!(
            ok,
            "promtool check metrics refused {}'s output: {said}",
            n.name
        );
    }

    // Bytes between the two workloads: every datagram's IP + UDP header and payload, at the
    // client's veth on node1 and at the receiver's veth on node2.
    let bytes = (UDP_COUNT * (20 + 8 + UDP_PAYLOAD)) as f64;
    for (node, direction) in [("node1", "ingress"), ("node2", "egress")] {
        let q = format!(
            r#"sum(flowtrace_bytes_total{{node="{node}",src_namespace="default",src_workload="client",dst_namespace="monitoring",dst_workload="agent",protocol="udp",hop="pod",direction="{direction}"}})"#
        );
        assert_eq!(prom.wait_for(&q, bytes).unwrap(), Some(bytes), "{q}");
        let q = q.replace("flowtrace_bytes_total", "flowtrace_packets_total");
        assert_eq!(
            prom.wait_for(&q, UDP_COUNT as f64).unwrap(),
            Some(UDP_COUNT as f64),
            "{q}"
        );
    }
    // Connections through the Service, as conntrack counted them, all seen on node1 (the
    // client's node, where the DNAT happens), split between the two backends.
    let q = r#"sum(flowtrace_nat_translations_total{node="node1",service="default/svc-demo",src_workload="client",dst_workload="backend"})"#;
    assert_eq!(
        prom.wait_for(q, through_service).unwrap(),
        Some(through_service),
        "{q}"
    );
    let per_node = prom.query(
        r#"sum by (dst_pod) (flowtrace_nat_translations_total{node="node1",service="default/svc-demo"})"#,
    ).unwrap();
    assert_eq!(
        per_node.len(),
        1,
        "workload level: no pod label values: {per_node:?}"
    );
    // The dashboard's application map (a node graph) from the same Prometheus: its edges
    // query gives the client -> Service -> backend arrow with the fields the panel reads
    // (id, source, target), its nodes query both workloads.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/flowtrace-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let map = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "nodeGraph")
        .expect("the dashboard has a node graph panel");
    let expr = |ref_id: &str| {
        map["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["refId"] == ref_id)
            .and_then(|t| t["expr"].as_str())
            .unwrap_or_else(|| panic!("node graph target {ref_id}"))
            .replace("$namespace", ".*")
            .replace("$__range", "10m")
    };
    let edges = prom.query(&expr("edges")).unwrap();
    let arrow = edges.iter().find(|(m, _)| {
        m["source"] == "default/client"
            && m["target"] == "default/backend"
            && m["id"] == "default/client -> default/svc-demo -> default/backend"
    });
    assert!(arrow.is_some_and(|(_, v)| *v >= 0.0), "edges: {edges:?}");
    assert_eq!(edges.len(), 1, "one arrow, client -> backend: {edges:?}");
    let nodes = prom.query(&expr("nodes")).unwrap();
    for id in ["default/client", "default/backend"] {
        assert!(nodes.iter().any(|(m, _)| m["id"] == id), "{id}: {nodes:?}");
    }

    // The agent's own health is there too.
    let attached = prom.query("flowtrace_attached_interfaces").unwrap();
    assert_eq!(attached.len(), 2, "{attached:?}");
    assert!(attached.iter().all(|(_, v)| *v >= 4.0), "{attached:?}");
    let synced = prom.query("flowtrace_metadata_synced == 1").unwrap();
    assert_eq!(synced.len(), 2, "{synced:?}");
}
