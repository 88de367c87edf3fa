//! Folding the agents' `/v1/flows` answers into the relay's: the `limit` largest flows of
//! all nodes, each given its node. A flow is kept as the agent wrote it (a JSON object) and
//! only its size is decoded, so merging costs a scan of each answer, not a full decode and
//! re-encode, and memory holds what is kept, not every answer.

use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::wire::{MissingNode, NodeAnswer};

/// An agent's `/v1/flows` answer with its flows left undecoded.
#[derive(Deserialize)]
pub struct RawFlows {
    pub node: String,
    #[serde(default)]
    pub truncated: bool,
    pub flows: Vec<Box<RawValue>>,
}

/// What ordering needs of a flow.
#[derive(Deserialize)]
struct Size {
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    packets: u64,
}

struct Kept {
    bytes: u64,
    packets: u64,
    /// Index into `TopFlows::nodes`.
    node: usize,
    raw: Box<RawValue>,
}

/// The largest flows seen so far.
pub struct TopFlows {
    limit: usize,
    kept: Vec<Kept>,
    nodes: Vec<NodeAnswer>,
    truncated: bool,
}

impl TopFlows {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            kept: Vec::new(),
            nodes: Vec::new(),
            truncated: false,
        }
    }

    fn order(a: &Kept, b: &Kept) -> std::cmp::Ordering {
        (b.bytes, b.packets)
            .cmp(&(a.bytes, a.packets))
            .then_with(|| a.node.cmp(&b.node))
    }

    fn trim(&mut self) {
        if self.kept.len() > self.limit {
            self.kept.select_nth_unstable_by(self.limit, Self::order);
            self.kept.truncate(self.limit);
            self.truncated = true;
        }
    }

    /// Folds one node's answer in.
    pub fn add(&mut self, agent: String, answer: RawFlows, elapsed: Duration) {
        let node = self.nodes.len();
        self.truncated |= answer.truncated;
        self.nodes.push(NodeAnswer {
            node: answer.node,
            agent,
            flows: answer.flows.len(),
            truncated: answer.truncated,
            elapsed_ms: elapsed.as_millis() as u64,
        });
        for raw in answer.flows {
            // A flow whose size cannot be read still counts, as the smallest.
            let size = serde_json::from_str::<Size>(raw.get()).unwrap_or(Size {
                bytes: 0,
                packets: 0,
            });
            self.kept.push(Kept {
                bytes: size.bytes,
                packets: size.packets,
                node,
                raw,
            });
            // Trimmed in batches: a selection per limit's worth of flows.
            if self.kept.len() >= self.limit.saturating_mul(2).max(1024) {
                self.trim();
            }
        }
        self.trim();
    }

    /// The body of a `RelayFlowsResponse`: `nodes` (by name), `missing`, `flows` (largest
    /// first, each with `"node"` before the agent's own fields) and `truncated`.
    pub fn into_json(mut self, missing: Vec<MissingNode>) -> String {
        self.trim();
        self.kept.sort_by(Self::order);
        let names: Vec<String> = self
            .nodes
            .iter()
            .map(|n| serde_json::to_string(&n.node).unwrap_or_else(|_| "\"\"".into()))
            .collect();
        let mut nodes = self.nodes;
        let node_json = {
            let mut sorted: Vec<&NodeAnswer> = nodes.iter().collect();
            sorted.sort_by(|a, b| a.node.cmp(&b.node));
            serde_json::to_string(&sorted).unwrap_or_else(|_| "[]".into())
        };
        nodes.clear();
        let mut out = String::with_capacity(
            self.kept
                .iter()
                .map(|k| k.raw.get().len() + 24)
                .sum::<usize>()
                + node_json.len()
                + 256,
        );
        out.push_str("{\"nodes\":");
        out.push_str(&node_json);
        out.push_str(",\"missing\":");
        out.push_str(&serde_json::to_string(&missing).unwrap_or_else(|_| "[]".into()));
        out.push_str(",\"flows\":[");
        for (i, k) in self.kept.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"node\":");
            out.push_str(&names[k.node]);
            // The agent's object without its opening brace: `{"node":..., <its fields>}`.
            let body = k.raw.get().trim_start();
            let inner = body.strip_prefix('{').unwrap_or(body).trim_start();
            if !inner.starts_with('}') {
                out.push(',');
            }
            out.push_str(inner);
        }
        out.push_str("],\"truncated\":");
        out.push_str(if self.truncated { "true" } else { "false" });
        out.push('}');
        out
    }
}
