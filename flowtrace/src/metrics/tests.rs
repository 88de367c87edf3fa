use flowtrace_common::{FlowKey, FlowStats, NatRecord, DIR_EGRESS, DIR_INGRESS};

use super::*;
use crate::{
    host::links::{Link, LinkRole},
    k8s::MetaCache,
    kernel::drain::{DrainedFlow, DrainedNat},
    state::nat::NatTable,
    testutil::{kernel_addr, kernel_tuple, lcg, shop_cache as cache, tcp as ft},
};

fn flow(t: &FlowTuple, ifindex: u32, direction: u8, packets: u64, bytes: u64) -> DrainedFlow {
    DrainedFlow {
        key: FlowKey {
            src_addr: kernel_addr(t.src),
            dst_addr: kernel_addr(t.dst),
            src_port: t.src_port,
            dst_port: t.dst_port,
            ifindex,
            direction,
            ip_version: 4,
            protocol: t.protocol,
            _pad: 0,
        },
        stats: FlowStats {
            packets,
            bytes,
            ..FlowStats::default()
        },
    }
}

fn cfg(level: Level, max_series: usize) -> MetricsConfig {
    MetricsConfig {
        level,
        max_series,
        series_ttl_ns: 60_000_000_000,
    }
}

fn drained(flows: Vec<DrainedFlow>, nat: Vec<DrainedNat>) -> Drained {
    Drained {
        flows,
        nat,
        latency: Vec::new(),
        drops: Vec::new(),
        fill: Default::default(),
        problems: Vec::new(),
    }
}

/// Interface 1 is a pod's veth, 2 the overlay device, 100 to 199 other devices `ifN`.
fn links() -> HashMap<u32, Link> {
    let link = |ifindex: u32, name: &str, kind: &str, peer: bool| Link {
        ifindex,
        name: name.into(),
        kind: Some(kind.into()),
        peer_netnsid: peer.then_some(0),
        ethernet: true,
        master: None,
        role: match kind {
            "vxlan" => LinkRole::Overlay,
            "veth" if peer => LinkRole::PodVeth,
            _ => LinkRole::Other,
        },
        why: String::new(),
    };
    let mut links = HashMap::from([
        (1, link(1, "veth1", "veth", true)),
        (2, link(2, "flannel.1", "vxlan", false)),
    ]);
    for i in 100..200 {
        links.insert(i, link(i, &format!("if{i}"), "bridge", false));
    }
    links
}

fn observe(m: &mut Metrics, meta: &MetaCache, nat: &mut NatTable, d: &Drained, now_ns: u64) {
    let new = nat.merge_kernel(&d.nat, now_ns);
    let links = links();
    let namer = Namer::new(meta, nat, &links);
    m.observe_drain(&DrainView {
        drained: d,
        drops: &[],
        reasons: &HashMap::new(),
        new_translations: &new,
        namer: &namer,
        now_ns,
        duration_s: 0.002,
    });
}

/// Feeds `m` one drain of drops: 3 + 4 NETFILTER_DROP at the overlay device, 5 inside the
/// pod behind veth1, and 6 retransmitted segments.
fn observe_drops(m: &mut Metrics) {
    use crate::{
        host::netns::NsPlace,
        state::drops::{DropSite, PlacedDrop},
    };
    let meta = MetaCache::new();
    let nat = NatTable::new(u64::MAX);
    let links = links();
    let namer = Namer::new(&meta, &nat, &links);
    let tuple = Some(crate::model::FlowTuple {
        protocol: 17,
        src: "10.0.0.1".parse().unwrap(),
        dst: "10.0.0.2".parse().unwrap(),
        src_port: 1,
        dst_port: 2,
    });
    let site = |netns, ifindex| DropSite {
        reason: 12,
        netns,
        ifindex,
        location: 0,
    };
    let placed = [
        PlacedDrop {
            tuple,
            retransmit: false,
            site: site(NsPlace::Node, 2),
            packets: 3,
        },
        PlacedDrop {
            tuple,
            retransmit: false,
            site: site(NsPlace::Node, 2),
            packets: 4,
        },
        PlacedDrop {
            tuple,
            retransmit: false,
            site: site(NsPlace::Pod { veth: 1 }, 2),
            packets: 5,
        },
        PlacedDrop {
            tuple,
            retransmit: true,
            site: site(NsPlace::Node, 0),
            packets: 6,
        },
    ];
    let reasons = HashMap::from([(12, "NETFILTER_DROP".to_string())]);
    m.observe_drain(&DrainView {
        drained: &drained(Vec::new(), Vec::new()),
        drops: &placed,
        reasons: &reasons,
        new_translations: &[],
        namer: &namer,
        now_ns: 1,
        duration_s: 0.001,
    });
}

