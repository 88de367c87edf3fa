//! `flowtrace relay` on an emulated cluster of three nodes, the relay in a network namespace of
//! its own on the underlay, finding the agents through the fixture API server's EndpointSlice of
//! their headless Service (or a static `--agents` list) and reaching their data API over mTLS.
//! Ground truth: what the senders sent and the sinks received (ftgen's own counts, the
//! client's source ports), the topology the test built for the hops and nodes of each flow, and
//! the fixture's EndpointSlice for which nodes exist. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use flowtrace::{
    model::{wire::FlowRecord, Direction, TraceLine},
    query::path::PathRecord,
};
use flowtrace_tests::{
    apiserver::Resource,
    finish, ftgen, ftgen_bg, parse_exposition,
    relay::{Discovery, Lines, RelayBed, RelayOptions},
    udp_all_received, Pod, PortForward,
};
use serde::Deserialize;
use serde_json::Value;

/// Datagrams per flow.
const COUNT: u64 = 25;

/// A flow of the relay's answer: the agent's record and the node it came from.
#[derive(Debug, Deserialize)]
struct NodeFlow {
    node: String,
    #[serde(flatten)]
    flow: FlowRecord,
}

const ALL: [&str; 3] = ["node1", "node2", "node3"];

fn bed(opts: RelayOptions) -> RelayBed {
    let bed = RelayBed::up(&opts).unwrap();
    let nodes: Vec<&str> = opts
        .listed
        .as_ref()
        .map(|l| l.iter().map(|i| ALL[i - 1]).collect())
        .unwrap_or(ALL.to_vec());
    bed.relay()
        .unwrap()
        .wait_nodes_ok(&nodes, Duration::from_secs(30))
        .unwrap();
    bed
}

fn pod(bed: &RelayBed, node: usize, name: &str) -> Pod {
    bed.cluster.pod(node, name).unwrap().clone()
}

/// The hops a cross-node pod-to-pod flow takes on each node, from the topology: out of the
/// source pod's veth and through the overlay on its node, in from the overlay and into the
/// destination pod's veth on the other.
fn expected_hops(src: &Pod, dst: &Pod) -> [(String, Vec<(String, Direction)>); 2] {
    [
        (
            src.node.clone(),
            vec![
                (src.host_veth.clone(), Direction::Ingress),
                ("flannel.1".into(), Direction::Egress),
            ],
        ),
        (
            dst.node.clone(),
            vec![
                ("flannel.1".into(), Direction::Ingress),
                (dst.host_veth.clone(), Direction::Egress),
            ],
        ),
    ]
}

/// One UDP flow the test sent: `COUNT` datagrams from `src` to `dst`:`port`, all received.
struct Sent {
    src: Pod,
    dst: Pod,
    port: u16,
}

fn send_udp(src: &Pod, dst: &Pod, port: u16) -> Sent {
    udp_all_received(src, dst, port, COUNT, 64).unwrap();
    Sent {
        src: src.clone(),
        dst: dst.clone(),
        port,
    }
}

/// A flow as the check compares it: its node, its hops (interface, direction) in order, and
/// the packets at each hop.
type NodeHops = (String, Vec<(String, Direction)>, Vec<u64>);

