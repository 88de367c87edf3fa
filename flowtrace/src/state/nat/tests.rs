use flowtrace_common::NatRecord;

use super::*;
use crate::testutil::{kernel_tuple, tcp as ft};

fn drained(before: &FlowTuple, after: &FlowTuple) -> DrainedNat {
    DrainedNat {
        original: kernel_tuple(before),
        record: NatRecord {
            translated: kernel_tuple(after),
            from_ifindex: 5,
            to_ifindex: 3,
            from_direction: 0,
            to_direction: 1,
            sightings: 1,
            first_seen_ns: 10,
            last_seen_ns: 10,
            ..NatRecord::default()
        },
    }
}

fn names(i: u32) -> String {
    format!("if{i}")
}

/// client 10.244.1.2:40000 -> VIP 10.96.0.10:80, DNAT to 10.244.2.3:8080.
fn service_conn() -> (CtEntry, FlowTuple, FlowTuple) {
    let orig = ft("10.244.1.2", 40000, "10.96.0.10", 80);
    let reply = ft("10.244.2.3", 8080, "10.244.1.2", 40000);
    (CtEntry { orig, reply }, orig, reply)
}

#[test]
fn conntrack_entry_rewrites_both_directions() {
    let (ct, orig, reply) = service_conn();
    assert!(ct.translated());
    let [fwd, back] = ct.rewrites();
    assert_eq!(fwd, (orig, ft("10.244.1.2", 40000, "10.244.2.3", 8080)));
    assert_eq!(back, (reply, ft("10.96.0.10", 80, "10.244.1.2", 40000)));
    let plain = CtEntry {
        orig,
        reply: orig.reversed(),
    };
    assert!(!plain.translated());
}

#[test]
fn kernel_records_confirmed_by_conntrack() {
    let (ct, _, _) = service_conn();
    let [fwd, back] = ct.rewrites();
    let mut t = NatTable::new(u64::MAX);
    t.merge_kernel(&[drained(&fwd.0, &fwd.1), drained(&back.0, &back.1)], 1);
    t.cross_check(&[ct], &|_| true, 2);
    let c = t.counters();
    assert_eq!(
        (c.kernel_records, c.confirmed, c.disagreements()),
        (2, 2, 0)
    );
    let all = t.snapshot(&names);
    assert_eq!(all.len(), 2);
    assert!(all
        .iter()
        .all(|x| x.state == NatState::Confirmed && x.source == "kernel+conntrack"));
    let fwd_view = t.get(&fwd.0, &names).unwrap();
    assert_eq!(fwd_view.rewrote, "dst");
    assert_eq!(t.get(&back.0, &names).unwrap().rewrote, "src");
    assert_eq!(fwd_view.between.as_ref().unwrap()[0].interface, "if5");
}

#[test]
fn disagreements_are_counted() {
    let (ct, _, _) = service_conn();
    let [fwd, back] = ct.rewrites();
    let mut t = NatTable::new(u64::MAX);
    // The programs saw a different backend than conntrack chose.
    let wrong = ft("10.244.1.2", 40000, "10.244.1.9", 8080);
    t.merge_kernel(&[drained(&fwd.0, &wrong)], 1);
    // And a rewrite conntrack never heard of.
    let ghost = ft("10.244.1.7", 1, "10.96.0.99", 80);
    t.merge_kernel(
        &[drained(&ghost, &ft("10.244.1.7", 1, "10.244.2.8", 80))],
        1,
    );
    t.cross_check(&[ct], &|_| true, 2);
    assert_eq!(t.counters().mismatch, 1);
    // The reply direction was traced on both sides but not recorded: pending, then missed.
    assert_eq!(t.get(&back.0, &names).unwrap().state, NatState::Pending);
    assert_eq!(
        t.counters().not_in_conntrack,
        0,
        "one check is not enough to give up"
    );
    t.cross_check(&[ct], &|_| true, 3);
    let c = t.counters();
    assert_eq!((c.mismatch, c.not_in_conntrack, c.missed), (1, 1, 1));
    assert_eq!(c.disagreements(), 3);
}

#[test]
fn untraced_pre_nat_side_is_completed_from_conntrack() {
    // NodePort from outside: 192.168.50.1:5000 -> node 192.168.50.2:30080, DNAT + masquerade.
    let orig = ft("192.168.50.1", 5000, "192.168.50.2", 30080);
    let reply = ft("10.244.2.3", 8080, "10.244.2.1", 61000);
    let ct = CtEntry { orig, reply };
    let post = reply.reversed();
    let mut t = NatTable::new(u64::MAX);
    t.cross_check(&[ct], &|x| *x == post || *x == reply, 1);
    let c = t.counters();
    assert_eq!((c.conntrack_only, c.disagreements()), (2, 0));
    let v = t.get(&orig, &names).unwrap();
    assert_eq!(
        (v.state, v.source.as_str(), v.rewrote.as_str()),
        (NatState::ConntrackOnly, "conntrack", "src+dst")
    );
    assert_eq!(t.original_of(&post), Some(orig));
    assert_eq!(t.original_of(&orig), None);
    // Completed from conntrack, the translation's sides are known as the kernel's are.
    assert!([orig, post, orig.reversed(), reply]
        .iter()
        .all(|x| t.touches(x)));
    // Connections flowtrace never saw are ignored.
    let mut t = NatTable::new(u64::MAX);
    t.cross_check(&[ct], &|_| false, 1);
    assert!(t.is_empty());
}

#[test]
fn the_translated_index_follows_new_repointed_and_expired_entries() {
    let before = ft("10.244.1.10", 40000, "10.96.0.10", 80);
    let a = ft("10.244.1.10", 40000, "10.244.1.11", 8080);
    let b = ft("10.244.1.10", 40000, "10.244.2.11", 8080);
    let mut t = NatTable::new(10);
    assert_eq!(t.merge_kernel(&[drained(&before, &a)], 1).len(), 1);
    assert_eq!(t.original_of(&a), Some(before));
    let sides = |t: &NatTable, x: &FlowTuple| (t.touches(x), t.touches(&x.reversed()));
    assert_eq!(
        (sides(&t, &before), sides(&t, &a), sides(&t, &b)),
        ((true, true), (true, true), (false, false))
    );
    // The same rewrite again changes nothing.
    assert!(t.merge_kernel(&[drained(&before, &a)], 2).is_empty());
    assert_eq!(t.original_of(&a), Some(before));
    // The tuple reused by a connection to the other backend.
    assert_eq!(t.merge_kernel(&[drained(&before, &b)], 3).len(), 1);
    assert_eq!((t.original_of(&a), t.original_of(&b)), (None, Some(before)));
    assert_eq!(
        (sides(&t, &before), sides(&t, &a), sides(&t, &b)),
        ((true, true), (false, false), (true, true))
    );
    t.expire(5);
    assert_eq!(t.original_of(&b), Some(before));
    t.expire(100);
    assert_eq!(t.original_of(&b), None);
    assert_eq!(
        (sides(&t, &before), sides(&t, &b)),
        ((false, false), (false, false))
    );
}
