//! Lookups in the flows an agent reports (`/v1/flows`), by 5-tuple and by the hops a flow met.

use std::net::IpAddr;

use flowtrace::model::{Direction, FlowRecord};

/// The flow with this 5-tuple in `flows`, if any (`sport: None` matches any source port).
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

/// `list` in the shape [`hop_names`] returns, to compare a flow's hops with the topology.
pub fn hops(list: &[(&str, Direction)]) -> Vec<(String, Direction)> {
    list.iter().map(|(n, d)| (n.to_string(), *d)).collect()
}
