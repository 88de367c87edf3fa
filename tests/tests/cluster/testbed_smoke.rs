//! Smoke tests of the test bed itself: the emulated cluster must forward pod traffic within and
//! across nodes (IPv4 and IPv6), translate Service traffic like kube-proxy, carry malformed frames
//! unchanged across the bridge, send nothing nobody asked for, and leave no namespace behind.
//! Needs root.
//!
//! Run: `cargo test --release -p flowtrace-tests --test cluster testbed_smoke -- --test-threads=1`

use std::net::IpAddr;
use std::path::Path;

use flowtrace_tests::{list_netns, sweep_stale, ChildGuard, Cluster, ClusterOptions, Pod};
use serde_json::Value;

fn up() -> Cluster {
    flowtrace_tests::require_root().unwrap();
    Cluster::up(&ClusterOptions::default()).expect("bringing the cluster up")
}

/// `ftgen <args>` inside `pod`, waited for (the library's helper, failing the test on error).
fn ftgen(pod: &Pod, args: &[&str]) -> Value {
    flowtrace_tests::ftgen(pod, args).unwrap()
}

/// `ftgen <args>` started in `pod`; returns once its socket is bound.
fn ftgen_bg(pod: &Pod, args: &[&str]) -> ChildGuard {
    flowtrace_tests::ftgen_bg(pod, args).unwrap()
}

fn finish(guard: ChildGuard) -> Value {
    flowtrace_tests::finish(guard).unwrap()
}

fn ping(from: &Pod, to: IpAddr) {
    let out = from.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &to.to_string()]);
    assert!(
        out.is_ok(),
        "ping {to} from {}: {:?}",
        from.netns,
        out.err()
    );
}

#[test]
fn pods_reach_each_other_on_ipv4_and_ipv6() {
    let c = up();
    let a1 = c.pod(1, "pod-a").unwrap();
    let a2 = c.pod(2, "pod-a").unwrap();
    let c1 = c.pod(1, "pod-c").unwrap();
    // Across nodes (VXLAN) and on the same bridge, both families.
    for to in [a2, c1] {
        ping(a1, to.ipv4.into());
        ping(a1, to.ipv6.into());
    }
    ping(a2, a1.ipv4.into());
    // The MAC the cluster reports is the one the pod has.
    assert_eq!(
        ftgen(a1, &["mac", "--iface", "eth0"])["mac"],
        a1.mac.as_str()
    );
    assert!(a1.host_veth_ifindex().unwrap() > 0);
    assert_eq!(c.pod_by_ip(a2.ipv6.into()), Some(a2));
    c.down().unwrap();
}

