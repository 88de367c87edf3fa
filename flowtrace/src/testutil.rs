//! Builders the unit tests of several modules share.

use std::net::IpAddr;

use flowtrace_common::Tuple;

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::json;

use crate::{
    k8s::{objects, MetaCache},
    model::{Direction, FlowTuple},
    state::trace::{Sighting, TracedPacket},
};

/// A seeded pseudo-random source for randomized tests (a 64-bit LCG): each call gives a
/// number below `n`, the same sequence for the same seed.
pub fn lcg(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    }
}

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

pub fn add_pod(c: &mut MetaCache, ns: &str, name: &str, ip: &str, deployment: &str) {
    let p: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": {},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": format!("{deployment}-5d4f"), "uid": "u",
                                          "controller": true}]},
        "spec": {"nodeName": "node1", "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .expect("a test object");
    c.apply_pod(objects::pod(&p).expect("a test object"));
    c.apply_owner(
        crate::k8s::Kind::ReplicaSets,
        ns,
        &format!("{deployment}-5d4f"),
        Some(deployment),
    );
}

/// The `shop` namespace: pods web-5d4f-a (10.244.1.10), web-5d4f-b (10.244.1.11) and
/// db-5d4f-a (10.244.1.20) of Deployments web and db on node1, and Service db
/// (10.96.0.20:5432/tcp).
pub fn shop_cache() -> MetaCache {
    let mut c = MetaCache::new();
    add_pod(&mut c, "shop", "web-5d4f-a", "10.244.1.10", "web");
    add_pod(&mut c, "shop", "web-5d4f-b", "10.244.1.11", "web");
    add_pod(&mut c, "shop", "db-5d4f-a", "10.244.1.20", "db");
    let s: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "db"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "ports": [{"port": 5432, "protocol": "TCP"}]}
    }))
    .expect("a test object");
    c.apply_service(objects::service(&s).expect("a test object"));
    c
}

/// A SYN from 10.244.1.5:40000 traced at two hooks: to the Service address 10.96.0.10:80 at
/// interface 3 (ingress, t = 100 ns), DNATed to 10.244.2.9:80 at interface 4 (egress, 2 600 ns).
pub fn syn_through_dnat() -> TracedPacket {
    let at = |ts_ns: u64, ifindex: u32, direction: Direction, dst: &str| Sighting {
        ts_ns,
        ifindex,
        direction,
        tuple: tcp("10.244.1.5", 40000, dst, 80),
        tcp_flags: 0x02,
        bytes: 60,
    };
    TracedPacket {
        hops: vec![
            at(100, 3, Direction::Ingress, "10.96.0.10"),
            at(2_600, 4, Direction::Egress, "10.244.2.9"),
        ],
    }
}

/// A TCP flow record of `bytes` bytes (one packet) between two fixed pods, no hops.
pub fn flow_record(bytes: u64) -> crate::model::FlowRecord {
    crate::model::FlowRecord {
        protocol: "tcp".into(),
        protocol_number: 6,
        ip_version: 4,
        src: "10.244.1.10".parse().expect("addr"),
        dst: "10.244.2.10".parse().expect("addr"),
        src_port: 40000 + (bytes % 20000) as u16,
        dst_port: 8080,
        packets: 1,
        bytes,
        payload_bytes: bytes.saturating_sub(40),
        hops: Vec::new(),
        src_endpoint: None,
        dst_endpoint: None,
        service: None,
        nat: None,
        src_peer: None,
        dst_peer: None,
        drops: Vec::new(),
        dropped: 0,
        retransmits: 0,
    }
}