/// Drops count per reason (named from the kernel's list) and place; retransmissions apart.
#[test]
fn drops_and_retransmissions_are_counted_by_reason_and_place() {
    let mut m = Metrics::new(cfg(Level::Pod, 100));
    observe_drops(&mut m);
    let t = text(&m);
    let series = |name: &str, needle: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with(name) && l.contains(needle))
            .map(String::from)
            .collect()
    };
    let overlay = series("flowtrace_drops_total{", "hop=\"overlay\"");
    assert_eq!(overlay.len(), 1, "{t}");
    assert!(
        overlay[0].contains("reason=\"NETFILTER_DROP\"") && overlay[0].ends_with(" 7"),
        "{t}"
    );
    let in_pod = series("flowtrace_drops_total{", "hop=\"in_pod\"");
    assert!(in_pod.len() == 1 && in_pod[0].ends_with(" 5"), "{t}");
    let retx = series("flowtrace_tcp_retransmits_total{", "");
    assert!(retx.len() == 1 && retx[0].ends_with(" 6"), "{t}");
}

fn text(m: &Metrics) -> String {
    encode(&m.families(&Health::default())).unwrap()
}

/// The value of the one sample of `name` whose labels include all of `want`.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(hits.len() <= 1, "{name} {want:?} matched {hits:?}");
    hits.first().copied()
}

#[test]
fn traffic_is_counted_per_workload_pair_hop_and_service_across_the_dnat() {
    let meta = cache();
    let mut nat = NatTable::new(u64::MAX);
    let mut m = Metrics::new(cfg(Level::Workload, 100));
    // web-a -> db Service; DNAT to db-a between the pod veth (1) and the overlay (2).
    let before = ft("10.244.1.10", 40000, "10.96.0.20", 5432);
    let after = ft("10.244.1.10", 40000, "10.244.1.20", 5432);
    let reply = ft("10.244.1.20", 5432, "10.244.1.10", 40000);
    let unreply = ft("10.96.0.20", 5432, "10.244.1.10", 40000);
    let nat_records = vec![
        DrainedNat {
            original: kernel_tuple(&before),
            record: NatRecord {
                translated: kernel_tuple(&after),
                ..NatRecord::default()
            },
        },
        DrainedNat {
            original: kernel_tuple(&reply),
            record: NatRecord {
                translated: kernel_tuple(&unreply),
                ..NatRecord::default()
            },
        },
    ];
    let d = drained(
        vec![
            flow(&before, 1, DIR_INGRESS, 3, 300),
            flow(&after, 2, DIR_EGRESS, 3, 300),
            flow(&reply, 2, DIR_INGRESS, 2, 120),
            flow(&unreply, 1, DIR_EGRESS, 2, 120),
            // web-b -> web-a, no Service; two drains add up.
            flow(
                &ft("10.244.1.11", 1000, "10.244.1.10", 80),
                1,
                DIR_INGRESS,
                1,
                60,
            ),
        ],
        nat_records,
    );
    observe(&mut m, &meta, &mut nat, &d, 1);
    let d2 = drained(
        vec![flow(
            &ft("10.244.1.11", 1000, "10.244.1.10", 80),
            1,
            DIR_INGRESS,
            4,
            240,
        )],
        Vec::new(),
    );
    observe(&mut m, &meta, &mut nat, &d2, 2);
    let t = text(&m);
    let web_to_db = [
        ("src_namespace", "shop"),
        ("src_workload", "web"),
        ("dst_workload", "db"),
        ("service", "shop/db"),
    ];
    // The hop before the DNAT names the backend too, not the Service address.
    let at = |hop: &str, dir: &str| {
        let mut w = web_to_db.to_vec();
        w.extend([("hop", hop), ("direction", dir)]);
        sample(&t, "flowtrace_bytes_total", &w)
    };
    assert_eq!(at("pod", "ingress"), Some(300.0), "{t}");
    assert_eq!(at("overlay", "egress"), Some(300.0), "{t}");
    // Replies: the backend is the source on both sides of the un-DNAT.
    let back = |hop: &str| {
        sample(
            &t,
            "flowtrace_packets_total",
            &[
                ("src_workload", "db"),
                ("dst_workload", "web"),
                ("service", "shop/db"),
                ("hop", hop),
            ],
        )
    };
    assert_eq!(
        (back("overlay"), back("pod")),
        (Some(2.0), Some(2.0)),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "flowtrace_bytes_total",
            &[
                ("src_workload", "web"),
                ("dst_workload", "web"),
                ("service", "")
            ]
        ),
        Some(300.0),
        "two drains add up: {t}"
    );
    // One connection translated (the reply's un-DNAT is not a second one).
    assert_eq!(
        sample(
            &t,
            "flowtrace_nat_translations_total",
            &[
                ("service", "shop/db"),
                ("src_workload", "web"),
                ("dst_workload", "db")
            ]
        ),
        Some(1.0),
        "{t}"
    );
    assert!(
        !t.contains("src_pod=\"web"),
        "no pod names at workload level: {t}"
    );
}

