use serde_json::json;

use std::net::IpAddr;

use super::*;
use crate::model::EndpointKind;
use k8s_openapi::api::core::v1::{Node, Pod, Service};

fn pod_json(
    ns: &str,
    name: &str,
    ip: &str,
    node: &str,
    owner: Option<(&str, &str)>,
) -> serde_json::Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": {}},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    });
    if let Some((kind, oname)) = owner {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": oname, "uid": "u", "controller": true
        }]);
    }
    p
}

fn pod(v: serde_json::Value) -> PodRecord {
    let p: Pod = serde_json::from_value(v).unwrap();
    objects::pod(&p).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn who(c: &MetaCache, a: &str) -> (EndpointKind, String, Option<(String, String)>) {
    let e = c.resolve(&ip(a)).unwrap();
    (
        e.kind,
        format!("{}/{}", e.namespace.clone().unwrap_or_default(), e.name),
        e.workload
            .as_ref()
            .map(|w| (w.kind.clone(), w.name.clone())),
    )
}

#[test]
fn owners_resolve_to_workloads() {
    let mut c = MetaCache::new();
    // Deployment via a known ReplicaSet.
    c.apply_owner(Kind::ReplicaSets, "shop", "front-7d9f", Some("front"));
    c.apply_pod(pod(pod_json(
        "shop",
        "front-7d9f-abcde",
        "10.244.1.5",
        "node1",
        Some(("ReplicaSet", "front-7d9f")),
    )));
    assert_eq!(
        who(&c, "10.244.1.5"),
        (
            EndpointKind::Pod,
            "shop/front-7d9f-abcde".into(),
            Some(("Deployment".into(), "front".into()))
        )
    );
    // Deployment from the pod-template-hash label when the ReplicaSet is unknown.
    let mut v = pod_json(
        "shop",
        "carts-5c6b-xyz",
        "10.244.1.6",
        "node1",
        Some(("ReplicaSet", "carts-5c6b")),
    );
    v["metadata"]["labels"]["pod-template-hash"] = json!("5c6b");
    c.apply_pod(pod(v));
    assert_eq!(
        who(&c, "10.244.1.6").2,
        Some(("Deployment".into(), "carts".into()))
    );
    // A ReplicaSet without a Deployment stays a ReplicaSet.
    c.apply_pod(pod(pod_json(
        "shop",
        "rs-only-1",
        "10.244.1.7",
        "node1",
        Some(("ReplicaSet", "rs-only")),
    )));
    assert_eq!(
        who(&c, "10.244.1.7").2,
        Some(("ReplicaSet".into(), "rs-only".into()))
    );
    // StatefulSet and DaemonSet directly; a bare pod is its own workload.
    c.apply_pod(pod(pod_json(
        "db",
        "pg-0",
        "10.244.2.3",
        "node2",
        Some(("StatefulSet", "pg")),
    )));
    assert_eq!(
        who(&c, "10.244.2.3").2,
        Some(("StatefulSet".into(), "pg".into()))
    );
    c.apply_pod(pod(pod_json(
        "kube-system",
        "dns-x",
        "10.244.2.4",
        "node2",
        Some(("DaemonSet", "dns")),
    )));
    assert_eq!(
        who(&c, "10.244.2.4").2,
        Some(("DaemonSet".into(), "dns".into()))
    );
    c.apply_pod(pod(pod_json(
        "default",
        "debug",
        "10.244.2.5",
        "node2",
        None,
    )));
    assert_eq!(
        who(&c, "10.244.2.5").2,
        Some(("Pod".into(), "debug".into()))
    );
    // Job, then its CronJob once the Job's owner is known (the pod's answer is rebuilt).
    c.apply_pod(pod(pod_json(
        "ops",
        "backup-2890-q",
        "10.244.2.6",
        "node2",
        Some(("Job", "backup-2890")),
    )));
    assert_eq!(
        who(&c, "10.244.2.6").2,
        Some(("Job".into(), "backup-2890".into()))
    );
    c.apply_owner(Kind::Jobs, "ops", "backup-2890", Some("backup"));
    assert_eq!(
        who(&c, "10.244.2.6").2,
        Some(("CronJob".into(), "backup".into()))
    );
    c.delete_owner(Kind::Jobs, "ops", "backup-2890");
    assert_eq!(
        who(&c, "10.244.2.6").2,
        Some(("Job".into(), "backup-2890".into()))
    );
    assert_eq!(
        c.resolve(&ip("10.244.2.6")).unwrap().node.as_deref(),
        Some("node2")
    );
}

#[test]
fn a_reused_address_names_the_newest_pod() {
    let mut c = MetaCache::new();
    c.apply_pod(pod(pod_json("default", "old", "10.244.1.9", "node1", None)));
    // The new pod appears before the old one's deletion arrives: the API says the address
    // is the new pod's now.
    c.apply_pod(pod(pod_json("default", "new", "10.244.1.9", "node1", None)));
    assert_eq!(who(&c, "10.244.1.9").1, "default/new");
    c.delete_pod("default", "old");
    assert_eq!(who(&c, "10.244.1.9").1, "default/new");
    c.delete_pod("default", "new");
    assert!(c.resolve(&ip("10.244.1.9")).is_none());
    // A finished pod gave its address back.
    let mut done = pod_json("default", "job-done", "10.244.1.10", "node1", None);
    done["status"]["phase"] = json!("Succeeded");
    c.apply_pod(pod(done));
    assert!(c.resolve(&ip("10.244.1.10")).is_none());
    assert!(c.has_pod("default", "job-done"));
}

#[test]
fn services_nodes_and_host_network_pods() {
    let mut c = MetaCache::new();
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}, {"type": "Hostname", "address": "node1"}]}
    }))
    .unwrap();
    c.apply_node(objects::node(&n).unwrap());
    let s: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .unwrap();
    c.apply_service(objects::service(&s).unwrap());
    assert_eq!(who(&c, "10.96.0.10").0, EndpointKind::Service);
    let r = c.service_at(&ip("10.96.0.10"), 80, 6).unwrap();
    assert_eq!(
        (r.name.as_str(), r.port_name.as_deref()),
        ("web", Some("http"))
    );
    assert_eq!(
        c.service_at(&ip("10.96.0.10"), 53, 17)
            .unwrap()
            .port_name
            .as_deref(),
        Some("dns")
    );
    assert!(c.service_at(&ip("10.96.0.10"), 53, 6).is_none());
    assert_eq!(
        c.service_at(&ip("192.168.50.1"), 30080, 6).unwrap().name,
        "web"
    );
    // A hostNetwork pod's address is its node's.
    let mut h = pod_json(
        "kube-system",
        "proxy-1",
        "192.168.50.1",
        "node1",
        Some(("DaemonSet", "proxy")),
    );
    h["spec"]["hostNetwork"] = json!(true);
    c.apply_pod(pod(h));
    assert_eq!(
        who(&c, "192.168.50.1"),
        (EndpointKind::Node, "/node1".into(), None)
    );
    // An address of the pod CIDR that is no pod's (the bridge) is the node's pod network.
    assert_eq!(who(&c, "10.244.1.1").0, EndpointKind::PodNetwork);
    assert!(c.resolve(&ip("10.244.2.1")).is_none());
    c.delete_service("default", "web");
    assert!(c.service_at(&ip("192.168.50.1"), 30080, 6).is_none());
    assert!(c.resolve(&ip("10.96.0.10")).is_none());
}

