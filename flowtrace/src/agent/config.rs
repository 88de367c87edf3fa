//! The agent's settings (flags, `FLOWTRACE_*` variables and the config file fill them).

use std::time::Duration;

use crate::{
    host::links::Selector, k8s::source::MetaSource, metrics::MetricsConfig, model::wire::AttachMode,
};

/// Agent settings (flags and `FLOWTRACE_*` environment variables fill it).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub drain_interval: Duration,
    /// Size of the kernel's event ring, in MiB.
    pub event_ring_mib: u32,
    /// Capacity of each kernel drop buffer.
    pub drop_entries: u32,
    /// Where the runtime mounts pod network namespaces.
    pub netns_dir: std::path::PathBuf,
    /// Latency sampling: one packet in N (a power of two), 0 = off.
    pub latency_sample: u32,
    /// Of the sampled packets, at most one per flow and hook in each window of
    /// 2^`latency_window_shift` ns (0: no cap).
    pub latency_window_shift: u32,
    /// Cross-check NAT translations with the conntrack table after each drain.
    pub conntrack: bool,
    /// How often to dump the whole conntrack table when events are followed.
    pub conntrack_resync: Duration,
    pub max_flows: usize,
    pub flow_idle_timeout: Duration,
    pub attach_mode: AttachMode,
    pub selector: Selector,
    /// Node name reported by the API; the hostname when `None`.
    pub node_name: Option<String>,
    /// Where pod, Service and node names come from.
    pub metadata: MetaSource,
    /// Longest wait between attempts to reach the API server again.
    pub metadata_backoff_max: Duration,
    /// Aggregation level, series cap and series expiry of `/metrics`.
    pub metrics: MetricsConfig,
}
