//! Kubernetes metadata on the emulated cluster, from the fixture API server (real list +
//! watch over HTTP, real object JSON, reached by kube-rs through a kubeconfig): names on
//! every flow between pods, renames, the API server going away and coming back, watch
//! edges (dropped connection, bookmarks, 410 Gone), and bad metadata input. Needs root.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use flowtrace::{
    model::wire::MetadataResponse,
    model::FlowRecord,
    model::{Endpoint, EndpointKind},
};
use flowtrace_tests::{
    apiserver::{pod_object, Resource},
    ftgen, ftgen_bg, http_get, Agent, Bed, Pod,
};
use serde_json::json;

/// Waits until `f` holds, polling every 200 ms; panics with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metadata(agent: &Agent) -> MetadataResponse {
    agent.get("/v1/metadata").unwrap()
}

/// `count` UDP datagrams of `size` bytes from `from` to `to`:9000, received by a sink there.
/// Returns the datagrams the sink received (the ground truth).
fn udp(from: &Pod, to: &Pod, count: u32, size: u32) -> u64 {
    let sink = ftgen_bg(
        to,
        &[
            "udp-sink",
            "--bind",
            "0.0.0.0:9000",
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "5000",
        ],
    )
    .unwrap();
    let dst = format!("{}:9000", to.ipv4);
    let sent = ftgen(
        from,
        &[
            "udp-send",
            "--to",
            &dst,
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
        ],
    )
    .unwrap();
    assert_eq!(sent["sent"], count, "{sent}");
    let got = flowtrace_tests::finish(sink).unwrap();
    got["received"].as_u64().unwrap()
}

fn pod_flows(flows: &[FlowRecord], src: IpAddr, dst: IpAddr) -> Vec<FlowRecord> {
    flows
        .iter()
        .filter(|f| f.src == src && f.dst == dst && f.dst_port == 9000)
        .cloned()
        .collect()
}

/// What the fixture says about an emulated pod (see `apiserver::pod_object`).
fn expected_name(p: &Pod) -> (String, String, Option<(&'static str, &'static str)>, String) {
    let (ns, workload) = match p.name.as_str() {
        "pod-a" => ("default", Some(("Deployment", "client"))),
        "pod-b" => ("default", Some(("Deployment", "backend"))),
        "pod-c" => ("monitoring", Some(("DaemonSet", "agent"))),
        _ => ("default", None),
    };
    (
        ns.to_string(),
        format!("{}-{}", p.name, p.node),
        workload,
        p.node.clone(),
    )
}

fn assert_named(e: Option<&Endpoint>, p: &Pod) {
    let e = e.unwrap_or_else(|| panic!("{} ({}) has no name", p.name, p.ipv4));
    let (ns, name, workload, node) = expected_name(p);
    assert_eq!(e.kind, EndpointKind::Pod, "{e:?}");
    assert_eq!(e.namespace.as_deref(), Some(ns.as_str()), "{e:?}");
    assert_eq!(e.name, name, "{e:?}");
    let got = e
        .workload
        .as_ref()
        .map(|w| (w.kind.as_str(), w.name.as_str()));
    match workload {
        Some(w) => assert_eq!(got, Some(w), "{e:?}"),
        None => assert_eq!(got, Some(("Pod", name.as_str())), "{e:?}"),
    }
    assert_eq!(e.node.as_deref(), Some(node.as_str()), "{e:?}");
}

