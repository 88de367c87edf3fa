//! The data model every layer above the kernel shares: tuples and hooks, the names of a
//! flow's ends, address ranges, and the API's wire types. Nothing here holds state or
//! touches the kernel; it depends on the kernel ABI (`flowtrace-common`) and `error` only.

pub mod cidr;
pub mod hist;
pub mod names;
pub mod tuple;
pub mod wire;

pub use cidr::IpFilter;
pub use names::{drop_reason_name, Endpoint, EndpointKind, ServiceRef, Workload};
pub use tuple::{
    is_icmp, protocol_name, tcp_flags_string, Direction, FlowTuple, HookView, Hop, TupleView,
};
pub use wire::{
    FlowRecord, HopRecord, LatencyKind, LatencyRecord, NatCounters, NatState, TraceLine,
    TracePacket, Translation,
};
