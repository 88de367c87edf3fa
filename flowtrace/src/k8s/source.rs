//! Where metadata comes from: the API server (in-cluster service account or a kubeconfig),
//! followed with list + watch, or a file of `kubectl get ... -o json` output.
//!
//! One task per kind of object. A watch cut mid-stream resumes from the last
//! resourceVersion (kube-rs's watcher, bookmarks included) and a 410 Gone lists again. A
//! list or watch the API server does not answer marks the kind not synced, keeps the names
//! it had, waits (doubling, up to the configured maximum) and starts over with a fresh list,
//! so names come back by themselves once the API server answers again.
//! Flow counting never waits for any of this.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, PartialObjectMeta},
    runtime::watcher::{self, Event},
    Client, Resource,
};
use tracing::{info, warn};

use super::{cache::MetaCache, kind::Kind, objects};
use crate::util::lock;
use crate::{error::SourceError, model::wire::KindStatus};

/// Where the agent gets metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaSource {
    /// No source: flows carry addresses only.
    None,
    /// The pod's service account (KUBERNETES_SERVICE_HOST/PORT and the mounted token).
    InCluster,
    /// A kubeconfig file, optionally with a context.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    /// `kubectl get pods,services,endpointslices,nodes -A -o json` output, re-read when
    /// it changes.
    File(PathBuf),
}

impl MetaSource {
    pub fn describe(&self) -> String {
        match self {
            MetaSource::None => "none".into(),
            MetaSource::InCluster => "in-cluster".into(),
            MetaSource::Kubeconfig { path, .. } => format!("kubeconfig {}", path.display()),
            MetaSource::File(p) => format!("file {}", p.display()),
        }
    }
}

/// Sync state of every kind.
#[derive(Debug, Default)]
pub struct MetaStatus {
    pub source: String,
    pub kinds: BTreeMap<Kind, KindStatus>,
}

impl MetaStatus {
    pub fn new(source: &MetaSource, kinds: &[Kind]) -> Self {
        Self {
            source: source.describe(),
            kinds: kinds.iter().map(|k| (*k, KindStatus::default())).collect(),
        }
    }

    /// Whether a metadata source is configured (with none, no kind is followed).
    pub fn has_source(&self) -> bool {
        !self.kinds.is_empty()
    }

    /// Every followed kind is synced (true with no source: nothing to wait for).
    pub fn synced(&self) -> bool {
        self.kinds.values().all(|k| k.synced)
    }
}

/// How long to wait before starting over after a failure: doubling from 500 ms up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub max: Duration,
}

/// Shared handles a source writes to.
#[derive(Clone)]
pub struct Sink {
    pub cache: Arc<RwLock<MetaCache>>,
    pub status: Arc<Mutex<MetaStatus>>,
}

impl Sink {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MetaCache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, kind: Kind, f: impl FnOnce(&mut KindStatus)) {
        let mut s = lock(&self.status);
        f(s.kinds.entry(kind).or_default());
    }
}

/// Builds the client for an API source (fails early on a kubeconfig that cannot be read).
pub async fn client(source: &MetaSource) -> Result<Client, SourceError> {
    let config = match source {
        MetaSource::InCluster => kube::Config::incluster().map_err(|e| SourceError::InCluster {
            detail: e.to_string(),
        })?,
        MetaSource::Kubeconfig { path, context } => {
            let err = |e: &dyn std::fmt::Display| SourceError::Kubeconfig {
                path: path.display().to_string(),
                detail: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            let opts = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| err(&e))?
        }
        MetaSource::None | MetaSource::File(_) => {
            return Err(SourceError::Client {
                detail: "not an API source".into(),
            })
        }
    };
    Client::try_from(config).map_err(|e| SourceError::Client {
        detail: e.to_string(),
    })
}

/// Starts one watch task per kind; they run until aborted.
pub fn spawn_watches(
    client: Client,
    sink: Sink,
    backoff: Backoff,
) -> Vec<tokio::task::JoinHandle<()>> {
    let c = || client.clone();
    vec![
        tokio::spawn(follow(
            Api::<Pod>::all(c()),
            Kind::Pods,
            sink.clone(),
            backoff,
            apply_pod,
        )),
        tokio::spawn(follow(
            Api::<Service>::all(c()),
            Kind::Services,
            sink.clone(),
            backoff,
            apply_service,
        )),
        tokio::spawn(follow(
            Api::<EndpointSlice>::all(c()),
            Kind::EndpointSlices,
            sink.clone(),
            backoff,
            apply_slice,
        )),
        tokio::spawn(follow(
            Api::<Node>::all(c()),
            Kind::Nodes,
            sink.clone(),
            backoff,
            apply_node,
        )),
        // Owners: metadata-only requests (ownerReferences is all flowtrace needs).
        tokio::spawn(follow(
            Api::<PartialObjectMeta<ReplicaSet>>::all(c()),
            Kind::ReplicaSets,
            sink.clone(),
            backoff,
            apply_replicaset,
        )),
        tokio::spawn(follow(
            Api::<PartialObjectMeta<Job>>::all(c()),
            Kind::Jobs,
            sink,
            backoff,
            apply_job,
        )),
    ]
}