#[test]
fn every_pod_flow_is_named_and_a_reused_address_follows_the_api() {
    let bed = Bed::with_metadata().unwrap();
    let c = &bed.cluster;
    let pods: Vec<&Pod> = c.pods().collect();
    // Every pod sends to every other pod (same node and across nodes).
    for from in &pods {
        for to in &pods {
            if from.ipv4 != to.ipv4 {
                assert_eq!(udp(from, to, 3, 100), 3);
            }
        }
    }
    for (i, node) in c.nodes.iter().enumerate() {
        let flows = bed.agent(i + 1).flows().unwrap();
        let mut checked = 0;
        for f in &flows {
            let (Some(s), Some(d)) = (c.pod_by_ip(f.src), c.pod_by_ip(f.dst)) else {
                continue;
            };
            if f.dst_port != 9000 {
                continue;
            }
            assert_named(f.src_endpoint.as_ref(), s);
            assert_named(f.dst_endpoint.as_ref(), d);
            checked += 1;
        }
        // This node sees every flow one of its pods sends or receives.
        let local = pods.iter().filter(|p| p.node == node.name).count();
        let expected = local * (pods.len() - 1) * 2 - local * (local - 1);
        assert_eq!(checked, expected, "flows between pods on {}", node.name);
    }

    // Name filters: by pod, workload, namespace; an unknown object is an error that says so.
    let a1 = c.pod(1, "pod-a").unwrap();
    let r: flowtrace::model::wire::FlowsResponse = bed
        .agent(1)
        .get("/v1/flows?pod=default/pod-a-node1")
        .unwrap();
    assert!(!r.flows.is_empty());
    assert!(r
        .flows
        .iter()
        .all(|f| f.src == IpAddr::from(a1.ipv4) || f.dst == IpAddr::from(a1.ipv4)));
    let r: flowtrace::model::wire::FlowsResponse = bed
        .agent(1)
        .get("/v1/flows?workload=monitoring/agent")
        .unwrap();
    let c1 = c.pod(1, "pod-c").unwrap();
    let c2 = c.pod(2, "pod-c").unwrap();
    let is_agent = |ip: IpAddr| ip == IpAddr::from(c1.ipv4) || ip == IpAddr::from(c2.ipv4);
    assert!(!r.flows.is_empty());
    assert!(r.flows.iter().all(|f| is_agent(f.src) || is_agent(f.dst)));
    let r: flowtrace::model::wire::FlowsResponse =
        bed.agent(1).get("/v1/flows?namespace=monitoring").unwrap();
    let is_c = |ip: IpAddr| c.pod_by_ip(ip).is_some_and(|p| p.name == "pod-c");
    assert!(r.flows.iter().all(|f| is_c(f.src) || is_c(f.dst)));
    let all = bed.agent(1).flows().unwrap();
    let want = all
        .iter()
        .filter(|f| f.dst_port == 9000 && (is_c(f.src) || is_c(f.dst)))
        .count();
    assert_eq!(r.flows.iter().filter(|f| f.dst_port == 9000).count(), want);
    assert!(want >= 2 * (pods.len() - 1));
    let (status, body) =
        http_get(&bed.agent(1).netns, "/v1/flows?pod=default/no-such-pod").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("pod default/no-such-pod does not exist"),
        "{body}"
    );
    let (status, body) = http_get(&bed.agent(1).netns, "/v1/flows?service=default/nope").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("service default/nope does not exist"),
        "{body}"
    );

    // Rename: pod-c on node1 is deleted and a new pod with another name takes its address.
    let api = bed.api().unwrap();
    assert!(api.delete("Pod", "monitoring", "pod-c-node1").unwrap());
    let mut renamed = pod_object(
        "renamed",
        "node1",
        &c1.ipv4.to_string(),
        &c1.ipv6.to_string(),
    );
    renamed["metadata"]["namespace"] = json!("default");
    api.apply(renamed).unwrap();
    wait_for(
        "the renamed pod in the agent",
        Duration::from_secs(10),
        || {
            http_get(&bed.agent(1).netns, "/v1/flows?pod=default/renamed-node1")
                .unwrap()
                .0
                == 200
        },
    );
    let (status, _) =
        http_get(&bed.agent(1).netns, "/v1/flows?pod=monitoring/pod-c-node1").unwrap();
    assert_eq!(status, 404, "the deleted pod is gone");
    let b2 = c.pod(2, "pod-b").unwrap();
    let before: Vec<u16> = pod_flows(
        &bed.agent(1).flows().unwrap(),
        c1.ipv4.into(),
        b2.ipv4.into(),
    )
    .iter()
    .map(|f| f.src_port)
    .collect();
    assert_eq!(udp(c1, b2, 4, 100), 4);
    let flows = bed.agent(1).flows().unwrap();
    let all = pod_flows(&flows, c1.ipv4.into(), b2.ipv4.into());
    let new: Vec<&FlowRecord> = all
        .iter()
        .filter(|f| !before.contains(&f.src_port))
        .collect();
    assert_eq!(new.len(), 1, "{all:?}");
    let e = new[0].src_endpoint.as_ref().unwrap();
    assert_eq!(
        (e.namespace.as_deref(), e.name.as_str()),
        (Some("default"), "renamed-node1")
    );
    // The traffic sent before the rename keeps the name it had then.
    for f in all.iter().filter(|f| before.contains(&f.src_port)) {
        assert_eq!(f.src_endpoint.as_ref().unwrap().name, "pod-c-node1");
    }
    drop(bed);
}

