//! `cargo xtask bench`: what flowtrace's TC programs cost per run under real traffic, against
//! reference programs and, optionally, a peer's prebuilt object, each arm ALONE on exactly the
//! hooks flowtrace attaches to (issue 16).
//!
//! Shapes (both up for the whole run, built from network namespaces of their own):
//! - `veth`: a node namespace holding the host side of one veth pair whose peer is `eth0` of a
//!   pod namespace, wired as a point-to-point CNI does (`flowtrace_tests::VethPair`); iperf3's
//!   client in the pod, its server in the node, so every packet crosses the host veth's ingress
//!   (pod -> node) or egress (node -> pod), the two hooks flowtrace attaches there.
//! - `cluster`: the emulated two-node flannel cluster (`flowtrace_tests::Cluster`), one pod on
//!   each node, iperf3 from node1/pod-a to node2/pod-a across the VXLAN overlay; hooks: the
//!   pods' host veths and `flannel.1` on both nodes (ingress and egress), so a packet crosses
//!   four hooks, all on one CPU.
//!
//! Traffic: `tcp`, one iperf3 TCP stream as fast as it goes; `udp`, iperf3 `-u -l 64 -b 0` (64
//! payload bytes, as fast as the one sender goes). iperf3's client and server are pinned to one
//! CPU (`--cpus 0,0`): the whole path then runs on that CPU and the other one is left to the
//! agent, the helpers and the machine's other tenants, so a sender at full speed starves
//! nothing but its own receiver.
//!
//! Arms, each alone on the shape's hooks, one after the other: `absent` (nothing attached: the
//! throughput baseline), `noop` (`bench_noop`, the floor every program run pays, bpf_stats
//! included), `counter` (`bench_counter`, a minimal per-CPU-hash 5-tuple counter), `flowtrace`
//! (the agent as shipped: latency sampling 1 in 64, drain every second), `no-latency` (the
//! agent with `--latency-sample 0`), when named `latency-rare` (`--latency-sample 1048576`:
//! every packet's sampling decision, next to no packet sampled) and, with `--peer-object PATH`,
//! `peer` (that object's two programs loaded by `xtask hold-peer`, e.g. NetObserv's with
//! `sampling=1`) and, with `--before-binary PATH`, `before` (another build of the agent with
//! its defaults: a change measured in the same rounds as the build before it, where two runs
//! of the bench on this shared machine differ by more than most changes).
//!
//! Per arm, shape and traffic in every round: iperf3 runs `--warmup` seconds that are left out
//! (`-O`) and then `--seconds` that count; the kernel's `run_time_ns` and `run_cnt` of the arm's
//! `sched_cls` programs (the ones the arm's processes hold, found through /proc/PID/fdinfo) are
//! read when the warm-up ends and when iperf3 exits, and the difference divided: ns per run,
//! summed over all the arm's program instances and hooks. Net = arm − that round's noop.
//! Rounds interleave the arms: each round runs every arm once, in an order rotated from round
//! to round; traffic order alternates too. Between two arms the previous one's programs must
//! have left the kernel, so arms never share a hook.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowtrace_tests::iperf::{IperfJob, IperfReport, IperfServer, IperfSpec, IperfTraffic};
use flowtrace_tests::{baselines, Agent, Cluster, ClusterOptions, VethPair};
use serde_json::{json, Value};

use crate::baselines::{Holder, Launched};
use crate::peer::{self, HoldPeerArgs};
use crate::proc::{self, median};

/// Goals of issue 16.
const GOAL_FLOWTRACE_TO_COUNTER: f64 = 1.0;
pub(crate) const GOAL_LATENCY_ON_TO_OFF: f64 = 1.15;
pub(crate) const IPERF_PORT: u16 = 5201;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Shape {
    Veth,
    Cluster,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Veth => "veth",
            Shape::Cluster => "cluster",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Traffic {
    Tcp,
    Udp,
}

impl Traffic {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Traffic::Tcp => "tcp",
            Traffic::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Arm {
    /// Nothing attached.
    Absent,
    /// `bench_noop`.
    Noop,
    /// `bench_counter`.
    Counter,
    /// The agent with its defaults.
    Flowtrace,
    /// The agent with `--latency-sample 0`.
    NoLatency,
    /// The agent with `--latency-sample 1048576`: every packet's sampling decision (its
    /// packet id, the hash) as with the defaults, next to no packet sampled. Between
    /// `flowtrace` and `no-latency` it splits latency tracking's cost into the decision every
    /// packet pays and the sampled packets' own (a diagnostic arm, not run unless asked).
    LatencyRare,
    /// The peer's object (needs `--peer-object`).
    Peer,
    /// Another build of the agent, with its defaults (needs `--before-binary`): the build
    /// before a change, measured interleaved with it.
    Before,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Absent => "absent",
            Arm::Noop => "noop",
            Arm::Counter => "counter",
            Arm::Flowtrace => "flowtrace",
            Arm::NoLatency => "no-latency",
            Arm::LatencyRare => "latency-rare",
            Arm::Peer => "peer",
            Arm::Before => "before",
        }
    }
}

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Shapes to measure: `veth` (one pod's veth pair to its node), `cluster` (two emulated
    /// nodes, VXLAN between them).
    #[arg(long, value_delimiter = ',', default_values = ["veth", "cluster"])]
    shapes: Vec<Shape>,
    /// Traffic: `tcp` (one iperf3 stream), `udp` (iperf3 -u -l <udp-len> -b <udp-bitrate>).
    #[arg(long, value_delimiter = ',', default_values = ["tcp", "udp"])]
    traffic: Vec<Traffic>,
    /// Interleaved rounds (each runs every arm once per shape and traffic); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// Counted seconds of every iperf3 run (4 keeps a default run under 10 minutes; even UDP's
    /// lightest arm runs some 100 000 times a second).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=600))]
    seconds: u32,
    /// Seconds of traffic before the counted ones (iperf3 -O; the kernel's counters are read
    /// when they end).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=60))]
    warmup: u32,
    #[command(flatten)]
    load: LoadArgs,
    /// Arms to run (`peer` is added by --peer-object; `latency-rare`, a diagnostic, only when
    /// named). `noop` is always run: the net figures are taken against it.
    #[arg(long, value_delimiter = ',', default_values = ["absent", "noop", "counter", "flowtrace", "no-latency"])]
    arms: Vec<Arm>,
    /// A peer's prebuilt TC object to run as one more arm, e.g. NetObserv's eBPF agent's
    /// `pkg/ebpf/bpf_x86_bpfel.o` (fetched by you; never part of this repository).
    #[arg(long)]
    peer_object: Option<PathBuf>,
    /// The peer arm's name in the report.
    #[arg(long, default_value = "netobserv")]
    peer_name: String,
    /// The peer's program for TCX ingress.
    #[arg(long, default_value = "tcx_ingress_flow_parse")]
    peer_ingress: String,
    /// The peer's program for TCX egress.
    #[arg(long, default_value = "tcx_egress_flow_parse")]
    peer_egress: String,
    /// The peer's globals, NAME=VALUE, comma separated (others keep the object's values).
    #[arg(long, value_delimiter = ',', default_values = ["sampling=1"])]
    peer_global: Vec<String>,
    /// The peer's map sizes, NAME=ENTRIES, comma separated (others keep the object's).
    #[arg(long, value_delimiter = ',')]
    peer_max_entries: Vec<String>,
    /// Another build's `flowtrace` binary to run as one more arm, `before`, with its defaults
    /// (e.g. the build before a change: copy `target/release/flowtrace` aside, then rebuild), so
    /// that a change is measured in the same rounds as what it changes, on this noisy machine.
    #[arg(long)]
    before_binary: Option<PathBuf>,
    /// Print the results as JSON on stdout (the human report then goes to stderr).
    #[arg(long)]
    json: bool,
}

