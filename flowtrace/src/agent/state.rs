//! [`Agent`]: the one owner of what the agent knows. Fields are private; the tasks and the
//! HTTP server go through its methods, each of which answers one question.
//!
//! Locks: the tables the drain always updates together (flows, NAT, latency, metrics) sit
//! behind one mutex, [`Tables`]. Naming needs the links and the metadata too; the drain
//! (`Agent::drain_now`) and `Agent::with_namer` are the only places that take more than one
//! lock, and both take links, then metadata, then tables, so the order is code, not a
//! comment. The map of network namespaces (`namespaces`) is only ever locked alone. The kernel handles (drainer, attacher) have async mutexes of their own and are
//! never held with the others.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock, RwLockReadGuard,
    },
    time::{Duration, Instant},
};

use flowtrace_common::{Counter, COUNTER_SLOTS};
use tracing::{debug, info, warn};

use super::{
    drops::{bare_record, join, DropNames},
    select::{flow_selected, packet_selected},
    tracers::TraceHub,
};
use crate::{
    enrich::Namer,
    error::Result,
    host::{
        conntrack::{self, CtMirror},
        links::{Link, LinkRole},
        netns::{self, NsMap},
    },
    k8s::{source::MetaStatus, MetaCache},
    kernel::{
        attach::Attacher,
        drain::{Drainer, EventRing},
    },
    metrics::{DrainView, Health, Metrics},
    model::{
        wire::{
            AttachMode, DropEntry, DropFlow, DropLoss, DropsResponse, FlowsResponse,
            InterfaceRecord, InterfacesResponse, LatencyResponse, MetadataResponse, NatResponse,
            PathDataResponse, ProgramRecord, RetransmitEntry, StatsResponse, StatusResponse,
            TraceLine,
        },
        FlowRecord,
    },
    query::filter::FlowFilter,
    state::{
        drops::DropTable,
        flows::FlowTable,
        latency::LatencyTable,
        nat::NatTable,
        trace::{Traced, TRACE_SAMPLE_WHEN_OFF},
    },
    tls::Refusal,
    util::{lock, mono_to_unix_offset_ns, monotonic_ns},
};

/// What the agent was started with that the views report.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub node: String,
    pub latency_sample: u32,
    /// The per-flow sampling window's shift (`window_shift_for_ms`; 0: no cap).
    pub latency_window_shift: u32,
    pub conntrack: bool,
    pub conntrack_resync: Duration,
    pub attach_mode: AttachMode,
    /// (program name, kernel program id) of the loaded programs.
    pub program_ids: Vec<(String, u32)>,
    pub max_flows: usize,
    /// The running kernel's drop reasons by code, when the drop programs are attached.
    pub drop_reasons: HashMap<u32, String>,
    /// Why the drop programs are not attached, when they are not.
    pub drops_unavailable: Option<String>,
    /// Where the runtime mounts pod network namespaces (`--netns-dir`).
    pub netns_dir: std::path::PathBuf,
}

/// The tables one drain updates together.
struct Tables {
    flows: FlowTable,
    nat: NatTable,
    latency: LatencyTable,
    drops: DropTable,
    metrics: Metrics,
}

/// The agent's counters of its own work.
#[derive(Debug, Default)]
struct Counters {
    links_synced: AtomicBool,
    attach_failures: AtomicU64,
    drains: AtomicU64,
    drain_errors: AtomicU64,
    /// Refused at the data API, by [`Refusal::ALL`] order.
    api_refused: [AtomicU64; 3],
}

/// Why a filter's names cannot be used.
#[derive(Debug)]
pub enum NameError {
    /// No metadata source: name filters cannot be checked.
    NoMetadata(String),
    /// The named object does not exist.
    Missing(String),
}