type Apply<K> = fn(&mut MetaCache, &K) -> Result<(), objects::ObjectError>;

fn apply_pod(c: &mut MetaCache, p: &Pod) -> Result<(), objects::ObjectError> {
    c.apply_pod(objects::pod(p)?);
    Ok(())
}
fn apply_service(c: &mut MetaCache, s: &Service) -> Result<(), objects::ObjectError> {
    c.apply_service(objects::service(s)?);
    Ok(())
}
fn apply_slice(c: &mut MetaCache, s: &EndpointSlice) -> Result<(), objects::ObjectError> {
    c.apply_slice(objects::endpoint_slice(s)?);
    Ok(())
}
fn apply_node(c: &mut MetaCache, n: &Node) -> Result<(), objects::ObjectError> {
    c.apply_node(objects::node(n)?);
    Ok(())
}
fn apply_replicaset(
    c: &mut MetaCache,
    r: &PartialObjectMeta<ReplicaSet>,
) -> Result<(), objects::ObjectError> {
    let (ns, name, owner) = objects::owner(Kind::ReplicaSets, &r.metadata)?;
    c.apply_owner(Kind::ReplicaSets, &ns, &name, owner.as_deref());
    Ok(())
}
fn apply_job(c: &mut MetaCache, j: &PartialObjectMeta<Job>) -> Result<(), objects::ObjectError> {
    let (ns, name, owner) = objects::owner(Kind::Jobs, &j.metadata)?;
    c.apply_owner(Kind::Jobs, &ns, &name, owner.as_deref());
    Ok(())
}