#[test]
fn levels_name_pods_or_namespaces_only() {
    let meta = cache();
    let f = flow(
        &ft("10.244.1.11", 1000, "10.244.1.10", 80),
        1,
        DIR_INGRESS,
        1,
        60,
    );
    for (level, src_workload, src_pod) in [
        (Level::Pod, "web", "web-5d4f-b"),
        (Level::Workload, "web", ""),
        (Level::Namespace, "", ""),
    ] {
        let mut m = Metrics::new(cfg(level, 100));
        observe(
            &mut m,
            &meta,
            &mut NatTable::new(u64::MAX),
            &drained(vec![f], vec![]),
            1,
        );
        let t = text(&m);
        assert_eq!(
            sample(
                &t,
                "flowtrace_bytes_total",
                &[
                    ("src_namespace", "shop"),
                    ("src_workload", src_workload),
                    ("src_pod", src_pod)
                ]
            ),
            Some(60.0),
            "{level:?}: {t}"
        );
    }
    // An address no metadata names.
    let mut m = Metrics::new(cfg(Level::Workload, 100));
    let f = flow(
        &ft("192.0.2.1", 1, "10.244.1.10", 80),
        1,
        DIR_INGRESS,
        1,
        60,
    );
    observe(
        &mut m,
        &meta,
        &mut NatTable::new(u64::MAX),
        &drained(vec![f], vec![]),
        1,
    );
    assert_eq!(
        sample(
            &text(&m),
            "flowtrace_bytes_total",
            &[("src_workload", "unknown")]
        ),
        Some(60.0)
    );
}

#[test]
fn series_stop_at_the_cap_and_the_rest_is_folded_into_other() {
    let meta = MetaCache::new();
    let mut m = Metrics::new(MetricsConfig {
        level: Level::Pod,
        max_series: 10,
        series_ttl_ns: 1_000,
    });
    // Unknown addresses all share labels; distinct hops make distinct series.
    let flows: Vec<DrainedFlow> = (0..50u32)
        .map(|i| {
            flow(
                &ft("192.0.2.1", 1, "192.0.2.2", 2),
                100 + i,
                DIR_INGRESS,
                1,
                10,
            )
        })
        .collect();
    observe(
        &mut m,
        &meta,
        &mut NatTable::new(u64::MAX),
        &drained(flows, vec![]),
        1,
    );
    let t = text(&m);
    let series = t
        .lines()
        .filter(|l| l.starts_with("flowtrace_bytes_total{"))
        .count();
    assert_eq!(series, 10, "{t}");
    // 9 real series took 9 updates; the other 41 went to `other`.
    assert_eq!(
        sample(&t, "flowtrace_bytes_total", &[("hop", "other")]),
        Some(410.0),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "flowtrace_metrics_folded_total",
            &[("metric", "flowtrace_bytes_total")]
        ),
        Some(41.0)
    );
    assert_eq!(
        sample(
            &t,
            "flowtrace_metrics_series",
            &[("metric", "flowtrace_bytes_total")]
        ),
        Some(10.0)
    );
    // Everything idle past the TTL goes; new series fit again.
    let one = vec![flow(
        &ft("192.0.2.1", 1, "192.0.2.2", 2),
        7,
        DIR_INGRESS,
        1,
        10,
    )];
    observe(
        &mut m,
        &meta,
        &mut NatTable::new(u64::MAX),
        &drained(one, vec![]),
        5_000,
    );
    let t = text(&m);
    assert_eq!(
        t.lines()
            .filter(|l| l.starts_with("flowtrace_bytes_total{"))
            .count(),
        1,
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "flowtrace_metrics_series_expired_total",
            &[("metric", "flowtrace_bytes_total")]
        ),
        Some(10.0)
    );
}