#[test]
fn the_api_server_going_away_and_back_loses_no_counts_and_fills_names_in() {
    let mut bed = Bed::with_metadata().unwrap();
    let a1 = bed.cluster.pod(1, "pod-a").unwrap().clone();
    let b2 = bed.cluster.pod(2, "pod-b").unwrap().clone();
    let lists_before = bed.api().unwrap().lists(Resource::Pods);
    bed.api.as_mut().unwrap().stop();

    // A new pod starts while the API server is away.
    let d1 = bed.cluster.add_pod(1, "pod-d").unwrap();
    // The agent notices: not synced, not ready; flows still counted, with addresses.
    wait_for("metadata not synced", Duration::from_secs(20), || {
        // A watch only fails when it next reconnects; cut ones reconnect at once.
        !metadata(bed.agent(1)).synced
    });
    let m = metadata(bed.agent(1));
    assert!(m.kinds.values().any(|k| k.last_error.is_some()), "{m:?}");
    let (status, body) = http_get(&bed.agent(1).netns, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("metadata is not synced"), "{body}");
    let received_a = udp(&a1, &b2, 25, 200);
    let received_d = udp(&d1, &b2, 30, 300);
    let flows = bed.agent(1).flows().unwrap();
    let fa = pod_flows(&flows, a1.ipv4.into(), b2.ipv4.into());
    assert_eq!(fa.iter().map(|f| f.packets).sum::<u64>(), received_a);
    // Known before the outage: still named.
    assert_named(fa[0].src_endpoint.as_ref(), &a1);
    let fd = pod_flows(&flows, d1.ipv4.into(), b2.ipv4.into());
    assert_eq!(fd.iter().map(|f| f.packets).sum::<u64>(), received_d);
    // Unknown pod: only "an address of node1's pod network".
    assert_eq!(
        fd[0].src_endpoint.as_ref().map(|e| e.kind),
        Some(EndpointKind::PodNetwork)
    );

    // The API server learns about pod-d while away, then comes back.
    let api = bed.api.as_mut().unwrap();
    api.apply(pod_object(
        "pod-d",
        "node1",
        &d1.ipv4.to_string(),
        &d1.ipv6.to_string(),
    ))
    .unwrap();
    api.start().unwrap();
    wait_for("metadata synced again", Duration::from_secs(30), || {
        metadata(bed.agent(1)).synced
    });
    let (status, _) = http_get(&bed.agent(1).netns, "/readyz").unwrap();
    assert_eq!(status, 200);
    assert!(
        bed.api().unwrap().lists(Resource::Pods) > lists_before,
        "the agent listed pods again"
    );
    // Same counts, names filled in, no restart (same process).
    let flows = bed.agent(1).flows().unwrap();
    let fd = pod_flows(&flows, d1.ipv4.into(), b2.ipv4.into());
    assert_eq!(fd.iter().map(|f| f.packets).sum::<u64>(), received_d);
    assert_named(fd[0].src_endpoint.as_ref(), &d1);
    assert!(bed.agent(1).log_text().contains("metadata listed"));
    drop(bed);
}

