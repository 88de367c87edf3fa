//! A fixture Kubernetes API server: no real one can run here, so this one speaks the part of
//! the protocol flowtrace's kube-rs watches use, over real HTTP:
//!
//! - `GET /api/v1/{pods,services,nodes}`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/apps/v1/replicasets`, `/apis/batch/v1/jobs`: a list with the collection's
//!   `resourceVersion` (metadata-only `PartialObjectMetadataList` when the client asks for it
//!   in `Accept`, as kube-rs does for owners);
//! - the same collections of one namespace (`/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`,
//!   as the relay watches its agents' EndpointSlices), and `labelSelector` (`key=value`,
//!   `key!=value`, `key`, `!key`, comma-separated, URL-encoded as kube-rs sends it) on lists
//!   and watches alike: an object that stops matching leaves a watch as `DELETED`, one that
//!   starts matching joins it as `ADDED`, as the real API server does;
//! - `?watch=true&resourceVersion=N`: a chunked stream of `ADDED`/`MODIFIED`/`DELETED` events
//!   after N, `BOOKMARK`s every second when `allowWatchBookmarks=true`, ended after
//!   `timeoutSeconds`; an `ERROR` event with a 410 `Status` when N is older than the kept
//!   history (after [`ApiServer::compact`]), which makes the client list again.
//!
//! The test drives it: [`ApiServer::apply`] / [`ApiServer::delete`] change objects,
//! [`ApiServer::drop_watches`] cuts every watch connection mid-stream, [`ApiServer::stop`] /
//! [`ApiServer::start`] take the server away and bring it back. It listens on
//! `127.0.0.1:API_SERVER_PORT` inside each node namespace it is given, so an agent there reaches
//! it through an ordinary kubeconfig ([`ApiServer::kubeconfig`]); [`ApiServer::start_local`]
//! serves on an ephemeral loopback port of the caller's own namespace instead (no root needed:
//! the fixture's own unit tests).
//!
//! [`agents_endpointslice`] and [`ApiServer::add_agent_endpoint`] /
//! [`ApiServer::remove_agent_endpoint`] describe the agents' headless Service, through which the
//! relay finds them, and make a node's agent join or leave it.

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

use std::net::Ipv4Addr;

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
    /// The object before a `MODIFIED` change: a watch with a label selector needs it to tell an
    /// object that left the selection from one that never was in it.
    previous: Option<Value>,
}

