//! The SockShop scenario: the microservices demo the studies this project comes from ran over
//! several nodes, emulated here with its call graph, its Services and its Kubernetes objects.
//!
//! Each workload is a pod (two for carts) on one of three nodes, running `ftshop` (real TCP,
//! HTTP for the services, a line protocol for the databases and the queue) and counting every
//! payload byte it writes and reads per peer. Each workload but queue-master and the load
//! generator is reached through a ClusterIP Service with kube-proxy's iptables rules on every
//! node. Load comes from Locust (PyPI) in the `load-test` pod: users browsing the catalogue,
//! logging in, adding to the cart and ordering (`tests/sockshop/locustfile.py`).
//!
//! The call graph ([`CALLS`]): front-end -> catalogue, carts, orders, user; orders -> user,
//! carts, payment, shipping, orders-db; catalogue, carts, user -> their database; shipping ->
//! rabbitmq; queue-master -> rabbitmq; load-test -> front-end.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    cluster::{Cluster, ClusterOptions, Pod},
    kubeproxy::{Endpoint, Protocol, ServicePort, ServiceSpec},
    netns::ChildGuard,
    Error, Result,
};

/// The Kubernetes namespace of every SockShop object.
pub const NAMESPACE: &str = "sock-shop";

/// How a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP service (`ftshop http --role NAME`).
    Http,
    /// A database or the queue (`ftshop store`).
    Store,
    /// queue-master, polling the queue.
    Consumer,
    /// Locust.
    Load,
}

/// One workload of the scenario: a Deployment, its pods and (most) a Service.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadSpec {
    pub name: &'static str,
    pub kind: Kind,
    /// Nodes (1-based) running one pod each.
    pub nodes: &'static [usize],
    /// The pods' port (the Service's targetPort).
    pub target_port: u16,
    /// The Service's port, for workloads with a Service.
    pub service_port: Option<u16>,
}

/// The workloads, in the order their pods are created (which fixes their addresses).
pub const WORKLOADS: [WorkloadSpec; 14] = [
    w("front-end", Kind::Http, &[1], 8079, Some(80)),
    w("catalogue", Kind::Http, &[2], 80, Some(80)),
    w("catalogue-db", Kind::Store, &[1], 3306, Some(3306)),
    w("carts", Kind::Http, &[2, 3], 80, Some(80)),
    w("carts-db", Kind::Store, &[3], 27017, Some(27017)),
    w("orders", Kind::Http, &[3], 80, Some(80)),
    w("orders-db", Kind::Store, &[2], 27017, Some(27017)),
    w("user", Kind::Http, &[1], 80, Some(80)),
    w("user-db", Kind::Store, &[3], 27017, Some(27017)),
    w("payment", Kind::Http, &[2], 80, Some(80)),
    w("shipping", Kind::Http, &[3], 80, Some(80)),
    w("rabbitmq", Kind::Store, &[1], 5672, Some(5672)),
    w("queue-master", Kind::Consumer, &[2], 80, None),
    w("load-test", Kind::Load, &[3], 80, None),
];

const fn w(
    name: &'static str,
    kind: Kind,
    nodes: &'static [usize],
    target_port: u16,
    service_port: Option<u16>,
) -> WorkloadSpec {
    WorkloadSpec {
        name,
        kind,
        nodes,
        target_port,
        service_port,
    }
}

/// Who calls whom (client workload, server workload), each through the server's Service.
pub const CALLS: [(&str, &str); 15] = [
    ("load-test", "front-end"),
    ("front-end", "catalogue"),
    ("front-end", "carts"),
    ("front-end", "orders"),
    ("front-end", "user"),
    ("orders", "user"),
    ("orders", "carts"),
    ("orders", "payment"),
    ("orders", "shipping"),
    ("orders", "orders-db"),
    ("catalogue", "catalogue-db"),
    ("carts", "carts-db"),
    ("user", "user-db"),
    ("shipping", "rabbitmq"),
    ("queue-master", "rabbitmq"),
];

