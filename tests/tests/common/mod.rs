//! Helpers shared by the integration tests: a cluster with an agent per node, and lookups of
//! flows and hops in the agents' JSON.
#![allow(dead_code)]

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use flowtrace::model::{Direction, FlowRecord};
use flowtrace_tests::{
    apiserver, finish, flowtrace_program_ids, ftgen, ftgen_bg, Agent, ApiServer, Cluster,
    ClusterOptions, Node, Pod,
};

pub fn assert_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    assert!(root, "these tests load eBPF programs and create network namespaces: run them as root (scripts/test.sh)");
}

/// The emulated cluster with one agent per node. Agents are dropped (killed) before the
/// cluster is torn down.
pub struct Bed {
    pub agents: Vec<Agent>,
    /// The fixture API server the agents get names from (see [`Bed::with_metadata`]).
    pub api: Option<ApiServer>,
    pub cluster: Cluster,
}

impl Bed {
    pub fn up() -> Bed {
        assert_root();
        let cluster =
            Cluster::up(&ClusterOptions::default()).expect("bringing the emulated cluster up");
        let agents = cluster
            .nodes
            .iter()
            .map(|n| Agent::start(&n.netns, &[]).expect("starting an agent"))
            .collect();
        Bed {
            agents,
            api: None,
            cluster,
        }
    }

    /// The cluster, a fixture API server describing it (reachable in every node namespace),
    /// and an agent per node that follows it through a kubeconfig, as in production.
    pub fn with_metadata() -> Bed {
        Self::with_metadata_and(&[])
    }

    /// [`Bed::with_metadata`] with `extra` agent flags.
    pub fn with_metadata_and(extra: &[&str]) -> Bed {
        Self::with_metadata_spawning(extra, |netns, args| {
            Agent::start(netns, args).expect("starting an agent")
        })
    }

    /// [`Bed::with_metadata`] with agents confined to capabilities `caps` and read-only
    /// filesystems, as the DaemonSet runs them ([`Agent::spawn_confined`]).
    pub fn with_metadata_confined(caps: &[&str]) -> Bed {
        Self::with_metadata_spawning(&[], |netns, args| {
            let mut agent =
                Agent::spawn_confined(netns, args, caps).expect("starting a confined agent");
            agent
                .wait_ready(Duration::from_secs(30))
                .expect("a confined agent becoming ready");
            agent
        })
    }

    fn with_metadata_spawning(extra: &[&str], spawn: impl Fn(&str, &[&str]) -> Agent) -> Bed {
        assert_root();
        let cluster =
            Cluster::up(&ClusterOptions::default()).expect("bringing the emulated cluster up");
        let netns: Vec<&str> = cluster.nodes.iter().map(|n| n.netns.as_str()).collect();
        let api = ApiServer::start_in(&netns, apiserver::cluster_objects(&cluster))
            .expect("starting the fixture API server");
        let kubeconfig = api.kubeconfig().display().to_string();
        let agents = cluster
            .nodes
            .iter()
            .map(|n| {
                let mut args = vec![
                    "--kubeconfig",
                    kubeconfig.as_str(),
                    "--metadata-backoff-max-ms",
                    "1000",
                ];
                args.extend_from_slice(extra);
                spawn(&n.netns, &args)
            })
            .collect();
        Bed {
            agents,
            api: Some(api),
            cluster,
        }
    }

    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("this bed has no API server")
    }

    /// Agent of node `i` (1-based).
    pub fn agent(&self, i: usize) -> &Agent {
        &self.agents[i - 1]
    }
}

/// The flow with this 5-tuple in `flows`, if any.
pub fn find(
    flows: &[FlowRecord],
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: Option<u16>,
    dport: u16,
) -> Option<FlowRecord> {
    flows
        .iter()
        .find(|f| {
            f.protocol_number == proto
                && f.src == src
                && f.dst == dst
                && f.dst_port == dport
                && sport.is_none_or(|p| p == f.src_port)
        })
        .cloned()
}

/// The hops of a flow as (interface, direction), in the order the flow met them.
pub fn hop_names(f: &FlowRecord) -> Vec<(String, Direction)> {
    f.hops
        .iter()
        .map(|h| (h.interface.clone(), h.direction))
        .collect()
}

pub fn hops(list: &[(&str, Direction)]) -> Vec<(String, Direction)> {
    list.iter().map(|(n, d)| (n.to_string(), *d)).collect()
}

/// A 5-tuple as (protocol, src, sport, dst, dport).
pub type T = (u8, IpAddr, u16, IpAddr, u16);

/// Connections `conntrack -L` lists in `node`'s namespace whose original tuple matches
/// `filter` (conntrack's own flags, e.g. `-d 10.96.0.10`): (original, reply) per entry.
pub fn conntrack_list(node: &Node, filter: &[&str]) -> Vec<(T, T)> {
    let mut argv = vec!["conntrack", "-L"];
    argv.extend_from_slice(filter);
    let out = node.exec(&argv).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut entries = Vec::new();
    for line in text.lines() {
        let proto: u8 = match line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        let field = |key: &str| -> Vec<String> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key).map(str::to_string))
                .collect()
        };
        let (src, dst, sport, dport) = (
            field("src="),
            field("dst="),
            field("sport="),
            field("dport="),
        );
        assert!(
            src.len() >= 2 && sport.len() >= 2,
            "unexpected conntrack line: {line}"
        );
        let t = |i: usize| -> T {
            (
                proto,
                src[i].parse().unwrap(),
                sport[i].parse().unwrap(),
                dst[i].parse().unwrap(),
                dport[i].parse().unwrap(),
            )
        };
        entries.push((t(0), t(1)));
    }
    entries
}