/// Everything the agent knows and holds.
pub struct Agent {
    settings: Settings,
    drainer: tokio::sync::Mutex<Drainer>,
    /// The drainer's event ring (`Drainer::ring`), read without the drainer's lock.
    ring: Arc<tokio::sync::Mutex<EventRing>>,
    /// Held for a whole drain (maps to tables), so drains never overlap and a reader can
    /// tell whether one began after it arrived.
    drain_gate: tokio::sync::Mutex<()>,
    /// Drains begun, and the number of the last one completed.
    drains_begun: AtomicU64,
    drains_completed: AtomicU64,
    /// The loaded programs and their attachments (the attached interfaces are read from it).
    attacher: tokio::sync::Mutex<Attacher>,
    tables: Mutex<Tables>,
    /// Every link seen in this namespace, by ifindex (kept after removal so drained
    /// counters of a vanished interface still carry its name).
    links: Mutex<HashMap<u32, Link>>,
    /// Kubernetes metadata (written by the source tasks).
    meta: Arc<RwLock<MetaCache>>,
    meta_status: Arc<Mutex<MetaStatus>>,
    /// Translated conntrack connections, from events and resync dumps.
    ct: Arc<Mutex<CtMirror>>,
    last_dump: Mutex<Option<Instant>>,
    trace: Arc<TraceHub>,
    counters: Counters,
    /// This node's network namespaces (to place drops).
    namespaces: Mutex<Namespaces>,
}

/// This node's network namespaces, when they were last listed, and the links (ifindex, peer
/// namespace id) they were listed for.
#[derive(Default)]
struct Namespaces {
    map: NsMap,
    scanned_at: Option<Instant>,
    links: Vec<(u32, Option<i32>, LinkRole)>,
}

/// What [`Agent::new`] is built from.
pub(super) struct Parts {
    pub settings: Settings,
    pub drainer: Drainer,
    pub attacher: Attacher,
    pub flow_idle_timeout: Duration,
    pub metrics: crate::metrics::MetricsConfig,
    pub meta: Arc<RwLock<MetaCache>>,
    pub meta_status: Arc<Mutex<MetaStatus>>,
}

impl Agent {
    pub(super) fn new(p: Parts) -> Self {
        let idle = p.flow_idle_timeout.as_nanos() as u64;
        Self {
            tables: Mutex::new(Tables {
                flows: FlowTable::new(p.settings.max_flows, idle),
                nat: NatTable::new(idle),
                latency: LatencyTable::new(idle),
                // The flow table's cap bounds the drop table too.
                drops: DropTable::new(idle, p.settings.max_flows),
                metrics: Metrics::new(p.metrics),
            }),
            settings: p.settings,
            ring: p.drainer.ring(),
            drainer: tokio::sync::Mutex::new(p.drainer),
            drain_gate: tokio::sync::Mutex::new(()),
            drains_begun: AtomicU64::new(0),
            drains_completed: AtomicU64::new(0),
            attacher: tokio::sync::Mutex::new(p.attacher),
            links: Mutex::new(HashMap::new()),
            meta: p.meta,
            meta_status: p.meta_status,
            ct: Arc::new(Mutex::new(CtMirror::new(idle))),
            last_dump: Mutex::new(None),
            trace: Arc::new(TraceHub::new()),
            counters: Counters::default(),
            namespaces: Mutex::new(Namespaces::default()),
        }
    }

    /// The node this agent runs on.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// Whether the agent cross-checks translations with conntrack.
    pub fn follows_conntrack(&self) -> bool {
        self.settings.conntrack
    }

    pub(super) fn conntrack_mirror(&self) -> Arc<Mutex<CtMirror>> {
        self.ct.clone()
    }

    pub(super) fn tracers(&self) -> Arc<TraceHub> {
        self.trace.clone()
    }

