//! Bounded cardinality on the emulated cluster: many distinct pods, each with its own flows,
//! against agents labelling by pod with a small series cap. Every family stays at or under
//! the cap, what did not fit is counted as folded, and no traffic is lost from the totals: the
//! named series plus the `other` series add up to what the senders sent (ground truth: the
//! senders' and the sink's own counts). Then the pods are deleted from the API; nothing updates
//! their series any more, and they expire after the TTL. The pods are extra addresses on one
//! pod's interface, each registered as its own Pod object in the fixture API server (a real
//! HTTP server speaking the API's list/watch protocol; the real API server cannot run here).
//! Needs root.

use std::time::{Duration, Instant};

use flowtrace_tests::{finish, ftgen, ftgen_bg, http_get, parse_exposition, promtool, Bed, Sample};
use serde_json::json;

/// Distinct source pods.
const PODS: usize = 120;
/// Flows (source ports) per pod, one datagram each, to a UDP sink.
const FLOWS_PER_POD: u64 = 2;
const PAYLOAD: u64 = 100;
/// The agents' --metrics-max-series: far fewer than the pod pairs the flood creates.
const CAP: usize = 40;
/// The agents' --metrics-series-ttl-s: longer than the flood and the checks take on a busy
/// machine (checked: nothing expires before the totals are compared).
const TTL_S: u64 = 45;
/// Hops each node's agent sees a datagram at: node1 the source pod's veth and flannel.1,
/// node2 flannel.1 and the destination pod's veth.
const HOPS_PER_NODE: u64 = 2;

fn flood_ip(i: usize) -> String {
    format!("10.244.1.{}", 100 + i)
}

fn scrape(netns: &str) -> (String, Vec<Sample>) {
    let (status, text) = http_get(netns, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let samples = parse_exposition(&text).unwrap();
    (text, samples)
}

/// The value of the sample `name{metric="<family>"}`.
fn per_family(samples: &[Sample], name: &str, family: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name && s.label("metric") == family)
        .unwrap_or_else(|| panic!("no {name}{{metric=\"{family}\"}} in /metrics"))
        .value
}

