//! Helpers shared by the integration tests: a cluster with an agent per node, and lookups of
//! flows and hops in the agents' JSON.
#![allow(dead_code)]

use std::net::IpAddr;

use flowtrace::flows::{Direction, FlowRecord};
use flowtrace_tests::{Agent, Cluster, ClusterOptions};

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
        Bed { agents, cluster }
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