    fn meta_read(&self) -> RwLockReadGuard<'_, MetaCache> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with a namer over the current metadata, NAT table and links, and the
    /// tables. The one place the metadata and the tables are locked together.
    fn with_namer<R>(&self, f: impl FnOnce(&Namer<'_>, &Tables) -> R) -> R {
        let links = lock(&self.links);
        let meta = self.meta_read();
        let tables = lock(&self.tables);
        let namer = Namer::new(&meta, &tables.nat, &links);
        f(&namer, &tables)
    }

    // ---- the pipeline ----

    /// Drains for a reader of the API. A drain that began after the reader arrived serves
    /// it as well as one of its own would, so readers arriving together cost one drain, and
    /// no client can make the agent drain more often than drains take.
    pub async fn drain_fresh(&self) -> Result<()> {
        let arrived = self.drains_begun.load(Ordering::SeqCst);
        let _gate = self.drain_gate.lock().await;
        if self.drains_completed.load(Ordering::SeqCst) > arrived {
            return Ok(());
        }
        self.drain_gated().await
    }

    /// Reads what the kernel's event ring holds into the next drain (see `EventRing::pump`),
    /// also while a drain is in progress. A pump that stopped at its bound (the programs
    /// writing as fast as it reads) lets the agent's other tasks and a waiting drain run
    /// before the next.
    pub async fn pump_events(&self) {
        while self.ring.lock().await.pump().more {
            tokio::task::yield_now().await;
        }
    }

    /// Drains the kernel buffers into the tables now, then cross-checks NAT with conntrack.
    pub async fn drain_now(&self) -> Result<()> {
        let _gate = self.drain_gate.lock().await;
        self.drain_gated().await
    }

    async fn drain_gated(&self) -> Result<()> {
        let number = self.drains_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let res = self.drain_unlocked().await;
        if res.is_ok() {
            self.drains_completed.store(number, Ordering::SeqCst);
        }
        res
    }

    async fn drain_unlocked(&self) -> Result<()> {
        let started = Instant::now();
        let drained = {
            let mut d = self.drainer.lock().await;
            d.drain().await
        };
        let drained = match drained {
            Ok(d) => d,
            Err(e) => {
                self.counters.drain_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if let Some(first) = drained.problems.first() {
            self.counters
                .drain_errors
                .fetch_add(drained.problems.len() as u64, Ordering::Relaxed);
            warn!(errors = drained.problems.len(), first = %first, "drain met map errors; the entries stay for the next drain");
        }
        let now = monotonic_ns();
        self.follow_namespaces(&drained.drops);
        let namespaces = lock(&self.namespaces).map.clone();
        {
            let links = lock(&self.links);
            let meta = self.meta_read();
            let mut tables = lock(&self.tables);
            let Tables {
                flows,
                nat,
                latency,
                drops,
                metrics,
            } = &mut *tables;
            flows.fold(
                &drained.flows,
                now,
                &|i| links.get(&i).map(|l| l.name.clone()),
                &|ip| meta.resolve(ip),
            );
            let new_translations = nat.merge_kernel(&drained.nat, now);
            latency.merge(&drained.latency, now);
            latency.expire(now);
            let placed = drops.merge(&drained.drops, &|ino| namespaces.place(ino));
            drops.expire(now);
            let namer = Namer::new(&meta, nat, &links);
            metrics.observe_drain(&DrainView {
                drained: &drained,
                drops: &placed,
                reasons: &self.settings.drop_reasons,
                new_translations: &new_translations,
                namer: &namer,
                now_ns: now,
                duration_s: started.elapsed().as_secs_f64(),
            });
        }
        if self.settings.conntrack {
            self.check_conntrack(now).await;
        }
        lock(&self.tables).nat.expire(now);
        self.counters.drains.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Lists this node's namespaces again, before this drain's drops are placed, when a drop
    /// comes from a namespace the last listing did not place (a new pod: none of its drops
    /// is lost to a stale list) or the links changed since (a pod deleted, and its
    /// namespace's inode number free for the next one). Listing is a directory read and one
    /// netlink request per file; it runs with no lock held.
    fn follow_namespaces(&self, drained: &[crate::kernel::drain::DrainedDrop]) {
        let links: Vec<Link> = lock(&self.links).values().cloned().collect();
        let mut shape: Vec<(u32, Option<i32>, LinkRole)> = links
            .iter()
            .map(|l| (l.ifindex, l.peer_netnsid, l.role))
            .collect();
        shape.sort_unstable();
        let due = {
            let ns = lock(&self.namespaces);
            ns.scanned_at.is_none()
                || ns.links != shape
                || drained
                    .iter()
                    .any(|d| d.key.netns != 0 && ns.map.place(d.key.netns).is_none())
        };
        if !due {
            return;
        }
        let map = netns::scan(&self.settings.netns_dir, &links);
        debug!(namespaces = map.len(), problem = ?map.problem, "listed this node's network namespaces");
        let mut ns = lock(&self.namespaces);
        ns.map = map;
        ns.scanned_at = Some(Instant::now());
        ns.links = shape;
    }

    /// Settles the translations against conntrack (a dump when due, else what events said).
    async fn check_conntrack(&self, now: u64) {
        if self.dump_due() {
            // After the drain: every connection whose packets were drained is in conntrack.
            match tokio::task::spawn_blocking(conntrack::dump).await {
                Ok(Ok(entries)) => {
                    lock(&self.ct).resync(&entries, monotonic_ns());
                    *lock(&self.last_dump) = Some(Instant::now());
                }
                Ok(Err(e)) => {
                    lock(&self.tables).nat.conntrack_failed();
                    warn!(error = %e, "conntrack dump failed; translations are checked against what events said until the next one");
                }
                Err(join) => {
                    lock(&self.tables).nat.conntrack_failed();
                    warn!(error = %join, "conntrack dump task failed");
                }
            }
        }
        let entries = lock(&self.ct).entries();
        {
            let mut tables = lock(&self.tables);
            let Tables { flows, nat, .. } = &mut *tables;
            nat.cross_check(&entries, &|t| flows.contains(t), now);
        }
        lock(&self.ct).expire(now);
    }

    /// Whether to dump conntrack now: no events, events lost, or the periodic resync.
    fn dump_due(&self) -> bool {
        lock(&self.ct).needs_resync()
            || lock(&self.last_dump).is_none_or(|t| t.elapsed() >= self.settings.conntrack_resync)
    }

    // ---- links ----

    /// A link exists: remember its name, and attach if `selected` (attaching an interface
    /// already attached does nothing).
    /// A link exists, or changed: attached when `selected`, detached when it no longer is
    /// (a veth that stopped being a pod's, an interface excluded by its new name).
    pub(super) async fn link_present(&self, link: &Link, selected: bool) {
        let before = lock(&self.links).insert(link.ifindex, link.clone());
        if before.as_ref().is_some_and(|b| b.role != link.role) {
            info!(interface = %link.name, role = %link.role, why = %link.why, "interface role changed");
        }
        if !selected {
            let detached = self.attacher.lock().await.detach(link.ifindex);
            if let Some(created_qdisc) = detached {
                info!(interface = %link.name, role = %link.role, why = %link.why, "no longer traced");
                if created_qdisc {
                    if let Err(e) = crate::host::links::delete_clsact(link.ifindex).await {
                        warn!(interface = %link.name, error = %e, "removing the clsact qdisc flowtrace added");
                    }
                }
            }
            return;
        }
        if let Err(e) = self.attacher.lock().await.attach(link.ifindex, &link.name) {
            self.counters
                .attach_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(interface = %link.name, error = %e, "not traced");
        }
    }

    /// A link is gone.
    pub(super) async fn link_removed(&self, ifindex: u32) {
        self.attacher.lock().await.forget(ifindex);
    }

    /// The links present at start are attached.
    pub(super) async fn links_synced(&self) -> usize {
        self.counters.links_synced.store(true, Ordering::Relaxed);
        self.attacher.lock().await.interfaces().len()
    }

    /// After a full dump: forgets attached interfaces the dump no longer has.
    pub(super) async fn forget_missing(&self, present: &[Link]) {
        let mut a = self.attacher.lock().await;
        for (ifindex, name) in a.interfaces() {
            if !present.iter().any(|l| l.ifindex == ifindex) {
                warn!(interface = %name, ifindex, "gone without a netlink event; forgetting it");
                a.forget(ifindex);
            }
        }
    }

    /// Detaches every program; returns the interfaces whose clsact qdisc flowtrace added.
    pub(super) async fn detach_all(&self) -> Vec<u32> {
        self.attacher.lock().await.detach_all()
    }

    // ---- tracing ----

    /// Makes the kernel follow the number of attached tracers: the programs write trace
    /// events only while there is one, and sample for latency while tracing even when
    /// latency tracking is off. Call after every subscribe and unsubscribe; it reads the
    /// count under the drainer's lock, so the last call leaves the right state.
    pub async fn apply_tracing(&self) -> Result<()> {
        let mut d = self.drainer.lock().await;
        let on = self.trace.tracers() > 0;
        d.set_tracing(on)?;
        if self.settings.latency_sample == 0 {
            d.set_latency_sampling(
                if on { TRACE_SAMPLE_WHEN_OFF } else { 0 },
                self.settings.latency_window_shift,
            )?;
        }
        Ok(())
    }

    /// Registers a tracer (then call [`Agent::apply_tracing`]; and again after
    /// [`Agent::unsubscribe`]).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Traced>> {
        self.trace.subscribe()
    }

    pub fn unsubscribe(&self) {
        self.trace.unsubscribe()
    }

    /// One packet in this many is traced (plus every SYN).
    pub fn trace_sample(&self) -> u32 {
        if self.settings.latency_sample == 0 {
            TRACE_SAMPLE_WHEN_OFF
        } else {
            self.settings.latency_sample
        }
    }

    /// A traced packet, drop or retransmission named, if it passes `filter` (a packet at
    /// any of its hooks).
    pub fn describe(&self, t: &Traced, filter: &FlowFilter) -> Option<TraceLine> {
        let d = match t {
            Traced::Packet(p) => {
                return self.with_namer(|namer, _| {
                    let named = namer.trace_packet(p, self.node(), mono_to_unix_offset_ns())?;
                    packet_selected(filter, namer, p, named.service.as_ref())
                        .then(|| TraceLine::Packet(Box::new(named)))
                })
            }
            Traced::Drop(d) => d,
        };
        let place = lock(&self.namespaces).map.place(d.netns);
        self.with_namer(|namer, _| {
            let named = self.drop_names(namer).trace(d, self.node(), place)?;
            if !filter.is_empty() {
                let t = d.tuple?;
                let mut f = bare_record(&t, namer);
                enrich_record(namer, &mut f);
                if !flow_selected(filter, namer, &f) {
                    return None;
                }
            }
            Some(if d.retransmit {
                TraceLine::Retransmit(Box::new(named))
            } else {
                TraceLine::Drop(Box::new(named))
            })
        })
    }

    // ---- the views ----

    /// Name filters must name objects that exist; without metadata they cannot be checked.
    pub fn check_names(&self, f: &FlowFilter) -> std::result::Result<(), NameError> {
        if !f.has_names() {
            return Ok(());
        }
        let (has_source, synced) = {
            let status = lock(&self.meta_status);
            (status.has_source(), status.synced())
        };
        if !has_source {
            return Err(NameError::NoMetadata(
                "pod, namespace, workload and service filters need Kubernetes metadata; start the agent with --kubeconfig, in-cluster credentials or --metadata-file".into(),
            ));
        }
        let meta = self.meta_read();
        let missing = |what: &str, name: &str| {
            let hint = if synced {
                ""
            } else {
                " (metadata is not synced yet, see /v1/metadata; retry shortly)"
            };
            Err(NameError::Missing(format!(
                "{what} {name} does not exist in the agent's metadata{hint}"
            )))
        };
        for p in &f.pods {
            if !meta.has_pod(&p.namespace, &p.name) {
                return missing("pod", &p.to_string());
            }
        }
        for n in &f.namespaces {
            if !meta.has_namespace(n) {
                return missing("namespace (no pod or Service in it)", n);
            }
        }
        for w in &f.workloads {
            if !meta.has_workload(&w.namespace, &w.name) {
                return missing("workload (no pod of it)", &w.to_string());
            }
        }
        for s in &f.services {
            if !meta.has_service(&s.namespace, &s.name) {
                return missing("service", &s.to_string());
            }
        }
        Ok(())
    }

    /// The flow table, drained fresh, enriched and filtered (`/v1/flows`): at most `limit`
    /// flows, those with the most bytes.
    pub async fn flows(&self, filter: &FlowFilter, limit: usize) -> Result<FlowsResponse> {
        self.drain_fresh().await?;
        let flows = self.with_namer(|namer, tables| {
            let mut flows: Vec<FlowRecord> = tables
                .flows
                .snapshot(mono_to_unix_offset_ns(), &|ip| namer.endpoint(ip));
            let names = self.drop_names(namer);
            for f in &mut flows {
                enrich_record(namer, f);
                join(f, &tables.drops, &names);
            }
            flows.retain(|f| flow_selected(filter, namer, f));
            flows
        });
        let (flows, matched) = largest(flows, limit);
        Ok(FlowsResponse {
            node: self.node().to_string(),
            truncated: matched > flows.len(),
            matched,
            flows,
        })
    }

    /// What the path builder needs from this node, from one drain (`/v1/pathdata`): the
    /// flows seen within `window` (zero: all), the latency records and the tunnel devices.
    pub async fn pathdata(&self, window: Duration) -> Result<PathDataResponse> {
        self.drain_fresh().await?;
        let now = crate::util::unix_now_ns();
        let window_ns = window.as_nanos() as u64;
        let (flows, latency) = self.with_namer(|namer, tables| {
            let mut flows: Vec<FlowRecord> = tables
                .flows
                .snapshot(mono_to_unix_offset_ns(), &|ip| namer.endpoint(ip));
            flows.retain(|f| {
                window_ns == 0
                    || f.hops
                        .iter()
                        .map(|h| h.last_seen_unix_ns)
                        .max()
                        .is_some_and(|l| now.saturating_sub(l) <= window_ns)
            });
            let names = self.drop_names(namer);
            for f in &mut flows {
                enrich_record(namer, f);
                join(f, &tables.drops, &names);
            }
            let latency = tables.latency.snapshot(&|i| namer.interface(i));
            (flows, latency)
        });
        let tunnels = self
            .interfaces()
            .await
            .interfaces
            .into_iter()
            .filter(|i| matches!(i.kind.as_deref(), Some("vxlan" | "geneve")))
            .map(|i| i.name)
            .collect();
        Ok(PathDataResponse {
            node: self.node().to_string(),
            flows,
            latency,
            tunnels,
        })
    }

    fn drop_names<'a>(&'a self, namer: &'a Namer<'a>) -> DropNames<'a> {
        DropNames {
            namer,
            reasons: &self.settings.drop_reasons,
            offset: mono_to_unix_offset_ns(),
        }
    }

    /// Drops and retransmissions per flow, drained fresh and filtered like the flows
    /// (`/v1/drops`).
    pub async fn drops(&self, filter: &FlowFilter, limit: usize) -> Result<DropsResponse> {
        self.drain_fresh().await?;
        let map_full = self.kernel_counters().await?[Counter::DropMapFull as usize];
        let lost_by_reason = self.drainer.lock().await.drops_lost()?;
        let netns_problem = lock(&self.namespaces).map.problem.clone();
        let out = self.with_namer(|namer, tables| {
            let names = self.drop_names(namer);
            let mut seen: HashMap<crate::model::FlowTuple, FlowRecord> = tables
                .flows
                .snapshot(names.offset, &|ip| namer.endpoint(ip))
                .into_iter()
                .map(|f| (f.tuple(), f))
                .collect();
            let mut drops = Vec::new();
            let mut retransmits = Vec::new();
            for (t, d) in tables.drops.iter() {
                let mut f = seen.remove(t).unwrap_or_else(|| bare_record(t, namer));
                enrich_record(namer, &mut f);
                join(&mut f, &tables.drops, &names);
                if !flow_selected(filter, namer, &f) {
                    continue;
                }
                let flow = DropFlow::of(&f);
                if f.retransmits > 0 {
                    retransmits.push(RetransmitEntry {
                        flow: flow.clone(),
                        segments: f.retransmits,
                        last_seen_unix_ns: names.unix(d.retransmits.last_seen_ns),
                    });
                }
                drops.extend(f.drops.into_iter().map(|drop| DropEntry {
                    flow: flow.clone(),
                    drop,
                }));
            }
            drops.sort_by_key(|e| std::cmp::Reverse(e.drop.packets));
            retransmits.sort_by_key(|e| std::cmp::Reverse(e.segments));
            let truncated = drops.len() > limit || retransmits.len() > limit;
            drops.truncate(limit);
            retransmits.truncate(limit);
            let totals = tables.drops.totals();
            DropsResponse {
                node: self.node().to_string(),
                available: self.settings.drops_unavailable.is_none(),
                unavailable: self.settings.drops_unavailable.clone(),
                drops,
                retransmits,
                by_reason: totals
                    .by_reason
                    .iter()
                    .map(|(code, n)| (names.reason(*code), *n))
                    .collect(),
                retransmitted_segments: totals.retransmits,
                truncated,
                lost: DropLoss {
                    table_full: totals.table_full,
                    map_full,
                    map_full_by_reason: lost_by_reason
                        .iter()
                        .map(|(code, n)| (names.reason(*code), *n))
                        .collect(),
                    unplaced: totals.unplaced,
                },
                netns_problem,
            }
        });
        Ok(out)
    }

    /// Latency histograms, drained fresh (`/v1/latency`).
    pub async fn latency(&self) -> Result<LatencyResponse> {
        self.drain_fresh().await?;
        let latency =
            self.with_namer(|namer, tables| tables.latency.snapshot(&|i| namer.interface(i)));
        Ok(LatencyResponse {
            node: self.node().to_string(),
            sample_rate: self.settings.latency_sample,
            sample_window_ns: match self.settings.latency_window_shift {
                0 => 0,
                s => 1 << s,
            },
            latency,
        })
    }

    /// Translations and the cross-check, drained fresh (`/v1/nat`).
    pub async fn nat(&self) -> Result<NatResponse> {
        self.drain_fresh().await?;
        let (counters, translations) =
            self.with_namer(|namer, tables| (tables.nat.counters(), namer.translations()));
        Ok(NatResponse {
            node: self.node().to_string(),
            conntrack: self.settings.conntrack,
            conntrack_source: lock(&self.ct).stats(),
            counters,
            disagreements: counters.disagreements(),
            translations,
        })
    }

    /// Where names come from and whether each kind is synced (`/v1/metadata`).
    pub fn metadata(&self) -> MetadataResponse {
        let (source, synced, kinds) = {
            let s = lock(&self.meta_status);
            (
                s.source.clone(),
                s.synced(),
                s.kinds
                    .iter()
                    .map(|(k, v)| (k.name().to_string(), v.clone()))
                    .collect(),
            )
        };
        let meta = self.meta_read();
        MetadataResponse {
            source,
            synced,
            kinds,
            objects: meta
                .counts()
                .into_iter()
                .map(|(k, n)| (k.name().to_string(), n))
                .collect(),
            skipped: meta
                .skipped()
                .iter()
                .map(|(k, n)| (k.name().to_string(), *n))
                .collect(),
        }
    }

    /// What flowtrace is attached to (`/v1/interfaces`).
    pub async fn interfaces(&self) -> InterfacesResponse {
        let attached = self.attacher.lock().await.interfaces();
        let links = lock(&self.links).clone();
        InterfacesResponse {
            attach_mode: self.settings.attach_mode,
            programs: self
                .settings
                .program_ids
                .iter()
                .map(|(name, id)| ProgramRecord {
                    name: name.clone(),
                    id: *id,
                })
                .collect(),
            synced: self.counters.links_synced.load(Ordering::Relaxed),
            not_traced: {
                let mut v: Vec<InterfaceRecord> = links
                    .values()
                    .filter(|l| {
                        !attached.iter().any(|(i, _)| *i == l.ifindex)
                            && (l.peer_netnsid.is_some() || l.role != LinkRole::Other)
                    })
                    .map(|l| interface_record(l.ifindex, l.name.clone(), Some(l)))
                    .collect();
                v.sort_by_key(|r| r.ifindex);
                v
            },
            interfaces: attached
                .into_iter()
                .map(|(ifindex, name)| interface_record(ifindex, name, links.get(&ifindex)))
                .collect(),
        }
    }

    /// Kernel and agent counters (`/v1/stats`).
    pub async fn stats(&self) -> Result<StatsResponse> {
        let counters = self.kernel_counters().await?;
        let kernel: BTreeMap<String, u64> = Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), counters[*c as usize]))
            .collect();
        let unparsed_packets = Counter::ALL
            .iter()
            .filter(|c| c.is_unparsed())
            .map(|c| counters[*c as usize])
            .sum();
        let kernel_tracing = self.drainer.lock().await.tracing()?;
        let tables = lock(&self.tables);
        Ok(StatsResponse {
            kernel,
            unparsed_packets,
            flows: tables.flows.len(),
            flows_evicted: tables.flows.evicted(),
            flows_expired: tables.flows.expired(),
            drains: self.counters.drains.load(Ordering::Relaxed),
            drain_errors: self.counters.drain_errors.load(Ordering::Relaxed),
            attach_failures: self.counters.attach_failures.load(Ordering::Relaxed),
            nat: tables.nat.counters(),
            tracers: self.trace.tracers(),
            kernel_tracing,
            traced_packets: self.trace.packets(),
        })
    }

    /// `/metrics` in the Prometheus text format: traffic and latency up to the last drain
    /// (a scrape does not drain), the agent's health as of now.
    pub async fn metrics_text(&self) -> std::result::Result<String, prometheus::Error> {
        let health = self.health().await;
        let families = lock(&self.tables).metrics.families(&health);
        crate::metrics::encode(&families)
    }

    /// Who this agent is and whether it is ready (`/v1/status`).
    pub fn status(&self) -> StatusResponse {
        let ready = self.ready();
        StatusResponse {
            node: self.node().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: ready.is_ok(),
            not_ready: ready.err().map(str::to_string),
            interfaces_synced: self.counters.links_synced.load(Ordering::Relaxed),
            metadata_synced: lock(&self.meta_status).synced(),
        }
    }

    /// Whether the agent is ready: the interfaces present at start are attached and the
    /// metadata, if any source is configured, is synced. The reason when not.
    pub fn ready(&self) -> std::result::Result<(), &'static str> {
        if !self.counters.links_synced.load(Ordering::Relaxed) {
            return Err("interfaces present at start are not attached yet");
        }
        if !lock(&self.meta_status).synced() {
            return Err("Kubernetes metadata is not synced (flows are counted with addresses only); see /v1/metadata");
        }
        Ok(())
    }

    /// Counts a connection or request the data API refused.
    pub fn count_refused(&self, why: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|r| *r == why) {
            self.counters.api_refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The agent's own state for `/metrics`.
    async fn health(&self) -> Health {
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
        let (flow_table_entries, flow_table_evicted, nat) = {
            let t = lock(&self.tables);
            (t.flows.len(), t.flows.evicted(), t.nat.counters())
        };
        let sizes = self.drainer.lock().await.sizes();
        Health {
            attached_interfaces,
            attach_failures: self.counters.attach_failures.load(Ordering::Relaxed),
            kernel_counters,
            map_capacity: [
                u64::from(sizes.cache_slots) * u64::from(sizes.cpus),
                u64::from(sizes.ring_bytes),
            ],
            flow_table_entries,
            flow_table_capacity: self.settings.max_flows,
            flow_table_evicted,
            drains: self.counters.drains.load(Ordering::Relaxed),
            drain_errors: self.counters.drain_errors.load(Ordering::Relaxed),
            metadata_synced: lock(&self.meta_status).synced(),
            programs,
            tracers: self.trace.tracers(),
            api_refused: Refusal::ALL
                .iter()
                .zip(&self.counters.api_refused)
                .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
                .collect(),
            nat,
        }
    }

    async fn kernel_counters(&self) -> Result<[u64; COUNTER_SLOTS as usize]> {
        self.drainer.lock().await.counters()
    }
}

