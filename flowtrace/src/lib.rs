//! flowtrace: an eBPF flow tracer for Kubernetes.
//!
//! Layers, lowest first; a module imports only from layers below its own (checked by
//! `cargo xtask layers`, see docs/design.md):
//!
//! 1. `util`, `error`: clocks, lock recovery, the error type.
//! 2. `model`: tuples, hooks, names, the API's wire types.
//! 3. `kernel` (load, attach, drain, trace ring), `host` (links, conntrack), `k8s` (metadata),
//!    `tls` (certificates of the data API).
//! 4. `state`: the flow, NAT, latency and trace-join tables.
//! 5. `enrich`: the one namer every view uses.
//! 6. `query` (filters, paths), `metrics` (Prometheus).
//! 7. `agent`: the pipeline and its tasks, state behind methods; `relay`: the agents of
//!    the cluster, asked together (peers: neither imports the other).
//! 8. `server`: HTTP (the agent's listeners and the relay's).
//! 9. `cli` (the client commands: model, wire types and queries only), `config` (flags and
//!    the config file), and the binary.

pub mod agent;
pub mod cli;
pub mod config;
pub mod enrich;
pub mod error;
pub mod host;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod query;
pub mod relay;
pub mod server;
pub mod state;
pub mod tls;
pub mod util;

pub use error::{Error, Result};

#[cfg(test)]
mod testutil;
