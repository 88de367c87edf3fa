//! Builders the unit tests of several modules share.

use std::net::IpAddr;

use flowtrace_common::Tuple;

use crate::flows::FlowTuple;

/// A TCP tuple from address strings.
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> FlowTuple {
    FlowTuple {
        protocol: 6,
        src: src.parse().expect("a test address"),
        dst: dst.parse().expect("a test address"),
        src_port: sport,
        dst_port: dport,
    }
}

/// `a` as the kernel stores it (an IPv4 address in the first 4 of 16 bytes).
pub fn kernel_addr(a: IpAddr) -> [u32; 4] {
    let b = match a {
        IpAddr::V4(v) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v.octets());
            b
        }
        IpAddr::V6(v) => v.octets(),
    };
    flowtrace_common::addr_from_bytes(&b)
}

/// `t` as the kernel programs record it.
pub fn kernel_tuple(t: &FlowTuple) -> Tuple {
    Tuple {
        src_addr: kernel_addr(t.src),
        dst_addr: kernel_addr(t.dst),
        src_port: t.src_port,
        dst_port: t.dst_port,
        ip_version: if t.src.is_ipv4() { 4 } else { 6 },
        protocol: t.protocol,
        _pad: 0,
    }
}
