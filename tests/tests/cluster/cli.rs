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