#[test]
fn label_values_are_escaped_whatever_the_name() {
    let mut set: SeriesSet<u64> = SeriesSet::new();
    *set.get(
        vec!["a\"b".to_string(), "back\\slash".into(), "new\nline".into()].into_boxed_slice(),
        10,
        1,
    ) += 5;
    let names = ["x", "y", "z"];
    let mut f = family("flowtrace_bytes_total", MetricType::COUNTER);
    for (l, v) in sorted(&set) {
        f.mut_metric().push(counter(&names, l, *v as f64));
    }
    let t = encode(&[f]).unwrap();
    assert!(
        t.contains(r#"flowtrace_bytes_total{x="a\"b",y="back\\slash",z="new\nline"} 5"#),
        "{t}"
    );
}

#[test]
fn every_family_served_is_listed_with_its_type_and_help() {
    let mut m = Metrics::new(cfg(Level::Workload, 100));
    // Something for every family: a flow through the Service, its DNAT, a hop latency and
    // a round trip.
    let before = ft("10.244.1.10", 40000, "10.96.0.20", 5432);
    let after = ft("10.244.1.10", 40000, "10.244.1.20", 5432);
    let mut d = drained(
        vec![flow(&before, 1, DIR_INGRESS, 1, 60)],
        vec![DrainedNat {
            original: kernel_tuple(&before),
            record: NatRecord {
                translated: kernel_tuple(&after),
                ..NatRecord::default()
            },
        }],
    );
    let mut rtt = flowtrace_common::LatencyHist {
        count: 1,
        ..Default::default()
    };
    rtt.buckets[20] = 1;
    d.latency.push(crate::kernel::drain::DrainedLatency {
        key: flowtrace_common::LatencyKey {
            tuple: kernel_tuple(&after),
            from_ifindex: 0,
            to_ifindex: 2,
            from_direction: 0,
            to_direction: DIR_EGRESS,
            kind: flowtrace_common::LAT_HANDSHAKE,
            _pad: 0,
        },
        hist: rtt,
    });
    d.latency.push(crate::kernel::drain::DrainedLatency {
        key: flowtrace_common::LatencyKey {
            tuple: kernel_tuple(&ft("10.244.1.11", 1000, "10.244.1.10", 80)),
            from_ifindex: 1,
            to_ifindex: 2,
            from_direction: DIR_INGRESS,
            to_direction: DIR_EGRESS,
            kind: flowtrace_common::LAT_HOP,
            _pad: 0,
        },
        hist: {
            let mut h = flowtrace_common::LatencyHist {
                count: 3,
                sum_ns: 3 * 3000,
                ..Default::default()
            };
            h.buckets[11] = 3; // [2048, 4096) ns
            h
        },
    });
    observe(&mut m, &cache(), &mut NatTable::new(u64::MAX), &d, 1);
    observe_drops(&mut m);
    let fams = m.families(&Health {
        programs: vec![("flowtrace_ingress".into(), 1_000, 10)],
        nat: crate::model::wire::NatCounters {
            confirmed: 7,
            not_in_conntrack: 2,
            conntrack_errors: 1,
            ..Default::default()
        },
        ..Health::default()
    });
    let listed: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
    for f in &fams {
        let (_, kind, help) = FAMILIES
            .iter()
            .find(|(n, _, _)| *n == f.name())
            .unwrap_or_else(|| panic!("{} is served but not in FAMILIES", f.name()));
        let served = match f.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            other => panic!("{other:?}"),
        };
        assert_eq!(*kind, served, "{}", f.name());
        assert!(!help.is_empty());
    }
    for name in listed {
        assert!(
            fams.iter().any(|f| f.name() == name),
            "{name} is listed but never served"
        );
    }
    let t = encode(&fams).unwrap();
    // 3 samples in [2048, 4096) ns: none up to le 2.048e-06, all from 4.096e-06.
    let le = |b: &str| {
        sample(
            &t,
            "flowtrace_hop_latency_seconds_bucket",
            &[("le", b), ("from_hop", "pod/ingress")],
        )
    };
    assert_eq!(
        (le("0.000002048"), le("0.000004096"), le("+Inf")),
        (Some(0.0), Some(3.0), Some(3.0)),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "flowtrace_bpf_program_run_seconds_total",
            &[("program", "flowtrace_ingress")]
        ),
        Some(0.000001)
    );
    let nat = |r: &str| sample(&t, "flowtrace_nat_checks_total", &[("result", r)]);
    assert_eq!(
        (nat("confirmed"), nat("not_in_conntrack"), nat("mismatch")),
        (Some(7.0), Some(2.0), Some(0.0)),
        "{t}"
    );
    assert_eq!(
        sample(&t, "flowtrace_conntrack_errors_total", &[]),
        Some(1.0)
    );
}