#[test]
fn udp_crosses_nodes_and_service_vip() {
    let c = up();
    let a1 = c.pod(1, "pod-a").unwrap();
    let b2 = c.pod(2, "pod-b").unwrap();

    for (bind, to) in [
        ("0.0.0.0:9000", format!("{}:9000", b2.ipv4)),
        ("[::]:9001", format!("[{}]:9001", b2.ipv6)),
    ] {
        let sink = ftgen_bg(
            b2,
            &[
                "udp-sink",
                "--bind",
                bind,
                "--count",
                "50",
                "--timeout-ms",
                "5000",
            ],
        );
        let sent = ftgen(
            a1,
            &[
                "udp-send",
                "--to",
                &to,
                "--count",
                "50",
                "--size",
                "200",
                "--interval-us",
                "500",
            ],
        );
        assert_eq!(sent["sent"], 50);
        let got = finish(sink);
        assert_eq!(got["received"], 50, "sink saw {got}");
        assert_eq!(got["bytes"], 50 * 200);
    }

    // UDP to the ClusterIP: DNAT to a pod-b, echo un-DNATed back (one socket = one conntrack
    // entry, so all datagrams go to the same backend; the other sink just times out).
    let echo_args = [
        "udp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--count",
        "10",
        "--echo",
        "--timeout-ms",
        "5000",
    ];
    let sinks: Vec<ChildGuard> = [c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-b").unwrap()]
        .iter()
        .map(|p| ftgen_bg(p, &echo_args))
        .collect();
    let sent = ftgen(
        a1,
        &[
            "udp-send",
            "--to",
            "10.96.0.10:53",
            "--count",
            "10",
            "--expect-echo",
        ],
    );
    assert_eq!(sent["echoed"], 10, "echoes through the Service: {sent}");
    drop(sinks);
    c.down().unwrap();
}

#[test]
fn tcp_to_service_vip_is_dnated_to_both_backends() {
    let c = up();
    let a1 = c.pod(1, "pod-a").unwrap();
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        "20",
        "--timeout-ms",
        "20000",
        "--idle-timeout-ms",
        "1500",
        "--echo-bytes",
        "100",
    ];
    let backends = [c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-b").unwrap()];
    let sinks: Vec<ChildGuard> = backends.iter().map(|p| ftgen_bg(p, &sink_args)).collect();

    let sent = ftgen(
        a1,
        &[
            "tcp-send",
            "--to",
            "10.96.0.10:80",
            "--bytes",
            "1000",
            "--connections",
            "20",
        ],
    );
    assert_eq!(sent["connections"], 20);
    assert_eq!(sent["sent_bytes"], 20_000);
    // Every connection got its 100-byte answer: replies were un-DNATed on node1, for the
    // same-node backend (bridged, needs br_netfilter) and the remote one (via flannel.1).
    assert_eq!(sent["received_bytes"], 20 * 100, "{sent}");

    let results: Vec<Value> = sinks.into_iter().map(finish).collect();
    let total: u64 = results
        .iter()
        .map(|r| r["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 20, "{results:?}");
    for (r, p) in results.iter().zip(backends) {
        // 0.5^20 odds of a false failure: kube-proxy's random split reached both.
        assert!(
            r["connections"].as_u64().unwrap() > 0,
            "{} got no connection: {results:?}",
            p.netns
        );
        assert_eq!(r["errors"], 0);
        // Pod sources are not masqueraded.
        for peer in r["peers"].as_array().unwrap() {
            assert!(
                peer.as_str().unwrap().starts_with(&format!("{}:", a1.ipv4)),
                "{r}"
            );
        }
    }
    c.down().unwrap();
}

#[test]
fn nodeport_is_masqueraded_and_answered() {
    let c = up();
    let a1 = c.pod(1, "pod-a").unwrap();
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        "10",
        "--timeout-ms",
        "20000",
        "--idle-timeout-ms",
        "1500",
        "--echo-bytes",
        "10",
    ];
    let sinks: Vec<ChildGuard> = [c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-b").unwrap()]
        .iter()
        .map(|p| ftgen_bg(p, &sink_args))
        .collect();
    let node2 = c.node(2).unwrap();
    let to = format!("{}:30080", node2.underlay_ip);
    let sent = ftgen(
        a1,
        &[
            "tcp-send",
            "--to",
            &to,
            "--bytes",
            "100",
            "--connections",
            "10",
        ],
    );
    assert_eq!(sent["received_bytes"], 10 * 10, "{sent}");
    let results: Vec<Value> = sinks.into_iter().map(finish).collect();
    let total: u64 = results
        .iter()
        .map(|r| r["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 10, "{results:?}");
    // NodePort traffic is SNATed by node2 (KUBE-MARK-MASQ), so backends never see pod-a's IP.
    for r in &results {
        for peer in r["peers"].as_array().unwrap() {
            assert!(
                !peer.as_str().unwrap().starts_with(&format!("{}:", a1.ipv4)),
                "{r}"
            );
        }
    }
    c.down().unwrap();
}

/// Ethernet + IPv4 frame from `src` to `dst` MAC, with the given IPv4 header (checksum computed
/// over it as given) and L4 bytes.
fn ipv4_frame(dst_mac: &str, src_mac: &str, ip_header: &mut [u8], l4: &[u8]) -> String {
    let mac = |m: &str| m.replace(':', "");
    let total = (ip_header.len() + l4.len()) as u16;
    ip_header[2..4].copy_from_slice(&total.to_be_bytes());
    ip_header[10..12].copy_from_slice(&[0, 0]);
    let csum = ipv4_checksum(ip_header);
    ip_header[10..12].copy_from_slice(&csum.to_be_bytes());
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}{}0800{}{}",
        mac(dst_mac),
        mac(src_mac),
        hex(ip_header),
        hex(l4)
    )
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `frame` on `a`'s eth0 and returns the IPv4 frames from `a` to `b` that `b` captured.
fn send_and_capture(a: &Pod, b: &Pod, frame: &str, timeout_ms: &str) -> Vec<String> {
    // Only the unicast pair the test's frame uses: anything the kernels send unasked goes to
    // multicast addresses.
    let cap = ftgen_bg(
        b,
        &[
            "raw-capture",
            "--iface",
            "eth0",
            "--count",
            "1",
            "--timeout-ms",
            timeout_ms,
            "--ethertype",
            "0x0800",
            "--src-mac",
            &a.mac,
            "--dst-mac",
            &b.mac,
        ],
    );
    let sent = ftgen(a, &["raw-send", "--iface", "eth0", "--hex", frame]);
    assert_eq!(sent["sent"], 1);
    let got = finish(cap);
    got["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn header(ihl_words: u8, protocol: u8, src: &Pod, dst: &Pod) -> Vec<u8> {
    let mut h = vec![
        0x40 | ihl_words,
        0,
        0,
        0,
        0x12,
        0x34,
        0x40,
        0,
        64,
        protocol,
        0,
        0,
    ];
    h.extend_from_slice(&src.ipv4.octets());
    h.extend_from_slice(&dst.ipv4.octets());
    h
}

#[test]
fn malformed_frames_cross_the_bridge_unchanged() {
    let c = up();
    let a = c.pod(1, "pod-a").unwrap();
    let b = c.pod(1, "pod-b").unwrap();

    // Valid IPv4 header, but a TCP header claiming a 8-byte length (data offset 2) and cut short.
    // br_netfilter validates only the IP header, so this is bridged to pod-b untouched.
    let mut h = header(5, 6, a, b);
    let bad_tcp = [0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0x20, 0x02];
    let frame = ipv4_frame(&b.mac, &a.mac, &mut h, &bad_tcp);
    assert_eq!(send_and_capture(a, b, &frame, "3000"), vec![frame.clone()]);

    // IHL=3 (a 12-byte "header"). With bridge-nf-call-iptables=1 (as Kubernetes requires) the
    // bridge's br_netfilter drops it before forwarding (br_validate_ipv4: ihl < 5)...
    let mut short = header(3, 17, a, b);
    short.truncate(12);
    let payload = [0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0];
    let frame = ipv4_frame(&b.mac, &a.mac, &mut short, &payload);
    let got = send_and_capture(a, b, &frame, "700");
    assert!(
        got.is_empty(),
        "br_netfilter let an IHL=3 frame through: sent {frame}, got {got:?}"
    );
    // ...and with br_netfilter off for the node it arrives byte-identical.
    let node1 = c.node(1).unwrap();
    node1
        .sysctl("net.bridge.bridge-nf-call-iptables", "0")
        .unwrap();
    assert_eq!(send_and_capture(a, b, &frame, "3000"), vec![frame.clone()]);
    node1
        .sysctl("net.bridge.bridge-nf-call-iptables", "1")
        .unwrap();
    c.down().unwrap();
}

/// Once `Cluster::up` (or `add_pod`) returned, no interface of the cluster sends anything by
/// itself: no router solicitation, no late MLD or IGMP report. Ground truth: tcpdump on every
/// interface of both node namespaces (the pods' veth peers, `cni0`, `flannel.1`, the underlay),
/// for longer than an unsettled pod takes to send its second router solicitation (4 s after
/// link-up).
#[test]
fn a_settled_cluster_sends_nothing_unasked() {
    let mut c = up();
    c.add_pod(1, "pod-late").unwrap();
    // SIGINT after 6 s: tcpdump prints what it caught and exits 0 (so does timeout, with
    // --preserve-status).
    let dumps: Vec<ChildGuard> = c
        .nodes
        .iter()
        .map(|n| {
            n.spawn_guarded(&[
                "timeout",
                "--preserve-status",
                "-s",
                "INT",
                "6",
                "tcpdump",
                "-i",
                "any",
                "-n",
                "-e",
                "-l",
            ])
            .unwrap()
        })
        .collect();
    for (node, dump) in c.nodes.iter().zip(dumps) {
        let out = dump
            .wait_output(std::time::Duration::from_secs(15))
            .unwrap();
        let frames = String::from_utf8_lossy(&out.stdout);
        assert!(
            frames.trim().is_empty(),
            "{} sent frames nobody asked for:\n{frames}",
            node.name
        );
    }
    c.down().unwrap();
}

#[test]
fn pods_come_and_go_and_teardown_leaves_nothing() {
    let mut c = up();
    let prefix = c.prefix.clone();
    let ours = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .cloned()
            .collect()
    };
    // 2 nodes + 3 pods each.
    assert_eq!(ours(&list_netns().unwrap()).len(), 8);

    let late = c.add_pod(2, "pod-late").unwrap();
    assert_eq!(c.pod(2, "pod-late").unwrap(), &late);
    assert!(late.host_veth.len() <= 15);
    ping(c.pod(1, "pod-a").unwrap(), late.ipv4.into());
    ping(c.pod(1, "pod-a").unwrap(), late.ipv6.into());
    assert!(
        c.add_pod(2, "pod-late").is_err(),
        "duplicate pod names must be refused"
    );
    let gone = c.remove_pod(2, "pod-late").unwrap();
    assert!(!list_netns().unwrap().contains(&gone.netns));
    assert!(c.pod(2, "pod-late").is_err());

    c.down().unwrap();
    assert_eq!(ours(&list_netns().unwrap()), Vec::<String>::new());

    // Drop tears down too.
    let c = up();
    let prefix = c.prefix.clone();
    drop(c);
    let left: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sweep_removes_namespaces_of_dead_runs_only() {
    // A pid that certainly belonged to a process that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let stale = format!("ft{dead}x0-node1");
    flowtrace_tests::netns::add_netns(&stale).unwrap();
    let live = format!("ft{}x999999-node1", std::process::id());
    flowtrace_tests::netns::add_netns(&live).unwrap();

    let swept = sweep_stale().unwrap();
    let names = list_netns().unwrap();
    flowtrace_tests::netns::del_netns(&live).unwrap();
    assert!(swept.contains(&stale), "swept {swept:?}");
    assert!(!names.contains(&stale));
    assert!(names.contains(&live), "a live run's namespace was swept");
}