/// The ClusterIP of workload `name`'s Service: 10.96.1.<position + 1>.
pub fn cluster_ip(name: &str) -> Result<Ipv4Addr> {
    WORKLOADS
        .iter()
        .position(|w| w.name == name && w.service_port.is_some())
        .map(|i| Ipv4Addr::new(10, 96, 1, i as u8 + 1))
        .ok_or_else(|| Error::Invalid(format!("SockShop has no Service {name:?}")))
}

fn spec(name: &str) -> Result<&'static WorkloadSpec> {
    WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .ok_or_else(|| Error::Invalid(format!("SockShop has no workload {name:?}")))
}

/// The ReplicaSet hash of a workload's pods (stable, Kubernetes-shaped).
fn rs_hash(name: &str) -> String {
    let h = crate::kubeproxy::chain_hash(name).to_lowercase();
    h[..8].to_string()
}

/// The Kubernetes pod name of workload `w`'s pod on node `node`.
pub fn pod_name(w: &str, node: usize) -> String {
    format!("{w}-{}-n{node}", rs_hash(w))
}

/// The scenario's Services as kube-proxy programs them.
pub fn services(cluster: &Cluster) -> Result<Vec<ServiceSpec>> {
    let mut out = Vec::new();
    for w in WORKLOADS.iter() {
        let Some(port) = w.service_port else {
            continue;
        };
        let endpoints = w
            .nodes
            .iter()
            .map(|&n| {
                cluster.pod(n, w.name).map(|p| Endpoint {
                    pod: w.name.to_string(),
                    node: p.node.clone(),
                    ip: p.ipv4,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(ServiceSpec {
            name: w.name.to_string(),
            namespace: NAMESPACE.to_string(),
            cluster_ip: cluster_ip(w.name)?,
            ports: vec![ServicePort {
                name: "web".into(),
                protocol: Protocol::Tcp,
                port,
                target_port: w.target_port,
                node_port: None,
            }],
            endpoints,
        });
    }
    Ok(out)
}

/// Builds the three nodes, the scenario's pods and its Services (the nodes' whole `nat`
/// table, as kube-proxy writes it).
pub fn cluster() -> Result<Cluster> {
    let mut cluster = Cluster::up(&ClusterOptions {
        nodes: 3,
        pods_per_node: Vec::new(),
        ..ClusterOptions::default()
    })?;
    for w in WORKLOADS.iter() {
        for &n in w.nodes {
            cluster.add_pod(n, w.name)?;
        }
    }
    let services = services(&cluster)?;
    for node in &cluster.nodes {
        crate::kubeproxy::install_all(&services, &node.netns)?;
    }
    Ok(cluster)
}

/// The Kubernetes objects of the scenario as a real API server would list them: Nodes,
/// ReplicaSets (owned by their Deployments, which flowtrace knows from those owner references
/// and does not watch), Pods, Services and EndpointSlices.
pub fn objects(cluster: &Cluster) -> Result<Vec<Value>> {
    let mut out: Vec<Value> = crate::apiserver::cluster_objects(cluster)
        .into_iter()
        .filter(|o| o["kind"] == "Node")
        .collect();
    for w in WORKLOADS.iter() {
        let hash = rs_hash(w.name);
        let rs = format!("{}-{hash}", w.name);
        out.push(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"namespace": NAMESPACE, "name": rs, "uid": format!("uid-rs-{}", w.name),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": w.name,
                                     "uid": format!("uid-deploy-{}", w.name), "controller": true}]},
            "spec": {"selector": {"matchLabels": {"name": w.name, "pod-template-hash": hash}}}
        }));
        for &n in w.nodes {
            let p = cluster.pod(n, w.name)?;
            out.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": NAMESPACE, "name": pod_name(w.name, n),
                    "labels": {"name": w.name, "pod-template-hash": hash},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                        "uid": format!("uid-rs-{}", w.name), "controller": true, "blockOwnerDeletion": true}]},
                "spec": {"nodeName": p.node, "containers": [{"name": w.name, "image": format!("weaveworksdemos/{}:0.4.8", w.name)}]},
                "status": {"phase": "Running", "podIP": p.ipv4.to_string(),
                           "podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]}
            }));
        }
    }
    for s in services(cluster)? {
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": NAMESPACE, "name": s.name},
            "spec": {"type": "ClusterIP", "clusterIP": s.cluster_ip.to_string(),
                     "clusterIPs": [s.cluster_ip.to_string()],
                     "selector": {"name": s.name},
                     "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port,
                        "targetPort": p.target_port, "protocol": "TCP"})).collect::<Vec<_>>()}
        }));
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": NAMESPACE, "name": format!("{}-{}", s.name, &rs_hash(&s.name)[..5]),
                         "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "endpoints": s.endpoints.iter().map(|e| {
                let n: usize = e.node.trim_start_matches("node").parse().unwrap_or(0);
                json!({"addresses": [e.ip.to_string()], "conditions": {"ready": true}, "nodeName": e.node,
                       "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod_name(&s.name, n)}})
            }).collect::<Vec<_>>(),
            "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.target_port, "protocol": "TCP"})).collect::<Vec<_>>()
        }));
    }
    Ok(out)
}