/// A traffic sum's key by name: both ends, the Service, the hook and the protocol.
type NamedKey = (String, String, String, u32, u8, u8);

/// `traffic_sums`'s sums, comparable: ends and Service by name, (packets, bytes, updates).
fn comparable(
    sums: HashMap<TrafficKey, TrafficSum, FastHash>,
) -> std::collections::BTreeMap<NamedKey, (u64, u64, u64)> {
    let end = |e: &Option<Arc<Endpoint>>| format!("{:?}", e.as_deref().map(|e| (e.kind, &e.name)));
    let mut out = std::collections::BTreeMap::new();
    for (k, s) in sums {
        let key = (
            end(&s.src),
            end(&s.dst),
            format!("{:?}", k.service),
            k.ifindex,
            k.direction,
            k.protocol,
        );
        let o: &mut (u64, u64, u64) = out.entry(key).or_default();
        *o = (o.0 + s.packets, o.1 + s.bytes, o.2 + s.updates);
    }
    out
}

#[test]
fn entries_summed_by_addresses_first_are_summed_as_entry_by_entry_naming_would() {
    // Random drains between pods, a Service address (with and without a translation the
    // NAT table holds) and an unknown address, on both ports of the Service and others:
    // the sums must be those of naming every entry with `Namer::flow`.
    let meta = cache();
    let links = links();
    let mut rand = lcg(0x9e37_79b9);
    let addrs = [
        "10.244.1.10",
        "10.244.1.11",
        "10.244.1.20",
        "10.96.0.20",
        "10.9.9.9",
    ];
    let ports = [5432, 80, 40000, 40001];
    let (mut served, mut translated) = (0, 0);
    for round in 0..20 {
        let mut nat = NatTable::new(u64::MAX);
        let mut tuples = Vec::new();
        for _ in 0..40 {
            let mut t = ft(
                addrs[rand(addrs.len() as u64) as usize],
                ports[rand(ports.len() as u64) as usize],
                addrs[rand(addrs.len() as u64) as usize],
                ports[rand(ports.len() as u64) as usize],
            );
            t.protocol = if rand(4) == 0 { 17 } else { 6 };
            tuples.push(t);
        }
        // Some connections to the Service address are DNATed to db-a, and some between
        // pods to another pod (no end serves: only the NAT table tells them apart), each
        // recorded with its reply's un-DNAT, alone, or without it (then a reply is named by
        // the request's translation, or the request by its reply's).
        let mut records = Vec::new();
        for t in tuples.clone() {
            let to_service = t.dst.to_string() == "10.96.0.20";
            let between_pods = t.src.to_string().starts_with("10.244.")
                && t.dst.to_string().starts_with("10.244.");
            if !(to_service || between_pods) || rand(2) == 0 {
                continue;
            }
            let after = FlowTuple {
                dst: if t.dst.to_string() == "10.244.1.20" {
                    "10.244.1.11"
                } else {
                    "10.244.1.20"
                }
                .parse()
                .expect("addr"),
                ..t
            };
            tuples.extend([after, after.reversed(), t.reversed()]);
            let both = [(t, after), (after.reversed(), t.reversed())];
            let recorded = match rand(3) {
                0 => &both[..1],
                1 => &both[1..],
                _ => &both[..],
            };
            for (o, x) in recorded {
                records.push(DrainedNat {
                    original: kernel_tuple(o),
                    record: NatRecord {
                        translated: kernel_tuple(x),
                        ..NatRecord::default()
                    },
                });
            }
        }
        nat.merge_kernel(&records, 1);
        let flows: Vec<DrainedFlow> = (0..200)
            .map(|_| {
                let t = &tuples[rand(tuples.len() as u64) as usize];
                let mut f = flow(t, 1 + rand(2) as u32, rand(2) as u8, 1 + rand(3), 100);
                f.key.protocol = t.protocol;
                f
            })
            .collect();
        let d = drained(flows, Vec::new());
        let namer = Namer::new(&meta, &nat, &links);
        let v = DrainView {
            drained: &d,
            drops: &[],
            reasons: &HashMap::new(),
            new_translations: &[],
            namer: &namer,
            now_ns: 1,
            duration_s: 0.0,
        };
        let mut want: HashMap<TrafficKey, TrafficSum, FastHash> = HashMap::default();
        for f in &d.flows {
            add_named(&mut want, &namer, &FlowTuple::from_key(&f.key), f);
        }
        let (got, want) = (comparable(traffic_sums(&v)), comparable(want));
        served += usize::from(want.keys().any(|k| k.2 != "None"));
        translated += usize::from(!records.is_empty());
        assert_eq!(got, want, "round {round}");
    }
    assert!(
        served >= 15 && translated >= 10,
        "the drains reach the Service ({served} of 20) and hold translations ({translated})"
    );
}