/// `promtool check metrics` (Debian package `prometheus`) on `text`: (passed, what it printed).
pub fn promtool(text: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (Debian package `prometheus`; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn bad(line: &str) -> ! {
    panic!("unreadable exposition line: {line}")
}

/// One sample of the Prometheus text format: metric name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

/// The samples of a text-format exposition (comments skipped; label values unescaped as the
/// format defines: `\\`, `\"`, `\n`). Panics on a line it cannot read, naming it.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => bad(line),
        };
        let mut labels = std::collections::BTreeMap::new();
        let mut chars = rest.chars().peekable();
        if chars.peek() == Some(&'{') {
            chars.next();
            loop {
                match chars.peek() {
                    Some('}') => {
                        chars.next();
                        break;
                    }
                    Some(',') => {
                        chars.next();
                        continue;
                    }
                    None => bad(line),
                    _ => {}
                }
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                if chars.next() != Some('"') {
                    bad(line);
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => bad(line),
                        },
                        Some(c) => value.push(c),
                        None => bad(line),
                    }
                }
                labels.insert(key.trim().to_string(), value);
            }
        }
        let value: String = chars.collect();
        let value = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| bad(line));
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// Every device in a node that flowtrace traces by default.
pub fn traced_devices(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = node.pods.iter().map(|p| p.host_veth.clone()).collect();
    v.push("flannel.1".into());
    v
}

pub fn tc_show(node: &Node, what: &[&str]) -> String {
    let mut args = vec!["tc"];
    args.extend_from_slice(what);
    String::from_utf8_lossy(&node.exec(&args).unwrap().stdout).to_string()
}

/// Asserts that nothing of flowtrace is attached in `node` and that `ids` are unloaded.
pub fn assert_nothing_left(node: &Node, ids: &[u64]) {
    assert_unloaded(ids);
    for dev in traced_devices(node) {
        for dir in ["ingress", "egress"] {
            let f = tc_show(node, &["filter", "show", "dev", &dev, dir]);
            assert!(
                !f.contains("flowtrace"),
                "{dev} {dir} still has a flowtrace filter: {f}"
            );
        }
        let q = tc_show(node, &["qdisc", "show", "dev", &dev]);
        assert!(!q.contains("clsact"), "{dev} still has a clsact qdisc: {q}");
    }
    let links = String::from_utf8_lossy(
        &node
            .exec(&["bpftool", "-j", "link", "show"])
            .unwrap()
            .stdout,
    )
    .to_string();
    let links: serde_json::Value = serde_json::from_str(&links).unwrap_or(serde_json::Value::Null);
    for l in links.as_array().into_iter().flatten() {
        let prog = l.get("prog_id").and_then(|p| p.as_u64()).unwrap_or(0);
        assert!(
            !ids.contains(&prog),
            "a bpf link still holds flowtrace program {prog}: {l}"
        );
    }
}

/// The kernel frees a program after an RCU grace period once its last filter or link is
/// gone, so the check allows a moment for that.
pub fn assert_unloaded(ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let loaded = flowtrace_program_ids().unwrap();
        let still: Vec<_> = ids.iter().filter(|i| loaded.contains(i)).collect();
        if still.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "flowtrace programs {still:?} are still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` to `to`:`port` (a sink there) and
/// asserts, by the sender's and the sink's own counts, that all of them arrived.
pub fn udp_all_received(from: &Pod, to: &Pod, port: u16, count: u64, payload: u64) {
    let sink = ftgen_bg(
        to,
        &[
            "udp-sink",
            "--bind",
            &format!("0.0.0.0:{port}"),
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "20000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        from,
        &[
            "udp-send",
            "--to",
            &format!("{}:{port}", to.ipv4),
            "--count",
            &count.to_string(),
            "--size",
            &payload.to_string(),
            "--interval-us",
            "200",
        ],
    )
    .unwrap();
    let got = finish(sink).unwrap();
    assert_eq!(sent["sent"], count, "{sent}");
    assert_eq!(
        got["received"], count,
        "the emulated network lost datagrams: {got}"
    );
}

/// Opens `connections` TCP connections from `client` (on node1) to the demo Service
/// 10.96.0.10:80, served by pod-b on both nodes, and returns how many of them `conntrack -L`
/// on node1 lists as DNATed from the Service address to a backend (asserted equal to the
/// client's own count).
pub fn service_connections(cluster: &Cluster, client: &Pod, connections: u64) -> f64 {
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        "100",
        "--timeout-ms",
        "60000",
        "--idle-timeout-ms",
        "3000",
        "--echo-bytes",
        "10",
    ];
    let sinks: Vec<_> = [
        cluster.pod(1, "pod-b").unwrap(),
        cluster.pod(2, "pod-b").unwrap(),
    ]
    .iter()
    .map(|p| ftgen_bg(p, &sink_args).unwrap())
    .collect();
    let tcp = ftgen(
        client,
        &[
            "tcp-send",
            "--to",
            "10.96.0.10:80",
            "--bytes",
            "100",
            "--connections",
            &connections.to_string(),
        ],
    )
    .unwrap();
    assert_eq!(tcp["connections"], connections, "{tcp}");
    drop(sinks);
    let service: IpAddr = "10.96.0.10".parse().unwrap();
    let dnat = conntrack_list(
        cluster.node(1).unwrap(),
        &[
            "-p",
            "tcp",
            "-d",
            "10.96.0.10",
            "-s",
            &client.ipv4.to_string(),
        ],
    )
    .iter()
    .filter(|(_, reply)| reply.1 != service)
    .count() as f64;
    assert_eq!(
        dnat, connections as f64,
        "conntrack -L disagrees with the client"
    );
    dnat
}
