use flowtrace_common::{NatRecord, DIR_EGRESS, DIR_INGRESS};

use super::*;
use crate::{
    kernel::drain::DrainedNat,
    model::Direction,
    state::trace::Sighting,
    testutil::{kernel_tuple, shop_cache, syn_through_dnat, tcp as ft},
};

fn nat_of(pairs: &[(FlowTuple, FlowTuple)]) -> NatTable {
    let mut nat = NatTable::new(u64::MAX);
    let drained: Vec<DrainedNat> = pairs
        .iter()
        .map(|(before, after)| DrainedNat {
            original: kernel_tuple(before),
            record: NatRecord {
                translated: kernel_tuple(after),
                from_ifindex: 1,
                to_ifindex: 2,
                from_direction: DIR_INGRESS,
                to_direction: DIR_EGRESS,
                sightings: 1,
                ..NatRecord::default()
            },
        })
        .collect();
    nat.merge_kernel(&drained, 1);
    nat
}

fn name(e: &Option<Arc<Endpoint>>) -> Option<&str> {
    e.as_deref().map(|e| e.name.as_str())
}

/// web-a -> Service db (10.96.0.20:5432), DNATed to db-a; and the reply, un-DNATed.
fn connection() -> [FlowTuple; 4] {
    [
        ft("10.244.1.10", 40000, "10.96.0.20", 5432),
        ft("10.244.1.10", 40000, "10.244.1.20", 5432),
        ft("10.244.1.20", 5432, "10.244.1.10", 40000),
        ft("10.96.0.20", 5432, "10.244.1.10", 40000),
    ]
}

#[test]
fn every_tuple_of_a_service_connection_names_the_service_and_the_backend() {
    let meta = shop_cache();
    let [before, after, reply, unreply] = connection();
    let links = HashMap::new();
    // Both rewrites recorded, only the request's, only the reply's: the same answers.
    for pairs in [
        vec![(before, after), (reply, unreply)],
        vec![(before, after)],
        vec![(reply, unreply)],
    ] {
        let nat = nat_of(&pairs);
        let n = Namer::new(&meta, &nat, &links);
        for t in [before, after, reply, unreply] {
            let a = n.flow(&t);
            assert_eq!(
                a.service.as_ref().map(|s| s.to_string()).as_deref(),
                Some("shop/db"),
                "{t:?} with {pairs:?}"
            );
        }
        // Before the DNAT the destination is the Service; the peer is the backend.
        let a = n.flow(&before);
        assert_eq!(
            a.dst.as_ref().map(|e| e.kind),
            Some(crate::model::EndpointKind::Service)
        );
        assert_eq!(name(&a.dst_peer), Some("db-5d4f-a"));
        assert_eq!(a.dst_end().map(|e| e.name.as_str()), Some("db-5d4f-a"));
        assert_eq!(a.src_end().map(|e| e.name.as_str()), Some("web-5d4f-a"));
        assert!(a.src_peer.is_none());
        // After the reply's un-DNAT the source is the Service; the peer is the backend.
        let a = n.flow(&unreply);
        assert_eq!(name(&a.src_peer), Some("db-5d4f-a"));
        assert_eq!(a.dst_end().map(|e| e.name.as_str()), Some("web-5d4f-a"));
        // Tuples with pod addresses on both ends have no peers to add.
        for t in [after, reply] {
            let a = n.flow(&t);
            assert!(a.src_peer.is_none() && a.dst_peer.is_none(), "{t:?}");
        }
    }
}

#[test]
fn the_nat_step_is_the_translation_the_tuple_is_a_side_of() {
    let meta = shop_cache();
    let [before, after, reply, unreply] = connection();
    let links = HashMap::new();
    let nat = nat_of(&[(before, after)]);
    let n = Namer::new(&meta, &nat, &links);
    assert_eq!(n.flow(&before).nat_original, Some(before));
    assert_eq!(n.flow(&after).nat_original, Some(before));
    // The reply's own rewrite was not recorded: no NAT step, but still named.
    assert_eq!(n.flow(&reply).nat_original, None);
    assert_eq!(n.flow(&unreply).nat_original, None);
    let t = n.translation(&before).expect("recorded");
    assert_eq!(t.service.map(|s| s.to_string()).as_deref(), Some("shop/db"));
    assert_eq!(t.between.expect("hooks")[0].interface, "if1");
}

#[test]
fn a_tuple_without_nat_or_service_is_named_by_its_addresses() {
    let meta = shop_cache();
    let nat = NatTable::new(u64::MAX);
    let links = HashMap::new();
    let n = Namer::new(&meta, &nat, &links);
    let a = n.flow(&ft("10.244.1.11", 1000, "10.244.1.10", 80));
    assert_eq!(name(&a.src), Some("web-5d4f-b"));
    assert_eq!(name(&a.dst), Some("web-5d4f-a"));
    assert_eq!(
        (a.service, a.nat_original, a.src_peer, a.dst_peer),
        (None, None, None, None)
    );
    let a = n.flow(&ft("192.0.2.1", 1000, "10.244.9.9", 80));
    assert_eq!((a.src, a.dst), (None, None));
}