#[test]
fn a_flood_of_pods_stays_under_the_series_cap_and_the_overflow_is_counted() {
    let cap = CAP.to_string();
    let ttl = TTL_S.to_string();
    let bed = Bed::with_metadata_and(&[
        "--metrics-level",
        "pod",
        "--metrics-max-series",
        &cap,
        "--metrics-series-ttl-s",
        &ttl,
    ])
    .unwrap();
    let c = &bed.cluster;
    let (src, dst) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-c").unwrap());

    // The pods: addresses on pod-a's eth0 (node1's pod CIDR, unused by the emulated pods), each
    // a bare Pod in namespace `flood` as far as the API server says.
    for i in 0..PODS {
        let ip = flood_ip(i);
        src.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])
            .unwrap();
        bed.api().unwrap()
            .apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "flood", "name": format!("flood-{i}"), "labels": {"app": "flood"}},
                "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap();
    }
    // Both agents hold every flood pod before traffic starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &c.nodes {
        loop {
            let (_, body) = http_get(&node.netns, "/v1/metadata").unwrap();
            let meta: serde_json::Value = serde_json::from_str(&body).unwrap();
            if meta["objects"]["pods"].as_u64().unwrap_or(0) >= (PODS + c.pods().count()) as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never learned the flood pods: {meta}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The flood: every pod sends one datagram on each of FLOWS_PER_POD flows to pod-c on node2.
    let datagrams = PODS as u64 * FLOWS_PER_POD;
    let sink = ftgen_bg(
        dst,
        &[
            "udp-sink",
            "--bind",
            "0.0.0.0:7300",
            "--count",
            &datagrams.to_string(),
            "--timeout-ms",
            "60000",
        ],
    )
    .unwrap();
    let to = format!("{}:7300", dst.ipv4);
    let mut sent = 0;
    for i in 0..PODS {
        let out = ftgen(
            src,
            &[
                "udp-send",
                "--to",
                &to,
                "--bind",
                &flood_ip(i),
                "--count",
                &FLOWS_PER_POD.to_string(),
                "--sockets",
                &FLOWS_PER_POD.to_string(),
                "--size",
                &PAYLOAD.to_string(),
            ],
        )
        .unwrap();
        sent += out["sent"].as_u64().unwrap();
    }
    let got = finish(sink).unwrap();
    assert_eq!(sent, datagrams);
    assert_eq!(
        got["received"], datagrams,
        "the emulated network lost datagrams: {got}"
    );
    let peers = got["peers"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        peers,
        PODS * FLOWS_PER_POD as usize,
        "distinct sender flows as the sink saw them: {got}"
    );

    // Each agent: every family at or under the cap, the overflow counted, and the flood's
    // packets all in the totals (named flood series plus `other`).
    let want_packets = datagrams * HOPS_PER_NODE;
    let want_bytes = want_packets * (20 + 8 + PAYLOAD);
    let mut flood_series = Vec::new();
    for node in &c.nodes {
        // Drained every 500 ms: wait until the flood is all counted (or 20 s passed).
        let deadline = Instant::now() + Duration::from_secs(20);
        let (text, samples) = loop {
            let (text, samples) = scrape(&node.netns);
            let (named, other) = flood_and_other(&samples, "flowtrace_packets_total");
            if named + other >= want_packets as f64 || Instant::now() > deadline {
                break (text, samples);
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let (ok, said) = promtool(&text).unwrap();
        assert!(ok, "promtool check metrics on {}: {said}", node.name);

        for family in [
            "flowtrace_bytes_total",
            "flowtrace_packets_total",
            "flowtrace_nat_translations_total",
            "flowtrace_hop_latency_seconds",
            "flowtrace_tcp_rtt_seconds",
        ] {
            let held = per_family(&samples, "flowtrace_metrics_series", family);
            assert!(
                held <= CAP as f64,
                "{}: {family} holds {held} series, cap {CAP}",
                node.name
            );
        }
        let limit = samples
            .iter()
            .find(|s| s.name == "flowtrace_metrics_series_limit")
            .map(|s| s.value);
        assert_eq!(limit, Some(CAP as f64), "{}", node.name);
        // The exposition itself: series of the traffic families, counted line by line.
        for name in ["flowtrace_bytes_total", "flowtrace_packets_total"] {
            let lines = samples.iter().filter(|s| s.name == name).count();
            assert!(
                lines <= CAP,
                "{}: {lines} {name} series exported, cap {CAP}",
                node.name
            );
            assert_eq!(
                lines as f64,
                per_family(&samples, "flowtrace_metrics_series", name),
                "{}: flowtrace_metrics_series disagrees with the exposition for {name}",
                node.name
            );
        }
        let named: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "flowtrace_packets_total" && s.label("src_namespace") == "flood")
            .collect();
        let named_pods: std::collections::BTreeSet<&str> =
            named.iter().map(|s| s.label("src_pod")).collect();
        assert!(
            named_pods.len() < PODS,
            "{}: all {PODS} flood pods have their own series under a cap of {CAP}",
            node.name
        );
        let folded = per_family(
            &samples,
            "flowtrace_metrics_folded_total",
            "flowtrace_packets_total",
        );
        assert!(
            folded >= 1.0,
            "{}: flood pods lack series but nothing was counted as folded",
            node.name
        );
        let expired = per_family(
            &samples,
            "flowtrace_metrics_series_expired_total",
            "flowtrace_packets_total",
        );
        assert_eq!(
            expired, 0.0,
            "{}: series expired before the check (TTL_S {TTL_S} s is too short for this machine)",
            node.name
        );
        // Nothing lost: named flood series plus `other` hold every packet of the flood (and
        // `other` may hold a little background traffic that arrived after the cap was reached).
        for (name, want) in [
            ("flowtrace_packets_total", want_packets),
            ("flowtrace_bytes_total", want_bytes),
        ] {
            let (named, other) = flood_and_other(&samples, name);
            assert!(
                named + other >= want as f64 && named + other <= want as f64 * 1.05,
                "{}: {name}: named flood series {named} + other {other}, the flood was {want}",
                node.name
            );
            assert!(other > 0.0, "{}: {name}: nothing in `other`", node.name);
        }
        eprintln!(
            "{}: {} flood pods named, {} updates folded, {} packet series",
            node.name,
            named_pods.len(),
            folded,
            per_family(
                &samples,
                "flowtrace_metrics_series",
                "flowtrace_packets_total"
            )
        );
        flood_series.push(named.len());
    }

    // The pods go away; nothing updates their series, which expire after the TTL.
    for i in 0..PODS {
        assert!(bed
            .api()
            .unwrap()
            .delete("Pod", "flood", &format!("flood-{i}"))
            .unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(TTL_S + 15);
    for (node, had) in c.nodes.iter().zip(flood_series) {
        loop {
            let (_, samples) = scrape(&node.netns);
            let left = samples
                .iter()
                .filter(|s| s.label("src_namespace") == "flood")
                .count();
            if left == 0 {
                let expired = per_family(
                    &samples,
                    "flowtrace_metrics_series_expired_total",
                    "flowtrace_packets_total",
                );
                assert!(
                    expired >= had as f64,
                    "{}: {had} flood series went but only {expired} expiries were counted",
                    node.name
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {left} series of deleted pods still exported {}s after the flood",
                node.name,
                TTL_S + 15
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Sums of counter `name` over the flood pods' own series and over the `other` series.
fn flood_and_other(samples: &[Sample], name: &str) -> (f64, f64) {
    let sum = |ns: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && s.label("src_namespace") == ns)
            .map(|s| s.value)
            .sum()
    };
    (sum("flood"), sum(flowtrace::metrics::OTHER))
}