/// How iperf3 is driven: its CPUs and the UDP load (`cargo xtask bench` and `bench-latency`).
#[derive(clap::Args)]
pub(crate) struct LoadArgs {
    /// CPUs of the iperf3 client and server, as iperf3's `-A client,server`.
    #[arg(long, default_value = "0,0")]
    pub(crate) cpus: String,
    /// UDP payload bytes per datagram (iperf3 -l).
    #[arg(long, default_value_t = 64)]
    pub(crate) udp_len: u32,
    /// UDP target rate (iperf3 -b; 0 = as fast as the sender goes).
    #[arg(long, default_value = "0")]
    pub(crate) udp_bitrate: String,
}

impl LoadArgs {
    /// iperf3's run of `seconds` (after `omit` left out) for `traffic`.
    pub(crate) fn spec(&self, traffic: Traffic, seconds: u64, omit: u64) -> IperfSpec {
        IperfSpec {
            seconds,
            omit,
            cpus: Some(self.cpus.clone()),
            traffic: match traffic {
                Traffic::Tcp => IperfTraffic::Tcp,
                Traffic::Udp => IperfTraffic::Udp {
                    len: self.udp_len,
                    bitrate: self.udp_bitrate.clone(),
                },
            },
        }
    }
}

/// Where the human report goes: stdout as it is measured, or stderr when stdout is for JSON.
pub(crate) fn reporter(json: bool) -> impl Fn(String) {
    move |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// Run time and run count, summed over program instances.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Runs {
    pub(crate) time_ns: u64,
    pub(crate) count: u64,
}

impl Runs {
    pub(crate) fn add(&mut self, other: Runs) {
        self.time_ns += other.time_ns;
        self.count += other.count;
    }

    /// What ran between `earlier` and `self` (two readings of the same program).
    pub(crate) fn since(self, earlier: Runs) -> Runs {
        Runs {
            time_ns: self.time_ns.saturating_sub(earlier.time_ns),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    pub(crate) fn ns_per_run(self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.time_ns as f64 / self.count as f64
        }
    }
}

/// One arm's measurement for one shape and traffic in one round.
#[derive(Clone, Debug)]
struct Sample {
    runs: Runs,
    /// Per program name (ingress and egress apart).
    programs: BTreeMap<String, Runs>,
    iperf: IperfReport,
}

impl Sample {
    fn ns(&self) -> f64 {
        self.runs.ns_per_run()
    }

    /// UDP datagrams sent per second.
    fn sent_pps(&self) -> f64 {
        if self.iperf.seconds > 0.0 {
            self.iperf.sent_datagrams as f64 / self.iperf.seconds
        } else {
            f64::NAN
        }
    }

    /// TCP: Gbit/s the receiver saw; UDP: datagrams per second that reached it.
    fn throughput(&self, traffic: Traffic) -> f64 {
        match traffic {
            Traffic::Tcp => self.iperf.gbps,
            Traffic::Udp => self.iperf.received_pps(),
        }
    }
}

/// The interfaces of one node namespace that every arm attaches to.
#[derive(Clone, Debug)]
pub(crate) struct Hooks {
    pub(crate) netns: String,
    pub(crate) ifaces: Vec<String>,
}

/// What holds a shape's namespaces.
enum Owner {
    Veth(VethPair),
    Cluster(Cluster),
}

/// One shape, up, with its iperf3 server listening.
pub(crate) struct Bed {
    pub(crate) shape: Shape,
    pub(crate) hooks: Vec<Hooks>,
    pub(crate) client_netns: String,
    pub(crate) server_ip: IpAddr,
    // Dropped before the namespaces (fields drop in order).
    server: Option<IperfServer>,
    owner: Option<Owner>,
}

impl Bed {
    pub(crate) fn up(shape: Shape) -> Result<Bed> {
        let (owner, hooks, client_netns, server_netns, server_ip) = match shape {
            Shape::Veth => {
                let pair = VethPair::up().context(
                    "building the veth pair shape (needs root and iproute2; see scripts/setup.sh)",
                )?;
                let hooks = vec![Hooks {
                    netns: pair.node_netns.clone(),
                    ifaces: vec![pair.host_veth.clone()],
                }];
                let (client, server) = (pair.pod_netns.clone(), pair.node_netns.clone());
                (
                    Owner::Veth(pair),
                    hooks,
                    client,
                    server,
                    IpAddr::V4(flowtrace_tests::vethpair::NODE_IP),
                )
            }
            Shape::Cluster => {
                let cluster = Cluster::up(&ClusterOptions {
                    pods_per_node: vec!["pod-a".into()],
                    ..ClusterOptions::default()
                })
                .context(
                    "bringing the emulated cluster up (needs root, iproute2, iptables; see scripts/setup.sh)",
                )?;
                let hooks = cluster
                    .nodes
                    .iter()
                    .map(|n| Hooks {
                        netns: n.netns.clone(),
                        ifaces: flowtrace_tests::traced_devices(n),
                    })
                    .collect();
                let client = cluster.pod(1, "pod-a")?.netns.clone();
                let server_pod = cluster.pod(2, "pod-a")?;
                let (server, ip) = (server_pod.netns.clone(), IpAddr::V4(server_pod.ipv4));
                (Owner::Cluster(cluster), hooks, client, server, ip)
            }
        };
        let server = IperfServer::start_in(&server_netns, IPERF_PORT, Duration::from_secs(10))?;
        Ok(Bed {
            shape,
            hooks,
            client_netns,
            server_ip,
            server: Some(server),
            owner: Some(owner),
        })
    }

