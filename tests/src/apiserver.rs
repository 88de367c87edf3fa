//! A fixture Kubernetes API server: no real one can run here, so this one speaks the part of
//! the protocol flowtrace's kube-rs watches use, over real HTTP:
//!
//! - `GET /api/v1/{pods,services,nodes}`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/apps/v1/replicasets`, `/apis/batch/v1/jobs`: a list with the collection's
//!   `resourceVersion` (metadata-only `PartialObjectMetadataList` when the client asks for it
//!   in `Accept`, as kube-rs does for owners);
//! - `?watch=true&resourceVersion=N`: a chunked stream of `ADDED`/`MODIFIED`/`DELETED` events
//!   after N, `BOOKMARK`s every second when `allowWatchBookmarks=true`, ended after
//!   `timeoutSeconds`; an `ERROR` event with a 410 `Status` when N is older than the kept
//!   history (after [`ApiServer::compact`]), which makes the client list again.
//!
//! The test drives it: [`ApiServer::apply`] / [`ApiServer::delete`] change objects,
//! [`ApiServer::drop_watches`] cuts every watch connection mid-stream, [`ApiServer::stop`] /
//! [`ApiServer::start`] take the server away and bring it back. It listens on
//! `127.0.0.1:API_SERVER_PORT` inside each node namespace it is given, so an agent there reaches
//! it through an ordinary kubeconfig ([`ApiServer::kubeconfig`]).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{agent::in_netns, Error, Result};

/// Port the fixture listens on inside each node namespace.
pub const API_SERVER_PORT: u16 = 16443;

/// A resource collection the fixture serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Pods,
    Services,
    Nodes,
    EndpointSlices,
    ReplicaSets,
    Jobs,
}

impl Resource {
    const ALL: [Resource; 6] = [
        Resource::Pods,
        Resource::Services,
        Resource::Nodes,
        Resource::EndpointSlices,
        Resource::ReplicaSets,
        Resource::Jobs,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "/api/v1/pods",
            Resource::Services => "/api/v1/services",
            Resource::Nodes => "/api/v1/nodes",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::ReplicaSets => "/apis/apps/v1/replicasets",
            Resource::Jobs => "/apis/batch/v1/jobs",
        }
    }

    /// (apiVersion, kind) of the objects.
    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Resource::Pods => ("v1", "Pod"),
            Resource::Services => ("v1", "Service"),
            Resource::Nodes => ("v1", "Node"),
            Resource::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Resource::ReplicaSets => ("apps/v1", "ReplicaSet"),
            Resource::Jobs => ("batch/v1", "Job"),
        }
    }

    fn of_kind(kind: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.type_meta().1 == kind)
    }
}

/// One change, as a watch replays it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

/// A request the fixture served (for assertions such as "the client listed again").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub resource: Resource,
    pub watch: bool,
    pub resource_version: Option<String>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_rv: u64,
    requests: Vec<Request>,
}

struct Inner {
    store: Mutex<Store>,
    changed: Condvar,
    /// Bumped to end every open watch abruptly.
    generation: AtomicU64,
    running: AtomicBool,
}

/// The fixture server. Stops on drop.
pub struct ApiServer {
    inner: Arc<Inner>,
    netns: Vec<String>,
    /// Listener threads' stop flags, one per namespace while running.
    listeners: Vec<Arc<AtomicBool>>,
    kubeconfig: PathBuf,
}

