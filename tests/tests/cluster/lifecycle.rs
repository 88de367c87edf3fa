//! The agent's life cycle on the emulated cluster: interfaces that appear later, interfaces
//! that go away, other TC programs on the same hooks, and what is left after the agent exits.
//!
//! Ground truth: the kernel's own view (`bpftool prog show`, `bpftool link show`,
//! `tc filter show`, `tc qdisc show`), not flowtrace's.

use std::{
    net::IpAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use flowtrace_tests::{
    check_nothing_left, check_unloaded, find, finish, flowtrace_program_ids, ftgen, ftgen_bg,
    in_netns, require_root, tc_show, traced_devices, Agent, Bed, Cluster, ClusterOptions,
};

/// The kernel program IDs the agent reports (its TC programs and its raw tracepoint
/// programs, whose links must go with it too); checked against bpftool's list.
fn ids_of(agent: &Agent) -> Vec<u64> {
    let ids: Vec<u64> = agent
        .interfaces()
        .unwrap()
        .programs
        .iter()
        .map(|p| p.id as u64)
        .collect();
    let loaded = flowtrace_program_ids().unwrap();
    let mut names: Vec<String> = agent
        .interfaces()
        .unwrap()
        .programs
        .iter()
        .map(|p| p.name.clone())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "flowtrace_egress",
            "flowtrace_ingress",
            "flowtrace_kfree_skb",
            "flowtrace_slow",
            "flowtrace_tcp_retransmit"
        ],
        "the TC programs, their tail-called slow path and the two raw tracepoint programs (drops, retransmissions): {ids:?}"
    );
    assert!(
        ids.iter().all(|i| loaded.contains(i)),
        "bpftool does not list {ids:?}: {loaded:?}"
    );
    ids
}

#[test]
fn nothing_is_left_after_sigterm_or_sigkill_with_tcx() {
    require_root().unwrap();
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let node = cluster.node(1).unwrap();

    // Clean exit.
    let agent = Agent::start(&node.netns, &[]).unwrap();
    let ids = ids_of(&agent);
    let attached = agent.interfaces().unwrap();
    assert_eq!(
        attached.interfaces.len(),
        traced_devices(node).len(),
        "{attached:?}"
    );
    let log = agent.stop().unwrap();
    assert!(log.contains("detached from every interface"), "{log}");
    check_nothing_left(node, &ids).unwrap();

    // Killed: TCX links belong to the process's file descriptors, so the kernel detaches.
    let agent = Agent::start(&node.netns, &[]).unwrap();
    let killed_ids = ids_of(&agent);
    agent.kill().unwrap();
    // The next start works and its exit leaves nothing either.
    let agent = Agent::start(&node.netns, &[]).unwrap();
    let mut all = killed_ids.clone();
    all.extend(ids_of(&agent));
    agent.stop().unwrap();
    check_nothing_left(node, &all).unwrap();
    cluster.down().unwrap();
}

#[test]
fn nothing_is_left_after_sigterm_or_sigkill_with_clsact() {
    require_root().unwrap();
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let node = cluster.node(1).unwrap();

    let agent = Agent::start(&node.netns, &["--attach-mode", "clsact"]).unwrap();
    let f = tc_show(node, &["filter", "show", "dev", "flannel.1", "ingress"]).unwrap();
    assert!(
        f.contains("flowtrace_ingress"),
        "clsact mode attaches a cls_bpf filter: {f}"
    );
    let ids = ids_of(&agent);
    agent.stop().unwrap();
    check_nothing_left(node, &ids).unwrap();

    // A killed agent leaves its filters (cls_bpf does not belong to a process); the next start
    // removes them and attaches exactly one filter per hook.
    let agent = Agent::start(&node.netns, &["--attach-mode", "clsact"]).unwrap();
    let ids = ids_of(&agent);
    agent.kill().unwrap();
    let f = tc_show(node, &["filter", "show", "dev", "flannel.1", "egress"]).unwrap();
    assert!(
        f.contains("flowtrace_egress"),
        "expected the killed agent's filter to remain: {f}"
    );
    let agent = Agent::start(&node.netns, &["--attach-mode", "clsact"]).unwrap();
    let f = tc_show(node, &["filter", "show", "dev", "flannel.1", "egress"]).unwrap();
    assert_eq!(
        f.matches("flowtrace_egress").count(),
        1,
        "stale filter not replaced: {f}"
    );
    let mut all = ids;
    all.extend(ids_of(&agent));
    agent.stop().unwrap();
    // The qdisc the killed agent added cannot be told apart from an operator's; only the
    // filters and programs are checked here (see docs/design.md).
    check_unloaded(&all).unwrap();
    for dev in traced_devices(node) {
        for dir in ["ingress", "egress"] {
            let f = tc_show(node, &["filter", "show", "dev", &dev, dir]).unwrap();
            assert!(!f.contains("flowtrace"), "{dev} {dir}: {f}");
        }
    }
    cluster.down().unwrap();
}