    pub(crate) fn describe(&self) -> String {
        let hooks: Vec<String> = self
            .hooks
            .iter()
            .map(|h| format!("{} in {}", h.ifaces.join("+"), h.netns))
            .collect();
        match self.shape {
            Shape::Veth => format!(
                "one veth pair, client in the pod, server in the node; hooks ingress+egress of {}",
                hooks.join("; ")
            ),
            Shape::Cluster => format!(
                "2 emulated nodes, flannel VXLAN, node1/pod-a -> node2/pod-a; hooks ingress+egress of {}",
                hooks.join("; ")
            ),
        }
    }

    pub(crate) fn down(mut self) -> Result<()> {
        drop(self.server.take());
        match self.owner.take() {
            Some(Owner::Veth(p)) => p.down().context("deleting the veth pair's namespaces"),
            Some(Owner::Cluster(c)) => c.down().context("tearing the emulated cluster down"),
            None => Ok(()),
        }
    }
}

/// The programs of one arm while attached.
pub(crate) enum Attached {
    Nothing,
    Holders(Vec<Holder>),
    Agents(Vec<Agent>),
}

impl Attached {
    fn pids(&self) -> Result<Vec<u32>> {
        match self {
            Attached::Nothing => Ok(Vec::new()),
            Attached::Holders(hs) => Ok(hs.iter().map(Holder::pid).collect()),
            Attached::Agents(agents) => agents
                .iter()
                .map(|a| {
                    a.pid()
                        .with_context(|| format!("the agent in {} was already reaped", a.netns))
                })
                .collect(),
        }
    }

    pub(crate) fn stop(self) -> Result<()> {
        match self {
            Attached::Nothing => Ok(()),
            Attached::Holders(hs) => hs.into_iter().try_for_each(Holder::stop),
            Attached::Agents(agents) => agents.into_iter().try_for_each(|a| {
                let ns = a.netns.clone();
                a.stop()
                    .map(drop)
                    .with_context(|| format!("stopping the flowtrace agent in {ns}"))
            }),
        }
    }
}

/// How the peer arm is loaded (everything but the interfaces).
pub(crate) struct PeerConfig {
    name: String,
    template: HoldPeerArgs,
}

/// Agent flags per arm. The harness drains every 500 ms unless told; the shipped default is
/// 1000 ms, so it is given explicitly.
fn agent_flags(arm: Arm) -> &'static [&'static str] {
    match arm {
        Arm::NoLatency => &["--drain-interval-ms", "1000", "--latency-sample", "0"],
        Arm::LatencyRare => &["--drain-interval-ms", "1000", "--latency-sample", "1048576"],
        _ => &["--drain-interval-ms", "1000"],
    }
}

/// Attaches `arm` to every hook of `bed`; returns once everything is attached.
pub(crate) fn attach(
    arm: Arm,
    bed: &Bed,
    peer: Option<&PeerConfig>,
    before: Option<&std::path::Path>,
) -> Result<(Attached, Vec<String>)> {
    proc::check_interrupted()?;
    let mut notes = Vec::new();
    let attached = match arm {
        Arm::Absent => Attached::Nothing,
        Arm::Noop | Arm::Counter => {
            let program = if arm == Arm::Noop {
                baselines::BENCH_NOOP
            } else {
                baselines::BENCH_COUNTER
            };
            let launched: Vec<Launched> = bed
                .hooks
                .iter()
                .map(|h| Holder::launch_programs(&h.netns, &h.ifaces, &[program]))
                .collect::<Result<_>>()?;
            let holders = launched
                .into_iter()
                .map(|l| l.wait_ready(Duration::from_secs(30)))
                .collect::<Result<Vec<_>>>()?;
            Attached::Holders(holders)
        }
        Arm::Peer => {
            let peer = peer.context("the peer arm needs --peer-object PATH")?;
            let launched: Vec<Launched> = bed
                .hooks
                .iter()
                .map(|h| {
                    let args = HoldPeerArgs {
                        iface: h.ifaces.clone(),
                        ..peer.template.clone()
                    };
                    Holder::launch(&h.netns, &args.to_argv()?, peer::READY)
                })
                .collect::<Result<_>>()?;
            // Map creation of a large object takes seconds; all nodes load at once.
            let holders = launched
                .into_iter()
                .map(|l| l.wait_ready(Duration::from_secs(180)))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("loading the peer object ({})", peer.name))?;
            notes.extend(holders.iter().map(|h| h.ready_line.clone()));
            Attached::Holders(holders)
        }
        Arm::Flowtrace | Arm::NoLatency | Arm::LatencyRare | Arm::Before => {
            let mut agents = Vec::new();
            for h in &bed.hooks {
                // On error the agents started so far are killed by their Drop.
                let agent = match (arm, before) {
                    (Arm::Before, Some(bin)) => {
                        Agent::spawn_binary(&h.netns, bin, agent_flags(arm))
                    }
                    (Arm::Before, None) => bail!("the before arm needs --before-binary PATH"),
                    _ => Agent::spawn(&h.netns, agent_flags(arm)),
                };
                agents.push(
                    agent
                        .with_context(|| format!("starting the flowtrace agent in {}", h.netns))?,
                );
            }
            for (agent, h) in agents.iter_mut().zip(&bed.hooks) {
                agent
                    .wait_ready(Duration::from_secs(60))
                    .with_context(|| format!("waiting for the flowtrace agent in {}", h.netns))?;
                let mut traced: Vec<String> = agent
                    .interfaces()
                    .with_context(|| format!("asking the agent in {} what it traces", h.netns))?
                    .interfaces
                    .into_iter()
                    .map(|i| i.name)
                    .collect();
                traced.sort();
                let mut want = h.ifaces.clone();
                want.sort();
                if traced != want {
                    bail!(
                        "the agent in {} traces {traced:?}, the reference arms attach to {want:?}: \
                         the arms would not see the same packets; check the agent's \
                         /v1/interfaces (not_traced says why) and flowtrace/src/host/roles.rs",
                        h.netns
                    );
                }
            }
            Attached::Agents(agents)
        }
    };
    Ok((attached, notes))
}