fn lock(m: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiServer {
    /// Starts serving `objects` inside each of `netns`.
    pub fn start_in(netns: &[&str], objects: Vec<Value>) -> Result<Self> {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 1000,
                oldest_rv: 0,
                ..Store::default()
            }),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
            running: AtomicBool::new(false),
        });
        let kubeconfig = std::env::temp_dir().join(format!(
            "flowtrace-fixture-kubeconfig-{}-{}",
            std::process::id(),
            crate::netns::new_prefix()
        ));
        std::fs::write(&kubeconfig, kubeconfig_text(API_SERVER_PORT))
            .map_err(|e| Error::Invalid(format!("writing {}: {e}", kubeconfig.display())))?;
        let mut server = ApiServer {
            inner,
            netns: netns.iter().map(|s| s.to_string()).collect(),
            listeners: Vec::new(),
            kubeconfig,
        };
        for o in objects {
            server.apply(o)?;
        }
        server.start()?;
        Ok(server)
    }

    /// A kubeconfig pointing at the fixture (`http://127.0.0.1:API_SERVER_PORT`).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// (Re)starts listening in every namespace.
    pub fn start(&mut self) -> Result<()> {
        if self.inner.running.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for ns in &self.netns {
            let listener = in_netns(ns, || {
                TcpListener::bind(("127.0.0.1", API_SERVER_PORT))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
            })?
            .map_err(|e| Error::Invalid(format!("fixture API server: binding in {ns}: {e}")))?;
            let stop = Arc::new(AtomicBool::new(false));
            self.listeners.push(stop.clone());
            let inner = self.inner.clone();
            thread::spawn(move || accept_loop(listener, inner, stop));
        }
        Ok(())
    }

    /// Takes the server away: closes the listeners and every open connection.
    pub fn stop(&mut self) {
        self.inner.running.store(false, Ordering::SeqCst);
        for l in self.listeners.drain(..) {
            l.store(true, Ordering::SeqCst);
        }
        self.drop_watches();
        // Let the accept loops see the flag and close their sockets.
        thread::sleep(Duration::from_millis(300));
    }

    /// Cuts every open watch connection mid-stream (no terminating chunk).
    pub fn drop_watches(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.changed.notify_all();
    }

    /// Forgets the change history up to a revision newer than any a client holds (as a
    /// compaction after changes the client missed, or a restarted API server's empty watch
    /// cache): every watch resuming from an older resourceVersion gets 410 Gone and must list
    /// again. Open watches are cut.
    pub fn compact(&self) {
        {
            let mut s = lock(&self.inner.store);
            s.history.clear();
            s.rv += 1;
            s.oldest_rv = s.rv + 1;
        }
        self.drop_watches();
    }

    /// Creates or replaces an object (its `kind` says the collection).
    pub fn apply(&self, mut object: Value) -> Result<()> {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let resource = Resource::of_kind(&kind).ok_or_else(|| {
            Error::Invalid(format!(
                "fixture API server: no collection for kind `{kind}`"
            ))
        })?;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut s = lock(&self.inner.store);
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let existed = s
            .objects
            .insert((resource, ns, name), object.clone())
            .is_some();
        s.history.push(Change {
            rv,
            resource,
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object,
        });
        drop(s);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool> {
        let resource = Resource::of_kind(kind).ok_or_else(|| {
            Error::Invalid(format!(
                "fixture API server: no collection for kind `{kind}`"
            ))
        })?;
        let mut s = lock(&self.inner.store);
        let Some(mut object) =
            s.objects
                .remove(&(resource, namespace.to_string(), name.to_string()))
        else {
            return Ok(false);
        };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push(Change {
            rv,
            resource,
            kind: "DELETED",
            object,
        });
        drop(s);
        self.inner.changed.notify_all();
        Ok(true)
    }

    /// Requests served so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.inner.store).requests.clone()
    }

    /// List requests served for one collection.
    pub fn lists(&self, resource: Resource) -> usize {
        lock(&self.inner.store)
            .requests
            .iter()
            .filter(|r| r.resource == resource && !r.watch)
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn kubeconfig_text(port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fixture
  cluster:
    server: http://127.0.0.1:{port}
users:
- name: flowtrace
  user:
    token: fixture-token
contexts:
- name: fixture
  context:
    cluster: fixture
    user: flowtrace
current-context: fixture
"
    )
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let inner = inner.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &inner);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads one request (line and headers) and answers it; the connection is closed after.
fn serve(stream: TcpStream, inner: &Inner) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut accept = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("accept") {
                accept = v.trim().to_string();
            }
        }
    }
    let mut stream = stream;
    if !inner.running.load(Ordering::SeqCst) {
        return stream.shutdown(Shutdown::Both);
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",")))
        .collect();
    let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == path) else {
        return respond(
            &mut stream,
            404,
            &status_json(404, "NotFound", &format!("no such path {path}")),
        );
    };
    let meta_only = accept.contains("as=PartialObjectMetadata");
    let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    lock(&inner.store).requests.push(Request {
        resource,
        watch,
        resource_version: params.get("resourceVersion").cloned(),
    });
    if watch {
        serve_watch(&mut stream, inner, resource, &params, meta_only)
    } else {
        let s = lock(&inner.store);
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == resource)
            .map(|(_, o)| shape(o, meta_only))
            .collect();
        let (api_version, kind) = if meta_only {
            ("meta.k8s.io/v1", "PartialObjectMetadataList".to_string())
        } else {
            let (av, k) = resource.type_meta();
            (av, format!("{k}List"))
        };
        let body = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        drop(s);
        respond(&mut stream, 200, &body.to_string())
    }
}

