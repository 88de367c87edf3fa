//! NAT translations on the emulated cluster: every Service connection kube-proxy's rules
//! translate appears in the agent with its original and translated tuple, in both
//! directions, and the set equals what `conntrack -L` (conntrack-tools, independent of
//! flowtrace) lists for the node. Needs root.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use flowtrace::model::FlowRecord;
use flowtrace::{
    model::wire::NatResponse,
    model::{NatState, TupleView},
};
use flowtrace_tests::{
    conntrack_list, finish, ftgen, ftgen_bg, ftgen_bin, service_connections, Bed, Cluster, Tuple,
};

fn view(t: &TupleView) -> Tuple {
    (t.protocol, t.src, t.src_port, t.dst, t.dst_port)
}

fn rev(t: Tuple) -> Tuple {
    (t.0, t.3, t.4, t.1, t.2)
}

/// Translations (original, translated, state) from the agent; asks twice so that every
/// translation went through at least two conntrack cross-checks.
/// The (before, after) pairs of `list` that go to or come back from `vip`.
fn through_vip(list: &[(Tuple, Tuple, NatState, String)], vip: IpAddr) -> BTreeSet<(Tuple, Tuple)> {
    list.iter()
        .filter(|(o, t, _, _)| o.3 == vip || t.1 == vip)
        .map(|(o, t, _, _)| (*o, *t))
        .collect()
}

fn translations(bed: &Bed, node: usize) -> (NatResponse, Vec<(Tuple, Tuple, NatState, String)>) {
    let _: NatResponse = bed.agent(node).get("/v1/nat").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let r: NatResponse = bed.agent(node).get("/v1/nat").unwrap();
    let list = r
        .translations
        .iter()
        .map(|t| {
            (
                view(&t.original),
                view(&t.translated),
                t.state,
                t.source.clone(),
            )
        })
        .collect();
    (r, list)
}

/// What conntrack says the two rewrites of each connection are: original direction
/// `orig -> reply reversed`, reply direction `reply -> orig reversed`.
fn expected(ct: &[(Tuple, Tuple)]) -> BTreeSet<(Tuple, Tuple)> {
    ct.iter()
        .flat_map(|&(o, r)| [(o, rev(r)), (r, rev(o))])
        .collect()
}

/// Every translation of `want` names the demo Service and its port.
fn assert_service_named(list: &NatResponse, want: &BTreeSet<(Tuple, Tuple)>) {
    for t in &list.translations {
        if !want.contains(&(view(&t.original), view(&t.translated))) {
            continue;
        }
        let s = t
            .service
            .as_ref()
            .unwrap_or_else(|| panic!("no Service on {t:?}"));
        let port = if t.original.protocol == 6 {
            "http"
        } else {
            "dns"
        };
        assert_eq!(
            (
                s.namespace.as_str(),
                s.name.as_str(),
                s.port_name.as_deref()
            ),
            ("default", "svc-demo", Some(port)),
            "{t:?}"
        );
    }
}