fn key_of<K: Resource>(o: &K) -> (String, String) {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// Applies one object, counting and logging it if it is unusable.
fn apply_one<K>(sink: &Sink, kind: Kind, apply: Apply<K>, obj: &K) {
    let mut cache = sink.write();
    if let Err(e) = apply(&mut cache, obj) {
        cache.count_skip(kind);
        drop(cache);
        warn!(error = %e, "metadata object skipped");
    }
}

/// Follows one kind: list, then watch; after any failure, waits and starts over.
async fn follow<K>(api: Api<K>, kind: Kind, sink: Sink, backoff: Backoff, apply: Apply<K>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let mut delay = Duration::from_millis(500);
    loop {
        let mut stream = Box::pin(watcher::watcher(api.clone(), watcher::Config::default()));
        // Keys listed since the last `Init`; objects not among them were deleted meanwhile.
        let mut listed: Option<HashSet<(String, String)>> = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init) => listed = Some(HashSet::new()),
                Ok(Event::InitApply(o)) => {
                    apply_one(&sink, kind, apply, &o);
                    if let Some(l) = listed.as_mut() {
                        l.insert(key_of(&o));
                    }
                }
                Ok(Event::InitDone) => {
                    let seen = listed.take().unwrap_or_default();
                    let mut cache = sink.write();
                    let gone: Vec<(String, String)> = cache
                        .keys(kind)
                        .into_iter()
                        .filter(|k| !seen.contains(k))
                        .collect();
                    for (ns, name) in &gone {
                        cache.delete(kind, ns, name);
                    }
                    cache.compact();
                    drop(cache);
                    sink.set(kind, |s| {
                        s.synced = true;
                        s.lists += 1;
                    });
                    delay = Duration::from_millis(500);
                    info!(
                        kind = kind.name(),
                        objects = seen.len(),
                        removed = gone.len(),
                        "metadata listed"
                    );
                }
                Ok(Event::Apply(o)) => {
                    apply_one(&sink, kind, apply, &o);
                    sink.set(kind, |s| s.events += 1);
                }
                Ok(Event::Delete(o)) => {
                    let (ns, name) = key_of(&o);
                    sink.write().delete(kind, &ns, &name);
                    sink.set(kind, |s| s.events += 1);
                }
                // A watch cut mid-stream, or a 410 Gone: the watcher itself resumes from the
                // last resourceVersion (bookmarks included) or lists again. Names stay valid.
                Err(e @ (watcher::Error::WatchFailed(_) | watcher::Error::WatchError(_))) => {
                    let msg = e.to_string();
                    info!(kind = kind.name(), error = %msg, "metadata watch interrupted; resuming");
                    sink.set(kind, |s| {
                        s.errors += 1;
                        s.last_error = Some(msg);
                    });
                }
                // The API server cannot be reached or refused the list/watch: names may go
                // stale, so the kind is not synced until a fresh list succeeds.
                Err(e) => {
                    let msg = e.to_string();
                    warn!(kind = kind.name(), error = %msg, retry_in_ms = delay.as_millis() as u64, "metadata list/watch failed; names are kept and may be stale until it recovers");
                    sink.set(kind, |s| {
                        s.synced = false;
                        s.errors += 1;
                        s.last_error = Some(msg);
                    });
                    break;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

/// Reads a metadata file into a fresh cache. Returns the cache and the objects skipped
/// (with why); a file that is not JSON, or has no `items` list, is an error.
pub fn load_file(path: &Path) -> Result<(MetaCache, Vec<String>), SourceError> {
    let err = |detail: String| SourceError::File {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    let items = match doc.get("items") {
        Some(serde_json::Value::Array(a)) => a.clone(),
        Some(_) => return Err(err("`items` is not a list".into())),
        None if doc.get("kind").is_some() => vec![doc],
        None => {
            return Err(err(
                "no `items` list and no `kind`: not a Kubernetes object or list".into(),
            ))
        }
    };
    let mut cache = MetaCache::new();
    let mut skipped = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let kind = item
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let res = apply_file_item(&mut cache, &kind, item);
        match res {
            Ok(()) => {}
            Err((k, reason)) => {
                if let Some(k) = k {
                    cache.count_skip(k);
                }
                skipped.push(format!(
                    "items[{i}] ({}): {reason}",
                    if kind.is_empty() { "no kind" } else { &kind }
                ));
            }
        }
    }
    cache.compact();
    Ok((cache, skipped))
}

type ItemError = (Option<Kind>, String);

fn apply_file_item(
    cache: &mut MetaCache,
    kind: &str,
    item: serde_json::Value,
) -> Result<(), ItemError> {
    fn de<T: serde::de::DeserializeOwned>(k: Kind, v: serde_json::Value) -> Result<T, ItemError> {
        serde_json::from_value(v).map_err(|e| (Some(k), format!("not a valid object: {e}")))
    }
    let obj_err = |k: Kind| move |e: objects::ObjectError| (Some(k), e.to_string());
    match kind {
        "Pod" => {
            let p: Pod = de(Kind::Pods, item)?;
            cache.apply_pod(objects::pod(&p).map_err(obj_err(Kind::Pods))?);
        }
        "Service" => {
            let s: Service = de(Kind::Services, item)?;
            cache.apply_service(objects::service(&s).map_err(obj_err(Kind::Services))?);
        }
        "EndpointSlice" => {
            let s: EndpointSlice = de(Kind::EndpointSlices, item)?;
            cache.apply_slice(objects::endpoint_slice(&s).map_err(obj_err(Kind::EndpointSlices))?);
        }
        "Node" => {
            let n: Node = de(Kind::Nodes, item)?;
            cache.apply_node(objects::node(&n).map_err(obj_err(Kind::Nodes))?);
        }
        "ReplicaSet" | "Job" => {
            let k = if kind == "Job" {
                Kind::Jobs
            } else {
                Kind::ReplicaSets
            };
            let m: PartialObjectMeta<Pod> = de(k, item)?;
            let (ns, name, owner) = objects::owner(k, &m.metadata).map_err(obj_err(k))?;
            cache.apply_owner(k, &ns, &name, owner.as_deref());
        }
        other => return Err((None, format!("kind `{other}` is not used by flowtrace"))),
    }
    Ok(())
}

/// Follows a metadata file: re-reads it when its modification time changes. A file that
/// turns unreadable keeps the last good content and marks metadata not synced.
pub async fn follow_file(path: PathBuf, sink: Sink, mut loaded: Option<SystemTime>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && mtime == loaded {
            continue;
        }
        loaded = mtime;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || load_file(&p)).await {
            Ok(Ok((cache, skipped))) => {
                install(&sink, cache, &skipped);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "metadata file re-read failed; keeping the last good content");
                let msg = e.to_string();
                let mut s = lock(&sink.status);
                for k in s.kinds.values_mut() {
                    k.synced = false;
                    k.errors += 1;
                    k.last_error = Some(msg.clone());
                }
            }
            Err(join) => warn!(error = %join, "metadata file task failed"),
        }
    }
}

/// Replaces the cache with a file's content and marks every kind synced.
pub fn install(sink: &Sink, cache: MetaCache, skipped: &[String]) {
    for s in skipped.iter().take(20) {
        warn!(skipped = %s, "metadata file entry skipped");
    }
    let counts = cache.counts();
    *sink.write() = cache;
    let mut s = lock(&sink.status);
    for k in s.kinds.values_mut() {
        k.synced = true;
        k.lists += 1;
        k.last_error = None;
    }
    drop(s);
    info!(?counts, skipped = skipped.len(), "metadata file loaded");
}