#[test]
fn watches_resume_after_a_cut_from_bookmarks_and_list_again_after_410() {
    let bed = Bed::with_metadata().unwrap();
    let api = bed.api().unwrap();
    let agent = bed.agent(1);
    let service = |name: &str, ip: &str| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"namespace": "default", "name": name},
               "spec": {"clusterIP": ip, "ports": [{"name": "web", "port": 80, "protocol": "TCP"}]}})
    };
    let exists = |name: &str| {
        http_get(&agent.netns, &format!("/v1/flows?service=default/{name}"))
            .unwrap()
            .0
            == 200
    };

    // Change pods only: the services watch hears of the newer resourceVersion through
    // bookmarks alone.
    let c = &bed.cluster;
    let a1 = c.pod(1, "pod-a").unwrap();
    let mut changed = pod_object("pod-a", "node1", &a1.ipv4.to_string(), &a1.ipv6.to_string());
    changed["metadata"]["labels"]["version"] = json!("2");
    api.apply(changed).unwrap();
    let pods_rv: u64 = api
        .requests()
        .iter()
        .filter_map(|r| r.resource_version.as_deref()?.parse().ok())
        .max()
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(2500));
    let service_lists = api.lists(Resource::Services);
    let before = api.requests().len();
    api.drop_watches();
    api.apply(service("after-cut", "10.96.0.30")).unwrap();
    wait_for(
        "a Service created after the cut",
        Duration::from_secs(15),
        || exists("after-cut"),
    );
    // Resumed, not relisted, and from a version at least as new as the pod change.
    assert_eq!(
        api.lists(Resource::Services),
        service_lists,
        "a cut watch resumes without listing"
    );
    let resumed: Vec<u64> = api.requests()[before..]
        .iter()
        .filter(|r| r.resource == Resource::Services && r.watch)
        .filter_map(|r| r.resource_version.as_deref()?.parse().ok())
        .collect();
    assert!(!resumed.is_empty());
    assert!(
        resumed[0] > pods_rv,
        "services re-watch from {resumed:?}, pod change was at {pods_rv}: bookmarks not used"
    );

    // Compaction: resuming is refused with 410 Gone, and the agent lists again.
    api.compact();
    api.apply(service("after-compaction", "10.96.0.31"))
        .unwrap();
    wait_for(
        "a Service created after compaction",
        Duration::from_secs(15),
        || exists("after-compaction"),
    );
    let svc_requests: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.resource == Resource::Services)
        .collect();
    // Both nodes' agents follow the fixture: one list each.
    let agents = bed.agents.len();
    assert_eq!(
        api.lists(Resource::Services),
        service_lists + agents,
        "one list per agent after 410: {svc_requests:?}"
    );
    // Deleted while the watch was cut and history was gone: the relist removes it.
    api.drop_watches();
    api.compact();
    api.delete("Service", "default", "after-cut").unwrap();
    wait_for("the deleted Service gone", Duration::from_secs(15), || {
        !exists("after-cut")
    });
    assert!(metadata(agent).synced);
    drop(bed);
}

