//! Who an address is: the names the Kubernetes metadata gives the ends of a flow, as the API
//! serves them.

use serde::{Deserialize, Serialize};

/// A workload: the controller at the top of a pod's owner chain (a bare pod is its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    /// Deployment, StatefulSet, DaemonSet, Job, CronJob, ReplicaSet (without a Deployment),
    /// Pod (no controller), or another controller's kind.
    pub kind: String,
    pub name: String,
}

/// What an address is, as the API serves it next to a flow's `src`/`dst`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `pod`, `service`, `node`, or `pod-network` (an address in a node's pod CIDR that
    /// is no pod's: the bridge or overlay address, or a pod not yet known).
    pub kind: EndpointKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's, Service's or node's name (the node's for `pod-network`).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// The node a pod runs on (or the node itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointKind {
    Pod,
    Service,
    Node,
    PodNetwork,
}

/// The Service a translation or a flow belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

impl std::fmt::Display for ServiceRef {
    /// `namespace/name`, as filters and metric labels write a Service.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kernel's name of a drop reason (`NETFILTER_DROP`, from its BTF), or `REASON_<code>`
/// for a code the kernel's BTF did not list.
pub fn drop_reason_name(reasons: &std::collections::HashMap<u32, String>, code: u32) -> String {
    reasons
        .get(&code)
        .cloned()
        .unwrap_or_else(|| format!("REASON_{code}"))
}
