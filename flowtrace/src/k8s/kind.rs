//! The kinds of object flowtrace follows.

use serde::{Deserialize, Serialize};

/// The kinds of object flowtrace follows, in the order they are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pods,
    Services,
    EndpointSlices,
    Nodes,
    ReplicaSets,
    Jobs,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Nodes,
        Kind::ReplicaSets,
        Kind::Jobs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Nodes => "nodes",
            Kind::ReplicaSets => "replicasets",
            Kind::Jobs => "jobs",
        }
    }
}
