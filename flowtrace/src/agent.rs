//! `flowtrace agent`: loads the programs, follows interfaces, drains, serves the API.
//!
//! One task per source, joined by shared state: the link watcher (attach/forget), the
//! periodic drain, and the HTTP server. SIGINT/SIGTERM detaches everything before exit;
//! with TCX the kernel also detaches by itself if the process is killed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    attach::{self, AttachMode, Attacher},
    drain::Drainer,
    error::{Error, Result},
    flows::FlowTable,
    k8s::{
        source::{self, Backoff, MetaSource, MetaStatus, Sink},
        Kind, MetaCache,
    },
    links::{self, Link, LinkEvent, Selector},
    nat::NatTable,
};

/// Agent settings (flags and `FLOWTRACE_*` environment variables fill it).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub drain_interval: Duration,
    pub flow_entries: u32,
    pub nat_entries: u32,
    /// Capacity of each kernel latency buffer.
    pub latency_entries: u32,
    /// Latency sampling: one packet in N (a power of two), 0 = off.
    pub latency_sample: u32,
    /// Cross-check NAT translations with the conntrack table after each drain.
    pub conntrack: bool,
    /// How often to dump the whole conntrack table when events are followed.
    pub conntrack_resync: Duration,
    pub max_flows: usize,
    pub flow_idle_timeout: Duration,
    pub attach_mode: AttachMode,
    pub selector: Selector,
    /// Node name reported by the API; the hostname when `None`.
    pub node_name: Option<String>,
    /// Where pod, Service and node names come from.
    pub metadata: MetaSource,
    /// Longest wait between attempts to reach the API server again.
    pub metadata_backoff_max: Duration,
    /// Aggregation level, series cap and series expiry of `/metrics`.
    pub metrics: crate::metrics::MetricsConfig,
}

/// State shared by the agent's tasks and the API.
pub struct Shared {
    drainer: tokio::sync::Mutex<Drainer>,
    /// The loaded programs and their attachments (the attached interfaces are read from it).
    pub attacher: tokio::sync::Mutex<Attacher>,
    pub table: Mutex<FlowTable>,
    /// NAT translations (kernel records checked against conntrack).
    pub nat: Mutex<NatTable>,
    /// Hop latency and round trips.
    pub latency: Mutex<crate::latency::LatencyTable>,
    pub latency_sample: u32,
    /// Whether to cross-check with conntrack after each drain.
    pub conntrack: bool,
    /// Translated conntrack connections, from events and resync dumps.
    pub ct: Arc<Mutex<crate::conntrack::CtMirror>>,
    conntrack_resync: Duration,
    last_dump: Mutex<Option<std::time::Instant>>,
    /// Every link seen in this namespace, by ifindex (kept after removal so drained
    /// counters of a vanished interface still carry its name).
    pub links: Mutex<HashMap<u32, Link>>,
    pub attach_mode: AttachMode,
    /// (program name, kernel program id) of the loaded programs.
    pub program_ids: Vec<(String, u32)>,
    pub links_synced: AtomicBool,
    pub attach_failures: AtomicU64,
    pub drains: AtomicU64,
    pub drain_errors: AtomicU64,
    pub node: String,
    /// Kubernetes metadata (written by the source tasks, read by the drain and the API).
    pub meta: Arc<RwLock<MetaCache>>,
    pub meta_status: Arc<Mutex<MetaStatus>>,
    /// Live tracers and the joined packets they receive.
    pub trace: Arc<crate::trace::TraceHub>,
    /// What `/metrics` serves, fed by every drain.
    pub metrics: Mutex<crate::metrics::Metrics>,
    /// Capacity of each kernel buffer: flows, NAT, latency.
    pub map_capacity: [u32; 3],
    pub max_flows: usize,
}

