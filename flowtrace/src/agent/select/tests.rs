use std::collections::HashMap;

use super::*;
use crate::{k8s::MetaCache, state::nat::NatTable, testutil::syn_through_dnat};

#[test]
fn a_traced_packet_is_selected_at_any_of_its_hooks() {
    let meta = MetaCache::new();
    let nat = NatTable::new(1);
    let links = HashMap::new();
    let namer = Namer::new(&meta, &nat, &links);
    let p = syn_through_dnat();
    let named = namer.trace_packet(&p, "node1", 0).expect("two hooks");
    let passes = |f: FlowFilter| packet_selected(&f, &namer, &p, named.service.as_ref());
    assert!(passes(FlowFilter::default()), "no filter passes everything");
    // A filter on the backend address matches the packet whose first hook still had the
    // Service address: the packet is followed across the NAT.
    assert!(passes(FlowFilter {
        ips: vec!["10.244.2.9".parse().unwrap()],
        ..Default::default()
    }));
    assert!(!passes(FlowFilter {
        ips: vec!["10.244.3.0/24".parse().unwrap()],
        ..Default::default()
    }));
    assert!(!passes(FlowFilter {
        protos: vec!["udp".parse().unwrap()],
        ..Default::default()
    }));
    assert!(passes(FlowFilter {
        ifaces: vec!["if4".into()],
        ..Default::default()
    }));
}
