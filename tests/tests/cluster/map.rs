//! The application's map on the SockShop scenario (`flowtrace_tests::sockshop`): three nodes,
//! the shop's services, databases and queue behind their ClusterIP Services, Locust's
//! shoppers, the fixture API server with the scenario's objects, an agent per node and the
//! relay. Ground truth: the call graph the scenario defines, the bytes and connections its
//! own processes counted, and `conntrack -L` on every node for the Service of each edge.

use std::{collections::BTreeSet, time::Duration};

use flowtrace::query::map::MapAnswer;
use flowtrace_tests::{
    relay::{RelayBed, RelayOptions},
    sockshop::{self, CALLS, NAMESPACE, WORKLOADS},
};

fn id(workload: &str) -> String {
    format!("workload/{NAMESPACE}/{workload}")
}

fn map_of(v: &serde_json::Value) -> MapAnswer {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not a map ({e}): {v:#}"))
}

/// Payload bytes within 1% (and 2 bytes) of the applications' own count.
fn close(flowtrace: u64, truth: u64) -> bool {
    flowtrace.abs_diff(truth) <= (truth / 100).max(2)
}

#[test]
fn the_sockshop_map_is_its_call_graph_with_the_bytes_its_processes_counted() {
    flowtrace_tests::require_root().unwrap();
    let cluster = sockshop::cluster().unwrap();
    let objects = sockshop::objects(&cluster).unwrap();
    let bed = RelayBed::up_on(cluster, objects, &RelayOptions::default()).unwrap();
    let relay = bed.relay().unwrap();
    relay
        .wait_nodes_ok(&["node1", "node2", "node3"], Duration::from_secs(20))
        .unwrap();

    let shop = sockshop::start(&bed.cluster).unwrap();
    let summary = sockshop::load(&bed.cluster, 6, 12).unwrap();
    let counts = shop.stop().unwrap();
    assert!(
        counts.errors().is_empty(),
        "{:#?}\n{summary}",
        counts.errors()
    );

    // What each edge must be, from the processes' own counts: (request, reply, connections).
    let pod_ips = |w: &str| -> Vec<String> {
        bed.cluster
            .pods()
            .filter(|p| p.name == w)
            .map(|p| p.ipv4.to_string())
            .collect()
    };
    let truth = |client: &str, server: &str| -> (u64, u64, u64) {
        if client == "load-test" {
            // Locust does not count what it sends; the front-end counts what it served it.
            let ip = &pod_ips("load-test")[0];
            counts.served(server, ip)
        } else {
            counts.calls(client, server)
        }
    };
    for (c, s) in CALLS {
        assert!(truth(c, s).2 > 0, "{c} never called {s}: {summary}");
    }

    // The agents drain every 500 ms: wait until every edge has all its connections.
    let complete = |m: &MapAnswer| {
        CALLS.iter().all(|(c, s)| {
            m.edges
                .iter()
                .find(|e| e.from == id(c) && e.to == id(s))
                .is_some_and(|e| e.connections >= truth(c, s).2)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = map_of(&relay.get_json("/v1/map?window_s=0").unwrap());
        if complete(&m) || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let table: Vec<String> = CALLS
        .iter()
        .map(|(c, s)| {
            let e = m.edges.iter().find(|e| e.from == id(c) && e.to == id(s));
            format!(
                "{c} -> {s}: applications {:?}, flowtrace {:?}",
                truth(c, s),
                e.map(|e| (
                    e.request_payload_bytes,
                    e.reply_payload_bytes,
                    e.connections
                ))
            )
        })
        .collect();
    assert!(
        complete(&m),
        "edges still incomplete after 20 s:\n{}",
        table.join("\n")
    );
    eprintln!("{}", table.join("\n"));
    assert!(m.missing.is_empty(), "{:?}", m.missing);
    assert_eq!(m.nodes, ["node1", "node2", "node3"]);

    // Every edge of the call graph and nothing else, each through its server's Service.
    let got: BTreeSet<(String, String)> = m
        .edges
        .iter()
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = CALLS.iter().map(|(c, s)| (id(c), id(s))).collect();
    assert_eq!(
        got,
        want,
        "edges: {:#?}",
        m.edges.iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    assert_eq!(m.edges.len(), CALLS.len(), "one edge per call");
    for e in &m.edges {
        let (client, server) = (
            e.from.rsplit('/').next().unwrap(),
            e.to.rsplit('/').next().unwrap(),
        );
        let svc = e.service.as_ref().map(ToString::to_string);
        assert_eq!(svc, Some(format!("{NAMESPACE}/{server}")), "{}", e.id);
        let port = WORKLOADS
            .iter()
            .find(|w| w.name == server)
            .unwrap()
            .target_port;
        assert_eq!((e.protocol.as_str(), e.port), ("tcp", port), "{}", e.id);
        let (request, reply, connections) = truth(client, server);
        assert_eq!(e.connections, connections, "{}: connections", e.id);
        assert!(
            close(e.request_payload_bytes, request) && close(e.reply_payload_bytes, reply),
            "{}: flowtrace counted {} bytes of requests and {} of replies, the applications \
             {request} and {reply}",
            e.id,
            e.request_payload_bytes,
            e.reply_payload_bytes
        );
        assert!(e.handshake_rtt.is_some(), "{}: no handshake measured", e.id);
        let client_nodes: Vec<String> = bed
            .cluster
            .pods()
            .filter(|p| p.name == client)
            .map(|p| p.node.clone())
            .collect();
        assert!(
            client_nodes.contains(&e.nodes[0]),
            "{}: starts on {:?}, the client runs on {client_nodes:?}",
            e.id,
            e.nodes
        );
        assert!(!e.paths.is_empty() && !e.hops.is_empty(), "{}", e.id);
    }

    // The Service of each edge is the one kube-proxy translated it through: conntrack on the
    // client's node has each connection from the client to the Service's address answered by
    // a pod of the server, and as many as the edge counts.
    let mut tables = String::new();
    for n in &bed.cluster.nodes {
        let out =
            flowtrace_tests::netns::exec(&n.netns, &["conntrack", "-L", "-p", "tcp"]).unwrap();
        tables.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    for e in &m.edges {
        let (client, server) = (
            e.from.rsplit('/').next().unwrap(),
            e.to.rsplit('/').next().unwrap(),
        );
        let vip = sockshop::cluster_ip(server).unwrap().to_string();
        let (clients, servers) = (pod_ips(client), pod_ips(server));
        let field = |l: &str, key: &str, nth: usize| -> Option<String> {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .nth(nth)
                .map(str::to_string)
        };
        let entries: Vec<&str> = tables
            .lines()
            .filter(|l| {
                field(l, "dst=", 0).as_deref() == Some(vip.as_str())
                    && field(l, "src=", 0).is_some_and(|s| clients.contains(&s))
            })
            .collect();
        assert_eq!(
            entries.len() as u64,
            e.tuples,
            "{}: conntrack has {} connections to {vip}:\n{}",
            e.id,
            entries.len(),
            entries.join("\n")
        );
        for l in entries {
            let answered_by = field(l, "src=", 1).unwrap_or_default();
            assert!(
                servers.contains(&answered_by),
                "{}: conntrack translated {vip} to {answered_by}, not a pod of {server}: {l}",
                e.id
            );
        }
    }

    // The page: the relay serves it at /map; written as a file with this map inlined, a
    // headless Chromium draws every vertex and edge of it, and a real click on an edge shows
    // that edge's path hop by hop (its NAT step included). The screenshot is left in the
    // test's output directory.
    let (status, page) = relay.get("/map").unwrap();
    assert_eq!(status, 200);
    assert_eq!(page, flowtrace::server::page::MAP_PAGE);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/map");
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("sockshop-map.html");
    std::fs::write(
        &html,
        flowtrace::server::page::static_map_page(&serde_json::to_string(&m).unwrap()),
    )
    .unwrap();
    let mut b = flowtrace_tests::browser::Browser::launch().unwrap();
    b.navigate(&format!("file://{}", html.display())).unwrap();
    b.wait_for(
        "document.body.dataset.ready === '1'",
        Duration::from_secs(15),
    )
    .unwrap();
    let drawn = b
        .eval(
            "({v: [...document.querySelectorAll('#map g.vertex')].map(g => g.dataset.id).sort(), \
               e: [...document.querySelectorAll('#map g.edge')].map(g => g.dataset.id).sort()})",
        )
        .unwrap();
    let mut want_v: Vec<&str> = m.vertices.iter().map(|v| v.id.as_str()).collect();
    let mut want_e: Vec<&str> = m.edges.iter().map(|e| e.id.as_str()).collect();
    want_v.sort();
    want_e.sort();
    assert_eq!(
        drawn["v"],
        serde_json::json!(want_v),
        "vertices on the page"
    );
    assert_eq!(drawn["e"], serde_json::json!(want_e), "edges on the page");
    let edge = m
        .edges
        .iter()
        .find(|e| e.from == id("front-end") && e.to == id("catalogue"))
        .unwrap();
    let eid = serde_json::to_string(&edge.id).unwrap();
    let (x, y) = b
        .edge_click_point(&edge.id)
        .unwrap()
        .unwrap_or_else(|| panic!("no point of {eid} can be clicked"));
    b.click_at(x, y).unwrap();
    b.wait_for(
        &format!("document.getElementById('edge-detail').dataset.edge === {eid}"),
        Duration::from_secs(5),
    )
    .unwrap();
    let shown = b
        .eval(
            "[...document.querySelectorAll('#edge-detail .path[data-path=\"0\"] .leg[data-leg=\"request\"] .step')]\
               .map(s => [s.dataset.step, s.dataset.node, s.dataset.interface || null])",
        )
        .unwrap();
    let want: Vec<serde_json::Value> = edge.paths[0]
        .request
        .steps
        .iter()
        .map(|st| match st {
            flowtrace::query::path::Step::Hop {
                node, interface, ..
            } => serde_json::json!(["hop", node, interface]),
            flowtrace::query::path::Step::Nat { node, .. } => {
                serde_json::json!(["nat", node, null])
            }
            flowtrace::query::path::Step::Drop { node, .. } => {
                serde_json::json!(["drop", node, null])
            }
        })
        .collect();
    assert_eq!(shown, serde_json::json!(want), "the panel's steps of {eid}");
    assert!(
        want.iter().any(|s| s[0] == "nat"),
        "{eid} went through a DNAT"
    );
    let png = dir.join("sockshop-map.png");
    let bytes = b.screenshot(&png).unwrap();
    assert!(bytes > 50_000, "{}: {bytes} bytes", png.display());
    eprintln!("the page: {} and {}", html.display(), png.display());
    drop(b);

    // The CLI through the relay: a row per edge, and a Graphviz graph of the same edges.
    let text = relay.cli("map", &["--window-s", "0"]).unwrap();
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    for (c, s) in CALLS {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("{NAMESPACE}/{c} "))
                    && l.contains(&format!("{NAMESPACE}/{s} "))),
            "no row {c} -> {s}:\n{text}"
        );
    }
    eprintln!("{text}");
    let dot = relay.cli("map", &["--window-s", "0", "--dot"]).unwrap();
    let dot = String::from_utf8_lossy(&dot.stdout).to_string();
    assert!(dot.starts_with("digraph flowtrace {"), "{dot}");
    // Each edge is drawn client -> Service -> server.
    assert_eq!(dot.matches(" -> ").count(), 2 * CALLS.len(), "{dot}");
}
