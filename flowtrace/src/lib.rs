//! flowtrace: an eBPF flow tracer for Kubernetes.
//!
//! One module per concern: `attach` (loading and attaching the TC programs), `links`
//! (which interfaces, following netlink), `drain` (reading the kernel maps without loss),
//! `flows` (the flow table), `k8s` (Kubernetes metadata: who an address is), `latency` (hop latency and round trips the programs measured), `nat` (translations seen by the programs, checked against
//! `conntrack`, the kernel's connection table), `filter` (flow filters), `path` (the hops
//! of each connection across nodes, with NAT steps and latency), `trace` (live tracing:
//! sampled packets hook by hook), `api` (HTTP/JSON),
//! `agent` (the daemon's tasks), `cli` (the client commands).

pub mod agent;
pub mod api;
pub mod attach;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod drain;
pub mod error;
pub mod filter;
pub mod flows;
pub mod k8s;
pub mod latency;
pub mod links;
pub mod metrics;
pub mod nat;
pub mod path;
pub mod trace;

pub use error::{Error, Result};

#[cfg(test)]
mod testutil;
