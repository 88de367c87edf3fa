//! The agent's tasks, one per source: the link watcher (attach/forget), the periodic drain,
//! conntrack events, the trace ring reader and the metadata sources. [`start`] loads the
//! programs and starts them; [`Running::shutdown`] stops them and detaches everything (with
//! TCX the kernel also detaches by itself if the process is killed).

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    config::AgentConfig,
    state::{Agent, Parts, Settings},
    tracers::TraceHub,
};
use crate::{
    error::{Error, Result},
    host::{
        conntrack::{self, CtMirror},
        links::{self, Link, LinkEvent, Selector},
    },
    k8s::{
        source::{self, Backoff, MetaSource, MetaStatus, Sink},
        Kind, MetaCache,
    },
    kernel::{
        attach::{self, Attacher},
        drain::{self, Drainer},
        ring::TraceRing,
    },
    state::trace::{Assembler, Sighting, Traced, TracedDrop, JOIN_WINDOW_NS},
    util::{hostname, lock, monotonic_ns},
};

/// A started agent: its state and the tasks that feed it.
pub struct Running {
    agent: Arc<Agent>,
    /// The link watcher: if it ends, new pods would silently go untraced.
    watcher: JoinHandle<Result<()>>,
    tasks: Vec<JoinHandle<()>>,
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

/// Loads the programs, builds the agent and starts its tasks (the HTTP server is the
/// caller's: see `server::run_until`).
pub async fn start(cfg: &AgentConfig) -> Result<Running> {
    let (sink, meta_start) = prepare_metadata(cfg).await?;
    let sizes = attach::buffer_sizes(cfg.event_ring_mib)?;
    let mut ebpf = attach::load(&sizes, cfg.drop_entries)?;
    let (drop_reasons, drops_unavailable) = match attach::attach_tracepoints(&mut ebpf) {
        Ok(r) => (r, None),
        Err(e) => {
            warn!(error = %e, "drops and retransmissions are not recorded; flows are");
            (Default::default(), Some(e))
        }
    };
    let mut drainer = Drainer::new(&mut ebpf, sizes, drain::DEFAULT_GRACE)?;
    let ring_wakeups = drainer.ring_wakeups()?;
    let trace_ring = drain::take_trace_ring(&mut ebpf)?;
    drainer.set_latency_sampling(cfg.latency_sample, cfg.latency_window_shift)?;
    let mut attacher = Attacher::new(ebpf, cfg.attach_mode);
    let (mode, program_ids) = (attacher.mode(), attacher.program_ids());
    info!(?mode, "flowtrace agent starting");

    let agent = Arc::new(Agent::new(Parts {
        settings: Settings {
            node: cfg.node_name.clone().unwrap_or_else(hostname),
            latency_sample: cfg.latency_sample,
            latency_window_shift: cfg.latency_window_shift,
            conntrack: cfg.conntrack,
            conntrack_resync: cfg.conntrack_resync,
            attach_mode: mode,
            program_ids,
            max_flows: cfg.max_flows,
            drop_reasons,
            drops_unavailable,
            netns_dir: cfg.netns_dir.clone(),
        },
        drainer,
        attacher,
        flow_idle_timeout: cfg.flow_idle_timeout,
        metrics: cfg.metrics,
        meta: sink.cache.clone(),
        meta_status: sink.status.clone(),
    }));
    let mut tasks = vec![
        tokio::spawn(read_trace_ring(trace_ring, agent.tracers())),
        tokio::spawn(read_event_ring(ring_wakeups, agent.clone())),
    ];
    if agent.follows_conntrack() {
        follow_conntrack_events(agent.conntrack_mirror());
    }
    match meta_start {
        MetadataStart::Nothing => {}
        MetadataStart::File(path, mtime) => {
            tasks.push(tokio::spawn(source::follow_file(path, sink, mtime)))
        }
        MetadataStart::Api(client) => tasks.extend(source::spawn_watches(
            client,
            sink,
            Backoff {
                max: cfg.metadata_backoff_max,
            },
        )),
    }
    let (tx, rx) = mpsc::channel(1024);
    let watcher = tokio::spawn(links::watch(tx));
    tasks.push(tokio::spawn(follow_links(
        rx,
        agent.clone(),
        cfg.selector.clone(),
    )));
    tasks.push(tokio::spawn(periodic_drain(
        agent.clone(),
        cfg.drain_interval,
    )));
    Ok(Running {
        agent,
        watcher,
        tasks,
    })
}

impl Running {
    /// The agent, for the HTTP server.
    pub fn agent(&self) -> Arc<Agent> {
        self.agent.clone()
    }