/// The object as the client asked for it: whole, or its metadata only.
fn shape(o: &Value, meta_only: bool) -> Value {
    if meta_only {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]})
    } else {
        o.clone()
    }
}

fn status_json(code: u16, reason: &str, message: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn respond(stream: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = if code == 200 { "OK" } else { "Not Found" };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

fn serve_watch(
    stream: &mut TcpStream,
    inner: &Inner,
    resource: Resource,
    params: &BTreeMap<String, String>,
    meta_only: bool,
) -> std::io::Result<()> {
    let generation = inner.generation.load(Ordering::SeqCst);
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(
        params
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let too_old = {
        let s = lock(&inner.store);
        from + 1 < s.oldest_rv
    };
    if too_old {
        let status: Value = serde_json::from_str(&status_json(
            410,
            "Expired",
            &format!("too old resource version: {from}"),
        ))
        .unwrap_or(Value::Null);
        chunk(stream, &json!({"type": "ERROR", "object": status}))?;
        write!(stream, "0\r\n\r\n")?;
        return stream.flush();
    }
    let (api_version, kind) = resource.type_meta();
    let started = Instant::now();
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let (events, rv) = {
            let s = lock(&inner.store);
            let s = if s
                .history
                .iter()
                .any(|c| c.rv > sent && c.resource == resource)
            {
                s
            } else {
                inner
                    .changed
                    .wait_timeout(s, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0)
            };
            let events: Vec<Change> = s
                .history
                .iter()
                .filter(|c| c.rv > sent && c.resource == resource)
                .cloned()
                .collect();
            (events, s.rv)
        };
        if inner.generation.load(Ordering::SeqCst) != generation {
            // Cut mid-stream, as a load balancer or a crashed API server would.
            return stream.shutdown(Shutdown::Both);
        }
        for c in &events {
            chunk(
                stream,
                &json!({"type": c.kind, "object": shape(&c.object, meta_only)}),
            )?;
            sent = c.rv;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let object = if meta_only {
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"resourceVersion": rv.to_string()}})
            } else {
                json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}})
            };
            chunk(stream, &json!({"type": "BOOKMARK", "object": object}))?;
            sent = sent.max(rv);
            last_bookmark = Instant::now();
        }
        if started.elapsed() >= timeout {
            write!(stream, "0\r\n\r\n")?;
            return stream.flush();
        }
    }
}

