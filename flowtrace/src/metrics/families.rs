//! The metric families `/metrics` serves: the one list the encoder's help texts, the API
//! document and the Grafana dashboard's test are checked against.

/// (name, type, help) of every family the agent exports.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    ("flowtrace_packets_total", "counter", "Packets counted per source/destination peer, Service, hop (interface class and direction) and protocol. Peers are named at the aggregation level (--metrics-level)."),
    ("flowtrace_bytes_total", "counter", "Layer-3 bytes counted per source/destination peer, Service, hop (interface class and direction) and protocol."),
    ("flowtrace_nat_translations_total", "counter", "Connections seen rewritten by a Service's DNAT, per Service, client and backend."),
    ("flowtrace_hop_latency_seconds", "histogram", "Time a sampled packet took from one hook of this node to the next (from_hop, to_hop: interface class/direction)."),
    ("flowtrace_tcp_rtt_seconds", "histogram", "TCP round trips seen at one hook: SYN to SYN-ACK (kind=handshake) or a sampled data segment to the data acknowledging it (kind=response)."),
    ("flowtrace_drops_total", "counter", "Packets the kernel dropped on this node (skb:kfree_skb with a drop reason), per source/destination peer, reason (the kernel's skb_drop_reason without SKB_DROP_REASON_) and where (hop: the interface class of the device it died at, in_pod inside a pod's namespace, none without a device)."),
    ("flowtrace_tcp_retransmits_total", "counter", "TCP segments retransmitted by sockets on this node (tcp:tcp_retransmit_skb), per source/destination peer."),
    ("flowtrace_drain_duration_seconds", "histogram", "Time one drain of the kernel buffers took, naming and merging included."),
    ("flowtrace_attached_interfaces", "gauge", "Interfaces the programs are attached to."),
    ("flowtrace_interface_attach_failures_total", "counter", "Attachments that failed (the interface is not traced)."),
    ("flowtrace_kernel_packets_seen_total", "counter", "Packets that entered a flowtrace hook (wire packets: a GSO/GRO aggregate counts as its segments)."),
    ("flowtrace_kernel_lost_total", "counter", "Packets not counted in a flow, or updates the kernel programs could not record, by reason."),
    ("flowtrace_kernel_map_entries", "gauge", "Use of each kernel buffer in the last drain period: map=cache, flow cache slots used (all CPUs); map=events, the event ring's largest backlog in bytes."),
    ("flowtrace_kernel_map_capacity", "gauge", "Capacity of each kernel buffer: map=cache, flow cache slots per half (all CPUs); map=events, the event ring's bytes."),
    ("flowtrace_flow_table_entries", "gauge", "Flows held in the agent's table (served by /v1/flows)."),
    ("flowtrace_flow_table_capacity", "gauge", "Most flows the agent's table holds (--max-flows)."),
    ("flowtrace_flow_table_evicted_total", "counter", "Flows evicted from the agent's table because it was full."),
    ("flowtrace_drains_total", "counter", "Drains of the kernel buffers."),
    ("flowtrace_drain_errors_total", "counter", "Map errors met while draining (the entries stay for the next drain)."),
    ("flowtrace_metadata_synced", "gauge", "1 when the Kubernetes metadata (pods, Services, EndpointSlices, nodes, owners) is synced, else 0."),
    ("flowtrace_bpf_program_run_seconds_total", "counter", "CPU time spent in each flowtrace program, from the kernel's statistics (0 unless kernel.bpf_stats_enabled=1)."),
    ("flowtrace_bpf_program_runs_total", "counter", "Runs of each flowtrace program, from the kernel's statistics (0 unless kernel.bpf_stats_enabled=1)."),
    ("flowtrace_metrics_series", "gauge", "Series each traffic or latency family holds now."),
    ("flowtrace_metrics_series_limit", "gauge", "Most series any one family may hold (--metrics-max-series); beyond, updates go to the series labelled other."),
    ("flowtrace_metrics_folded_total", "counter", "Updates folded into a family's other series because the family was at its series limit."),
    ("flowtrace_metrics_series_expired_total", "counter", "Series dropped after --metrics-series-ttl-s without updates (deleted pods and workloads go this way)."),
    ("flowtrace_nat_checks_total", "counter", "Outcomes of the cross-check of the NAT rewrites the kernel programs saw against conntrack, by result: confirmed, conntrack_only (conntrack translated, the programs saw neither tuple), and the disagreements mismatch (conntrack translates the tuple differently), not_in_conntrack (a rewrite conntrack does not know), missed (both tuples traced, no rewrite seen)."),
    ("flowtrace_conntrack_errors_total", "counter", "Conntrack dumps that failed (the NAT cross-check waits for the next)."),
    ("flowtrace_api_refused_total", "counter", "Connections and requests the authenticated data API (--api-listen) refused, by reason: no_client_certificate (401), client_not_allowed (403), tls_handshake."),
    ("flowtrace_tracers", "gauge", "Live tracing clients attached (/v1/trace)."),
    ("flowtrace_build_info", "gauge", "Always 1; the version label says which flowtrace runs."),
];

/// The help text of family `name` (empty for a name not in `FAMILIES`, which a test forbids).
pub fn help(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, h)| *h)
        .unwrap_or("")
}