/// The `ftshop` binary next to the test binaries.
pub fn ftshop_bin() -> Result<PathBuf> {
    crate::agent::sibling_binary("ftshop", "FTSHOP_BIN", "flowtrace-tests")
}

/// Locust, installed by scripts/setup.sh in its own virtual environment.
pub fn locust_bin() -> Result<PathBuf> {
    let p = PathBuf::from(
        std::env::var("FLOWTRACE_LOCUST")
            .unwrap_or_else(|_| "/opt/flowtrace-locust/bin/locust".into()),
    );
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::Invalid(format!(
            "Locust is not at {}: run scripts/setup.sh (it installs it from PyPI), or set \
             FLOWTRACE_LOCUST",
            p.display()
        )))
    }
}

/// The Locust file of the scenario's users.
pub fn locustfile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sockshop/locustfile.py")
}

/// The running scenario: every stand-in, and how to stop them and collect their counts.
pub struct Running {
    processes: Vec<(String, usize, ChildGuard)>,
    stop: PathBuf,
}

/// What every stand-in counted: `counts[(workload, node)]` is its `ftshop` JSON.
pub struct Counts(pub BTreeMap<(String, usize), Value>);

impl Counts {
    /// Payload bytes (sent, received) and connections that `client`'s pods counted in their
    /// calls to `server` (through its Service).
    pub fn calls(&self, client: &str, server: &str) -> (u64, u64, u64) {
        let mut t = (0, 0, 0);
        for ((w, _), v) in &self.0 {
            if w == client {
                let c = &v["calls"][server];
                t.0 += c["sent_bytes"].as_u64().unwrap_or(0);
                t.1 += c["received_bytes"].as_u64().unwrap_or(0);
                t.2 += c["connections"].as_u64().unwrap_or(0);
            }
        }
        t
    }

    /// Payload bytes (received, sent) and connections `server`'s pods served to `client_ip`.
    pub fn served(&self, server: &str, client_ip: &str) -> (u64, u64, u64) {
        let mut t = (0, 0, 0);
        for ((w, _), v) in &self.0 {
            if w == server {
                let c = &v["served"][client_ip];
                t.0 += c["received_bytes"].as_u64().unwrap_or(0);
                t.1 += c["sent_bytes"].as_u64().unwrap_or(0);
                t.2 += c["connections"].as_u64().unwrap_or(0);
            }
        }
        t
    }

    /// Calls that failed, by workload (none expected).
    pub fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ((w, n), v) in &self.0 {
            for side in ["calls", "served"] {
                if let Some(m) = v[side].as_object() {
                    for (peer, c) in m {
                        if c["errors"].as_u64().unwrap_or(0) > 0 {
                            out.push(format!("{w} on node{n}, {side} {peer}: {c}"));
                        }
                    }
                }
            }
        }
        out
    }
}

