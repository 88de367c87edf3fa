//! Host tests for the shared parser: the same code the kernel runs, fed crafted frames.
extern crate std;
use std::vec::Vec;

use super::*;

const MAC_HDR: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

fn eth(ethertype: u16, vlans: &[u16]) -> Vec<u8> {
    let mut f = MAC_HDR.to_vec();
    for &tpid in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&[0x00, 0x64]); // TCI: VLAN 100
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv4(proto: u8, options: &[u8], payload: &[u8], frag: u16) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4));
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    let mut h = std::vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0, 10, 244, 1, 10, 10, 244, 2, 11]);
    h.extend_from_slice(options);
    h.extend_from_slice(payload);
    h
}

fn ipv6(next: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
    let payload_len = (ext.len() + l4.len()) as u16;
    let mut h = std::vec![0x60, 0, 0, 0];
    h.extend_from_slice(&payload_len.to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    let mut src = [0u8; 16];
    src[..8].copy_from_slice(&[0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1]);
    src[15] = 10;
    let mut dst = src;
    dst[7] = 2;
    dst[15] = 11;
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(ext);
    h.extend_from_slice(l4);
    h
}

fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.resize(8 + payload, 0xab);
    u
}

fn tcp(sport: u16, dport: u16, flags: u8, option_words: usize, payload: usize) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    t.push(((5 + option_words) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    t.resize(20 + option_words * 4, 1); // NOP options
    t.resize(20 + option_words * 4 + payload, 0xcd);
    t
}

fn frame(l2: Vec<u8>, l3: Vec<u8>) -> Vec<u8> {
    let mut f = l2;
    f.extend_from_slice(&l3);
    f
}

fn meta(f: &[u8]) -> SkbMeta {
    SkbMeta {
        len: f.len() as u32,
        gso_segs: 0,
    }
}

fn parse(f: &[u8]) -> Result<PacketInfo, ParseError> {
    parse_frame(f, meta(f))
}

#[test]
fn ipv4_udp() {
    let f = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_UDP, &[], &udp(40000, 53, 100), 0x4000),
    );
    let i = parse(&f).unwrap();
    assert_eq!(i.ip_version, 4);
    assert_eq!(i.protocol, IPPROTO_UDP);
    let src = crate::addr_bytes(&i.src_addr);
    assert_eq!(&src[..4], &[10, 244, 1, 10]);
    assert_eq!(&src[4..], &[0u8; 12]);
    assert_eq!(&crate::addr_bytes(&i.dst_addr)[..4], &[10, 244, 2, 11]);
    assert_eq!((i.src_port, i.dst_port), (40000, 53));
    assert_eq!(i.wire_counts(meta(&f)), (1, 20 + 8 + 100));
    assert_eq!(i.wire_counts_with_payload(meta(&f)), (1, 20 + 8 + 100, 100));
}

#[test]
fn ethernet_padding_is_not_counted() {
    let mut f = frame(eth(ETH_P_IP, &[]), ipv4(IPPROTO_UDP, &[], &udp(1, 2, 0), 0));
    assert_eq!(f.len(), 42);
    f.resize(60, 0); // minimum Ethernet frame
    let i = parse(&f).unwrap();
    assert_eq!(i.wire_counts(meta(&f)), (1, 28));
}

#[test]
fn ipv4_options_move_the_transport_header() {
    let options = [0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert + NOPs + EOL
    let f = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_TCP, &options, &tcp(1234, 80, 0x18, 3, 10), 0),
    );
    let i = parse(&f).unwrap();
    assert_eq!(i.l3_header_len, 28);
    assert_eq!((i.src_port, i.dst_port, i.tcp_flags), (1234, 80, 0x18));
    assert_eq!(i.l4_header_len, 32);
    assert_eq!(i.wire_counts(meta(&f)).1, 28 + 32 + 10);
    assert_eq!(i.wire_counts_with_payload(meta(&f)).2, 10);
}

#[test]
fn vlan_tags_are_skipped() {
    let l3 = ipv4(IPPROTO_UDP, &[], &udp(5, 6, 1), 0);
    let one = frame(eth(ETH_P_IP, &[ETH_P_8021Q]), l3.clone());
    assert_eq!(parse(&one).unwrap().l3_offset, 18);
    let two = frame(eth(ETH_P_IP, &[ETH_P_8021AD, ETH_P_8021Q]), l3.clone());
    assert_eq!(parse(&two).unwrap().l3_offset, 22);
    let three = frame(eth(ETH_P_IP, &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q]), l3);
    assert_eq!(parse(&three), Err(ParseError::TooManyVlanTags));
}

