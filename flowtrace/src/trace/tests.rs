use super::*;

fn id(n: u32) -> PacketId {
    PacketId {
        ident: n,
        len_proto: 60 << 8 | 6,
        l4_a: 1000,
        l4_b: 2000,
    }
}

fn at(ts_ns: u64, ifindex: u32, direction: Direction, dst: &str) -> Sighting {
    Sighting {
        ts_ns,
        ifindex,
        direction,
        tuple: FlowTuple {
            protocol: 6,
            src: "10.244.1.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: 40000,
            dst_port: 80,
        },
        tcp_flags: 0x02,
        bytes: 60,
    }
}

#[test]
fn joins_one_packets_hooks_in_time_order_and_waits_for_the_window() {
    let mut a = Assembler::default();
    let t0 = 1_000_000_000;
    assert!(a
        .push(&id(1), at(t0 + 30_000, 4, Direction::Egress, "10.244.2.9"))
        .is_none());
    assert!(a
        .push(&id(1), at(t0, 3, Direction::Ingress, "10.96.0.10"))
        .is_none());
    assert!(a
        .push(&id(2), at(t0 + 5, 3, Direction::Ingress, "10.96.0.10"))
        .is_none());
    assert!(a.flush(t0 + JOIN_WINDOW_NS - 1).is_empty(), "too early");
    let out = a.flush(t0 + JOIN_WINDOW_NS + 5);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].hops.iter().map(|h| h.ifindex).collect::<Vec<_>>(),
        vec![3, 4],
        "sorted by time"
    );
    assert_eq!(out[1].hops.len(), 1);
    assert!(a.is_empty());
}

#[test]
fn the_same_hook_twice_or_a_long_gap_starts_another_packet() {
    let mut a = Assembler::default();
    let t0 = 5_000;
    a.push(&id(1), at(t0, 3, Direction::Ingress, "10.96.0.10"));
    let first = a
        .push(&id(1), at(t0 + 100, 3, Direction::Ingress, "10.96.0.10"))
        .expect("a retransmission at the same hook ends the first packet");
    assert_eq!(first.hops.len(), 1);
    let second = a
        .push(
            &id(1),
            at(
                t0 + 100 + JOIN_MAX_GAP_NS + 1,
                4,
                Direction::Egress,
                "10.244.2.9",
            ),
        )
        .expect("too late to be the same packet");
    assert_eq!(second.hops[0].ts_ns, t0 + 100);
    assert_eq!(a.flush(u64::MAX).len(), 1);
}

#[test]
fn describe_reports_hop_deltas_the_nat_step_and_applies_the_filter() {
    let meta = MetaCache::new();
    let nat = NatTable::new(1);
    let iface = |i: u32| format!("if{i}");
    let namer = Namer {
        node: "node1",
        meta: &meta,
        nat: &nat,
        iface: &iface,
        mono_to_unix_ns: 1_000,
    };
    let p = TracedPacket {
        hops: vec![
            at(100, 3, Direction::Ingress, "10.96.0.10"),
            at(2_600, 4, Direction::Egress, "10.244.2.9"),
        ],
    };
    let all = FlowFilter::default();
    let named = namer
        .describe(&p, &all)
        .expect("no filter passes everything");
    assert_eq!(named.ts_unix_ns, 1_100);
    assert_eq!(named.node_time_ns, 2_500);
    assert_eq!(named.hops[0].since_previous_ns, 0);
    assert!(named.hops[0].nat.is_none());
    assert_eq!(named.hops[1].since_previous_ns, 2_500);
    let step = named.hops[1].nat.as_ref().expect("the tuple changed");
    assert_eq!(step.rewrote, "dst");
    assert_eq!(step.before.dst.to_string(), "10.96.0.10");
    assert_eq!(step.after.dst.to_string(), "10.244.2.9");
    assert_eq!(named.tcp_flags, "S");

    // A filter on the backend address matches the packet whose first hook still had the
    // Service address: the packet is followed across the NAT.
    let backend = FlowFilter {
        ips: vec!["10.244.2.9".parse().unwrap()],
        ..Default::default()
    };
    assert!(namer.describe(&p, &backend).is_some());
    let other = FlowFilter {
        ips: vec!["10.244.3.0/24".parse().unwrap()],
        ..Default::default()
    };
    assert!(namer.describe(&p, &other).is_none());
    let udp = FlowFilter {
        protos: vec!["udp".parse().unwrap()],
        ..Default::default()
    };
    assert!(namer.describe(&p, &udp).is_none());
    let iface_filter = FlowFilter {
        ifaces: vec!["if4".into()],
        ..Default::default()
    };
    assert!(namer.describe(&p, &iface_filter).is_some());
}

#[test]
fn lines_round_trip_as_tagged_json() {
    let line = TraceLine::Lost { packets: 7 };
    let s = serde_json::to_string(&line).unwrap();
    assert_eq!(s, r#"{"kind":"lost","packets":7}"#);
    assert_eq!(serde_json::from_str::<TraceLine>(&s).unwrap(), line);
}