#[test]
fn translations_of_one_drain_between_the_same_pods_add_up() {
    // Three connections web-a -> db Service DNATed to db-a and one web-b -> db: summed
    // before their labels are built, they must still count one each.
    let meta = cache();
    let mut nat = NatTable::new(u64::MAX);
    let mut m = Metrics::new(cfg(Level::Pod, 100));
    let records = [
        ("10.244.1.10", 40000),
        ("10.244.1.10", 40001),
        ("10.244.1.10", 40002),
        ("10.244.1.11", 40000),
    ]
    .map(|(client, port)| DrainedNat {
        original: kernel_tuple(&ft(client, port, "10.96.0.20", 5432)),
        record: NatRecord {
            translated: kernel_tuple(&ft(client, port, "10.244.1.20", 5432)),
            ..NatRecord::default()
        },
    });
    observe(
        &mut m,
        &meta,
        &mut nat,
        &drained(Vec::new(), records.to_vec()),
        1,
    );
    let t = text(&m);
    let from = |pod: &str| {
        sample(
            &t,
            "flowtrace_nat_translations_total",
            &[
                ("src_pod", pod),
                ("dst_pod", "db-5d4f-a"),
                ("service", "shop/db"),
            ],
        )
    };
    assert_eq!(
        (from("web-5d4f-a"), from("web-5d4f-b")),
        (Some(3.0), Some(1.0)),
        "{t}"
    );
}

/// Adds entry `f`, of tuple `t`, to `sums`, the tuple named with `Namer::flow`: the
/// reference the drain's sums are checked against, every entry named by itself.
fn add_named(
    sums: &mut HashMap<TrafficKey, TrafficSum, FastHash>,
    namer: &Namer<'_>,
    t: &FlowTuple,
    f: &DrainedFlow,
) {
    let a = namer.flow(t);
    let sum = summed(
        sums,
        a.src_peer.or(a.src),
        a.dst_peer.or(a.dst),
        a.service,
        hook(&f.key),
    );
    sum.packets += f.stats.packets;
    sum.bytes += f.stats.bytes;
    sum.updates += 1;
}