#[test]
fn clusterip_connections_match_conntrack_in_both_directions() {
    let bed = Bed::with_metadata().unwrap();
    let c = &bed.cluster;
    let a1 = c.pod(1, "pod-a").unwrap();
    let backends = [c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-b").unwrap()];
    let connections = 200;
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        "200",
        "--timeout-ms",
        "60000",
        "--idle-timeout-ms",
        "3000",
        "--echo-bytes",
        "64",
    ];
    let sinks: Vec<_> = backends
        .iter()
        .map(|p| ftgen_bg(p, &sink_args).unwrap())
        .collect();
    let sent = ftgen(
        a1,
        &[
            "tcp-send",
            "--to",
            "10.96.0.10:80",
            "--bytes",
            "300",
            "--connections",
            "200",
        ],
    )
    .unwrap();
    assert_eq!(sent["connections"], connections, "{sent}");
    assert_eq!(sent["received_bytes"], connections * 64, "{sent}");
    let got: u64 = sinks
        .into_iter()
        .map(|s| finish(s).unwrap()["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(got, connections);

    // A UDP exchange through the Service's DNS port (one socket: one conntrack entry).
    let echo = [
        "udp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--count",
        "20",
        "--echo",
        "--timeout-ms",
        "4000",
    ];
    let udp_sinks: Vec<_> = backends
        .iter()
        .map(|p| ftgen_bg(p, &echo).unwrap())
        .collect();
    let sent = ftgen(
        a1,
        &[
            "udp-send",
            "--to",
            "10.96.0.10:53",
            "--count",
            "20",
            "--size",
            "120",
            "--expect-echo",
        ],
    )
    .unwrap();
    assert_eq!(sent["echoed"], 20, "{sent}");
    drop(udp_sinks);

    // Ground truth: node1's conntrack table, every connection to the ClusterIP.
    let node1 = c.node(1).unwrap();
    let ct = conntrack_list(node1, &["-d", "10.96.0.10"]).unwrap();
    let tcp = ct.iter().filter(|(o, _)| o.0 == 6).count();
    let udp = ct.iter().filter(|(o, _)| o.0 == 17).count();
    assert_eq!(
        (tcp, udp),
        (200, 1),
        "conntrack -L -d 10.96.0.10 on node1: {ct:?}"
    );
    let want = expected(&ct);
    assert_eq!(want.len(), 402);

    let (resp, list) = translations(&bed, 1);
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let got = through_vip(&list, vip);
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "flowtrace vs conntrack: {} missing {missing:?}, {} extra {extra:?}",
        missing.len(),
        extra.len()
    );
    // Every one was seen by the kernel programs themselves and confirmed by conntrack.
    for (o, t, state, source) in list.iter().filter(|(o, t, _, _)| want.contains(&(*o, *t))) {
        assert_eq!(
            (*state, source.as_str()),
            (NatState::Confirmed, "kernel+conntrack"),
            "{o:?} -> {t:?}"
        );
    }
    assert_eq!(resp.disagreements, 0, "{:?}", resp.counters);
    assert_service_named(&resp, &want);

    // The flows carry their translation: the client's flow to the VIP names its backend.
    let flows = bed.agent(1).flows().unwrap();
    let (o, r) = ct.iter().find(|(o, _)| o.0 == 6).unwrap();
    let f = flows
        .iter()
        .find(|f| f.src == o.1 && f.src_port == o.2 && f.dst == vip && f.dst_port == 80)
        .expect("the client's flow to the VIP");
    let nat = f
        .nat
        .as_ref()
        .expect("a translation on the flow to the VIP");
    assert_eq!(view(&nat.translated), rev(*r));
    assert_eq!(nat.rewrote, "dst");
    let between = nat.between.as_ref().expect("the hooks around the rewrite");
    assert_eq!(between[0].interface, a1.host_veth);

    // Names, from the fixture API server: every connection to the VIP, in both directions,
    // shows the client pod, the Service and (after the translation) the backend pod.
    let backend_name = |ip: IpAddr| {
        let p = c.pod_by_ip(ip).expect("a backend pod");
        format!("{}-{}", p.name, p.node)
    };
    for (o, r) in &ct {
        for (orig, reply) in [(*o, *r), (*r, *o)] {
            // The flow as the node's hooks saw it before and after the rewrite.
            let before = flow_with(&flows, orig);
            let after = flow_with(&flows, rev(reply));
            let (Some(before), Some(after)) = (before, after) else {
                panic!("flows of {orig:?} / {:?} missing", rev(reply));
            };
            for f in [before, after] {
                let s = f
                    .service
                    .as_ref()
                    .unwrap_or_else(|| panic!("no Service on {f:?}"));
                assert_eq!(
                    (s.namespace.as_str(), s.name.as_str()),
                    ("default", "svc-demo")
                );
            }
        }
        // Forward direction: client pod -> Service VIP, then client pod -> backend pod.
        let fwd = flow_with(&flows, *o).unwrap();
        let src = fwd.src_endpoint.as_ref().expect("client named");
        assert_eq!(
            (
                src.name.as_str(),
                src.workload.as_ref().map(|w| w.name.as_str())
            ),
            ("pod-a-node1", Some("client"))
        );
        let dst = fwd.dst_endpoint.as_ref().expect("VIP named");
        assert_eq!(
            (dst.name.as_str(), format!("{:?}", dst.kind)),
            ("svc-demo", "Service".to_string())
        );
        let translated = flow_with(&flows, rev(*r)).unwrap();
        let be = translated.dst_endpoint.as_ref().expect("backend named");
        assert_eq!(be.name, backend_name(r.1), "{translated:?}");
        assert_eq!(
            be.workload.as_ref().map(|w| w.name.as_str()),
            Some("backend")
        );
    }
    drop(bed);
}

/// `connections` TCP connections from node1's own namespace (as `curl node2:30080` on a
/// node would be) to the NodePort on node2, answered by the pod-b backends on both nodes;
/// checks both ends saw every connection.
fn nodeport_from_node1(c: &Cluster, connections: u64) {
    let backends = [c.pod(1, "pod-b").unwrap(), c.pod(2, "pod-b").unwrap()];
    let n = connections.to_string();
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        &n,
        "--timeout-ms",
        "30000",
        "--idle-timeout-ms",
        "2000",
        "--echo-bytes",
        "10",
    ];
    let sinks: Vec<_> = backends
        .iter()
        .map(|p| ftgen_bg(p, &sink_args).unwrap())
        .collect();
    let (node1, node2) = (c.node(1).unwrap(), c.node(2).unwrap());
    let to = format!("{}:30080", node2.underlay_ip);
    let bin = ftgen_bin().unwrap().to_string_lossy().to_string();
    let out = node1
        .exec(&[
            bin.as_str(),
            "tcp-send",
            "--to",
            &to,
            "--bytes",
            "100",
            "--connections",
            &n,
        ])
        .unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent["received_bytes"], connections * 10, "{sent}");
    let got: u64 = sinks
        .into_iter()
        .map(|s| finish(s).unwrap()["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(got, connections);
}

/// The flow with tuple `t` in `flows`.
fn flow_with(flows: &[FlowRecord], t: Tuple) -> Option<&FlowRecord> {
    flows
        .iter()
        .find(|f| (f.protocol_number, f.src, f.src_port, f.dst, f.dst_port) == t)
}

#[test]
fn nodeport_from_a_node_is_completed_from_conntrack() {
    let bed = Bed::with_metadata().unwrap();
    let c = &bed.cluster;
    nodeport_from_node1(c, 20);
    let node2 = c.node(2).unwrap();

    // node2 translated (DNAT to a backend + masquerade): its conntrack is the ground truth.
    let ct = conntrack_list(node2, &["-p", "tcp", "--orig-port-dst", "30080"]).unwrap();
    assert_eq!(ct.len(), 20, "conntrack on node2: {ct:?}");
    let want = expected(&ct);
    let (resp, list) = translations(&bed, 2);
    let got: BTreeSet<(Tuple, Tuple)> = list
        .iter()
        .filter(|(o, t, _, _)| want.contains(&(*o, *t)))
        .map(|(o, t, _, _)| (*o, *t))
        .collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{} NodePort rewrites missing: {missing:?}",
        missing.len()
    );
    // The packets before DNAT arrive on node2's uplink, which flowtrace does not trace by
    // default, so these come from conntrack, and say so.
    for (o, t, state, source) in list.iter().filter(|(o, t, _, _)| want.contains(&(*o, *t))) {
        assert_eq!(
            (*state, source.as_str()),
            (NatState::ConntrackOnly, "conntrack"),
            "{o:?} -> {t:?}"
        );
    }
    assert!(resp.counters.conntrack_only >= 40, "{:?}", resp.counters);
    assert_eq!(resp.disagreements, 0, "{:?}", resp.counters);
    // The NodePort translations name the Service (by node address and NodePort), and the
    // translated flows name the backend pod conntrack chose.
    assert_service_named(&resp, &want);
    let flows = bed.agent(2).flows().unwrap();
    for (_, r) in &ct {
        let t = rev(*r);
        let f = flow_with(&flows, t).unwrap_or_else(|| panic!("no flow {t:?} on node2"));
        let p = c.pod_by_ip(r.1).expect("a backend pod");
        let be = f.dst_endpoint.as_ref().expect("backend named");
        assert_eq!(be.name, format!("{}-{}", p.name, p.node), "{f:?}");
        let s = f.service.as_ref().expect("Service on the translated flow");
        assert_eq!(s.name, "svc-demo");
    }
    drop(bed);
}