/// Whether `flows` hold each sent flow exactly on its two nodes, with the topology's hops and
/// `COUNT` packets at every hop; `Err` says what is not (yet) so.
fn check_flows(flows: &[NodeFlow], sent: &[Sent]) -> Result<(), String> {
    for s in sent {
        let (src, dst) = (IpAddr::from(s.src.ipv4), IpAddr::from(s.dst.ipv4));
        let mine: Vec<&NodeFlow> = flows
            .iter()
            .filter(|f| f.flow.src == src && f.flow.dst == dst && f.flow.dst_port == s.port)
            .collect();
        let mut got: Vec<NodeHops> = mine
            .iter()
            .map(|f| {
                (
                    f.node.clone(),
                    f.flow
                        .hops
                        .iter()
                        .map(|h| (h.interface.clone(), h.direction))
                        .collect(),
                    f.flow.hops.iter().map(|h| h.packets).collect(),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<NodeHops> = expected_hops(&s.src, &s.dst)
            .into_iter()
            .map(|(n, h)| (n, h, vec![COUNT, COUNT]))
            .collect();
        want.sort();
        if got != want {
            return Err(format!(
                "port {}: {} -> {}: want {want:?}, got {got:?}",
                s.port, s.src.node, s.dst.node
            ));
        }
    }
    Ok(())
}

fn node_flows(resp: &Value) -> Vec<NodeFlow> {
    serde_json::from_value(resp["flows"].clone())
        .unwrap_or_else(|e| panic!("the relay's flows do not parse ({e}): {resp}"))
}

/// The names of the nodes an answer's `nodes` list as answered (`ok`), and those its `missing`
/// names.
fn answered_and_missing(resp: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = |key: &str, pick: &dyn Fn(&Value) -> bool| -> BTreeSet<String> {
        resp[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| pick(n))
                    .filter_map(|n| n["node"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        // `nodes` lists the nodes that answered; `missing` those that did not.
        names("nodes", &|_| true),
        names("missing", &|_| true),
    )
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Polls the relay's `/v1/flows?proto=udp` until `sent` check out; returns that answer.
fn wait_flows(bed: &RelayBed, sent: &[Sent]) -> Value {
    let relay = bed.relay().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = relay.get_json("/v1/flows?proto=udp").unwrap();
        let check = check_flows(&node_flows(&resp), sent);
        if check.is_ok() {
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "the relay's flows never matched what was sent: {check:?}\n{resp:#}\nrelay log:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Traffic seen by every node: node1 -> node2, node2 -> node3, node3 -> node1.
fn ring_traffic(bed: &RelayBed) -> Vec<Sent> {
    [(1, 2, 24101u16), (2, 3, 24102), (3, 1, 24103)]
        .into_iter()
        .map(|(s, d, port)| send_udp(&pod(bed, s, "pod-a"), &pod(bed, d, "pod-a"), port))
        .collect()
}

/// The bed's plumbing, without the relay: its namespace reaches every node over the underlay
/// bridge (and only through it: it has no route elsewhere), the fixture API server answers
/// there through the agents' kubeconfig address with the agents' EndpointSlice, and a port
/// forward carries the CLI to an agent's loopback-only API.
#[test]
fn the_relays_namespace_reaches_the_nodes_the_fixture_and_a_forwarded_agent() {
    flowtrace_tests::require_root().unwrap();
    let cluster = flowtrace_tests::Cluster::up(&flowtrace_tests::ClusterOptions {
        nodes: 3,
        ..Default::default()
    })
    .unwrap();
    let net = flowtrace_tests::relay::RelayNet::attach(&cluster).unwrap();
    for n in &cluster.nodes {
        flowtrace_tests::exec(
            &net.netns,
            &["ping", "-c1", "-W2", &n.underlay_ip.to_string()],
        )
        .unwrap();
    }
    let mut api = flowtrace_tests::ApiServer::start_in(
        &[],
        vec![flowtrace_tests::apiserver::agents_endpointslice(&[(
            "node1",
            cluster.node(1).unwrap().underlay_ip,
        )])],
    )
    .unwrap();
    api.listen_in(&net.netns).unwrap();
    let (status, body) = flowtrace_tests::http_get_url(
        &net.netns,
        "http://127.0.0.1:16443/apis/discovery.k8s.io/v1/namespaces/flowtrace/endpointslices\
         ?labelSelector=kubernetes.io%2Fservice-name%3Dflowtrace",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list["items"][0]["endpoints"][0]["nodeName"], "node1",
        "{list:#}"
    );

    let node1 = &cluster.node(1).unwrap().netns;
    let agent = flowtrace_tests::Agent::start(node1, &[]).unwrap();
    let fwd =
        PortForward::start(&net.netns, 19650, node1, "127.0.0.1:9650".parse().unwrap()).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &net.netns])
        .arg(flowtrace_tests::flowtrace_bin().unwrap())
        .args([
            "flows",
            "--json",
            "--agent",
            &format!("http://127.0.0.1:{}", fwd.port),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(flows["node"], "node1", "{flows:#}");
    drop(fwd);
    drop(agent);
    drop(api);
    drop(net);
    // The relay's namespace is gone with its guard.
    let left = flowtrace_tests::list_netns().unwrap();
    assert!(
        !left
            .iter()
            .any(|n| n.ends_with("-relay") && n.starts_with(&cluster.prefix)),
        "{left:?}"
    );
    cluster.down().unwrap();
}

#[test]
fn relay_flows_lists_every_nodes_flows_with_the_senders_counts() {
    let bed = bed(RelayOptions::default());
    let relay = bed.relay().unwrap();

    // Which agents it found: every node of the EndpointSlice, at the address and the port
    // named `api` the slice gives (it lists `metrics` first), with their state.
    let nodes = relay.get_json("/v1/nodes").unwrap();
    for (i, name) in ALL.iter().enumerate() {
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == *name)
            .unwrap_or_else(|| panic!("{name} not in {nodes:#}"));
        assert_eq!(n["agent"], bed.agent_url(i + 1).unwrap(), "{n}");
        assert_eq!(n["ok"], true, "{n}");
        assert_eq!(n["ready"], true, "{n}");
        assert_eq!(n["metadata_synced"], true, "{n}");
        assert!(n["version"].as_str().is_some_and(|v| !v.is_empty()), "{n}");
        assert!(n["last_ok_unix_ms"].as_u64().is_some_and(|t| t > 0), "{n}");
    }
    // It found them the way the spec says: a namespaced list and watch with the Service's
    // label (only the relay asks for namespace flowtrace; the agents watch cluster-wide).
    let asked: Vec<_> = bed
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == Resource::EndpointSlices && r.namespace.is_some())
        .collect();
    assert!(
        asked.iter().any(|r| !r.watch) && asked.iter().any(|r| r.watch),
        "{asked:?}"
    );
    for r in &asked {
        assert_eq!(r.namespace.as_deref(), Some("flowtrace"), "{r:?}");
        assert_eq!(
            r.label_selector.as_deref(),
            Some("kubernetes.io/service-name=flowtrace"),
            "{r:?}"
        );
    }

    let sent = ring_traffic(&bed);
    let resp = wait_flows(&bed, &sent);
    let (answered, missing) = answered_and_missing(&resp);
    assert_eq!(answered, set(&ALL), "{resp:#}");
    assert!(missing.is_empty(), "{resp:#}");
    assert_eq!(resp["missing"], serde_json::json!([]), "{resp:#}");
    assert_eq!(resp["truncated"], false, "{resp:#}");
    // Each flow says its node, and its node is one the flow crossed: no node reports another's.
    for f in node_flows(&resp) {
        assert!(ALL.contains(&f.node.as_str()), "{f:?}");
    }

    // The same through the CLI in the relay's namespace.
    let out = relay.cli("flows", &["--json", "--proto", "udp"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "no node is missing, no warning: {stderr}"
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "flowtrace flows --relay --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    check_flows(&node_flows(&cli), &sent).unwrap();
    // The table gains a NODE column: each sent flow's rows name its two nodes.
    let out = relay.cli("flows", &["--proto", "udp"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A title line (the nodes that answered), then the header.
    let header = table.lines().nth(1).unwrap_or_default();
    assert!(header.split_whitespace().any(|w| w == "NODE"), "{table}");
    for s in &sent {
        let rows: BTreeSet<&str> = table
            .lines()
            .filter(|l| l.contains(&format!(":{}", s.port)))
            .filter_map(|l| l.split_whitespace().find(|w| ALL.contains(w)))
            .collect();
        assert_eq!(
            rows,
            BTreeSet::from([s.src.node.as_str(), s.dst.node.as_str()]),
            "{table}"
        );
    }

    // Server-side filters pass through: one port, one flow per node it crossed.
    let one = relay.get_json("/v1/flows?port=24102").unwrap();
    let flows = node_flows(&one);
    assert_eq!(
        flows
            .iter()
            .map(|f| f.node.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["node2", "node3"]),
        "{one:#}"
    );
    assert!(flows.iter().all(|f| f.flow.dst_port == 24102), "{one:#}");

    // Its own health and cost on its metrics listener.
    let (status, text) = relay.get_metrics("/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    let samples = parse_exposition(&text).unwrap();
    // Every agent it knows is in one state or another.
    let agents: f64 = samples
        .iter()
        .filter(|s| s.name == "flowtrace_relay_agents")
        .map(|s| s.value)
        .sum();
    assert_eq!(agents, 3.0, "flowtrace_relay_agents: {text}");
    assert!(
        samples
            .iter()
            .any(|s| s.name == "flowtrace_relay_requests_total" && s.value >= 1.0),
        "{text}"
    );
}

#[test]
fn relay_with_a_static_agent_list_answers_for_every_node() {
    let bed = bed(RelayOptions {
        relay: Some(Discovery::Static),
        ..RelayOptions::default()
    });
    let sent = ring_traffic(&bed);
    let resp = wait_flows(&bed, &sent);
    assert_eq!(answered_and_missing(&resp).0, set(&ALL), "{resp:#}");
    // It never asked the API server for the agents.
    let asked: Vec<_> = bed
        .api
        .requests()
        .into_iter()
        .filter(|r| r.namespace.as_deref() == Some("flowtrace"))
        .collect();
    assert!(asked.is_empty(), "{asked:?}");
    relay_drops_name_the_node_they_happened_on(&bed);
}

/// Datagrams an iptables DROP rule kills on node3 are reported by the relay's `/v1/drops` under
/// node3, as many as the rule's own counter says, with the kernel's reason; the other nodes
/// answer with none on that port.
fn relay_drops_name_the_node_they_happened_on(bed: &RelayBed) {
    const PORT: u16 = 24_900;
    const N: u64 = 20;
    let (src, dst) = (pod(bed, 1, "pod-a"), pod(bed, 3, "pod-a"));
    let node3 = bed.cluster.node(3).unwrap();
    let rule = flowtrace_tests::drops::DropRule::insert(
        &node3.netns,
        "FORWARD",
        &["-p", "udp", "--dport", &PORT.to_string()],
        &format!("{}-relay-drop", bed.cluster.prefix),
    )
    .unwrap();
    let sent = ftgen(
        &src,
        &[
            "udp-send",
            "--to",
            &format!("{}:{PORT}", dst.ipv4),
            "--count",
            &N.to_string(),
            "--size",
            "64",
        ],
    )
    .unwrap();
    assert_eq!(sent["sent"], N, "{sent}");
    assert_eq!(rule.packets().unwrap(), N, "the rule's own counter");
    let relay = bed.relay().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = relay.get_json(&format!("/v1/drops?port={PORT}")).unwrap();
        let nodes = resp["nodes"].as_array().cloned().unwrap_or_default();
        let dropped = |node: &str, reason: Option<&str>| -> u64 {
            nodes
                .iter()
                .filter(|n| n["node"] == node)
                .flat_map(|n| n["drops"].as_array().cloned().unwrap_or_default())
                .filter(|d| reason.is_none_or(|r| d["reason"] == r))
                .map(|d| d["packets"].as_u64().unwrap_or(0))
                .sum()
        };
        let answered: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| n["node"].as_str().map(String::from))
            .collect();
        let done = answered == set(&ALL) && dropped("node3", Some("NETFILTER_DROP")) == N;
        if done || Instant::now() > deadline {
            assert_eq!(answered, set(&ALL), "{resp:#}");
            assert_eq!(dropped("node3", Some("NETFILTER_DROP")), N, "{resp:#}");
            assert_eq!(dropped("node3", None), N, "{resp:#}");
            for other in ["node1", "node2"] {
                assert_eq!(dropped(other, None), 0, "{other}: {resp:#}");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// What the topology says a pod-b -> pod-b path crosses, node by node: (node, interface,
/// direction) of the request and of the reply.
type Hop = (String, String, Direction);

fn path_hops(leg: &flowtrace::query::path::Leg) -> Vec<Hop> {
    leg.steps
        .iter()
        .filter_map(|s| match s {
            flowtrace::query::path::Step::Hop {
                node,
                interface,
                direction,
                ..
            } => Some((node.clone(), interface.clone(), *direction)),
            flowtrace::query::path::Step::Nat { .. }
            | flowtrace::query::path::Step::Drop { .. } => None,
        })
        .collect()
}

/// The list of paths in a `path --json` output or a relay answer (`{"paths": [...]}`).
fn paths_of(v: &Value) -> Vec<PathRecord> {
    let list = if v.is_array() { v } else { &v["paths"] };
    serde_json::from_value(list.clone()).unwrap_or_else(|e| panic!("not paths ({e}): {v:#}"))
}

#[test]
fn relay_path_is_the_path_the_cli_joins_from_every_agent() {
    let bed = bed(RelayOptions::default());
    let relay = bed.relay().unwrap();
    let (client, server) = (pod(&bed, 1, "pod-b"), pod(&bed, 2, "pod-b"));
    let sink = ftgen_bg(
        &server,
        &[
            "tcp-sink",
            "--bind",
            "0.0.0.0:9090",
            "--connections",
            "10",
            "--timeout-ms",
            "30000",
            "--echo-bytes",
            "200",
        ],
    )
    .unwrap();
    let sent = ftgen(
        &client,
        &[
            "tcp-send",
            "--to",
            &format!("{}:9090", server.ipv4),
            "--bytes",
            "100",
            "--connections",
            "10",
        ],
    )
    .unwrap();
    assert_eq!(sent["connections"], 10, "{sent}");
    assert_eq!(finish(sink).unwrap()["connections"], 10);

    let (src, dst) = (client.ipv4.to_string(), server.ipv4.to_string());
    let route = format!("/v1/path?src={src}&dst={dst}&window_s=60");
    // The agents drain every 500 ms: wait until the relay's path has every connection and both
    // legs across both nodes.
    let (n1, n2) = ("node1".to_string(), "node2".to_string());
    let (ig, eg) = (Direction::Ingress, Direction::Egress);
    let want_request: Vec<Hop> = vec![
        (n1.clone(), client.host_veth.clone(), ig),
        (n1.clone(), "flannel.1".into(), eg),
        (n2.clone(), "flannel.1".into(), ig),
        (n2.clone(), server.host_veth.clone(), eg),
    ];
    let want_reply: Vec<Hop> = vec![
        (n2.clone(), server.host_veth.clone(), ig),
        (n2, "flannel.1".into(), eg),
        (n1.clone(), "flannel.1".into(), ig),
        (n1, client.host_veth.clone(), eg),
    ];
    let settled = relay
        .wait_for(&route, Duration::from_secs(15), |v| {
            let p = paths_of(v);
            p.len() == 1
                && p[0].connections == 10
                && path_hops(&p[0].request) == want_request
                && p[0].reply.as_ref().map(path_hops) == Some(want_reply.clone())
        })
        .unwrap();
    assert_eq!(settled["missing"], serde_json::json!([]), "{settled:#}");
    // /v1/path names the nodes whose views it joined.
    let joined: BTreeSet<String> = settled["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(joined, set(&ALL), "{settled:#}");

    // Today's multi-agent path: the CLI in the relay's namespace joins the three agents'
    // answers itself, reaching each agent's loopback API through a port forward (as an
    // operator does with kubectl port-forward; the node addresses serve only mTLS).
    let forwards: Vec<PortForward> = (1..=3)
        .map(|i| {
            PortForward::start(
                &bed.net.netns,
                19650 + i as u16,
                &bed.cluster.node(i).unwrap().netns,
                "127.0.0.1:9650".parse().unwrap(),
            )
            .unwrap()
        })
        .collect();
    let agents: Vec<String> = forwards
        .iter()
        .map(|f| format!("http://127.0.0.1:{}", f.port))
        .collect();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &bed.net.netns])
        .arg(flowtrace_tests::flowtrace_bin().unwrap())
        .args(["path", &src, &dst, "--json", "--agent", &agents.join(",")])
        .env_remove("FLOWTRACE_RELAY");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_cli = paths_of(&serde_json::from_slice(&out.stdout).unwrap());

    let out = relay.cli("path", &[&src, &dst, "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_relay_cli = paths_of(&serde_json::from_slice(&out.stdout).unwrap());
    let by_relay = paths_of(&relay.get_json(&route).unwrap());

    assert_eq!(
        by_relay, by_cli,
        "the relay's /v1/path vs the CLI over the three agents"
    );
    assert_eq!(by_relay_cli, by_cli, "path --relay vs path --agent x3");
    assert_eq!(paths_of(&settled), by_cli);
    drop(forwards);
}

/// Waits until agent `i` serves `tracers` trace streams.
fn wait_tracers(bed: &RelayBed, i: usize, tracers: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = bed.agent(i).stats().unwrap();
        if s.tracers == tracers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node{i}: {} tracers, want {tracers}\nrelay log:\n{}",
            s.tracers,
            bed.relay().unwrap().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn relay_trace_shows_packets_of_two_nodes_within_a_second() {
    let bed = bed(RelayOptions::default());
    let relay = bed.relay().unwrap();
    let (client, server) = (pod(&bed, 1, "pod-a"), pod(&bed, 2, "pod-a"));
    let sink = ftgen_bg(
        &server,
        &[
            "tcp-sink",
            "--bind",
            "0.0.0.0:8181",
            "--connections",
            "5",
            "--timeout-ms",
            "30000",
            "--echo-bytes",
            "10",
        ],
    )
    .unwrap();
    let cmd = relay
        .cli_command("trace", &["--json", "--port", "8181", "--duration-s", "10"])
        .unwrap();
    let trace = Lines::spawn(cmd, "flowtrace trace --relay").unwrap();
    // The relay holds a trace stream on every agent before the traffic starts.
    for i in 1..=3 {
        wait_tracers(&bed, i, 1);
    }
    let sent_at = Instant::now();
    let sent = ftgen(
        &client,
        &[
            "tcp-send",
            "--to",
            &format!("{}:8181", server.ipv4),
            "--bytes",
            "10",
            "--connections",
            "5",
            "--interval-ms",
            "100",
        ],
    )
    .unwrap();
    assert_eq!(sent["connections"], 5, "{sent}");
    finish(sink).unwrap();

    // First packet per node, measured from the send.
    let mut first: BTreeMap<String, Duration> = BTreeMap::new();
    let mut syns: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    let mut other = Vec::new();
    while let Some((at, line)) = trace.next(Duration::from_secs(15)) {
        match serde_json::from_str::<TraceLine>(&line) {
            Ok(TraceLine::Packet(p)) => {
                first.entry(p.node.clone()).or_insert(at - sent_at);
                if p.tcp_flags.contains('S') && !p.tcp_flags.contains('A') {
                    syns.entry(p.node.clone())
                        .or_default()
                        .push(p.tuple.src_port);
                }
            }
            _ => other.push(line),
        }
    }
    let out = trace.guard.wait_output(Duration::from_secs(20)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("first packet per node after the send: {first:?}");
    for node in ["node1", "node2"] {
        let t = first
            .get(node)
            .unwrap_or_else(|| panic!("no packet from {node}: {first:?} {other:#?} {stderr}"));
        assert!(
            *t <= Duration::from_secs(1),
            "{node}'s first packet after {t:?}"
        );
    }
    assert!(
        !first.contains_key("node3"),
        "node3 never saw the traffic: {first:?}"
    );
    // Every SYN is traced: each node shows each of the client's connections once.
    let ports: Vec<u16> = sent["local_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect();
    for node in ["node1", "node2"] {
        assert_eq!(
            syns.get(node),
            Some(&ports),
            "{node}'s SYNs vs the client's ports"
        );
    }
    assert!(
        !other.iter().any(|l| l.contains("\"missing\"")),
        "no agent went missing: {other:#?}"
    );
}

/// `/v1/flows` and `/v1/nodes` of the relay, each with how long it took.
fn timed(bed: &RelayBed, path: &str) -> (Value, Duration) {
    let t = Instant::now();
    let v = bed.relay().unwrap().get_json(path).unwrap();
    (v, t.elapsed())
}

fn node_entry<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node"] == name))
        .unwrap_or_else(|| panic!("{name} not in {nodes:#}"))
}

/// The relay's answers once node `name`'s agent stopped answering at `since`: `/v1/nodes` says
/// it is not ok within the agent timeout plus `margin` of that moment, and a `/v1/flows`
/// answered within the timeout plus `margin` names it missing while the others answered.
fn assert_missing(bed: &RelayBed, name: &str, since: Instant, timeout: Duration, margin: Duration) {
    let relay = bed.relay().unwrap();
    let nodes = relay
        .wait_for("/v1/nodes", timeout + margin, |v| {
            v.as_array()
                .and_then(|a| a.iter().find(|n| n["node"] == name))
                .is_some_and(|n| n["ok"] == false)
        })
        .unwrap();
    eprintln!(
        "{name} not ok in /v1/nodes {:?} after it stopped answering",
        since.elapsed()
    );
    let n = node_entry(&nodes, name);
    assert!(n["error"].as_str().is_some_and(|e| !e.is_empty()), "{n}");
    let others: BTreeSet<String> = ALL
        .iter()
        .filter(|n| **n != name)
        .map(|n| n.to_string())
        .collect();
    for o in &others {
        assert_eq!(node_entry(&nodes, o)["ok"], true, "{nodes:#}");
    }

    let (flows, took) = timed(bed, "/v1/flows");
    assert!(
        took <= timeout + margin,
        "/v1/flows took {took:?}: {flows:#}"
    );
    let (answered, missing) = answered_and_missing(&flows);
    assert_eq!(answered, others, "{flows:#}");
    assert_eq!(missing, set(&[name]), "{flows:#}");
    let m = &flows["missing"][0];
    assert!(m["error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
    assert!(
        node_flows(&flows).iter().all(|f| f.node != name),
        "flows of a missing node: {flows:#}"
    );
}

#[test]
fn relay_says_which_node_is_missing_within_the_timeout_and_follows_it_back() {
    let timeout = Duration::from_millis(1000);
    let margin = Duration::from_millis(1500);
    let mut bed = bed(RelayOptions {
        agent_timeout_ms: 1000,
        ..RelayOptions::default()
    });

    // A hung agent (SIGSTOP: its socket still accepts, nothing answers): the relay waits no
    // longer than its timeout and says who is missing.
    bed.agent(2).pause().unwrap();
    assert_missing(&bed, "node2", Instant::now(), timeout, margin);
    bed.agent(2).resume().unwrap();
    bed.relay()
        .unwrap()
        .wait_nodes_ok(&ALL, Duration::from_secs(10))
        .unwrap();

    // A stopped agent: missing at once, back when it is restarted, and queried again: the
    // new agent's flows (traffic after its restart) come through with the senders' counts.
    bed.stop_agent(3).unwrap();
    assert_missing(&bed, "node3", Instant::now(), timeout, margin);
    bed.start_agent(3).unwrap();
    bed.relay()
        .unwrap()
        .wait_nodes_ok(&ALL, Duration::from_secs(10))
        .unwrap();
    let sent = [send_udp(
        &pod(&bed, 3, "pod-a"),
        &pod(&bed, 1, "pod-a"),
        24301,
    )];
    let resp = wait_flows(&bed, &sent);
    assert_eq!(
        answered_and_missing(&resp),
        (set(&ALL), BTreeSet::new()),
        "{resp:#}"
    );
}

#[test]
fn relay_discovers_a_node_added_to_the_endpointslice_and_drops_one_removed() {
    let bed = bed(RelayOptions {
        listed: Some(vec![1, 2]),
        ..RelayOptions::default()
    });
    let relay = bed.relay().unwrap();
    // node3's agent runs but is not in the slice: the relay does not know it.
    let sent = [send_udp(
        &pod(&bed, 3, "pod-a"),
        &pod(&bed, 1, "pod-a"),
        24401,
    )];
    let resp = relay
        .wait_for("/v1/flows?proto=udp", Duration::from_secs(15), |v| {
            node_flows(v)
                .iter()
                .any(|f| f.node == "node1" && f.flow.dst_port == 24401)
        })
        .unwrap();
    assert_eq!(
        answered_and_missing(&resp),
        (set(&["node1", "node2"]), BTreeSet::new())
    );
    assert!(
        node_flows(&resp).iter().all(|f| f.node != "node3"),
        "{resp:#}"
    );

    // node3 joins the Service: found through the watch and queried by the relay that runs
    // (the test never restarts it).
    bed.api
        .add_agent_endpoint("node3", bed.node_ip(3).unwrap())
        .unwrap();
    relay.wait_nodes_ok(&ALL, Duration::from_secs(10)).unwrap();
    let resp = wait_flows(&bed, &sent);
    assert_eq!(
        answered_and_missing(&resp),
        (set(&ALL), BTreeSet::new()),
        "{resp:#}"
    );

    // node1 leaves the Service: no longer asked, and not reported missing either (it left).
    assert!(bed.api.remove_agent_endpoint("node1").unwrap());
    relay
        .wait_nodes_ok(&["node2", "node3"], Duration::from_secs(10))
        .unwrap();
    let resp = relay.get_json("/v1/flows?proto=udp").unwrap();
    assert_eq!(
        answered_and_missing(&resp),
        (set(&["node2", "node3"]), BTreeSet::new()),
        "{resp:#}"
    );
    assert!(
        node_flows(&resp).iter().all(|f| f.node != "node1"),
        "{resp:#}"
    );
}
