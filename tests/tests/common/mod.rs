//! Helpers shared by the integration tests: a cluster with an agent per node, and lookups of
//! flows and hops in the agents' JSON.
#![allow(dead_code)]

use std::net::IpAddr;

use flowtrace::flows::{Direction, FlowRecord};
use flowtrace_tests::{apiserver, Agent, ApiServer, Cluster, ClusterOptions, Node};

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
                Agent::start(&n.netns, &args).expect("starting an agent")
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