#[test]
fn non_ip_is_not_a_flow() {
    let f = frame(eth(0x0806, &[]), std::vec![0u8; 28]);
    assert_eq!(parse(&f), Err(ParseError::NonIp));
}

#[test]
fn truncated_headers_at_every_layer() {
    let full = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_TCP, &[], &tcp(1, 2, 2, 0, 0), 0),
    );
    for cut in 0..full.len() {
        let f = &full[..cut];
        let expected = match cut {
            0..=13 => ParseError::TruncatedEthernet,
            // The IPv4 total length then promises more than the frame holds.
            _ => ParseError::TruncatedIp,
        };
        assert_eq!(parse(f), Err(expected), "cut at {cut}");
    }
    // A total length that fits the frame but leaves the TCP header short.
    let mut short = ipv4(IPPROTO_TCP, &[], &tcp(1, 2, 2, 0, 0)[..10], 0);
    short[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(
        parse(&frame(eth(ETH_P_IP, &[]), short)),
        Err(ParseError::TruncatedL4)
    );
}

#[test]
fn bad_ihl_and_version() {
    for ihl in 0..5u8 {
        let mut l3 = ipv4(IPPROTO_UDP, &[], &udp(1, 2, 4), 0);
        l3[0] = 0x40 | ihl;
        assert_eq!(
            parse(&frame(eth(ETH_P_IP, &[]), l3)),
            Err(ParseError::BadIpHeader),
            "ihl {ihl}"
        );
    }
    let mut l3 = ipv4(IPPROTO_UDP, &[], &udp(1, 2, 4), 0);
    l3[0] = 0x65; // IPv6 version under an IPv4 EtherType
    assert_eq!(
        parse(&frame(eth(ETH_P_IP, &[]), l3)),
        Err(ParseError::BadIpHeader)
    );
    // IHL promising options beyond the end of the frame.
    let mut l3 = ipv4(IPPROTO_UDP, &[], &[], 0);
    l3[0] = 0x4f;
    l3[2..4].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(
        parse(&frame(eth(ETH_P_IP, &[]), l3)),
        Err(ParseError::BadIpHeader)
    );
    // Bad TCP data offset.
    let mut t = tcp(1, 2, 2, 0, 0);
    t[12] = 0x40;
    assert_eq!(
        parse(&frame(eth(ETH_P_IP, &[]), ipv4(IPPROTO_TCP, &[], &t, 0))),
        Err(ParseError::TruncatedL4)
    );
}

#[test]
fn ipv4_fragments_are_not_flows() {
    let first = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_UDP, &[], &udp(1, 2, 16), 0x2000),
    );
    assert_eq!(parse(&first), Err(ParseError::Fragment));
    let later = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_UDP, &[], &[0u8; 16], 0x0002),
    );
    assert_eq!(parse(&later), Err(ParseError::Fragment));
    let df = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_UDP, &[], &udp(1, 2, 16), 0x4000),
    );
    assert!(parse(&df).is_ok());
}