#[test]
fn connections_gone_before_any_dump_are_completed_from_conntrack_events() {
    flowtrace_tests::require_root().unwrap();
    let cluster =
        flowtrace_tests::Cluster::up(&flowtrace_tests::ClusterOptions::default()).unwrap();
    let node2 = cluster.node(2).unwrap();
    // No periodic drain and no resync dump during the test: only the start-up dump, then
    // whatever the events say.
    let agent = flowtrace_tests::Agent::start(
        &node2.netns,
        &[
            "--drain-interval-ms",
            "600000",
            "--conntrack-resync-s",
            "3600",
        ],
    )
    .unwrap();
    nodeport_from_node1(&cluster, 10);

    // Ground truth, then the connections are gone from conntrack before the agent's next
    // dump (there is none): a dump-only agent could not know them any more.
    let ct = conntrack_list(node2, &["-p", "tcp", "--orig-port-dst", "30080"]).unwrap();
    assert_eq!(ct.len(), 10, "conntrack on node2: {ct:?}");
    node2
        .exec(&["conntrack", "-D", "-p", "tcp", "--orig-port-dst", "30080"])
        .unwrap();
    assert!(
        conntrack_list(node2, &["-p", "tcp", "--orig-port-dst", "30080"])
            .unwrap()
            .is_empty()
    );
    std::thread::sleep(Duration::from_millis(300));

    let want = expected(&ct);
    let _: NatResponse = agent.get("/v1/nat").unwrap();
    let r: NatResponse = agent.get("/v1/nat").unwrap();
    let got: BTreeSet<(Tuple, Tuple)> = r
        .translations
        .iter()
        .map(|t| (view(&t.original), view(&t.translated)))
        .filter(|p| want.contains(p))
        .collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{} rewrites missing: {missing:?}",
        missing.len()
    );
    let s = r.conntrack_source;
    assert!(s.subscribed, "{s:?}");
    assert_eq!(s.dumps, 1, "only the start-up dump: {s:?}");
    assert!(s.events >= 20, "10 NEW + 10 DESTROY at least: {s:?}");
    assert_eq!(r.disagreements, 0, "{:?}", r.counters);
    drop(agent);
    cluster.down().unwrap();
}