#[test]
fn a_nodeport_connection_names_its_service_and_backend_from_one_namer() {
    // shop plus node1 (192.168.50.1) and Service db's NodePort 30432, DNATed to db-a.
    let mut meta = shop_cache();
    let n: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}
    }))
    .expect("a test object");
    meta.apply_node(crate::k8s::objects::node(&n).expect("a test object"));
    let s: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "db"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "ports": [{"port": 5432, "protocol": "TCP", "nodePort": 30432}]}
    }))
    .expect("a test object");
    meta.apply_service(crate::k8s::objects::service(&s).expect("a test object"));
    let before = ft("10.244.1.10", 40000, "192.168.50.1", 30432);
    let after = ft("10.244.1.10", 40000, "10.244.1.20", 5432);
    let nat = nat_of(&[(before, after)]);
    let links = HashMap::new();
    let n = Namer::new(&meta, &nat, &links);
    // Asked twice each, in both orders: the namer's memo of addresses answers the same.
    for t in [before, after, after, before] {
        let a = n.flow(&t);
        assert_eq!(
            a.service.as_ref().map(|s| s.to_string()).as_deref(),
            Some("shop/db"),
            "{t:?}"
        );
        assert_eq!(
            a.dst_end().map(|e| e.name.as_str()),
            Some("db-5d4f-a"),
            "{t:?}"
        );
    }
    assert_eq!(name(&n.flow(&before).dst_peer), Some("db-5d4f-a"));
    // The node's address on a port that is no NodePort: no Service, the node itself.
    let a = n.flow(&ft("10.244.1.10", 40001, "192.168.50.1", 22));
    assert_eq!((a.service, a.dst_peer.is_none()), (None, true));
    assert_eq!(
        a.dst.map(|e| e.kind),
        Some(crate::model::EndpointKind::Node)
    );
}

#[test]
fn a_traced_packet_is_named_like_the_flows_it_crosses() {
    let meta = shop_cache();
    let [before, after, ..] = connection();
    let links = HashMap::new();
    // The NAT table does not have the rewrite yet: the packet's hooks show it.
    let nat = NatTable::new(u64::MAX);
    let n = Namer::new(&meta, &nat, &links);
    let p = TracedPacket {
        hops: vec![
            Sighting {
                ts_ns: 100,
                ifindex: 1,
                direction: Direction::Ingress,
                tuple: before,
                tcp_flags: 0x02,
                bytes: 60,
            },
            Sighting {
                ts_ns: 2_600,
                ifindex: 2,
                direction: Direction::Egress,
                tuple: after,
                tcp_flags: 0x02,
                bytes: 60,
            },
        ],
    };
    let named = n.trace_packet(&p, "node1", 1_000).expect("two hooks");
    assert_eq!(
        named.service.as_ref().map(|s| s.to_string()).as_deref(),
        Some("shop/db")
    );
    assert_eq!(
        named.dst_peer.as_ref().map(|e| e.name.as_str()),
        Some("db-5d4f-a")
    );
    // Once the NAT table has it, the flow view says the same.
    let nat = nat_of(&[(before, after)]);
    let n2 = Namer::new(&meta, &nat, &links);
    let a = n2.flow(&before);
    assert_eq!(a.service, named.service);
    assert_eq!(a.dst_peer.map(|e| (*e).clone()), named.dst_peer);
    assert_eq!(n2.trace_packet(&p, "node1", 1_000), Some(named));
}

#[test]
fn describe_reports_hop_deltas_the_nat_step_and_applies_the_filter() {
    let meta = MetaCache::new();
    let nat = NatTable::new(1);
    let links = HashMap::new();
    let namer = Namer::new(&meta, &nat, &links);
    let p = syn_through_dnat();
    let named = namer.trace_packet(&p, "node1", 1_000).expect("two hooks");
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
}

#[test]
fn a_naming_form_names_as_its_tuples_do_and_leaves_out_only_client_ports() {
    let meta = shop_cache();
    let links = HashMap::new();
    // Two connections of web-a to the Service db (client ports 40000 and 40001), both DNATed
    // to db-a, with their replies (the second's un-DNAT not recorded); one of web-a's to
    // db-a directly.
    let conn = |port: u16| {
        [
            ft("10.244.1.10", port, "10.96.0.20", 5432),
            ft("10.244.1.10", port, "10.244.1.20", 5432),
            ft("10.244.1.20", 5432, "10.244.1.10", port),
            ft("10.96.0.20", 5432, "10.244.1.10", port),
        ]
    };
    let (a, b) = (conn(40000), conn(40001));
    let nat = nat_of(&[(a[0], a[1]), (a[2], a[3]), (b[0], b[1])]);
    let n = Namer::new(&meta, &nat, &links);
    let direct = ft("10.244.1.10", 40002, "10.244.1.20", 5432);
    for t in a.iter().chain(&b).chain([&direct]) {
        let form = n.naming_form(t);
        let want = Attribution {
            nat_original: None,
            ..n.flow(t)
        };
        assert_eq!(n.name_form(&form), want, "{t:?}");
    }
    // The same places of both connections share a form (the client port left out), and no
    // two places of one connection do.
    for i in 0..4 {
        assert!(n.naming_form(&a[i]) == n.naming_form(&b[i]), "place {i}");
        for j in 0..4 {
            assert_eq!(
                i == j,
                n.naming_form(&a[i]) == n.naming_form(&a[j]),
                "{i} {j}"
            );
        }
    }
    // A Service port is kept: the Service's other port is another form.
    let other = ft("10.244.1.10", 40000, "10.96.0.20", 5433);
    assert!(n.naming_form(&other) != n.naming_form(&a[0]));
}
