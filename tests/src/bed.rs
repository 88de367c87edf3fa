//! The emulated cluster with a flowtrace agent per node, as most integration tests start.

use std::time::Duration;

use crate::{apiserver, Agent, ApiServer, Cluster, ClusterOptions, Error, Result};

/// The emulated cluster (default options) with one agent per node. Agents are dropped
/// (killed) before the cluster is torn down.
pub struct Bed {
    /// One agent per node, `agents[i - 1]` on node `i`.
    pub agents: Vec<Agent>,
    /// The fixture API server the agents get names from (see [`Bed::with_metadata`]).
    pub api: Option<ApiServer>,
    /// The cluster; declared last, so it is dropped after the agents and the API server.
    pub cluster: Cluster,
}

impl Bed {
    /// The cluster and an agent per node without a metadata source.
    pub fn up() -> Result<Bed> {
        crate::require_root()?;
        let cluster = Cluster::up(&ClusterOptions::default())?;
        let agents = cluster
            .nodes
            .iter()
            .map(|n| Agent::start(&n.netns, &[]))
            .collect::<Result<_>>()?;
        Ok(Bed {
            agents,
            api: None,
            cluster,
        })
    }

    /// The cluster, a fixture API server describing it (reachable in every node namespace),
    /// and an agent per node that follows it through a kubeconfig, as in production.
    pub fn with_metadata() -> Result<Bed> {
        Self::with_metadata_and(&[])
    }

    /// [`Bed::with_metadata`] with `extra` agent flags.
    pub fn with_metadata_and(extra: &[&str]) -> Result<Bed> {
        Self::with_metadata_spawning(extra, Agent::start)
    }

    /// [`Bed::with_metadata`] with agents confined to capabilities `caps` and read-only
    /// filesystems, as the DaemonSet runs them ([`Agent::spawn_confined`]).
    pub fn with_metadata_confined(caps: &[&str]) -> Result<Bed> {
        Self::with_metadata_spawning(&[], |netns, args| {
            let mut agent = Agent::spawn_confined(netns, args, caps)?;
            agent.wait_ready(Duration::from_secs(30))?;
            Ok(agent)
        })
    }

    fn with_metadata_spawning(
        extra: &[&str],
        spawn: impl Fn(&str, &[&str]) -> Result<Agent>,
    ) -> Result<Bed> {
        crate::require_root()?;
        let cluster = Cluster::up(&ClusterOptions::default())?;
        let netns: Vec<&str> = cluster.nodes.iter().map(|n| n.netns.as_str()).collect();
        let api = ApiServer::start_in(&netns, apiserver::cluster_objects(&cluster))?;
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
            .collect::<Result<_>>()?;
        Ok(Bed {
            agents,
            api: Some(api),
            cluster,
        })
    }

    /// The fixture API server; an error for a bed made with [`Bed::up`].
    pub fn api(&self) -> Result<&ApiServer> {
        self.api.as_ref().ok_or_else(|| {
            Error::Invalid("this bed has no API server: use Bed::with_metadata".into())
        })
    }

    /// Agent of node `i` (1-based).
    ///
    /// # Panics
    /// If there is no node `i`, like indexing out of bounds.
    pub fn agent(&self, i: usize) -> &Agent {
        match i.checked_sub(1).and_then(|k| self.agents.get(k)) {
            Some(a) => a,
            None => panic!(
                "no agent {i}: agents are numbered 1..={}",
                self.agents.len()
            ),
        }
    }
}