#[test]
fn bad_metadata_input_is_refused_or_counted_never_a_crash() {
    flowtrace_tests::require_root().unwrap();
    let cluster = flowtrace_tests::Cluster::up(&flowtrace_tests::ClusterOptions {
        nodes: 2,
        pods_per_node: vec!["pod-a".into()],
        ..Default::default()
    })
    .unwrap();
    let ns = cluster.node(1).unwrap().netns.clone();
    let dir = std::env::temp_dir().join(format!("flowtrace-badmeta-{}", cluster.prefix));
    std::fs::create_dir_all(&dir).unwrap();

    // A metadata file that is not JSON: the agent refuses to start and says why.
    let bad = dir.join("broken.json");
    std::fs::write(&bad, "{\"kind\": \"List\", \"items\": [ {\"kind\": \"Pod\"").unwrap();
    let mut agent = Agent::spawn(&ns, &["--metadata-file", bad.to_str().unwrap()]).unwrap();
    wait_for("the agent to exit", Duration::from_secs(15), || {
        agent.has_exited()
    });
    let log = agent.log_text();
    assert!(
        log.contains("broken.json") && log.contains("not JSON") && log.contains("kubectl get"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    drop(agent);

    // A file with objects missing fields: those are skipped and counted, the rest used.
    let a1 = cluster.pod(1, "pod-a").unwrap();
    let file = dir.join("partial.json");
    let doc = json!({"apiVersion": "v1", "kind": "List", "items": [
        pod_object("pod-a", "node1", &a1.ipv4.to_string(), &a1.ipv6.to_string()),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nameless-namespace"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": "no-spec"}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"namespace": "default", "name": "orphan"}, "endpoints": []}
    ]});
    std::fs::write(&file, doc.to_string()).unwrap();
    let agent = Agent::start(&ns, &["--metadata-file", file.to_str().unwrap()]).unwrap();
    let m = metadata(&agent);
    assert!(m.synced && m.source.starts_with("file "), "{m:?}");
    assert_eq!(m.objects["pods"], 1, "{m:?}");
    assert_eq!(
        (
            m.skipped["pods"],
            m.skipped["services"],
            m.skipped["endpointslices"]
        ),
        (1, 1, 1),
        "{m:?}"
    );
    assert!(agent.log_text().contains("metadata.namespace is missing"));
    let (status, _) = http_get(&ns, "/v1/flows?pod=default/pod-a-node1").unwrap();
    assert_eq!(status, 200);
    drop(agent);

    // A kubeconfig pointing nowhere: the agent runs, counts flows with addresses, reports
    // metadata not synced with the error, and is not ready.
    let nowhere = dir.join("nowhere.kubeconfig");
    std::fs::write(&nowhere, "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://127.0.0.1:1\nusers:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: x, user: u}\ncurrent-context: x\n").unwrap();
    let mut agent = Agent::spawn(
        &ns,
        &[
            "--kubeconfig",
            nowhere.to_str().unwrap(),
            "--metadata-backoff-max-ms",
            "500",
        ],
    )
    .unwrap();
    wait_for("metadata errors reported", Duration::from_secs(20), || {
        agent
            .get::<MetadataResponse>("/v1/metadata")
            .is_ok_and(|m| !m.synced && m.kinds.values().all(|k| k.errors > 0))
    });
    // Not ready (metadata), so Agent::spawn did not wait for the interfaces: do it here.
    wait_for("interfaces attached", Duration::from_secs(20), || {
        agent.interfaces().is_ok_and(|i| i.synced)
    });
    let m = metadata(&agent);
    let err = m.kinds["pods"].last_error.clone().unwrap();
    assert!(err.contains("list") || err.contains("connect"), "{err}");
    assert_eq!(http_get(&ns, "/readyz").unwrap().0, 503);
    let b2 = cluster.pod(2, "pod-a").unwrap();
    assert_eq!(udp(a1, b2, 5, 100), 5);
    let flows: Vec<FlowRecord> = agent.flows().unwrap();
    let f = pod_flows(&flows, a1.ipv4.into(), b2.ipv4.into());
    assert_eq!(f.iter().map(|f| f.packets).sum::<u64>(), 5);
    assert!(f[0].src_endpoint.is_none());
    // A name filter cannot be checked without metadata, and says so.
    let (status, body) = http_get(&ns, "/v1/flows?pod=default/pod-a-node1").unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not synced"), "{body}");
    assert!(!agent.has_exited());
    drop(agent);

    // A kubeconfig that cannot be read: refused at start with the path.
    let mut agent =
        Agent::spawn(&ns, &["--kubeconfig", dir.join("absent").to_str().unwrap()]).unwrap();
    wait_for("the agent to exit", Duration::from_secs(15), || {
        agent.has_exited()
    });
    let log = agent.log_text();
    assert!(
        log.contains("reading the kubeconfig") && log.contains("absent"),
        "{log}"
    );
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
    cluster.down().unwrap();
}