#[test]
fn ipv6_tcp_and_extension_headers() {
    let t = tcp(443, 50000, 0x12, 0, 0);
    let plain = frame(eth(ETH_P_IPV6, &[]), ipv6(IPPROTO_TCP, &[], &t));
    let i = parse(&plain).unwrap();
    assert_eq!(
        (i.ip_version, i.protocol, i.src_port, i.dst_port),
        (6, 6, 443, 50000)
    );
    assert_eq!(crate::addr_bytes(&i.src_addr)[15], 10);
    assert_eq!(crate::addr_bytes(&i.dst_addr)[7], 2);
    assert_eq!(
        crate::addr_from_bytes(&crate::addr_bytes(&i.src_addr)),
        i.src_addr
    );
    assert_eq!(i.wire_counts(meta(&plain)), (1, 60));

    // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> routing (8) -> TCP.
    let mut ext = std::vec![60, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[43, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ext.extend_from_slice(&[IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
    let f = frame(eth(ETH_P_IPV6, &[]), ipv6(0, &ext, &t));
    let i = parse(&f).unwrap();
    assert_eq!(i.l3_header_len, 40 + 32);
    assert_eq!((i.protocol, i.src_port), (IPPROTO_TCP, 443));

    // Atomic fragment is parsed through; a real fragment is not a flow.
    let atomic = frame(
        eth(ETH_P_IPV6, &[]),
        ipv6(44, &[IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 1], &udp(7, 8, 0)),
    );
    assert_eq!(parse(&atomic).unwrap().dst_port, 8);
    let real = frame(
        eth(ETH_P_IPV6, &[]),
        ipv6(44, &[IPPROTO_UDP, 0, 0, 1, 0, 0, 0, 1], &udp(7, 8, 0)),
    );
    assert_eq!(parse(&real), Err(ParseError::Fragment));
}

#[test]
fn ipv6_extension_chain_too_long_or_truncated() {
    // Seven destination-options headers chained: one more than the walk allows.
    let mut ext = Vec::new();
    for _ in 0..7 {
        ext.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let f = frame(eth(ETH_P_IPV6, &[]), ipv6(60, &ext, &udp(1, 2, 0)));
    assert_eq!(parse(&f), Err(ParseError::Ipv6ExtensionChain));
    // An extension header whose length runs past the end of the packet.
    let l3 = ipv6(60, &[IPPROTO_UDP, 200, 1, 4, 0, 0, 0, 0], &[]);
    assert_eq!(
        parse(&frame(eth(ETH_P_IPV6, &[]), l3)),
        Err(ParseError::Ipv6ExtensionChain)
    );
    // Six headers is still fine.
    let mut ext = Vec::new();
    for i in 0..6 {
        ext.extend_from_slice(&[if i == 5 { IPPROTO_UDP } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    let f = frame(eth(ETH_P_IPV6, &[]), ipv6(60, &ext, &udp(1, 2, 0)));
    assert_eq!(parse(&f).unwrap().dst_port, 2);
}

#[test]
fn icmp_echo_identifier_and_type() {
    let echo = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    let f = frame(eth(ETH_P_IP, &[]), ipv4(IPPROTO_ICMP, &[], &echo, 0));
    let i = parse(&f).unwrap();
    assert_eq!((i.src_port, i.dst_port), (0x1234, 0x0800));
    let unreachable = [3u8, 3, 0, 0, 0, 0, 0, 0];
    let i = parse(&frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_ICMP, &[], &unreachable, 0),
    ))
    .unwrap();
    assert_eq!((i.src_port, i.dst_port), (0, 0x0303));
    let reply6 = [129u8, 0, 0, 0, 0, 7, 0, 1];
    let i = parse(&frame(
        eth(ETH_P_IPV6, &[]),
        ipv6(IPPROTO_ICMPV6, &[], &reply6),
    ))
    .unwrap();
    assert_eq!((i.src_port, i.dst_port), (7, 129 << 8));
}

#[test]
fn sctp_and_portless_protocols() {
    let mut sctp = std::vec![0x0b, 0xb8, 0x0b, 0xb9];
    sctp.resize(12, 0);
    let i = parse(&frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_SCTP, &[], &sctp, 0),
    ))
    .unwrap();
    assert_eq!((i.src_port, i.dst_port), (3000, 3001));
    let i = parse(&frame(eth(ETH_P_IP, &[]), ipv4(47, &[], &[0u8; 4], 0))).unwrap();
    assert_eq!((i.protocol, i.src_port, i.dst_port), (47, 0, 0));
}

#[test]
fn gso_aggregate_counts_wire_segments() {
    // A TSO aggregate of 3 segments: 3 x 1448 payload bytes behind one IPv4 + TCP (32) header.
    let payload = 3 * 1448;
    let mut l3 = ipv4(IPPROTO_TCP, &[], &tcp(1, 2, 0x10, 3, payload), 0);
    l3[2..4].copy_from_slice(&0u16.to_be_bytes()); // BIG TCP style: total length unusable
    let f = frame(eth(ETH_P_IP, &[]), l3);
    let m = SkbMeta {
        len: f.len() as u32,
        gso_segs: 3,
    };
    let i = parse_frame(&f[..], m).unwrap();
    assert_eq!(i.wire_counts(m), (3, 3 * (20 + 32 + 1448)));
    assert_eq!(
        i.wire_counts_with_payload(m),
        (3, 3 * (20 + 32 + 1448), payload as u64),
        "the payload is what the application sent"
    );
}

#[test]
fn stats_merge() {
    let mut a = crate::FlowStats {
        packets: 1,
        bytes: 10,
        payload_bytes: 4,
        first_seen_ns: 50,
        last_seen_ns: 60,
        tcp_flags: 2,
        _pad0: 0,
        last_sample: 0,
        last_ack: 0,
    };
    let b = crate::FlowStats {
        packets: 2,
        bytes: 20,
        payload_bytes: 7,
        first_seen_ns: 40,
        last_seen_ns: 55,
        tcp_flags: 0x10,
        _pad0: 0,
        last_sample: 0,
        last_ack: 0,
    };
    a.merge(&b);
    assert_eq!(
        (
            a.packets,
            a.bytes,
            a.payload_bytes,
            a.first_seen_ns,
            a.last_seen_ns,
            a.tcp_flags
        ),
        (3, 30, 11, 40, 60, 0x12)
    );
    let mut empty = crate::FlowStats::default();
    empty.merge(&b);
    assert_eq!(empty.first_seen_ns, 40);
    empty.merge(&crate::FlowStats::default());
    assert_eq!(empty.packets, 2);
}

#[test]
fn cache_index_spreads_and_stays_in_range() {
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..2000u16 {
        let k = crate::FlowKey {
            src_port: port,
            dst_port: 80,
            ifindex: 5,
            ip_version: 4,
            protocol: 6,
            ..Default::default()
        };
        // A half of 256 slots: shift 24.
        let i = crate::CacheSlot::index(&k, 24);
        assert!(i < 256);
        seen.insert(i);
    }
    assert!(
        seen.len() > 200,
        "2000 flows should use most of the 256 slots, used {}",
        seen.len()
    );
    // The hops of one flow on neighbouring interfaces, the two directions: distinct slots.
    let hop = |ifindex, direction| crate::FlowKey {
        src_port: 40000,
        dst_port: 5201,
        ifindex,
        direction,
        ip_version: 4,
        protocol: 6,
        ..Default::default()
    };
    for i in 1..64u32 {
        let (a, b) = (hop(i, 0), hop(i + 1, 1));
        assert_ne!(
            crate::CacheSlot::index(&a, 20),
            crate::CacheSlot::index(&b, 20),
            "{i}"
        );
        assert_ne!(
            crate::CacheSlot::index(&hop(i, 0), 20),
            crate::CacheSlot::index(&hop(i, 1), 20),
            "{i}"
        );
    }
    let a = crate::FlowKey {
        ifindex: 1,
        ..Default::default()
    };
    let b = crate::FlowKey {
        ifindex: 1,
        direction: 1,
        ..Default::default()
    };
    assert_ne!(a.words(), b.words());
}

#[test]
fn vxlan_gso_aggregate_counts_inner_headers_per_segment() {
    // Outer IPv4/UDP to 8472, VXLAN, inner Ethernet + IPv4 + TCP (32) + 3 x 1398 bytes.
    let mut inner = eth(ETH_P_IP, &[]);
    inner.extend(ipv4(
        IPPROTO_TCP,
        &[],
        &tcp(40000, 80, 0x10, 3, 3 * 1398),
        0,
    ));
    let mut vx = std::vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend(inner);
    let outer = udp(51000, 8472, vx.len());
    let mut outer_udp = outer[..8].to_vec();
    outer_udp.extend(vx);
    let f = frame(eth(ETH_P_IP, &[]), ipv4(IPPROTO_UDP, &[], &outer_udp, 0));
    let m = SkbMeta {
        len: f.len() as u32,
        gso_segs: 3,
    };
    let i = parse_frame(&f[..], m).unwrap();
    assert_eq!(i.l4_header_len, 8 + 8 + 14 + 20 + 32);
    assert_eq!(
        i.wire_counts(m),
        (3, 3 * (20 + 8 + 8 + 14 + 20 + 32 + 1398))
    );
    // Not an aggregate: the plain IP total length, as always.
    let plain = SkbMeta {
        len: f.len() as u32,
        gso_segs: 1,
    };
    assert_eq!(
        parse_frame(&f[..], plain).unwrap().wire_counts(plain).1,
        (f.len() - 14) as u64
    );
}

/// Rewrites what DNAT/SNAT rewrite: addresses and ports (and, as the kernel does, the
/// checksums, which the packet id must not depend on either).
fn nat_rewrite(f: &mut [u8], l3: usize, ihl: usize) {
    f[l3 + 12..l3 + 16].copy_from_slice(&[192, 168, 50, 2]);
    f[l3 + 16..l3 + 20].copy_from_slice(&[10, 96, 0, 10]);
    f[l3 + 10] ^= 0x5a;
    let l4 = l3 + ihl;
    f[l4..l4 + 4].copy_from_slice(&[0x75, 0x30, 0x00, 0x50]);
}

#[test]
fn packet_id_survives_nat_and_tells_packets_apart() {
    let l3 = ETH_HLEN;
    for proto_frame in [
        ipv4(IPPROTO_TCP, &[], &tcp(40000, 8080, 0x18, 0, 100), 0x4000),
        ipv4(IPPROTO_UDP, &[], &udp(40000, 53, 32), 0x4000),
    ] {
        let f = frame(eth(ETH_P_IP, &[]), proto_frame);
        let before = packet_id(f.as_slice(), &parse(&f).unwrap());
        let mut g = f.clone();
        nat_rewrite(&mut g, l3, 20);
        let info = parse(&g).unwrap();
        assert_eq!(info.dst_port, 80, "the rewrite changed the port");
        assert!(packet_id(g.as_slice(), &info).same_as(&before));
        // Another IPv4 id: another packet.
        let mut h = f.clone();
        h[l3 + 5] ^= 1;
        assert!(!packet_id(h.as_slice(), &parse(&h).unwrap()).same_as(&before));
    }
    // TCP: another sequence number is another packet.
    let f = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_TCP, &[], &tcp(1, 2, 0x10, 0, 10), 0),
    );
    let a = packet_id(f.as_slice(), &parse(&f).unwrap());
    let mut g = f.clone();
    g[l3 + 20 + 7] ^= 0x40;
    assert!(!packet_id(g.as_slice(), &parse(&g).unwrap()).same_as(&a));
    // IPv6 (no id field): the flow label and the payload start identify it.
    let f = frame(
        eth(ETH_P_IPV6, &[]),
        ipv6(IPPROTO_UDP, &[], &udp(5353, 53, 16)),
    );
    let mut g = f.clone();
    g[l3 + 1] = 0x0a; // flow label
    let (a, b) = (
        packet_id(f.as_slice(), &parse(&f).unwrap()),
        packet_id(g.as_slice(), &parse(&g).unwrap()),
    );
    assert!(!a.same_as(&b));
    assert_eq!(b.ident, 0x000a_0000);
    // A packet whose payload is shorter than the words read still gets an id.
    let f = frame(eth(ETH_P_IP, &[]), ipv4(IPPROTO_UDP, &[], &udp(1, 2, 0), 0));
    let id = packet_id(f.as_slice(), &parse(&f).unwrap());
    assert_eq!((id.l4_a, id.l4_b), (0, 0));
    assert!(id.slot() < crate::SIGHTING_SLOTS);
}

#[test]
fn tuple_reversal_and_equality() {
    let f = frame(
        eth(ETH_P_IP, &[]),
        ipv4(IPPROTO_UDP, &[], &udp(40000, 53, 4), 0),
    );
    let info = parse(&f).unwrap();
    let key = crate::FlowKey {
        src_addr: info.src_addr,
        dst_addr: info.dst_addr,
        src_port: info.src_port,
        dst_port: info.dst_port,
        ifindex: 7,
        direction: 1,
        ip_version: 4,
        protocol: IPPROTO_UDP,
        _pad: 0,
    };
    let t = key.tuple();
    let r = t.reversed();
    assert_eq!((r.src_port, r.dst_port), (53, 40000));
    assert!(r.reversed().same_as(&t));
    assert!(!r.same_as(&t));
}

#[test]
fn rtt_hint_slot_pairs_a_question_with_its_answer() {
    let key = |src: u32, dst: u32, sp: u16, dp: u16, ifindex: u32| crate::FlowKey {
        src_addr: [src, 0, 0, 0],
        dst_addr: [dst, 0, 0, 0],
        src_port: sp,
        dst_port: dp,
        ifindex,
        direction: 1,
        ip_version: 4,
        protocol: IPPROTO_TCP,
        _pad: 0,
    };
    let question = key(0x0a_f4_01_0a, 0x0a_f4_02_0b, 40000, 80, 7);
    let answer = key(0x0a_f4_02_0b, 0x0a_f4_01_0a, 80, 40000, 7);
    // The answer reads the slot the question marked, whatever the hook direction.
    let mut other_dir = answer;
    other_dir.direction = 0;
    assert_eq!(question.rtt_hint_slot(false), answer.rtt_hint_slot(true));
    assert_eq!(question.rtt_hint_slot(false), other_dir.rtt_hint_slot(true));
    // Per direction: the two directions of one connection mark different slots here, so
    // one direction's answer does not clear the other's mark.
    assert_ne!(question.rtt_hint_slot(false), answer.rtt_hint_slot(false));
    // Another interface or port is another slot, and slots spread over the whole array.
    assert_ne!(
        question.rtt_hint_slot(false),
        key(0x0a_f4_01_0a, 0x0a_f4_02_0b, 40000, 80, 8).rtt_hint_slot(false)
    );
    let mut seen = std::collections::HashSet::new();
    for port in 0..4096u16 {
        let s = key(0x0a_f4_01_0a, 0x0a_f4_02_0b, 30000 + port, 80, 7).rtt_hint_slot(false);
        assert!(s < crate::RTT_HINT_SLOTS);
        seen.insert(s);
    }
    assert!(
        seen.len() > 3000,
        "4096 client ports took only {} slots",
        seen.len()
    );
}

#[test]
fn the_common_frame_parses_as_field_by_field() {
    // The frames the fast path is for: TCP with and without options and payload, UDP of
    // every payload size around the bytes a packet id reads, plain and as GSO aggregates.
    let mut bases = Vec::new();
    for flags in [0x02, 0x12, 0x10, 0x18, 0x11, 0x04] {
        for (options, payload) in [(0, 0), (3, 0), (0, 1), (3, 1448), (10, 7)] {
            bases.push(frame(
                eth(ETH_P_IP, &[]),
                ipv4(
                    IPPROTO_TCP,
                    &[],
                    &tcp(40000, 8080, flags, options, payload),
                    0x4000,
                ),
            ));
        }
    }
    for payload in [0, 3, 11, 12, 13, 64, 1400] {
        bases.push(frame(
            eth(ETH_P_IP, &[]),
            ipv4(IPPROTO_UDP, &[], &udp(5353, 53, payload), 0),
        ));
    }
    let mut common = 0;
    for f in &bases {
        for gso_segs in [0, 1, 3] {
            let m = SkbMeta {
                len: f.len() as u32,
                gso_segs,
            };
            if let Some(fast) = parse_common(f.as_slice(), m) {
                common += 1;
                assert_eq!(Ok(fast), parse_any(f.as_slice(), m), "{f:02x?} {m:?}");
            }
            assert_eq!(parse_frame(f.as_slice(), m), parse_any(f.as_slice(), m));
        }
    }
    // Every TCP base (54 bytes and up) and the UDP ones of 54 bytes or more (12 payload bytes), plain
    // or TCP GSO: the fast path is taken where it is meant to be.
    assert_eq!(common, 30 * 3 + 4 * 2, "frames the fast path took");

    // Then every frame one to three bytes away from those, cut short or with a GSO meta that
    // disagrees: wherever the fast path answers, it answers as the checked reads do, and
    // parse_frame as a whole always does.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut fast, mut slow) = (0, 0);
    for _ in 0..200_000 {
        let mut f = bases[(next() % bases.len() as u64) as usize].clone();
        for _ in 0..1 + next() % 3 {
            // Mostly the headers the fast path reads, sometimes beyond.
            let at = (next() % 64) as usize % f.len();
            f[at] = next() as u8;
        }
        if next() % 4 == 0 {
            let cut = (next() as usize) % (f.len() + 1);
            f.truncate(cut);
        }
        let m = SkbMeta {
            len: match next() % 4 {
                0 => (next() % 2000) as u32,
                _ => f.len() as u32,
            },
            gso_segs: [0, 1, 2, 45][(next() % 4) as usize],
        };
        match parse_common(f.as_slice(), m) {
            Some(info) => {
                fast += 1;
                assert_eq!(Ok(info), parse_any(f.as_slice(), m), "{f:02x?} {m:?}");
            }
            None => slow += 1,
        }
        assert_eq!(parse_frame(f.as_slice(), m), parse_any(f.as_slice(), m));
    }
    assert!(fast > 20_000 && slow > 20_000, "fast {fast}, slow {slow}");
}