/// Starts every service, database and the queue (not the load): each in its pod, listening
/// before this returns.
pub fn start(cluster: &Cluster) -> Result<Running> {
    let bin = ftshop_bin()?.to_string_lossy().to_string();
    let stop = std::env::temp_dir().join(format!("{}-sockshop.stop", cluster.prefix));
    let _ = std::fs::remove_file(&stop);
    let stop_arg = stop.to_string_lossy().to_string();
    let mut processes = Vec::new();
    // Servers first, the consumer last (it calls the queue at once).
    let mut order: Vec<&WorkloadSpec> = WORKLOADS.iter().filter(|w| w.kind != Kind::Load).collect();
    order.sort_by_key(|w| w.kind == Kind::Consumer);
    for w in order {
        let peers: Vec<String> = CALLS
            .iter()
            .filter(|(c, _)| *c == w.name)
            .map(|(_, s)| {
                let port = spec(s)?.service_port.unwrap_or(0);
                Ok(format!("{s}={}:{port}", cluster_ip(s)?))
            })
            .collect::<Result<_>>()?;
        for &n in w.nodes {
            let pod = cluster.pod(n, w.name)?;
            let ready = crate::netns::ReadyFile::new(&format!("{}-shop", pod.netns));
            let listen = format!("0.0.0.0:{}", w.target_port);
            let mut argv: Vec<&str> = vec![&bin];
            match w.kind {
                Kind::Http => argv.extend(["http", "--role", w.name, "--listen", &listen]),
                Kind::Store => argv.extend(["store", "--listen", &listen]),
                Kind::Consumer => argv.extend(["consume", "--interval-ms", "250"]),
                Kind::Load => continue,
            }
            for p in &peers {
                argv.extend(["--peer", p]);
            }
            argv.extend(["--stop-file", &stop_arg, "--ready-file", ready.arg()?]);
            let mut guard =
                ChildGuard::new(pod.spawn(&argv)?, format!("ftshop {} on node{n}", w.name));
            ready.wait(
                &mut guard,
                &format!("ftshop {}", w.name),
                Duration::from_secs(10),
            )?;
            processes.push((w.name.to_string(), n, guard));
        }
    }
    Ok(Running { processes, stop })
}

impl Running {
    /// Stops every stand-in (after the calls in flight) and returns their counts.
    pub fn stop(self) -> Result<Counts> {
        std::fs::write(&self.stop, b"").map_err(|e| Error::Io {
            what: format!("writing {}", self.stop.display()),
            source: e,
        })?;
        let mut counts = BTreeMap::new();
        for (w, n, guard) in self.processes {
            let out = guard.wait_output(Duration::from_secs(30))?;
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                Error::Invalid(format!(
                    "ftshop {w} on node{n} printed no counts ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                ))
            })?;
            counts.insert((w, n), v);
        }
        let _ = std::fs::remove_file(&self.stop);
        Ok(Counts(counts))
    }
}

/// Runs Locust in the `load-test` pod against the front-end's Service for `seconds`, with
/// `users` simulated users; returns its summary (requests and failures per task).
pub fn load(cluster: &Cluster, users: u32, seconds: u32) -> Result<String> {
    let pod: &Pod = cluster.pod(spec("load-test")?.nodes[0], "load-test")?;
    let locust = locust_bin()?.to_string_lossy().to_string();
    let file = locustfile().to_string_lossy().to_string();
    let host = format!("http://{}:80", cluster_ip("front-end")?);
    let (u, t) = (users.to_string(), format!("{seconds}s"));
    let started = Instant::now();
    let out = pod.exec(&[
        locust.as_str(),
        "-f",
        &file,
        "--headless",
        "--users",
        &u,
        "--spawn-rate",
        &u,
        "--run-time",
        &t,
        "--host",
        &host,
        "--only-summary",
        "--stop-timeout",
        "5",
        "--exit-code-on-error",
        "1",
    ])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if started.elapsed() < Duration::from_secs(u64::from(seconds)) {
        return Err(Error::Invalid(format!(
            "Locust ended before its run time: {text}"
        )));
    }
    Ok(text)
}
