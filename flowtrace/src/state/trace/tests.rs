use super::*;
use crate::model::wire::TraceLine;

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
fn lines_round_trip_as_tagged_json() {
    let line = TraceLine::Lost { packets: 7 };
    let s = serde_json::to_string(&line).unwrap();
    assert_eq!(s, r#"{"kind":"lost","packets":7}"#);
    assert_eq!(serde_json::from_str::<TraceLine>(&s).unwrap(), line);
}