/// Names a flow record of the table: its Service, its NAT step and the peers behind
/// Service addresses (the endpoints stay those the table recorded while the flow had
/// packets, so a pod deleted later does not rename past traffic).
fn enrich_record(namer: &Namer<'_>, f: &mut FlowRecord) {
    let a = namer.flow(&f.tuple());
    f.nat = a.nat_original.and_then(|o| namer.translation(&o));
    f.service = a.service;
    f.src_peer = a.src_peer.map(|e| (*e).clone());
    f.dst_peer = a.dst_peer.map(|e| (*e).clone());
}

/// The `limit` flows with the most bytes (then packets), and how many there were.
pub fn largest(mut flows: Vec<FlowRecord>, limit: usize) -> (Vec<FlowRecord>, usize) {
    let matched = flows.len();
    if matched > limit {
        flows.select_nth_unstable_by(limit, |a, b| {
            (b.bytes, b.packets).cmp(&(a.bytes, a.packets))
        });
        flows.truncate(limit);
        flows.sort_by_key(|f| std::cmp::Reverse((f.bytes, f.packets)));
    }
    (flows, matched)
}

/// One entry of `/v1/interfaces`, with the link's role and the evidence for it.
fn interface_record(ifindex: u32, name: String, link: Option<&Link>) -> InterfaceRecord {
    InterfaceRecord {
        ifindex,
        name,
        kind: link.and_then(|l| l.kind.clone()),
        role: link.map_or("other", |l| l.role.as_str()).to_string(),
        why: link.map(|l| l.why.clone()).unwrap_or_default(),
    }
}