    /// Resolves when the link watcher stops: with its error, or `Ok` if it just ended.
    pub async fn watcher_stopped(&mut self) -> Result<()> {
        match (&mut self.watcher).await {
            Ok(r) => r,
            Err(join) => Err(Error::Netlink {
                what: "following link events",
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    /// Stops every task and detaches every program (and the clsact qdiscs flowtrace added).
    pub async fn shutdown(self) {
        self.watcher.abort();
        for t in &self.tasks {
            t.abort();
        }
        for ifindex in self.agent.detach_all().await {
            if let Err(e) = links::delete_clsact(ifindex).await {
                warn!(ifindex, error = %e, "removing the clsact qdisc flowtrace added");
            }
        }
    }
}

/// Reads the event ring whenever it has records, for the agent's lifetime, so that it never
/// fills between drains (a flood of new flows hands over hundreds of thousands of records a
/// second). Without wakeups (the fd cannot be polled) the drains still read it.
async fn read_event_ring(ring: std::os::fd::OwnedFd, agent: Arc<Agent>) {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and the same until
    // both are dropped together.
    // The programs wake us only when the ring is an eighth full (a wakeup per record would
    // cost an interrupt per record); below that the ring is read on a slow timer, and by
    // every drain.
    let mut tick = tokio::time::interval(RING_READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fd = match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the event ring; it is read on a timer only");
            loop {
                tick.tick().await;
                agent.pump_events().await;
            }
        }
    };
    loop {
        tokio::select! {
            ready = fd.readable() => match ready {
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    warn!(error = %e, "polling the event ring failed; it is read on a timer only");
                    loop {
                        tick.tick().await;
                        agent.pump_events().await;
                    }
                }
            },
            _ = tick.tick() => {}
        }
        agent.pump_events().await;
    }
}

/// How often the agent reads the event ring when the programs have not woken it. Only a
/// fallback: the programs wake the agent at an eighth of the ring, so the other seven
/// eighths are the room for the time it takes to answer, and every drain reads the ring
/// too. At 10 ms it woke an idle agent 100 times a second for nothing.
const RING_READ_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads the trace ring for the agent's lifetime, joining events into packets and
/// publishing them to the tracers.
async fn read_trace_ring(ring: aya::maps::RingBuf<aya::maps::MapData>, hub: Arc<TraceHub>) {
    let mut ring = match TraceRing::new(ring) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot poll the trace ring buffer; live tracing is unavailable");
            return;
        }
    };
    let mut asm = Assembler::default();
    let tick = Duration::from_nanos(JOIN_WINDOW_NS / 2);
    loop {
        let batch = match ring.read((!asm.is_empty()).then_some(tick)).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "polling the trace ring buffer failed; live tracing stops");
                return;
            }
        };
        hub.count_bad_events(batch.bad);
        for event in &batch.events {
            if let Some(d) = TracedDrop::from_event(event) {
                hub.publish(Traced::Drop(d));
            } else if let Some(done) = asm.push(&event.id, Sighting::from_event(event)) {
                hub.publish(Traced::Packet(done));
            }
        }
        for p in asm.flush(monotonic_ns()) {
            hub.publish(Traced::Packet(p));
        }
    }
}

/// Follows conntrack's NEW/DESTROY events on a thread of its own (the socket read blocks).
/// Without them (no subscription, or the socket fails) the agent dumps after every drain.
fn follow_conntrack_events(mirror: Arc<Mutex<CtMirror>>) {
    let mut socket = match conntrack::subscribe() {
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

async fn follow_links(mut rx: mpsc::Receiver<LinkEvent>, agent: Arc<Agent>, selector: Selector) {
    while let Some(event) = rx.recv().await {
        match event {
            LinkEvent::Present(link) => present(&link, &agent, &selector).await,
            LinkEvent::Removed { ifindex } => agent.link_removed(ifindex).await,
            LinkEvent::Synced => {
                let interfaces = agent.links_synced().await;
                info!(interfaces, "initial interfaces attached");
            }
            LinkEvent::Resync(links) => {
                for link in &links {
                    present(link, &agent, &selector).await;
                }
                agent.forget_missing(&links).await;
            }
        }
    }
}

async fn present(link: &Link, agent: &Agent, selector: &Selector) {
    agent.link_present(link, selector.selects(link)).await;
}

async fn periodic_drain(agent: Arc<Agent>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = agent.drain_now().await {
            warn!(error = %e, "drain failed");
        }
    }
}
