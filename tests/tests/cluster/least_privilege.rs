//! The agent run as the DaemonSet runs it: uid 0 with only the capabilities
//! deploy/daemonset.yaml adds (read from the manifest), nothing inheritable or ambient,
//! `no_new_privs`, every filesystem but /proc and /dev read-only and no bpffs or tracefs mounted
//! ([`flowtrace_tests::Agent::spawn_confined`], which uses `setpriv` and a private mount
//! namespace). Not emulated: the container runtime's seccomp profile (see deploy/README.md).
//!
//! Ground truth: the kernel's view of the agent process (`/proc/<pid>/status`, its
//! `mountinfo`), ftgen's counts of what it sent, `conntrack -L`, `promtool`, and
//! `bpftool`/`tc` for what is left attached. Names come from the fixture API server (a real
//! HTTP server speaking the API's list/watch protocol; the real API server cannot run here).
//! Needs root.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use flowtrace::model::Direction;
use flowtrace_tests::{
    check_nothing_left, find, flowtrace_program_ids, http_get, parse_exposition, promtool,
    require_root, service_connections, udp_all_received, Agent, Bed, Cluster, ClusterOptions,
};

const UDP_COUNT: u64 = 200;
const UDP_PAYLOAD: u64 = 100;
const CONNECTIONS: u64 = 20;

/// The capabilities deploy/daemonset.yaml adds to the agent container, as `setpriv` spells
/// them (`NET_ADMIN` -> `net_admin`).
fn daemonset_capabilities() -> Vec<String> {
    let (_, agent) = crate::manifest::daemonset_agent();
    let caps = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("the agent container's capabilities");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "the DaemonSet drops ALL before adding"
    );
    let caps: Vec<String> = caps
        .add
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    assert!(
        !caps.is_empty(),
        "no capability added in deploy/daemonset.yaml"
    );
    caps
}

/// Bit numbers of capability names (linux/capability.h).
fn cap_bit(name: &str) -> u32 {
    match name {
        "net_admin" => 12,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("cap_bit: add {other} (linux/capability.h)"),
    }
}