#[test]
fn a_pod_created_later_is_counted_within_a_second_and_forgotten_when_removed() {
    let mut bed = Bed::up().unwrap();
    let late = bed.cluster.add_pod(1, "pod-late").unwrap();
    let target = bed.cluster.pod(1, "pod-a").unwrap().clone();
    let sink = ftgen_bg(
        &target,
        &[
            "udp-sink",
            "--bind",
            "0.0.0.0:23001",
            "--count",
            "200",
            "--timeout-ms",
            "15000",
        ],
    )
    .unwrap();
    let started = Instant::now();
    let sender = late
        .spawn_guarded(&[
            flowtrace_tests::ftgen_bin().unwrap().to_str().unwrap(),
            "udp-send",
            "--to",
            &format!("{}:23001", target.ipv4),
            "--count",
            "200",
            "--size",
            "64",
            "--interval-us",
            "10000",
        ])
        .unwrap();
    let src: IpAddr = late.ipv4.into();
    let dst: IpAddr = target.ipv4.into();
    let visible = loop {
        let flows = bed.agent(1).flows().unwrap();
        if let Some(f) = find(&flows, 17, src, dst, None, 23001) {
            if f.hops.iter().any(|h| h.interface == late.host_veth) {
                break started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new pod's traffic never showed up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        visible < Duration::from_secs(1),
        "first seen after {visible:?}"
    );
    finish(sender).unwrap();
    let got = finish(sink).unwrap();
    let f = find(&bed.agent(1).flows().unwrap(), 17, src, dst, None, 23001).unwrap();
    let hop = f
        .hops
        .iter()
        .find(|h| h.interface == late.host_veth)
        .unwrap();
    assert_eq!(
        hop.packets,
        got["received"].as_u64().unwrap(),
        "every datagram the sink got was counted at the new veth"
    );

    // Removal: the interface leaves the attached set within a second; its flow keeps its name.
    bed.cluster.remove_pod(1, "pod-late").unwrap();
    let removed = Instant::now();
    loop {
        let names: Vec<String> = bed
            .agent(1)
            .interfaces()
            .unwrap()
            .interfaces
            .into_iter()
            .map(|i| i.name)
            .collect();
        if !names.contains(&late.host_veth) {
            break;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "{} still attached: {names:?}",
            late.host_veth
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = find(&bed.agent(1).flows().unwrap(), 17, src, dst, None, 23001).unwrap();
    assert!(f.hops.iter().any(|h| h.interface == late.host_veth));
}

/// Another TC program attached after flowtrace on the same hook still sees every packet:
/// flowtrace returns TCX_NEXT and never ends the chain.
#[test]
fn programs_after_flowtrace_on_the_same_hook_still_run() {
    let bed = Bed::up().unwrap();
    let (a, c) = (
        bed.cluster.pod(1, "pod-a").unwrap().clone(),
        bed.cluster.pod(1, "pod-c").unwrap().clone(),
    );
    let netns = bed.cluster.node(1).unwrap().netns.clone();
    let veth = a.host_veth.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let neighbour = std::thread::spawn(move || {
        in_netns(&netns, move || -> Result<u64, String> {
            use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
            use flowtrace_tests::baselines;
            let mut ebpf = aya::Ebpf::load(baselines::OBJECT).map_err(|e| e.to_string())?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(baselines::BENCH_COUNTER)
                .ok_or("no bench_counter")?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| e.to_string())?;
            prog.load().map_err(|e| e.to_string())?;
            prog.attach_with_options(
                &veth,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| e.to_string())?;
            ready_tx.send(()).map_err(|e| e.to_string())?;
            read_rx.recv().map_err(|e| e.to_string())?;
            let map: aya::maps::PerCpuHashMap<_, [u8; 16], u64> =
                aya::maps::PerCpuHashMap::try_from(
                    ebpf.map(baselines::BASELINE_FLOWS).ok_or("no map")?,
                )
                .map_err(|e| e.to_string())?;
            let mut total = 0;
            for item in map.iter() {
                let (k, v) = item.map_err(|e| e.to_string())?;
                // Key: src, dst (network order), sport, dport (network order), proto.
                if u16::from_be_bytes([k[10], k[11]]) == 23002 && k[12] == 17 {
                    total += v.iter().sum::<u64>();
                }
            }
            Ok(total)
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the neighbour program attached");
    let sink = ftgen_bg(
        &c,
        &[
            "udp-sink",
            "--bind",
            "0.0.0.0:23002",
            "--count",
            "50",
            "--timeout-ms",
            "10000",
        ],
    )
    .unwrap();
    let sent = ftgen(
        &a,
        &[
            "udp-send",
            "--to",
            &format!("{}:23002", c.ipv4),
            "--count",
            "50",
            "--size",
            "32",
            "--interval-us",
            "500",
        ],
    )
    .unwrap();
    assert_eq!(finish(sink).unwrap()["received"], 50);
    assert_eq!(sent["sent"], 50);
    read_tx.send(()).unwrap();
    let seen_by_neighbour = neighbour.join().unwrap().unwrap().unwrap();
    assert_eq!(
        seen_by_neighbour, 50,
        "the program attached after flowtrace must see every packet"
    );
    let f = find(
        &bed.agent(1).flows().unwrap(),
        17,
        a.ipv4.into(),
        c.ipv4.into(),
        None,
        23002,
    )
    .unwrap();
    assert_eq!(f.hops[0].packets, 50);
}