/// Real Kubernetes objects describing the emulated cluster: a Node per node (InternalIP on the
/// underlay, podCIDR), a Pod per pod with an owner chain, the demo Service and its
/// EndpointSlice, and the ReplicaSets of the Deployments.
///
/// Pods are named `<pod>-<node>` (`pod-a-node1`). `pod-a` belongs to Deployment `default/client`,
/// `pod-b` (the Service backend) to Deployment `default/backend`, `pod-c` to DaemonSet
/// `monitoring/agent`; any other pod is a bare pod in `default`.
pub fn cluster_objects(cluster: &crate::cluster::Cluster) -> Vec<Value> {
    let mut out = Vec::new();
    for node in &cluster.nodes {
        let i = node.index - 1;
        out.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name},
            "spec": {"podCIDR": format!("10.244.{}.0/24", i + 1), "podCIDRs": [format!("10.244.{}.0/24", i + 1)]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": node.underlay_ip.to_string()},
                {"type": "Hostname", "address": node.name}
            ]}
        }));
    }
    for (name, hash) in [("client", "5d4f8b"), ("backend", "7c9d6f")] {
        out.push(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"namespace": "default", "name": format!("{name}-{hash}"),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": format!("uid-deploy-{name}"), "controller": true}]},
            "spec": {"selector": {"matchLabels": {"app": name}}}
        }));
    }
    for pod in cluster.pods() {
        out.push(pod_object(
            &pod.name,
            &pod.node,
            &pod.ipv4.to_string(),
            &pod.ipv6.to_string(),
        ));
    }
    let svc = &cluster.service;
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": svc.namespace, "name": svc.name},
        "spec": {
            "type": "NodePort",
            "clusterIP": svc.cluster_ip.to_string(), "clusterIPs": [svc.cluster_ip.to_string()],
            "ports": svc.ports.iter().map(|p| {
                let mut v = json!({"name": p.name, "port": p.port, "targetPort": p.target_port,
                                   "protocol": p.protocol.as_str().to_uppercase()});
                if let Some(np) = p.node_port { v["nodePort"] = json!(np); }
                v
            }).collect::<Vec<_>>()
        }
    }));
    out.push(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": svc.namespace, "name": format!("{}-x7k2p", svc.name),
                     "labels": {"kubernetes.io/service-name": svc.name}},
        "addressType": "IPv4",
        "endpoints": svc.endpoints.iter().map(|e| json!({
            "addresses": [e.ip.to_string()], "conditions": {"ready": true}, "nodeName": e.node,
            "targetRef": {"kind": "Pod", "namespace": svc.namespace, "name": format!("{}-{}", e.pod, e.node)}
        })).collect::<Vec<_>>(),
        "ports": svc.ports.iter().map(|p| json!({"name": p.name, "port": p.target_port, "protocol": p.protocol.as_str().to_uppercase()})).collect::<Vec<_>>()
    }));
    out
}

/// The Pod object for emulated pod `pod` on `node` (see [`cluster_objects`] for the owners).
pub fn pod_object(pod: &str, node: &str, ipv4: &str, ipv6: &str) -> Value {
    let (namespace, owner, hash) = match pod {
        "pod-a" => (
            "default",
            Some(("ReplicaSet", "client-5d4f8b")),
            Some("5d4f8b"),
        ),
        "pod-b" => (
            "default",
            Some(("ReplicaSet", "backend-7c9d6f")),
            Some("7c9d6f"),
        ),
        "pod-c" => ("monitoring", Some(("DaemonSet", "agent")), None),
        _ => ("default", None, None),
    };
    let mut labels = json!({"app": pod});
    if let Some(h) = hash {
        labels["pod-template-hash"] = json!(h);
    }
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": format!("{pod}-{node}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": ipv4, "podIPs": [{"ip": ipv4}, {"ip": ipv6}]}
    });
    if let Some((kind, name)) = owner {
        let api_version = if kind == "DaemonSet" || kind == "ReplicaSet" {
            "apps/v1"
        } else {
            "v1"
        };
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": api_version, "kind": kind, "name": name,
            "uid": format!("uid-{name}"), "controller": true, "blockOwnerDeletion": true}]);
    }
    p
}