/// A flood of datagrams identical but for their source port (one packet id for all, fresh
/// tuples, no NAT on their path) from pod-c on node1 to pod-c on node2, while pod-a makes
/// Service connections: neither node records a translation for the flood nor counts a
/// disagreement, and every Service connection is recorded and confirmed as conntrack lists
/// it. Before, consecutive flood packets at two hooks paired as a "rewrite" of the source
/// port, which filled the NAT buffer with phantoms.
#[test]
fn identical_packets_from_fresh_ports_make_no_translation_while_service_connections_are_confirmed()
{
    let bed = Bed::with_metadata().unwrap();
    let c = &bed.cluster;
    let (a1, c1, c2) = (
        c.pod(1, "pod-a").unwrap(),
        c.pod(1, "pod-c").unwrap(),
        c.pod(2, "pod-c").unwrap(),
    );
    let gateway_mac = flowtrace_tests::netns::link_mac(&c1.node_netns, "cni0").unwrap();
    let flood = ftgen_bg(
        c1,
        &[
            "udp-flood",
            "--iface",
            "eth0",
            "--src-mac",
            &c1.mac,
            "--dst-mac",
            &gateway_mac,
            "--src",
            &c1.ipv4.to_string(),
            "--dst",
            &c2.ipv4.to_string(),
            "--dst-port",
            "9999",
            "--ports",
            "20000-59999",
            "--pps",
            "40000",
            "--duration-ms",
            "6000",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let connections = 100;
    let dnat = service_connections(c, a1, connections).unwrap();
    assert_eq!(dnat, connections as f64);
    let flooded = finish(flood).unwrap();
    assert!(flooded["sent"].as_u64().unwrap() > 100_000, "{flooded}");
    assert_eq!(flooded["ports"], 40_000, "{flooded}");

    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let ct = conntrack_list(c.node(1).unwrap(), &["-p", "tcp", "-d", "10.96.0.10"]).unwrap();
    assert_eq!(
        ct.len() as u64,
        connections,
        "conntrack -L on node1: {ct:?}"
    );
    let want = expected(&ct);
    for node in [1, 2] {
        let (resp, list) = translations(&bed, node);
        let stats = bed.agent(node).stats().unwrap();
        let not_rewrites = stats.kernel.get("nat_not_rewrite").copied().unwrap_or(0);
        // Every translation is one of the Service's: the flood made none.
        let phantom: Vec<_> = list
            .iter()
            .filter(|(o, t, _, _)| !(o.3 == vip || t.1 == vip))
            .collect();
        assert!(
            phantom.is_empty(),
            "node{node}: {} translations of traffic that crossed no NAT (nat_not_rewrite \
             {not_rewrites}): {:?}",
            phantom.len(),
            &phantom[..phantom.len().min(5)]
        );
        assert_eq!(resp.disagreements, 0, "node{node}: {:?}", resp.counters);
        assert_eq!(
            stats.kernel.get("nat_map_full").copied().unwrap_or(0),
            0,
            "node{node}"
        );
        // The flood did pair at two hooks on both nodes, and was told apart.
        assert!(
            not_rewrites > 10_000,
            "node{node}: nat_not_rewrite {not_rewrites}: the flood did not pair across hooks"
        );
        if node == 1 {
            let got = through_vip(&list, vip);
            let missing: Vec<_> = want.difference(&got).collect();
            assert!(
                missing.is_empty() && got.len() == want.len(),
                "flowtrace vs conntrack on node1: {} missing {missing:?}, {} recorded for {} wanted",
                missing.len(),
                got.len(),
                want.len()
            );
            for (o, t, state, source) in list.iter().filter(|(o, t, _, _)| want.contains(&(*o, *t)))
            {
                assert_eq!(
                    (*state, source.as_str()),
                    (NatState::Confirmed, "kernel+conntrack"),
                    "{o:?} -> {t:?}"
                );
            }
        }
    }
    drop(bed);
}
