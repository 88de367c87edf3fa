//! The shipped alerting rules (deploy/alerts/flowtrace-rules.yaml), loaded into a real Prometheus
//! server (Debian's `prometheus` package, in node1's namespace, scraping both nodes' agents
//! every second) and evaluated against the live agents. Node1's agent is sent more distinct
//! flows than its `--max-flows` holds, so `FlowtraceFlowTableNearFull` must fire for node1,
//! and for node1 only: nothing fires before the traffic, node2 (which sees none of it) stays
//! quiet, and `FlowtraceMetadataNotSynced` (metadata comes from the fixture API server) does
//! not fire. The rules are the shipped file with every `for:` set to 0s (read and rewritten
//! here, the expressions untouched), evaluated every second, so the test takes seconds instead
//! of the 15 minutes of the shipped `for:`. Ground truth is what the test sent: FLOWS UDP
//! datagrams from FLOWS distinct source ports (flows), counted by ftgen's sender and sink.
//! Needs root.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use flowtrace_tests::{finish, ftgen, ftgen_bg, Bed, Prometheus};
use serde_json::Value;

/// Node1's and node2's agents' --max-flows.
const MAX_FLOWS: usize = 40;
/// Distinct flows sent on node1: five times what its table holds.
const FLOWS: u64 = 200;
const PORT: u16 = 7310;

/// The shipped rules with every `for:` at 0s, as a file Prometheus reads (JSON is YAML).
fn shipped_rules_without_for() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy/alerts/flowtrace-rules.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut rules: Value = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
    let mut rewritten = 0;
    for g in rules["groups"].as_array_mut().expect("groups").iter_mut() {
        for r in g["rules"].as_array_mut().expect("rules").iter_mut() {
            if let Some(f) = r.get_mut("for") {
                *f = Value::from("0s");
                rewritten += 1;
            }
        }
    }
    assert!(rewritten > 0, "{}: no rule has a `for:`", path.display());
    serde_json::to_string_pretty(&rules).expect("rules as JSON")
}

/// The alerts Prometheus has firing now: (alert name, node label, the alert).
fn firing(prom: &Prometheus) -> Vec<(String, String, Value)> {
    prom.alerts()
        .unwrap()
        .into_iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["labels"]["node"].as_str().unwrap_or("").to_owned(),
                a,
            )
        })
        .collect()
}

#[test]
fn prometheus_fires_flow_table_near_full_for_the_agent_sent_more_flows_than_it_holds() {
    let max = MAX_FLOWS.to_string();
    let bed = Bed::with_metadata_and(&[
        "--metrics-listen",
        "0.0.0.0:9651",
        "--max-flows",
        max.as_str(),
    ])
    .unwrap();
    let c = &bed.cluster;
    let (n1, n2) = (c.node(1).unwrap(), c.node(2).unwrap());
    let prom = Prometheus::start_with_rules(
        &n1.netns,
        &[
            ("127.0.0.1:9651".to_string(), "node1"),
            (format!("{}:9651", n2.underlay_ip), "node2"),
        ],
        &[("flowtrace-rules.yaml", shipped_rules_without_for())],
    )
    .unwrap();

    // Both agents scraped, their tables' capacity what the test set, and the rules loaded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = prom
            .query(&format!("flowtrace_flow_table_capacity == {MAX_FLOWS}"))
            .unwrap();
        let loaded = prom
            .api("rules", &[("type", "alert")])
            .unwrap()
            .and_then(|d| d["groups"].as_array().map(Vec::len))
            .unwrap_or(0);
        if caps.len() == 2 && loaded == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both agents and load the two rule groups: capacity {caps:?}, {loaded} groups\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A few evaluations over two scrapes of each agent (rate() and increase() need two
    // samples): no traffic was sent, nothing fires.
    std::thread::sleep(Duration::from_secs(4));
    let before = firing(&prom);
    assert!(
        before.is_empty(),
        "alerts fire before the test sent anything: {:?}",
        before
            .iter()
            .map(|(n, node, _)| (n, node))
            .collect::<Vec<_>>()
    );

    // FLOWS flows between two pods of node1 (one datagram from each of FLOWS source ports),
    // all of them arrived: node2 sees none of them.
    let (a1, b1) = (c.pod(1, "pod-a").unwrap(), c.pod(1, "pod-b").unwrap());
    let count = FLOWS.to_string();
    let sink = ftgen_bg(
        b1,
        &[
            "udp-sink",
            "--bind",
            &format!("0.0.0.0:{PORT}"),
            "--count",
            &count,
            "--timeout-ms",
            "20000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        a1,
        &[
            "udp-send",
            "--to",
            &format!("{}:{PORT}", b1.ipv4),
            "--count",
            &count,
            "--sockets",
            &count,
            "--interval-us",
            "200",
        ],
    )
    .unwrap();
    let got = finish(sink).unwrap();
    assert_eq!(sent["sent"], FLOWS, "udp-send: {sent}");
    assert_eq!(got["received"], FLOWS, "udp-sink: {got}");
    assert_eq!(
        sent["local_ports"].as_array().map(|p| p
            .iter()
            .filter_map(Value::as_u64)
            .collect::<std::collections::BTreeSet<_>>()
            .len()),
        Some(FLOWS as usize),
        "udp-send used {FLOWS} distinct source ports: {sent}"
    );

    // The alert fires for node1.
    let deadline = Instant::now() + Duration::from_secs(30);
    let now = loop {
        let now = firing(&prom);
        if now
            .iter()
            .any(|(n, node, _)| n == "FlowtraceFlowTableNearFull" && node == "node1")
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "FlowtraceFlowTableNearFull does not fire for node1 after {FLOWS} flows against --max-flows {MAX_FLOWS}; firing: {:?}, node1's table: {:?}\n{}",
            now.iter().map(|(n, node, _)| (n, node)).collect::<Vec<_>>(),
            prom.query("flowtrace_flow_table_entries").unwrap(),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let (_, _, alert) = now
        .iter()
        .find(|(n, node, _)| n == "FlowtraceFlowTableNearFull" && node == "node1")
        .expect("found above");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert_eq!(
        alert["annotations"]["summary"], "flowtrace flow table on node1 is over 90% full",
        "{alert}"
    );
    assert_eq!(
        alert["annotations"]["runbook_url"], "deploy/README.md#flowtraceflowtablenearfull",
        "{alert}"
    );
    // Nothing else fires but what the traffic tripped on node1 (a full table also evicts):
    // not node2's table, not the metadata alert, nothing on node2.
    for (name, node, a) in &now {
        assert!(
            node == "node1"
                && matches!(
                    name.as_str(),
                    "FlowtraceFlowTableNearFull" | "FlowtraceFlowTableEvicting"
                ),
            "{name} fires for node `{node}`, which the test did not trip: {a}"
        );
    }
    let metadata: Vec<_> = prom
        .alerts()
        .unwrap()
        .into_iter()
        .filter(|a| a["labels"]["alertname"] == "FlowtraceMetadataNotSynced")
        .collect();
    assert!(
        metadata.is_empty(),
        "FlowtraceMetadataNotSynced is active with metadata synced from the API server: {metadata:?}"
    );
}