/// The `sched_cls` programs the arm's processes hold: id -> name, and each name's tag.
pub(crate) fn arm_programs(
    attached: &Attached,
) -> Result<(BTreeMap<u32, String>, BTreeMap<String, String>)> {
    let mut held = BTreeSet::new();
    for pid in attached.pids()? {
        held.extend(proc::prog_ids_held_by(pid)?);
    }
    let progs: Vec<_> = flowtrace_tests::bpftool_progs()?
        .into_iter()
        .filter(|p| held.contains(&p.id) && p.kind == "sched_cls")
        .collect();
    let tags = progs
        .iter()
        .map(|p| (p.name.clone(), p.tag.clone()))
        .collect();
    Ok((progs.into_iter().map(|p| (p.id, p.name)).collect(), tags))
}

/// run_time_ns and run_cnt of programs `ids`, now.
pub(crate) fn counters(ids: &BTreeMap<u32, String>) -> Result<BTreeMap<u32, Runs>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let got: BTreeMap<u32, Runs> = flowtrace_tests::bpftool_progs()?
        .into_iter()
        .filter(|p| ids.contains_key(&p.id))
        .map(|p| {
            (
                p.id,
                Runs {
                    time_ns: p.run_time_ns,
                    count: p.run_cnt,
                },
            )
        })
        .collect();
    if let Some((id, name)) = ids.iter().find(|(id, _)| !got.contains_key(id)) {
        bail!("program {id} ({name}) is no longer loaded: did the arm's process die?");
    }
    Ok(got)
}

/// Waits until none of `ids` is loaded any more (the kernel frees a program after an RCU
/// grace period once its last link and fd are gone), so the next arm is alone on the hooks.
pub(crate) fn wait_gone(ids: &BTreeMap<u32, String>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded: BTreeSet<u32> = flowtrace_tests::bpftool_progs()?
            .into_iter()
            .map(|p| p.id)
            .collect();
        let left: Vec<String> = ids
            .iter()
            .filter(|(id, _)| loaded.contains(id))
            .map(|(id, name)| format!("{id} ({name})"))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "programs {} are still loaded 10 s after their arm stopped; the next arm would \
                 share their hooks (see `bpftool prog show` and `bpftool link show`)",
                left.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sleeps `d`, returning early with an error on a signal.
pub(crate) fn sleep_interruptible(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        proc::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    Ok(())
}

/// One iperf3 run with the kernel's counters of `ids` read after its warm-up and at its end.
fn measure(
    bed: &Bed,
    traffic: Traffic,
    ids: &BTreeMap<u32, String>,
    args: &BenchArgs,
) -> Result<Sample> {
    let spec = args
        .load
        .spec(traffic, u64::from(args.seconds), u64::from(args.warmup));
    let timeout = Duration::from_secs(u64::from(args.warmup + args.seconds) + 30);
    let mut last_err = None;
    for attempt in 1..=3 {
        if attempt > 1 {
            // The server takes a moment to be free again after a run.
            sleep_interruptible(Duration::from_secs(1))?;
        }
        proc::check_interrupted()?;
        let mut job = IperfJob::spawn(&bed.client_netns, bed.server_ip, IPERF_PORT, &spec)?;
        // Just past iperf3's omitted seconds (it starts counting after its connection setup).
        sleep_interruptible(
            Duration::from_secs(u64::from(args.warmup)) + Duration::from_millis(100),
        )?;
        if job.has_exited() {
            last_err = Some(match job.wait(timeout) {
                Err(e) => anyhow::Error::from(e),
                Ok(_) => anyhow::anyhow!("iperf3 ended before its warm-up was over"),
            });
            continue;
        }
        let before = counters(ids)?;
        let report = match job.wait(timeout) {
            Ok(r) => r,
            Err(e) => {
                last_err = Some(e.into());
                continue;
            }
        };
        let after = counters(ids)?;
        let mut runs = Runs::default();
        let mut programs: BTreeMap<String, Runs> = BTreeMap::new();
        for (id, name) in ids {
            let d = after[id].since(before[id]);
            runs.add(d);
            programs.entry(name.clone()).or_default().add(d);
        }
        if !ids.is_empty() && runs.count == 0 {
            bail!(
                "the arm's programs ran 0 times during the traffic: either they are not on the \
                 hooks the traffic crosses or kernel.bpf_stats_enabled did not take effect \
                 (check `bpftool prog show`)"
            );
        }
        return Ok(Sample {
            runs,
            programs,
            iperf: report,
        });
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("iperf3 failed"))
        .context(format!(
            "{} traffic on the {} shape failed 3 times",
            traffic.name(),
            bed.shape.name()
        )))
}