/// Locks a std mutex, recovering from poisoning (a panicked holder leaves data that is
/// still consistent for our counters and maps).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Reads the metadata cache (lock order: links, meta, table, nat).
    pub fn meta_read(&self) -> std::sync::RwLockReadGuard<'_, MetaCache> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Drains the kernel buffers into the flow table now.
    pub async fn drain_now(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let drained = {
            let mut d = self.drainer.lock().await;
            d.drain().await
        };
        let drained = match drained {
            Ok(d) => d,
            Err(e) => {
                self.drain_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if let Some(first) = drained.problems.first() {
            self.drain_errors
                .fetch_add(drained.problems.len() as u64, Ordering::Relaxed);
            warn!(errors = drained.problems.len(), first = %first, "drain met map errors; the entries stay for the next drain");
        }
        let now = monotonic_ns();
        {
            let links = lock(&self.links);
            let meta = self.meta_read();
            let mut table = lock(&self.table);
            table.merge(
                &drained.flows,
                &|i| links.get(&i).map(|l| l.name.clone()),
                &|ip| meta.resolve(ip),
            );
            table.expire(now);
            let mut nat = lock(&self.nat);
            let new_translations = nat.merge_kernel(&drained.nat, now);
            let mut lat = lock(&self.latency);
            lat.merge(&drained.latency, now);
            lat.expire(now);
            drop(lat);
            let hop = |i: u32| crate::metrics::hop_class(links.get(&i));
            lock(&self.metrics).observe_drain(&crate::metrics::DrainView {
                drained: &drained,
                new_translations: &new_translations,
                meta: &meta,
                nat: &nat,
                hop: &hop,
                now_ns: now,
                duration_s: started.elapsed().as_secs_f64(),
            });
        }
        if self.conntrack {
            if self.dump_due() {
                // After the drain: every connection whose packets were drained is in conntrack.
                match tokio::task::spawn_blocking(crate::conntrack::dump).await {
                    Ok(Ok(entries)) => {
                        lock(&self.ct).resync(&entries, monotonic_ns());
                        *lock(&self.last_dump) = Some(std::time::Instant::now());
                    }
                    Ok(Err(e)) => {
                        lock(&self.nat).conntrack_failed();
                        warn!(error = %e, "conntrack dump failed; translations are checked against what events said until the next one");
                    }
                    Err(join) => {
                        lock(&self.nat).conntrack_failed();
                        warn!(error = %join, "conntrack dump task failed");
                    }
                }
            }
            let entries = lock(&self.ct).entries();
            let table = lock(&self.table);
            let mut nat = lock(&self.nat);
            nat.cross_check(&entries, &|t| table.contains(t), now);
            drop((table, nat));
            lock(&self.ct).expire(now);
        }
        lock(&self.nat).expire(now);
        self.drains.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether to dump conntrack now: no events, events lost, or the periodic resync.
    fn dump_due(&self) -> bool {
        lock(&self.ct).needs_resync()
            || lock(&self.last_dump).is_none_or(|t| t.elapsed() >= self.conntrack_resync)
    }

    /// Interface names by ifindex, copied so no lock is held while they are used (the lock
    /// order is links, table, nat).
    pub fn iface_names(&self) -> HashMap<u32, String> {
        lock(&self.links)
            .iter()
            .map(|(i, l)| (*i, l.name.clone()))
            .collect()
    }

    /// Makes the kernel follow the number of attached tracers: the programs write trace
    /// events only while there is one, and sample for latency while tracing even when
    /// latency tracking is off. Call after every subscribe and unsubscribe; it reads the
    /// count under the drainer's lock, so the last call leaves the right state.
    pub async fn apply_tracing(&self) -> Result<()> {
        let mut d = self.drainer.lock().await;
        let on = self.trace.tracers() > 0;
        d.set_tracing(on)?;
        if self.latency_sample == 0 {
            d.set_latency_sampling(if on {
                crate::trace::TRACE_SAMPLE_WHEN_OFF
            } else {
                0
            })?;
        }
        Ok(())
    }

    /// Whether the programs' control word has the tracing bit set.
    pub async fn kernel_tracing(&self) -> Result<bool> {
        self.drainer.lock().await.tracing()
    }

    /// One packet in this many is traced (plus every SYN).
    pub fn trace_sample(&self) -> u32 {
        if self.latency_sample == 0 {
            crate::trace::TRACE_SAMPLE_WHEN_OFF
        } else {
            self.latency_sample
        }
    }

    /// The agent's own state for `/metrics`.
    pub async fn health(&self) -> crate::metrics::Health {
        let (attached_interfaces, programs) = {
            let mut a = self.attacher.lock().await;
            (a.interfaces().len(), a.program_stats())
        };
        let kernel_counters = match self.kernel_counters().await {
            Ok(c) => c.to_vec(),
            Err(e) => {
                warn!(error = %e, "reading the kernel counters for /metrics");
                Vec::new()
            }
        };
        let (flow_table_entries, flow_table_evicted) = {
            let t = lock(&self.table);
            (t.len(), t.evicted())
        };
        crate::metrics::Health {
            attached_interfaces,
            attach_failures: self.attach_failures.load(Ordering::Relaxed),
            kernel_counters,
            map_capacity: self.map_capacity,
            flow_table_entries,
            flow_table_capacity: self.max_flows,
            flow_table_evicted,
            drains: self.drains.load(Ordering::Relaxed),
            drain_errors: self.drain_errors.load(Ordering::Relaxed),
            metadata_synced: lock(&self.meta_status).synced(),
            programs,
            tracers: self.trace.tracers(),
        }
    }

    pub async fn kernel_counters(&self) -> Result<[u64; flowtrace_common::COUNTER_SLOTS as usize]> {
        self.drainer.lock().await.counters()
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock `bpf_ktime_get_ns` reads).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Offset to add to a CLOCK_MONOTONIC timestamp to get Unix time, in nanoseconds.
pub fn mono_to_unix_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Checks the metadata source before anything is attached (a kubeconfig that cannot be
/// read or a malformed metadata file stops the agent with the reason), and returns what
/// the source tasks need.
async fn prepare_metadata(cfg: &AgentConfig) -> Result<(Sink, MetadataStart)> {
    let kinds: &[Kind] = match cfg.metadata {
        MetaSource::None => &[],
        _ => &Kind::ALL,
    };
    let sink = Sink {
        cache: Arc::new(RwLock::new(MetaCache::new())),
        status: Arc::new(Mutex::new(MetaStatus::new(&cfg.metadata, kinds))),
    };
    let start = match &cfg.metadata {
        MetaSource::None => {
            info!("no Kubernetes metadata source (--kubeconfig, KUBECONFIG, in-cluster or --metadata-file): flows carry addresses only");
            MetadataStart::Nothing
        }
        MetaSource::File(path) => {
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let (cache, skipped) = source::load_file(path)?;
            source::install(&sink, cache, &skipped);
            MetadataStart::File(path.clone(), mtime)
        }
        api => MetadataStart::Api(source::client(api).await?),
    };
    Ok((sink, start))
}

enum MetadataStart {
    Nothing,
    File(std::path::PathBuf, Option<std::time::SystemTime>),
    Api(kube::Client),
}

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    run_until(cfg, |_| {}, std::future::pending()).await
}

/// Runs the agent until SIGINT, SIGTERM or `stop`, whichever comes first; all three leave
/// through the same shutdown path (tasks stopped, programs and qdiscs detached).
/// `listening` is told the API's address once it is bound (`--listen` port 0 picks a
/// free one: `flowtrace trace --standalone` runs the agent in-process that way).
pub async fn run_until(
    cfg: AgentConfig,
    listening: impl FnOnce(SocketAddr),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (sink, meta_start) = prepare_metadata(&cfg).await?;
    let mut ebpf = attach::load(cfg.flow_entries, cfg.nat_entries, cfg.latency_entries)?;
    let mut drainer = Drainer::new(&mut ebpf, crate::drain::DEFAULT_GRACE)?;
    let trace_ring = crate::drain::take_trace_ring(&mut ebpf)?;
    drainer.set_latency_sampling(cfg.latency_sample)?;
    let mut attacher = Attacher::new(ebpf, cfg.attach_mode);
    let (mode, program_ids) = (attacher.mode(), attacher.program_ids());
    info!(?mode, listen = %cfg.listen, "flowtrace agent starting");

    let shared = Arc::new(Shared {
        drainer: tokio::sync::Mutex::new(drainer),
        attacher: tokio::sync::Mutex::new(attacher),
        table: Mutex::new(FlowTable::new(
            cfg.max_flows,
            cfg.flow_idle_timeout.as_nanos() as u64,
        )),
        nat: Mutex::new(NatTable::new(cfg.flow_idle_timeout.as_nanos() as u64)),
        latency: Mutex::new(crate::latency::LatencyTable::new(
            cfg.flow_idle_timeout.as_nanos() as u64,
        )),
        latency_sample: cfg.latency_sample,
        conntrack: cfg.conntrack,
        ct: Arc::new(Mutex::new(crate::conntrack::CtMirror::new(
            cfg.flow_idle_timeout.as_nanos() as u64,
        ))),
        conntrack_resync: cfg.conntrack_resync,
        last_dump: Mutex::new(None),
        links: Mutex::new(HashMap::new()),
        attach_mode: mode,
        program_ids,
        links_synced: AtomicBool::new(false),
        attach_failures: AtomicU64::new(0),
        drains: AtomicU64::new(0),
        drain_errors: AtomicU64::new(0),
        node: cfg.node_name.clone().unwrap_or_else(hostname),
        meta: sink.cache.clone(),
        meta_status: sink.status.clone(),
        trace: Arc::new(crate::trace::TraceHub::new()),
        metrics: Mutex::new(crate::metrics::Metrics::new(cfg.metrics)),
        map_capacity: [cfg.flow_entries, cfg.nat_entries, cfg.latency_entries],
        max_flows: cfg.max_flows,
    });
    let trace_task = tokio::spawn(crate::trace::read_ring(trace_ring, shared.trace.clone()));
    if cfg.conntrack {
        follow_conntrack_events(shared.ct.clone());
    }
    let meta_tasks = match meta_start {
        MetadataStart::Nothing => Vec::new(),
        MetadataStart::File(path, mtime) => {
            vec![tokio::spawn(source::follow_file(path, sink, mtime))]
        }
        MetadataStart::Api(client) => source::spawn_watches(
            client,
            sink,
            Backoff {
                max: cfg.metadata_backoff_max,
            },
        ),
    };

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        listening(addr);
    }

    let (tx, rx) = mpsc::channel(1024);
    let mut watcher = tokio::spawn(links::watch(tx));
    let link_task = tokio::spawn(follow_links(rx, shared.clone(), cfg.selector.clone()));
    let drain_task = tokio::spawn(periodic_drain(shared.clone(), cfg.drain_interval));
    let api_task = tokio::spawn(crate::api::serve(listener, shared.clone()));

    // Without the link watcher new pods would silently go untraced: exit instead, so the
    // DaemonSet restarts the agent (and the operator sees why in the log).
    let outcome = tokio::select! {
        _ = wait_for_signal() => Ok(()),
        _ = stop => Ok(()),
        res = &mut watcher => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(Error::Netlink {
                what: "following link events",
                source: std::io::Error::other(join.to_string()),
            }),
        },
    };
    if let Err(e) = &outcome {
        error!(error = %e, "the link watcher stopped; detaching and exiting so the agent can be restarted");
    }
    info!("shutting down");
    watcher.abort();
    link_task.abort();
    drain_task.abort();
    api_task.abort();
    trace_task.abort();
    for t in &meta_tasks {
        t.abort();
    }
    let clsact_to_remove = shared.attacher.lock().await.detach_all();
    for ifindex in clsact_to_remove {
        if let Err(e) = links::delete_clsact(ifindex).await {
            warn!(ifindex, error = %e, "removing the clsact qdisc flowtrace added");
        }
    }
    outcome
}

/// Follows conntrack's NEW/DESTROY events on a thread of its own (the socket read blocks).
/// Without them (no subscription, or the socket fails) the agent dumps after every drain.
fn follow_conntrack_events(mirror: Arc<Mutex<crate::conntrack::CtMirror>>) {
    let mut socket = match crate::conntrack::subscribe() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "not following conntrack events; dumping the table after every drain instead");
            return;
        }
    };
    lock(&mirror).set_subscribed(true);
    let spawned = std::thread::Builder::new()
        .name("conntrack-events".into())
        .spawn(move || {
            let mut events = Vec::new();
            loop {
                events.clear();
                if let Err(e) = socket.recv(&mut events) {
                    warn!(error = %e, "conntrack events stopped; dumping the table after every drain instead");
                    lock(&mirror).set_subscribed(false);
                    return;
                }
                let now = monotonic_ns();
                let mut m = lock(&mirror);
                for ev in events.drain(..) {
                    m.event(ev, now);
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the conntrack event thread; dumping after every drain");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
        }
        _ => {
            warn!("cannot install signal handlers; waiting for Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn follow_links(mut rx: mpsc::Receiver<LinkEvent>, shared: Arc<Shared>, selector: Selector) {
    while let Some(event) = rx.recv().await {
        match event {
            LinkEvent::Present(link) => present(&link, &shared, &selector).await,
            LinkEvent::Removed { ifindex } => shared.attacher.lock().await.forget(ifindex),
            LinkEvent::Synced => {
                shared.links_synced.store(true, Ordering::Relaxed);
                let interfaces = shared.attacher.lock().await.interfaces().len();
                info!(interfaces, "initial interfaces attached");
            }
            LinkEvent::Resync(links) => {
                for link in &links {
                    present(link, &shared, &selector).await;
                }
                let mut a = shared.attacher.lock().await;
                for (ifindex, name) in a.interfaces() {
                    if !links.iter().any(|l| l.ifindex == ifindex) {
                        warn!(interface = %name, ifindex, "gone without a netlink event; forgetting it");
                        a.forget(ifindex);
                    }
                }
            }
        }
    }
}

/// A link exists: remember its name, and attach if the policy selects it (attaching an
/// interface already attached does nothing).
async fn present(link: &Link, shared: &Shared, selector: &Selector) {
    lock(&shared.links).insert(link.ifindex, link.clone());
    if !selector.selects(link) {
        return;
    }
    if let Err(e) = shared
        .attacher
        .lock()
        .await
        .attach(link.ifindex, &link.name)
    {
        shared.attach_failures.fetch_add(1, Ordering::Relaxed);
        warn!(interface = %link.name, error = %e, "not traced");
    }
}

async fn periodic_drain(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.drain_now().await {
            warn!(error = %e, "drain failed");
        }
    }
}