#[test]
fn endpoint_slices_index_backends_until_the_last_slice_goes() {
    let mut c = MetaCache::new();
    let slice = |name: &str, ips: &[&str]| EndpointSliceRecord {
        namespace: "default".into(),
        name: name.into(),
        service: "web".into(),
        addresses: ips.iter().map(|i| ip(i)).collect(),
    };
    c.apply_slice(slice("web-a", &["10.244.1.5", "10.244.2.5"]));
    c.apply_slice(slice("web-b", &["10.244.2.5"]));
    assert_eq!(
        c.services_backed_by(&ip("10.244.2.5")),
        vec!["default/web".to_string()]
    );
    c.delete_slice("default", "web-a");
    assert!(c.services_backed_by(&ip("10.244.1.5")).is_empty());
    assert_eq!(c.services_backed_by(&ip("10.244.2.5")).len(), 1);
}

#[test]
fn objects_missing_fields_are_refused_with_the_field() {
    let p: Pod = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}),
    )
    .unwrap();
    let e = objects::pod(&p).unwrap_err().to_string();
    assert!(e.contains("metadata.namespace is missing"), "{e}");
    let p: Pod =
        serde_json::from_value(pod_json("default", "bad", "10.244.1.300", "n", None)).unwrap();
    let e = objects::pod(&p).unwrap_err().to_string();
    assert!(
        e.contains("default/bad") && e.contains("not an IP address"),
        "{e}"
    );
    let s: Service = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "a", "name": "b"}}),
    )
    .unwrap();
    assert!(objects::service(&s)
        .unwrap_err()
        .to_string()
        .contains("spec is missing"));
}

#[test]
fn metadata_files_load_skip_bad_items_and_refuse_non_json() {
    let dir = std::env::temp_dir().join(format!("flowtrace-k8s-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        pod_json("default", "a", "10.244.1.5", "node1", None),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-namespace"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "x", "name": "y"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default", "name": "web"},
         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}
    ]});
    std::fs::write(&good, list.to_string()).unwrap();
    let (c, skipped) = source::load_file(&good).unwrap();
    assert_eq!(who(&c, "10.244.1.5").1, "default/a");
    assert!(c.has_service("default", "web"));
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped[0].contains("items[1]") && skipped[0].contains("metadata.namespace"),
        "{skipped:?}"
    );
    assert_eq!(c.skipped().get(&Kind::Pods), Some(&1));
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"items\": [").unwrap();
    let e = source::load_file(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("not JSON") && e.contains("kubectl get"),
        "{e}"
    );
    let e = source::load_file(&dir.join("absent.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
