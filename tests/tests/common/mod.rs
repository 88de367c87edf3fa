//! Helpers shared by the integration tests: a cluster with an agent per node, and lookups of
//! flows and hops in the agents' JSON.
#![allow(dead_code)]

use std::net::IpAddr;

use flowtrace::flows::{Direction, FlowRecord};
use flowtrace_tests::{apiserver, Agent, ApiServer, Cluster, ClusterOptions};

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
                Agent::start(
                    &n.netns,
                    &[
                        "--kubeconfig",
                        &kubeconfig,
                        "--metadata-backoff-max-ms",
                        "1000",
                    ],
                )
                .expect("starting an agent")
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