/// Median, min and max of the finite values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    min: f64,
    max: f64,
    n: usize,
}

pub(crate) fn spread(values: &[f64]) -> Spread {
    let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let (min, max) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    Spread {
        median: median(&finite).unwrap_or(f64::NAN),
        min: if finite.is_empty() { f64::NAN } else { min },
        max: if finite.is_empty() { f64::NAN } else { max },
        n: finite.len(),
    }
}

impl Spread {
    pub(crate) fn json(self) -> Value {
        let num = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        json!({"median": num(self.median), "min": num(self.min), "max": num(self.max), "rounds": self.n})
    }
}

/// All rounds of one shape and traffic: round -> arm -> sample.
type Rounds = Vec<BTreeMap<Arm, Sample>>;

/// The summary of one arm for one shape and traffic.
struct ArmSummary {
    arm: Arm,
    ns: Spread,
    net: Spread,
    runs: Spread,
    throughput: Spread,
    vs_absent: Spread,
}

fn per_round(rounds: &Rounds, f: impl Fn(&BTreeMap<Arm, Sample>) -> Option<f64>) -> Spread {
    spread(&rounds.iter().filter_map(f).collect::<Vec<_>>())
}

fn net(r: &BTreeMap<Arm, Sample>, arm: Arm) -> Option<f64> {
    Some(r.get(&arm)?.ns() - r.get(&Arm::Noop)?.ns())
}

fn summarize(rounds: &Rounds, traffic: Traffic, arms: &[Arm]) -> Vec<ArmSummary> {
    arms.iter()
        .map(|&arm| ArmSummary {
            arm,
            ns: per_round(rounds, |r| Some(r.get(&arm)?.ns())),
            net: per_round(rounds, |r| net(r, arm)),
            runs: per_round(rounds, |r| Some(r.get(&arm)?.runs.count as f64)),
            throughput: per_round(rounds, |r| Some(r.get(&arm)?.throughput(traffic))),
            vs_absent: per_round(rounds, |r| {
                Some(r.get(&arm)?.throughput(traffic) / r.get(&Arm::Absent)?.throughput(traffic))
            }),
        })
        .collect()
}

/// The per-round ratio of two arms' net costs.
fn ratio(rounds: &Rounds, num: Arm, den: Arm) -> Spread {
    per_round(rounds, |r| Some(net(r, num)? / net(r, den)?))
}

pub(crate) fn fmt_num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "-".into()
    }
}

pub(crate) fn fmt_spread(s: Spread, decimals: usize) -> String {
    if s.n == 0 {
        return "-".into();
    }
    format!(
        "{} ({}-{})",
        fmt_num(s.median, decimals),
        fmt_num(s.min, decimals),
        fmt_num(s.max, decimals)
    )
}