/// A request the fixture served (for assertions such as "the client listed again").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub resource: Resource,
    /// The namespace of a namespaced path (`/api/v1/namespaces/{ns}/pods`), `None` for the
    /// cluster-wide one.
    pub namespace: Option<String>,
    /// `labelSelector`, decoded.
    pub label_selector: Option<String>,
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
    /// Serving on this loopback port of the caller's own namespace instead of in `netns`
    /// ([`ApiServer::start_local`]); 0 until first bound.
    local_port: Option<u16>,
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
        Self::start_at(netns, None, objects)
    }

    /// Starts serving `objects` on an ephemeral port of 127.0.0.1 in the caller's own network
    /// namespace ([`ApiServer::local_port`]); needs no root. Its kubeconfig points at
    /// [`API_SERVER_PORT`], not at that port: this is for clients in the test process.
    pub fn start_local(objects: Vec<Value>) -> Result<Self> {
        Self::start_at(&[], Some(0), objects)
    }

    /// The port [`ApiServer::start_local`] serves on.
    pub fn local_port(&self) -> Option<u16> {
        self.local_port
    }

    fn start_at(netns: &[&str], local_port: Option<u16>, objects: Vec<Value>) -> Result<Self> {
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
            local_port,
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
        let mut bound = Vec::new();
        if let Some(port) = self.local_port {
            let listener = bind_loopback(port).map_err(|e| {
                Error::Invalid(format!("fixture API server: binding 127.0.0.1:{port}: {e}"))
            })?;
            let addr = listener.local_addr().map_err(|e| {
                Error::Invalid(format!("fixture API server: its local address: {e}"))
            })?;
            self.local_port = Some(addr.port());
            bound.push(listener);
        }
        for ns in &self.netns {
            bound.push(bind_in(ns)?);
        }
        for listener in bound {
            self.serve_on(listener);
        }
        Ok(())
    }

    /// Also serves inside `netns` from now on (and after every [`ApiServer::start`]), e.g. in
    /// a namespace created after the server.
    pub fn listen_in(&mut self, netns: &str) -> Result<()> {
        if self.netns.iter().any(|n| n == netns) {
            return Ok(());
        }
        if self.inner.running.load(Ordering::SeqCst) {
            let listener = bind_in(netns)?;
            self.serve_on(listener);
        }
        self.netns.push(netns.to_string());
        Ok(())
    }

    fn serve_on(&mut self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        self.listeners.push(stop.clone());
        let inner = self.inner.clone();
        thread::spawn(move || accept_loop(listener, inner, stop));
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
        let previous = s.objects.insert((resource, ns, name), object.clone());
        s.history.push(Change {
            rv,
            resource,
            kind: if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
            previous,
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
            previous: None,
        });
        drop(s);
        self.inner.changed.notify_all();
        Ok(true)
    }

    /// The stored object (with the resourceVersion it got), if it exists.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Result<Option<Value>> {
        let resource = Resource::of_kind(kind).ok_or_else(|| {
            Error::Invalid(format!(
                "fixture API server: no collection for kind `{kind}`"
            ))
        })?;
        Ok(lock(&self.inner.store)
            .objects
            .get(&(resource, namespace.to_string(), name.to_string()))
            .cloned())
    }

    /// Puts node `node`'s agent (underlay address `ip`) into the agents' EndpointSlice
    /// ([`agents_endpointslice`]), replacing an endpoint of that node it already lists; creates
    /// the slice if it does not exist. The change reaches watchers as `MODIFIED` (`ADDED`).
    pub fn add_agent_endpoint(&self, node: &str, ip: Ipv4Addr) -> Result<()> {
        let mut slice = self
            .object("EndpointSlice", AGENTS_NAMESPACE, AGENTS_SLICE)?
            .unwrap_or_else(|| agents_endpointslice(&[]));
        let mut endpoints = endpoints_without(&slice, node);
        endpoints.push(agent_endpoint(node, ip));
        slice["endpoints"] = Value::Array(endpoints);
        self.apply(slice)
    }

    /// Takes node `node`'s agent out of the agents' EndpointSlice (as when its pod is deleted);
    /// returns whether it was listed.
    pub fn remove_agent_endpoint(&self, node: &str) -> Result<bool> {
        let Some(mut slice) = self.object("EndpointSlice", AGENTS_NAMESPACE, AGENTS_SLICE)? else {
            return Ok(false);
        };
        let endpoints = endpoints_without(&slice, node);
        let listed = endpoints.len() != slice["endpoints"].as_array().map_or(0, Vec::len);
        if listed {
            slice["endpoints"] = Value::Array(endpoints);
            self.apply(slice)?;
        }
        Ok(listed)
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

fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A listener on `127.0.0.1:API_SERVER_PORT` inside `netns`.
fn bind_in(netns: &str) -> Result<TcpListener> {
    in_netns(netns, || bind_loopback(API_SERVER_PORT))?
        .map_err(|e| Error::Invalid(format!("fixture API server: binding in {netns}: {e}")))
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
    let params = query_params(query);
    let Some((resource, namespace)) = route(path) else {
        return respond(
            &mut stream,
            404,
            &status_json(404, "NotFound", &format!("no such path {path}")),
        );
    };
    let selector = match params.get("labelSelector").map(|s| Selector::parse(s)) {
        None => Selector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return respond(&mut stream, 400, &status_json(400, "BadRequest", &e)),
    };
    let meta_only = accept.contains("as=PartialObjectMetadata");
    let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
    lock(&inner.store).requests.push(Request {
        resource,
        namespace: namespace.clone(),
        label_selector: params.get("labelSelector").cloned(),
        watch,
        resource_version: params.get("resourceVersion").cloned(),
    });
    let scope = Scope {
        resource,
        namespace,
        selector,
    };
    if watch {
        serve_watch(&mut stream, inner, &scope, &params, meta_only)
    } else {
        let s = lock(&inner.store);
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((r, ns, _), o)| *r == resource && scope.holds(ns, o))
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
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
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
    scope: &Scope,
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
    let (api_version, kind) = scope.resource.type_meta();
    let started = Instant::now();
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let (events, rv) = {
            let s = lock(&inner.store);
            let s = if s
                .history
                .iter()
                .any(|c| c.rv > sent && c.resource == scope.resource)
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
                .filter(|c| c.rv > sent && c.resource == scope.resource)
                .cloned()
                .collect();
            (events, s.rv)
        };
        if inner.generation.load(Ordering::SeqCst) != generation {
            // Cut mid-stream, as a load balancer or a crashed API server would.
            return stream.shutdown(Shutdown::Both);
        }
        for c in &events {
            if let Some(kind) = scope.event(c) {
                chunk(
                    stream,
                    &json!({"type": kind, "object": shape(&c.object, meta_only)}),
                )?;
            }
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

/// What one request asks for: a collection, maybe one namespace of it, maybe a label selection.
struct Scope {
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
}

impl Scope {
    /// Whether an object stored under namespace `ns` is in this scope.
    fn holds(&self, ns: &str, object: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.selector.matches(&object["metadata"]["labels"])
    }

    fn holds_object(&self, object: &Value) -> bool {
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        self.holds(ns, object)
    }

    /// The event a watch of this scope sends for change `c`, if any: a modification that
    /// takes an object out of the selection is its deletion for this watch, one that brings
    /// it in its addition.
    fn event(&self, c: &Change) -> Option<&'static str> {
        if c.resource != self.resource {
            return None;
        }
        let now = self.holds_object(&c.object);
        match (c.kind, c.previous.as_ref().map(|p| self.holds_object(p))) {
            ("MODIFIED", Some(true)) if !now => Some("DELETED"),
            ("MODIFIED", Some(false)) if now => Some("ADDED"),
            (kind, _) if now => Some(kind),
            _ => None,
        }
    }
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A label selector in the API's string form; the empty one selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selector(Vec<Requirement>);

impl Selector {
    /// Parses `key=value`, `key==value`, `key!=value`, `key` and `!key`, comma-separated
    /// (set-based `in`/`notin` are not served: an error says so).
    fn parse(text: &str) -> std::result::Result<Selector, String> {
        let mut out = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_string())
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!(
                    "the fixture API server does not serve set-based selectors: {term:?}"
                ));
            } else {
                Requirement::Exists(term.to_string())
            };
            out.push(req);
        }
        Ok(Selector(out))
    }

    /// Whether an object with `labels` (its `metadata.labels`, maybe null) is selected.
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The collection and namespace a request path names: `/api/v1/pods` or
/// `/api/v1/namespaces/{ns}/pods` (Nodes have no namespaced form).
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    Resource::ALL.into_iter().find_map(|r| {
        if r.path() == path {
            return Some((r, None));
        }
        if r == Resource::Nodes {
            return None;
        }
        let (group, plural) = r.path().rsplit_once('/')?;
        let rest = path.strip_prefix(group)?.strip_prefix("/namespaces/")?;
        let (ns, tail) = rest.split_once('/')?;
        (tail == plural && !ns.is_empty()).then(|| (r, Some(ns.to_string())))
    })
}

