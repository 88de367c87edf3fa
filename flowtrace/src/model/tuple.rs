//! Tuples and hooks: the 5-tuple of a flow independent of where it was seen, a TC hook
//! (interface and direction), and their API forms.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowtrace_common::FlowKey;
use serde::{Deserialize, Serialize};

/// The 5-tuple of a flow, independent of where it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowTuple {
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowTuple {
    pub fn from_key(key: &FlowKey) -> Self {
        Self::from_tuple(&key.tuple())
    }

    pub fn from_tuple(t: &flowtrace_common::Tuple) -> Self {
        Self {
            protocol: t.protocol,
            src: addr(t.ip_version, &t.src_addr),
            dst: addr(t.ip_version, &t.dst_addr),
            src_port: t.src_port,
            dst_port: t.dst_port,
        }
    }

    /// The tuple of the other direction.
    pub fn reversed(&self) -> Self {
        Self {
            protocol: self.protocol,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

fn addr(version: u8, words: &flowtrace_common::Addr) -> IpAddr {
    let bytes = flowtrace_common::addr_bytes(words);
    if version == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

/// Direction of a TC hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The direction byte of the kernel's records (`DIR_INGRESS`, else egress): the one
    /// place it is decoded.
    pub fn from_kernel(direction: u8) -> Self {
        match flowtrace_common::HookDirection::from_raw(direction) {
            Some(flowtrace_common::HookDirection::Ingress) => Direction::Ingress,
            // The programs write only the two values; anything else is not ingress.
            _ => Direction::Egress,
        }
    }

    /// `ingress` or `egress`, as labels and text output write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// A hook: interface and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hop {
    pub ifindex: u32,
    pub direction: Direction,
}

/// ICMP or ICMPv6: flows whose "ports" are the echo identifier and type/code.
pub fn is_icmp(protocol: u8) -> bool {
    protocol == 1 || protocol == 58
}

pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
}

pub fn tcp_flags_string(flags: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (0x01, 'F'),
        (0x02, 'S'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x10, 'A'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'C'),
    ];
    LETTERS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// A 5-tuple in API form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TupleView {
    pub protocol: u8,
    pub src: std::net::IpAddr,
    pub src_port: u16,
    pub dst: std::net::IpAddr,
    pub dst_port: u16,
}

impl From<FlowTuple> for TupleView {
    fn from(t: FlowTuple) -> Self {
        Self {
            protocol: t.protocol,
            src: t.src,
            src_port: t.src_port,
            dst: t.dst,
            dst_port: t.dst_port,
        }
    }
}

/// A hook in API form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookView {
    pub interface: String,
    pub direction: Direction,
}