fn fmt_throughput(x: f64, traffic: Traffic) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    match traffic {
        Traffic::Tcp => format!("{x:.2} Gbit/s"),
        Traffic::Udp => format!("{:.0} kpps", x / 1e3),
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    for tool in ["iperf3", "bpftool", "ss", "ip", "ping"] {
        proc::require_tool(tool)?;
    }
    let mut arms: Vec<Arm> = Vec::new();
    for &a in args
        .arms
        .iter()
        .chain(std::iter::once(&Arm::Noop))
        .chain(args.peer_object.as_ref().map(|_| &Arm::Peer))
        .chain(args.before_binary.as_ref().map(|_| &Arm::Before))
    {
        if !arms.contains(&a) {
            arms.push(a);
        }
    }
    arms.sort();
    let peer = match &args.peer_object {
        Some(path) => {
            std::fs::metadata(path).with_context(|| {
                format!(
                    "--peer-object {}: cannot read it (fetch NetObserv's object with \
                     `git show HEAD:pkg/ebpf/bpf_x86_bpfel.o` in a clone of \
                     netobserv/netobserv-ebpf-agent)",
                    path.display()
                )
            })?;
            let object = std::fs::canonicalize(path)
                .with_context(|| format!("resolving {}", path.display()))?;
            Some(PeerConfig {
                name: args.peer_name.clone(),
                template: HoldPeerArgs {
                    object,
                    iface: Vec::new(),
                    ingress: args.peer_ingress.clone(),
                    egress: args.peer_egress.clone(),
                    globals: args.peer_global.clone(),
                    max_entries: args.peer_max_entries.clone(),
                },
            })
        }
        None if arms.contains(&Arm::Peer) => bail!("--arms peer needs --peer-object PATH"),
        None => None,
    };
    let before = match &args.before_binary {
        Some(path) => Some(std::fs::canonicalize(path).with_context(|| {
            format!(
                "--before-binary {}: cannot find it (copy target/release/flowtrace aside \
                 before rebuilding)",
                path.display()
            )
        })?),
        None if arms.contains(&Arm::Before) => {
            bail!("--arms before needs --before-binary PATH")
        }
        None => None,
    };
    let arm_name = |a: Arm| -> String {
        match (a, &peer) {
            (Arm::Peer, Some(p)) => p.name.clone(),
            _ => a.name().to_string(),
        }
    };
    // Width of the arm column: the longest arm name.
    let aw = arms
        .iter()
        .map(|&a| arm_name(a).len())
        .max()
        .unwrap_or(0)
        .max(10);
    let mut shapes = args.shapes.clone();
    shapes.dedup();
    let mut traffics = args.traffic.clone();
    traffics.dedup();

    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let (ncpu, cpu_model) = proc::cpus();
    let kernel = proc::kernel_release();
    // The human report goes to stdout as it is measured, or to stderr when stdout is for JSON.
    let json_mode = args.json;
    let out = reporter(json_mode);
    out(
        "flowtrace bench: ns per TC program run under iperf3 load, each arm alone on flowtrace's hooks".into(),
    );
    out(format!("  kernel    Linux {kernel}"));
    out(format!("  cpus      {ncpu} x {cpu_model}"));
    out(format!("  command   {command}"));
    out(
        format!(
            "  traffic   tcp: one iperf3 TCP stream; udp: iperf3 -u -l {} -b {}; -A {}; {} s warm-up (iperf3 -O, not counted), then {} s counted",
            args.load.udp_len, args.load.udp_bitrate, args.load.cpus, args.warmup, args.seconds
        ),
    );
    out(format!(
        "  arms      {} (each alone; order rotated every round)",
        arms.iter()
            .map(|&a| arm_name(a))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(p) = &peer {
        out(format!(
            "  peer      {}: {} ({} / {}; globals {}; max entries {})",
            p.name,
            p.template.object.display(),
            p.template.ingress,
            p.template.egress,
            if p.template.globals.is_empty() {
                "as in the object".to_string()
            } else {
                p.template.globals.join(",")
            },
            if p.template.max_entries.is_empty() {
                "as in the object".to_string()
            } else {
                p.template.max_entries.join(",")
            }
        ));
    }

    crate::build::release_binaries()?;
    let stats = proc::SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    out(
        format!(
            "  measure   kernel.bpf_stats_enabled=1 (was {}): run_time_ns / run_cnt summed over the arm's sched_cls programs, \
             read after the warm-up and at the end; net = arm - that round's noop",
            stats.old()
        ),
    );
    let mut beds = Vec::new();
    for &shape in &shapes {
        eprintln!("xtask: bringing the {} shape up", shape.name());
        let bed = Bed::up(shape)?;
        out(format!("  {:<9} {}", shape.name(), bed.describe()));
        beds.push(bed);
    }

    let mut results: BTreeMap<(Shape, Traffic), Rounds> = BTreeMap::new();
    let mut notes: Vec<String> = Vec::new();
    out(format!(
        "\n  {:<5} {:<8} {:<4} {:<aw$} {:>9} {:>12} {:>14}",
        "round", "shape", "load", "arm", "ns/run", "runs", "throughput"
    ));
    for round in 0..args.rounds as usize {
        let mut order = arms.clone();
        order.rotate_left(round % arms.len());
        let mut this: BTreeMap<(Shape, Traffic), BTreeMap<Arm, Sample>> = BTreeMap::new();
        for bed in &beds {
            for &arm in &order {
                let t_attach = Instant::now();
                let (attached, arm_notes) = attach(arm, bed, peer.as_ref(), before.as_deref())
                    .with_context(|| {
                        format!(
                            "round {}: attaching {} on the {} shape",
                            round + 1,
                            arm_name(arm),
                            bed.shape.name()
                        )
                    })?;
                if round == 0 {
                    notes.extend(
                        arm_notes
                            .into_iter()
                            .map(|n| format!("{} ({}): {n}", arm_name(arm), bed.shape.name())),
                    );
                }
                let attach_s = t_attach.elapsed().as_secs_f64();
                let (ids, tags) = arm_programs(&attached)?;
                if round == 0 && !tags.is_empty() {
                    let tags: Vec<String> =
                        tags.iter().map(|(n, t)| format!("{n} tag {t}")).collect();
                    notes.push(format!(
                        "{} ({}): {}",
                        arm_name(arm),
                        bed.shape.name(),
                        tags.join(", ")
                    ));
                }
                if arm != Arm::Absent && ids.is_empty() {
                    bail!(
                        "{} holds no sched_cls program after attaching on the {} shape",
                        arm_name(arm),
                        bed.shape.name()
                    );
                }
                let mut load = traffics.clone();
                if round % 2 == 1 {
                    load.reverse();
                }
                for traffic in load {
                    let s = measure(bed, traffic, &ids, args).with_context(|| {
                        format!(
                            "round {}: {} on the {} shape, {} traffic",
                            round + 1,
                            arm_name(arm),
                            bed.shape.name(),
                            traffic.name()
                        )
                    })?;
                    let detail = match traffic {
                        Traffic::Udp => {
                            format!(" received, {:.0} kpps sent", s.sent_pps() / 1e3)
                        }
                        Traffic::Tcp => format!(" ({} retransmits)", s.iperf.retransmits),
                    };
                    let programs: Vec<String> = s
                        .programs
                        .iter()
                        .map(|(name, r)| format!("{name} {}", fmt_num(r.ns_per_run(), 1)))
                        .collect();
                    out(format!(
                        "  {:<5} {:<8} {:<4} {:<aw$} {:>9} {:>12} {:>14}{detail}{}",
                        round + 1,
                        bed.shape.name(),
                        traffic.name(),
                        arm_name(arm),
                        fmt_num(s.ns(), 1),
                        s.runs.count,
                        fmt_throughput(s.throughput(traffic), traffic),
                        if programs.len() > 1 {
                            format!("  [{}]", programs.join(", "))
                        } else {
                            String::new()
                        }
                    ));
                    this.entry((bed.shape, traffic)).or_default().insert(arm, s);
                }
                let t_stop = Instant::now();
                attached.stop().with_context(|| {
                    format!(
                        "stopping {} on the {} shape",
                        arm_name(arm),
                        bed.shape.name()
                    )
                })?;
                wait_gone(&ids)?;
                eprintln!(
                    "xtask: {} on {}: attached in {attach_s:.1} s, gone {:.1} s after stopping",
                    arm_name(arm),
                    bed.shape.name(),
                    t_stop.elapsed().as_secs_f64()
                );
            }
        }
        for (k, v) in this {
            results.entry(k).or_default().push(v);
        }
    }
    drop(stats);

    // Summary.
    let mut summary_json = Vec::new();
    let mut goals: Vec<(String, bool)> = Vec::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| shape | traffic | arm | net ns/run, median (min-max) | ns/run | runs per round | throughput | vs absent |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    let mut md_ratios = String::new();
    let _ = writeln!(
        md_ratios,
        "| shape | traffic | flowtrace / counter (goal <= {GOAL_FLOWTRACE_TO_COUNTER}) | flowtrace / no-latency (goal <= {GOAL_LATENCY_ON_TO_OFF}) | {} / counter |",
        peer.as_ref().map(|p| p.name.as_str()).unwrap_or("peer")
    );
    let _ = writeln!(md_ratios, "|---|---|---|---|---|");
    out(
        format!(
            "\nsummary: medians over the rounds, (min-max) across rounds; net = ns/run - that round's noop\n  {:<8} {:<4} {:<aw$} {:>26} {:>10} {:>11} {:>14} {:>20}",
            "shape", "load", "arm", "net ns/run", "ns/run", "runs/round", "throughput", "vs absent"
        ),
    );
    for ((shape, traffic), rounds) in &results {
        let sums = summarize(rounds, *traffic, &arms);
        for s in &sums {
            let net_text = if s.arm == Arm::Noop {
                "(floor)".to_string()
            } else if s.arm == Arm::Absent {
                "-".to_string()
            } else {
                fmt_spread(s.net, 1)
            };
            out(format!(
                "  {:<8} {:<4} {:<aw$} {:>26} {:>10} {:>11} {:>14} {:>20}",
                shape.name(),
                traffic.name(),
                arm_name(s.arm),
                net_text,
                fmt_num(s.ns.median, 1),
                fmt_num(s.runs.median, 0),
                fmt_throughput(s.throughput.median, *traffic),
                if s.arm == Arm::Absent {
                    "-".into()
                } else {
                    fmt_spread(s.vs_absent, 3)
                },
            ));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                shape.name(),
                traffic.name(),
                arm_name(s.arm),
                if s.arm == Arm::Noop {
                    format!("floor: {} ns/run", fmt_spread(s.ns, 1))
                } else {
                    net_text.clone()
                },
                fmt_num(s.ns.median, 1),
                fmt_num(s.runs.median, 0),
                fmt_throughput(s.throughput.median, *traffic),
                if s.arm == Arm::Absent {
                    "-".into()
                } else {
                    fmt_spread(s.vs_absent, 3)
                },
            );
        }
        let ft_counter = ratio(rounds, Arm::Flowtrace, Arm::Counter);
        let ft_nolat = ratio(rounds, Arm::Flowtrace, Arm::NoLatency);
        let peer_counter = ratio(rounds, Arm::Peer, Arm::Counter);
        let ft_peer = ratio(rounds, Arm::Flowtrace, Arm::Peer);
        out(
            format!(
                "  {:<8} {:<4} ratios of net cost (median of per-round ratios, min-max): flowtrace/counter {}  flowtrace/no-latency {}{}",
                shape.name(),
                traffic.name(),
                fmt_spread(ft_counter, 3),
                fmt_spread(ft_nolat, 3),
                if peer.is_some() {
                    format!(
                        "  {}/counter {}  flowtrace/{} {}",
                        arm_name(Arm::Peer),
                        fmt_spread(peer_counter, 3),
                        arm_name(Arm::Peer),
                        fmt_spread(ft_peer, 3)
                    )
                } else {
                    String::new()
                }
            ),
        );
        // The change against the build before it, when that arm ran.
        let ft_before = ratio(rounds, Arm::Flowtrace, Arm::Before);
        if ft_before.n > 0 {
            out(format!(
                "  {:<8} {:<4} this build against --before-binary: flowtrace/before {}",
                shape.name(),
                traffic.name(),
                fmt_spread(ft_before, 3)
            ));
        }
        // The diagnostic split of latency tracking's cost, when its arm ran.
        let rare_nolat = ratio(rounds, Arm::LatencyRare, Arm::NoLatency);
        let ft_rare = ratio(rounds, Arm::Flowtrace, Arm::LatencyRare);
        if rare_nolat.n > 0 || ft_rare.n > 0 {
            out(format!(
                "  {:<8} {:<4} latency's cost split: latency-rare/no-latency {} (the decision on every packet)  flowtrace/latency-rare {} (the sampled packets)",
                shape.name(),
                traffic.name(),
                fmt_spread(rare_nolat, 3),
                fmt_spread(ft_rare, 3)
            ));
        }
        let _ = writeln!(
            md_ratios,
            "| {} | {} | {} | {} | {} |",
            shape.name(),
            traffic.name(),
            fmt_spread(ft_counter, 3),
            fmt_spread(ft_nolat, 3),
            fmt_spread(peer_counter, 3)
        );
        let label = format!("{} {}", shape.name(), traffic.name());
        if ft_counter.n > 0 {
            goals.push((
                format!(
                    "{label}: flowtrace defaults <= counter (net, median of per-round ratios {})",
                    fmt_num(ft_counter.median, 3)
                ),
                ft_counter.median <= GOAL_FLOWTRACE_TO_COUNTER,
            ));
        }
        if ft_nolat.n > 0 {
            goals.push((
                format!(
                    "{label}: latency on/off <= {GOAL_LATENCY_ON_TO_OFF} (net, median of per-round ratios {})",
                    fmt_num(ft_nolat.median, 3)
                ),
                ft_nolat.median <= GOAL_LATENCY_ON_TO_OFF,
            ));
        }
        let rounds_json: Vec<Value> = rounds
            .iter()
            .map(|r| {
                let arms_json: serde_json::Map<String, Value> = r
                    .iter()
                    .map(|(arm, s)| {
                        let programs: serde_json::Map<String, Value> = s
                            .programs
                            .iter()
                            .map(|(n, p)| {
                                (
                                    n.clone(),
                                    json!({"run_time_ns": p.time_ns, "run_cnt": p.count}),
                                )
                            })
                            .collect();
                        (
                            arm_name(*arm),
                            json!({
                                "run_time_ns": s.runs.time_ns,
                                "run_cnt": s.runs.count,
                                "ns_per_run": if s.ns().is_finite() { json!(s.ns()) } else { Value::Null },
                                "net_ns": net(r, *arm).filter(|x| x.is_finite()),
                                "programs": programs,
                                "gbps": s.iperf.gbps,
                                "retransmits": s.iperf.retransmits,
                                "udp_sent_datagrams": s.iperf.sent_datagrams,
                                "udp_received_datagrams": s.iperf.received_datagrams,
                                "udp_received_pps": s.iperf.received_pps(),
                                "seconds": s.iperf.seconds,
                            }),
                        )
                    })
                    .collect();
                Value::Object(arms_json)
            })
            .collect();
        let arms_json: serde_json::Map<String, Value> = sums
            .iter()
            .map(|s| {
                (
                    arm_name(s.arm),
                    json!({
                        "ns_per_run": s.ns.json(),
                        "net_ns": s.net.json(),
                        "runs_per_round": s.runs.json(),
                        "throughput": s.throughput.json(),
                        "throughput_unit": match traffic { Traffic::Tcp => "Gbit/s", Traffic::Udp => "received datagrams/s" },
                        "throughput_vs_absent": s.vs_absent.json(),
                    }),
                )
            })
            .collect();
        summary_json.push(json!({
            "shape": shape.name(),
            "traffic": traffic.name(),
            "arms": arms_json,
            "ratios": {
                "flowtrace_to_counter": ft_counter.json(),
                "flowtrace_to_no_latency": ft_nolat.json(),
                "peer_to_counter": peer_counter.json(),
                "flowtrace_to_peer": ft_peer.json(),
                "latency_rare_to_no_latency": rare_nolat.json(),
                "flowtrace_to_latency_rare": ft_rare.json(),
            },
            "rounds": rounds_json,
        }));
    }
    out("\ngoals (issue 16)".into());
    for (what, ok) in &goals {
        out(format!(
            "  {}  {what}",
            if *ok { "met    " } else { "NOT met" }
        ));
    }
    let all_met = !goals.is_empty() && goals.iter().all(|(_, ok)| *ok);
    out(format!(
        "  => {}",
        if goals.is_empty() {
            "no goal evaluated (they need the counter, flowtrace and no-latency arms)"
        } else if all_met {
            "all goals met"
        } else {
            "goals NOT all met"
        }
    ));
    if peer.is_none() {
        out(
            "  (no peer arm: give --peer-object PATH, e.g. NetObserv's pkg/ebpf/bpf_x86_bpfel.o)"
                .into(),
        );
    }
    for n in &notes {
        out(format!("  note: {n}"));
    }
    out(
        format!(
            "\n--- markdown (docs/benchmarks.md) ---\nLinux {kernel}, {ncpu} x {cpu_model}; `{command}`\n\n{md}\n{md_ratios}--- end ---"
        ),
    );

    for bed in beds {
        bed.down()?;
    }
    if args.json {
        let doc = json!({
            "kernel": kernel,
            "cpus": ncpu,
            "cpu_model": cpu_model,
            "command": command,
            "settings": {
                "rounds": args.rounds,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "cpus": args.load.cpus,
                "udp_len": args.load.udp_len,
                "udp_bitrate": args.load.udp_bitrate,
                "arms": arms.iter().map(|&a| arm_name(a)).collect::<Vec<_>>(),
                "peer": peer.as_ref().map(|p| json!({
                    "name": p.name,
                    "object": p.template.object.display().to_string(),
                    "ingress": p.template.ingress,
                    "egress": p.template.egress,
                    "globals": p.template.globals,
                    "max_entries": p.template.max_entries,
                })),
            },
            "results": summary_json,
            "goals": goals.iter().map(|(w, ok)| json!({"goal": w, "met": ok})).collect::<Vec<_>>(),
            "all_goals_met": all_met,
            "notes": notes,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("rendering the JSON report")?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(time_ns: u64, count: u64, gbps: f64) -> Sample {
        Sample {
            runs: Runs { time_ns, count },
            programs: BTreeMap::new(),
            iperf: IperfReport {
                gbps,
                retransmits: 0,
                sent_datagrams: 0,
                received_datagrams: 0,
                seconds: 5.0,
            },
        }
    }

    #[test]
    fn spread_ignores_missing_values() {
        let s = spread(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let empty = spread(&[]);
        assert_eq!(empty.n, 0);
        assert!(empty.median.is_nan());
        assert_eq!(fmt_spread(empty, 1), "-");
    }

    #[test]
    fn net_is_taken_against_the_same_rounds_noop() {
        let round = |noop: u64, counter: u64, ft: u64| -> BTreeMap<Arm, Sample> {
            [
                (Arm::Absent, sample(0, 0, 10.0)),
                (Arm::Noop, sample(noop * 10, 10, 9.0)),
                (Arm::Counter, sample(counter * 10, 10, 8.0)),
                (Arm::Flowtrace, sample(ft * 10, 10, 8.0)),
            ]
            .into_iter()
            .collect()
        };
        let rounds: Rounds = vec![round(70, 230, 200), round(100, 260, 260)];
        // Net: 160 and 160 for the counter; 130 and 160 for flowtrace.
        let r = ratio(&rounds, Arm::Flowtrace, Arm::Counter);
        assert_eq!(r.n, 2);
        assert!((r.min - 130.0 / 160.0).abs() < 1e-9);
        assert!((r.max - 1.0).abs() < 1e-9);
        // No no-latency arm ran: no ratio, not a made-up one.
        assert_eq!(ratio(&rounds, Arm::Flowtrace, Arm::NoLatency).n, 0);
        let sums = summarize(&rounds, Traffic::Tcp, &[Arm::Counter]);
        assert_eq!(sums[0].net.median, 160.0);
        assert!((sums[0].vs_absent.median - 0.8).abs() < 1e-9);
        // A round without its noop gives no net figure.
        let mut partial = round(70, 230, 200);
        partial.remove(&Arm::Noop);
        assert_eq!(net(&partial, Arm::Counter), None);
    }

    #[test]
    fn an_arm_that_never_ran_has_no_cost() {
        assert!(Runs::default().ns_per_run().is_nan());
    }
}