/// A query string's parameters, `%XX` and `+` decoded as a form-encoded query is (kube-rs
/// encodes `labelSelector=kubernetes.io%2Fservice-name%3Dflowtrace`).
fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Namespace of the agents' DaemonSet and of their headless Service.
pub const AGENTS_NAMESPACE: &str = "flowtrace";
/// The agents' headless Service (deploy/service.yaml), whose EndpointSlices the relay follows.
pub const AGENTS_SERVICE: &str = "flowtrace";
/// The name of its EndpointSlice, as the EndpointSlice controller generates one (the relay
/// must find it by its label, not by name).
pub const AGENTS_SLICE: &str = "flowtrace-7kq2x";
/// The agents' metrics port (`metrics`), listed first in the slice: the relay must pick the
/// port by its name.
pub const AGENT_METRICS_PORT: u16 = 9651;
/// The agents' mTLS data API port (`api`).
pub const AGENT_DATA_PORT: u16 = 9652;

/// The EndpointSlice of the agents' headless Service as the EndpointSlice controller writes it
/// (`flowtrace/flowtrace-7kq2x`, label `kubernetes.io/service-name=flowtrace`, ports `metrics`
/// 9651 and `api` 9652): one endpoint per `(node name, underlay address)` of `nodes`, each with
/// its `nodeName` and the agent pod as `targetRef` (hostNetwork pods have the node's address).
pub fn agents_endpointslice(nodes: &[(&str, Ipv4Addr)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "namespace": AGENTS_NAMESPACE, "name": AGENTS_SLICE,
            "labels": {
                "kubernetes.io/service-name": AGENTS_SERVICE,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "service.kubernetes.io/headless": ""
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": AGENTS_SERVICE,
                                 "uid": "uid-service-flowtrace", "controller": true,
                                 "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": nodes.iter().map(|(n, ip)| agent_endpoint(n, *ip)).collect::<Vec<_>>(),
        "ports": [
            {"name": "metrics", "port": AGENT_METRICS_PORT, "protocol": "TCP"},
            {"name": "api", "port": AGENT_DATA_PORT, "protocol": "TCP"}
        ]
    })
}