/// The hexadecimal capability sets and NoNewPrivs of process `pid`, from /proc.
fn proc_status(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs")
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_agent_works_with_only_the_daemonsets_capabilities_and_read_only_filesystems() {
    let caps = daemonset_capabilities();
    let names: Vec<&str> = caps.iter().map(String::as_str).collect();
    let before = flowtrace_program_ids().unwrap();
    let bed = Bed::with_metadata_confined(&names).unwrap();
    let c = &bed.cluster;
    let (n1, n2) = (c.node(1).unwrap(), c.node(2).unwrap());

    // What the kernel says each agent holds.
    let mask: u64 = names.iter().map(|n| 1u64 << cap_bit(n)).sum();
    for agent in &bed.agents {
        let pid = agent.pid().unwrap();
        let st = proc_status(pid);
        let hex = |k: &str| u64::from_str_radix(&st[k], 16).unwrap();
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                hex(set),
                mask,
                "{set} of the agent in {}: {st:?} (want only {names:?})",
                agent.netns
            );
        }
        assert_eq!((hex("CapInh"), hex("CapAmb")), (0, 0), "{st:?}");
        assert_eq!(st["NoNewPrivs"], "1", "{st:?}");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (point, opts) = (f[4], f[5]);
            let fstype = line
                .split(" - ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("");
            assert!(
                !["bpf", "tracefs", "debugfs"].contains(&fstype),
                "the confined agent sees a {fstype} mount: {line}"
            );
            if !point.starts_with("/proc") && !point.starts_with("/dev") {
                assert!(
                    opts.split(',').any(|o| o == "ro"),
                    "{point} is writable for the confined agent: {line}"
                );
            }
        }
    }

    // UDP between two workloads across the nodes, as in the metrics test.
    let (a1, c2) = (c.pod(1, "pod-a").unwrap(), c.pod(2, "pod-c").unwrap());
    udp_all_received(a1, c2, 7400, UDP_COUNT, UDP_PAYLOAD).unwrap();
    // Connections through the Service: conntrack (netlink) under the confined capabilities.
    let dnat = service_connections(c, a1, CONNECTIONS).unwrap();

    // The UDP flow at the client's veth (node1) and the receiver's (node2), bytes and packets
    // as sent.
    let bytes = UDP_COUNT * (20 + 8 + UDP_PAYLOAD);
    for (i, veth, dir) in [
        (1, a1.host_veth.as_str(), Direction::Ingress),
        (2, c2.host_veth.as_str(), Direction::Egress),
    ] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let flows = bed.agent(i).flows().unwrap();
            let hop = find(&flows, 17, a1.ipv4.into(), c2.ipv4.into(), None, 7400).and_then(|f| {
                f.hops
                    .into_iter()
                    .find(|h| h.interface == veth && h.direction == dir)
            });
            if let Some(h) = &hop {
                if h.packets == UDP_COUNT {
                    assert_eq!(h.bytes, bytes, "node{i}: {h:?}");
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node{i}: the confined agent did not count the UDP flow at {veth}: {hop:?}\n{}",
                bed.agent(i).log_text()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // /metrics: promtool accepts it, the Service translations equal conntrack's count (names
    // from the API server: the agent reached it), and no kernel map overflowed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, text) = http_get(&n1.netns, "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        let samples = parse_exposition(&text).unwrap();
        let translations: f64 = samples
            .iter()
            .filter(|s| {
                s.name == "flowtrace_nat_translations_total"
                    && s.label("service") == "default/svc-demo"
                    && s.label("src_workload") == "client"
            })
            .map(|s| s.value)
            .sum();
        if translations == dnat {
            let (ok, said) = promtool(&text).unwrap();
            assert!(ok, "promtool check metrics: {said}");
            let lost: f64 = samples
                .iter()
                .filter(|s| {
                    s.name == "flowtrace_kernel_lost_total"
                        && s.label("reason").ends_with("_map_full")
                })
                .map(|s| s.value)
                .sum();
            assert_eq!(lost, 0.0, "kernel maps full under the confined agent");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node1: {translations} Service translations in /metrics, conntrack counted {dnat}\n{}",
            bed.agent(1).log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for n in [n1, n2] {
        let (status, body) = http_get(&n.netns, "/readyz").unwrap();
        assert_eq!(status, 200, "{}: {body}", n.name);
    }

    // SIGTERM: a clean exit that leaves nothing attached, with only these capabilities to
    // detach with.
    let mine: Vec<u64> = flowtrace_program_ids()
        .unwrap()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(
        !mine.is_empty(),
        "no flowtrace program loaded by the confined agents"
    );
    let Bed {
        agents, cluster, ..
    } = bed;
    for agent in agents {
        agent.stop().unwrap();
    }
    for node in &cluster.nodes {
        check_nothing_left(node, &mine).unwrap();
    }
}

/// Drops under the same confinement: the agents, holding only the DaemonSet's capabilities,
/// with read-only filesystems and no tracefs mounted, record the datagrams an iptables rule
/// drops on node2 with the kernel's reason, device and last hop, exactly as the unconfined
/// agents do (the acceptance case of the drops tests, `drops::netfilter_drop_is_counted`).
#[test]
fn the_confined_agent_records_drops_with_their_reason() {
    let caps = daemonset_capabilities();
    let names: Vec<&str> = caps.iter().map(String::as_str).collect();
    let bed = Bed::with_metadata_confined(&names).unwrap();
    crate::drops::netfilter_drop_is_counted(&bed, 47601);
}

/// Each capability of the set is needed: without any one of them the agent refuses to start,
/// says why, and leaves nothing loaded.
#[test]
fn each_capability_of_the_set_is_necessary() {
    require_root().unwrap();
    let caps = daemonset_capabilities();
    let cluster =
        Cluster::up(&ClusterOptions::default()).expect("bringing the emulated cluster up");
    let node = cluster.node(1).unwrap();
    for missing in &caps {
        let rest: Vec<&str> = caps
            .iter()
            .filter(|c| *c != missing)
            .map(String::as_str)
            .collect();
        let before: BTreeSet<u64> = flowtrace_program_ids().unwrap().into_iter().collect();
        let mut agent = Agent::spawn_confined(&node.netns, &[], &rest).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.has_exited() {
            assert!(
                Instant::now() < deadline,
                "the agent without {missing} is still running after 30 s\n{}",
                agent.log_text()
            );
            if let Ok((200, _)) = http_get(&node.netns, "/readyz") {
                panic!(
                    "the agent became ready without {missing}: that capability is not needed\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = agent.log_text();
        // What the agent must say: the step the kernel refused, and what it lacks.
        let want = match missing.as_str() {
            "bpf" => "failed to create map",
            "net_admin" => "needs CAP_NET_ADMIN as well as CAP_BPF",
            "perfmon" => "treats the agent as unprivileged: it needs CAP_PERFMON",
            other => panic!("no expected message for a missing {other}: add one"),
        };
        assert!(
            log.contains("error:") && log.contains(want),
            "the agent without {missing} did not say {want:?}:\n{log}"
        );
        // The kernel frees programs after an RCU grace period: allow it a moment.
        let before: Vec<u64> = before.iter().copied().collect();
        if let Err(left) =
            flowtrace_tests::host::wait_programs_gone(&before, Duration::from_secs(3))
        {
            panic!("programs {left:?} still loaded after the agent without {missing} exited");
        }
        drop(agent);
    }
    cluster.down().unwrap();
}
