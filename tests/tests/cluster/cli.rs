//! `flowtrace flows` against a live agent: filters select exactly the flows they describe,
//! and a filter that cannot be parsed is rejected with the reason before anything is fetched.

use std::process::Command;

use flowtrace::model::wire::FlowsResponse;
use flowtrace_tests::{finish, flowtrace_bin, ftgen, ftgen_bg, Bed};

fn cli(netns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(flowtrace_bin().unwrap())
        .arg("flows")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_filters_are_rejected_with_the_reason() {
    let bin = flowtrace_bin().unwrap();
    for (args, needle) in [
        (
            vec!["--ip", "10.244.1.300"],
            "expected an IPv4/IPv6 address or CIDR",
        ),
        (
            vec!["--ip", "10.0.0.0/40"],
            "prefix length must be a number from 0 to 32",
        ),
        (
            vec!["--port", "70000"],
            "expected a port number from 1 to 65535",
        ),
        (
            vec!["--proto", "tpc"],
            "expected tcp, udp, icmp, icmpv6, sctp",
        ),
        (vec!["--iface", "eth 0"], "cannot contain"),
    ] {
        let out = Command::new(&bin)
            .arg("flows")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // No agent listening here: a clear error, exit 1.
    let out = Command::new(&bin)
        .args(["flows", "--agent", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the flowtrace agent"), "{err}");
}

#[test]
fn filters_select_flows_and_the_table_shows_hops() {
    let bed = Bed::up().unwrap();
    let (a, b, c) = (
        bed.cluster.pod(1, "pod-a").unwrap(),
        bed.cluster.pod(1, "pod-b").unwrap(),
        bed.cluster.pod(1, "pod-c").unwrap(),
    );
    for (dst, port) in [(b, 24001u16), (c, 24002)] {
        let sink = ftgen_bg(
            dst,
            &[
                "udp-sink",
                "--bind",
                &format!("0.0.0.0:{port}"),
                "--count",
                "10",
                "--timeout-ms",
                "10000",
            ],
        )
        .unwrap();
        ftgen(
            a,
            &[
                "udp-send",
                "--to",
                &format!("{}:{port}", dst.ipv4),
                "--count",
                "10",
                "--size",
                "10",
            ],
        )
        .unwrap();
        assert_eq!(finish(sink).unwrap()["received"], 10);
    }
    let ns = &bed.cluster.node(1).unwrap().netns;
    let out = cli(ns, &["--json", "--proto", "udp", "--port", "24002"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp: FlowsResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resp.flows.len(), 1, "{:#?}", resp.flows);
    assert_eq!(resp.flows[0].dst, std::net::IpAddr::from(c.ipv4));

    let out = cli(
        ns,
        &[
            "--json",
            "--ip",
            &format!("{}/32", b.ipv4),
            "--proto",
            "udp",
        ],
    );
    let resp: FlowsResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert!(resp.flows.iter().all(
        |f| f.src == std::net::IpAddr::from(b.ipv4) || f.dst == std::net::IpAddr::from(b.ipv4)
    ));
    assert!(resp.flows.iter().any(|f| f.dst_port == 24001));

    let out = cli(ns, &["--json", "--iface", &c.host_veth, "--port", "24001"]);
    let resp: FlowsResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        resp.flows.is_empty(),
        "pod-b's flow never crossed pod-c's veth: {:#?}",
        resp.flows
    );

    let out = cli(ns, &["--port", "24001"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.contains(":24001"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains(&format!("{}/in > {}/out", a.host_veth, b.host_veth)),
        "{row}"
    );
    assert!(
        row.split_whitespace().any(|w| w == "10"),
        "10 packets: {row}"
    );
}

/// Sixteen clients asking `/v1/flows` at once cost the agent a drain or two, not sixteen,
/// and every one of them still sees the datagrams sent just before it asked; `limit` keeps
/// the largest flows and says the answer was cut.
#[test]
fn concurrent_readers_share_drains_and_see_fresh_flows() {
    // A slow periodic drain, so the drains counted are the readers'.
    let bed = Bed::with_metadata_and(&["--drain-interval-ms", "600000"]).unwrap();
    let (a, b) = (
        bed.cluster.pod(1, "pod-a").unwrap(),
        bed.cluster.pod(1, "pod-b").unwrap(),
    );
    let agent = bed.agent(1);
    let send = |port: u16, count: u32, size: u32| {
        let sink = ftgen_bg(
            b,
            &[
                "udp-sink",
                "--bind",
                &format!("0.0.0.0:{port}"),
                "--count",
                &count.to_string(),
                "--timeout-ms",
                "10000",
            ],
        )
        .unwrap();
        ftgen(
            a,
            &[
                "udp-send",
                "--to",
                &format!("{}:{port}", b.ipv4),
                "--count",
                &count.to_string(),
                "--size",
                &size.to_string(),
            ],
        )
        .unwrap();
        assert_eq!(finish(sink).unwrap()["received"], count);
    };
    send(24101, 7, 10);
    send(24102, 3, 500);
    let before = agent.stats().unwrap().drains;
    let netns = agent.netns.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (netns, barrier) = (netns.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                flowtrace_tests::agent::http_get(&netns, "/v1/flows?proto=udp&port=24101")
            })
        })
        .collect();
    for r in readers {
        let (status, body) = r.join().unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        let resp: FlowsResponse = serde_json::from_str(&body).unwrap();
        let pod_b_in = resp
            .flows
            .iter()
            .find(|f| f.dst_port == 24101)
            .unwrap_or_else(|| panic!("the flow sent before the burst is missing: {body}"));
        assert_eq!(pod_b_in.packets, 7, "{body}");
    }
    let drains = agent.stats().unwrap().drains - before;
    // /v1/stats does not drain; the sixteen readers: the first drains, those that arrived
    // during its drain share the next one.
    assert!(
        (1..=3).contains(&drains),
        "16 concurrent readers cost {drains} drains"
    );
    // limit: of the two UDP flows out of pod-a, the one with more bytes.
    let resp: FlowsResponse = agent
        .get(&format!("/v1/flows?proto=udp&ip={}&limit=1", a.ipv4))
        .unwrap();
    assert_eq!(resp.flows.len(), 1);
    assert!(resp.truncated && resp.matched >= 2, "{resp:?}");
    assert_eq!(resp.flows[0].dst_port, 24102, "{resp:?}");
}