/// The agents' headless Service itself (deploy/service.yaml's shape).
pub fn agents_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": AGENTS_NAMESPACE, "name": AGENTS_SERVICE},
        "spec": {
            "clusterIP": "None", "clusterIPs": ["None"],
            "selector": {"app.kubernetes.io/name": "flowtrace"},
            "ports": [
                {"name": "metrics", "port": AGENT_METRICS_PORT, "targetPort": AGENT_METRICS_PORT, "protocol": "TCP"},
                {"name": "api", "port": AGENT_DATA_PORT, "targetPort": AGENT_DATA_PORT, "protocol": "TCP"}
            ]
        }
    })
}

fn agent_endpoint(node: &str, ip: Ipv4Addr) -> Value {
    json!({
        "addresses": [ip.to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": AGENTS_NAMESPACE, "name": format!("flowtrace-{node}")}
    })
}

/// The slice's endpoints less node `node`'s.
fn endpoints_without(slice: &Value, node: &str) -> Vec<Value> {
    slice["endpoints"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["nodeName"].as_str() != Some(node))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;

    /// The agents' slice with node1 and node2, the demo Service's slice (another namespace,
    /// another service name) and a decoy with the agents' label in another namespace.
    fn objects() -> Vec<Value> {
        let mut decoy = agents_endpointslice(&[("node9", Ipv4Addr::new(10, 9, 9, 9))]);
        decoy["metadata"]["namespace"] = json!("elsewhere");
        vec![
            agents_endpointslice(&[
                ("node1", Ipv4Addr::new(192, 168, 50, 1)),
                ("node2", Ipv4Addr::new(192, 168, 50, 2)),
            ]),
            decoy,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"namespace": "default", "name": "svc-demo-x7k2p",
                                "labels": {"kubernetes.io/service-name": "svc-demo"}},
                   "addressType": "IPv4", "endpoints": [], "ports": []}),
        ]
    }

    /// The agents' EndpointSlices path with the selector as kube-rs encodes it.
    fn agents_url(port: u16, extra: &str) -> String {
        format!(
            "http://127.0.0.1:{port}/apis/discovery.k8s.io/v1/namespaces/flowtrace/endpointslices\
             ?labelSelector=kubernetes.io%2Fservice-name%3Dflowtrace{extra}"
        )
    }

    fn get(url: &str) -> Value {
        ureq::get(url)
            .timeout(Duration::from_secs(5))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    /// The events of a watch at `url` (which must end by itself: `timeoutSeconds`), read on a
    /// thread while `during` runs.
    fn watch_events(url: String, during: impl FnOnce()) -> Vec<Value> {
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = thread::spawn(move || {
            let resp = ureq::get(&url)
                .timeout(Duration::from_secs(20))
                .call()
                .unwrap();
            tx.send(()).unwrap();
            BufReader::new(resp.into_reader())
                .lines()
                .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
                .collect::<Vec<_>>()
        });
        // The watch has its answer's head: changes after this are the watch's to send.
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        during();
        reader.join().unwrap()
    }

    fn names(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    fn nodes(slice: &Value) -> Vec<&str> {
        slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["nodeName"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_namespaced_list_serves_only_the_selected_objects_of_its_namespace() {
        let api = ApiServer::start_local(objects()).unwrap();
        let port = api.local_port().unwrap();
        let list = get(&agents_url(port, ""));
        assert_eq!(list["kind"], "EndpointSliceList");
        assert_eq!(names(&list["items"]), ["flowtrace/flowtrace-7kq2x"]);
        let slice = &list["items"][0];
        assert_eq!(nodes(slice), ["node1", "node2"]);
        assert_eq!(slice["endpoints"][1]["addresses"][0], "192.168.50.2");
        assert_eq!(slice["ports"][1]["name"], "api");
        assert_eq!(slice["ports"][1]["port"], 9652);
        // The list's revision is the collection's, so a watch from it misses nothing.
        let rv: u64 = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            rv >= slice["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        );

        // Without the selector: the namespace's every slice; cluster-wide: all three.
        let base = format!("http://127.0.0.1:{port}/apis/discovery.k8s.io/v1");
        let all_ns = get(&format!("{base}/namespaces/flowtrace/endpointslices"));
        assert_eq!(names(&all_ns["items"]), ["flowtrace/flowtrace-7kq2x"]);
        assert_eq!(
            get(&format!("{base}/endpointslices"))["items"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let other = get(&format!(
            "{base}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dsvc-demo"
        ));
        assert_eq!(names(&other["items"]), ["default/svc-demo-x7k2p"]);
        // != and !key select the complement.
        let not = get(&format!(
            "{base}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%21%3Dflowtrace"
        ));
        assert_eq!(names(&not["items"]), ["default/svc-demo-x7k2p"]);
        let headless = get(&format!(
            "{base}/endpointslices?labelSelector=%21service.kubernetes.io%2Fheadless"
        ));
        assert_eq!(names(&headless["items"]), ["default/svc-demo-x7k2p"]);

        let requests = api.requests();
        assert_eq!(requests[0].namespace.as_deref(), Some("flowtrace"));
        assert_eq!(
            requests[0].label_selector.as_deref(),
            Some("kubernetes.io/service-name=flowtrace")
        );
        assert!(!requests[0].watch);
    }

    #[test]
    fn a_namespaced_watch_sends_the_selected_changes_after_its_revision() {
        let mut objects = objects();
        objects.push(agents_service());
        let api = ApiServer::start_local(objects).unwrap();
        let port = api.local_port().unwrap();
        let rv = get(&agents_url(port, ""))["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let url = agents_url(
            port,
            &format!("&watch=true&resourceVersion={rv}&timeoutSeconds=2&allowWatchBookmarks=true"),
        );
        let events = watch_events(url, || {
            api.add_agent_endpoint("node3", Ipv4Addr::new(192, 168, 50, 3))
                .unwrap();
            // Not in the watch's scope: the agents' label in another namespace, another
            // service's slice.
            for (ns, name) in [("elsewhere", AGENTS_SLICE), ("default", "svc-demo-x7k2p")] {
                let mut other = api.object("EndpointSlice", ns, name).unwrap().unwrap();
                other["endpoints"] = json!([]);
                api.apply(other).unwrap();
            }
            assert!(api.remove_agent_endpoint("node1").unwrap());
            assert!(!api.remove_agent_endpoint("node1").unwrap());
            // Relabelled away from the selection: gone for this watch.
            let mut slice = api
                .object("EndpointSlice", "flowtrace", "flowtrace-7kq2x")
                .unwrap()
                .unwrap();
            slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("other");
            api.apply(slice.clone()).unwrap();
            // And back: a new addition.
            slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("flowtrace");
            api.apply(slice).unwrap();
            assert!(api
                .delete("EndpointSlice", "flowtrace", "flowtrace-7kq2x")
                .unwrap());
        });
        let changes: Vec<(String, Vec<&str>)> = events
            .iter()
            .filter(|e| e["type"] != "BOOKMARK")
            .map(|e| (e["type"].as_str().unwrap().to_string(), nodes(&e["object"])))
            .collect();
        let want: Vec<(String, Vec<&str>)> = [
            ("MODIFIED", vec!["node1", "node2", "node3"]),
            ("MODIFIED", vec!["node2", "node3"]),
            ("DELETED", vec!["node2", "node3"]),
            ("ADDED", vec!["node2", "node3"]),
            ("DELETED", vec!["node2", "node3"]),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
        assert_eq!(changes, want, "{events:#?}");
        // Every event carries a revision newer than the one watched from, in order.
        let revs: Vec<u64> = events
            .iter()
            .map(|e| {
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(revs.iter().all(|r| *r > rv.parse().unwrap()), "{revs:?}");
        assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{revs:?}");
        let watch = api.requests().into_iter().find(|r| r.watch).unwrap();
        assert_eq!(watch.resource_version.as_deref(), Some(rv.as_str()));
        assert_eq!(watch.namespace.as_deref(), Some("flowtrace"));
    }

    #[test]
    fn a_namespaced_watch_from_a_compacted_revision_is_told_to_list_again() {
        let api = ApiServer::start_local(objects()).unwrap();
        let port = api.local_port().unwrap();
        let rv = get(&agents_url(port, ""))["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        api.compact();
        let events = watch_events(
            agents_url(
                port,
                &format!("&watch=true&resourceVersion={rv}&timeoutSeconds=2"),
            ),
            || {},
        );
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["type"], "ERROR");
        assert_eq!(events[0]["object"]["code"], 410);
    }

    #[test]
    fn paths_name_their_collection_and_namespace() {
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/flowtrace/endpointslices"),
            Some((Resource::EndpointSlices, Some("flowtrace".into())))
        );
        assert_eq!(route("/api/v1/pods"), Some((Resource::Pods, None)));
        assert_eq!(
            route("/api/v1/namespaces/default/pods"),
            Some((Resource::Pods, Some("default".into())))
        );
        assert_eq!(route("/api/v1/namespaces/x/nodes"), None);
        assert_eq!(route("/api/v1/namespaces//pods"), None);
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/a/b/endpointslices"),
            None
        );
        assert_eq!(route("/api/v1/endpointslices"), None);
    }

    #[test]
    fn selectors_and_query_values_decode_as_the_api_server_does() {
        let q = query_params(
            "labelSelector=kubernetes.io%2Fservice-name%3Dflowtrace%2Capp+x%21%3Dy&watch=true",
        );
        assert_eq!(
            q["labelSelector"],
            "kubernetes.io/service-name=flowtrace,app x!=y"
        );
        assert_eq!(q["watch"], "true");
        assert_eq!(percent_decode("a%2"), "a%2");
        let s = Selector::parse("a=1, b==2,c!=3,d,!e").unwrap();
        assert!(s.matches(&json!({"a": "1", "b": "2", "d": ""})));
        assert!(!s.matches(&json!({"a": "1", "b": "2", "d": "", "e": "x"})));
        assert!(!s.matches(&json!({"a": "1", "b": "2", "c": "3", "d": ""})));
        assert!(!s.matches(&Value::Null));
        assert!(Selector::default().matches(&Value::Null));
        assert!(Selector::parse("env in (a,b)").is_err());
    }
}
