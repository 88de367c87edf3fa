//! `cargo xtask bench`: what flowtrace costs, measured on the emulated cluster.
//!
//! a) Throughput: one iperf3 TCP stream from node1/pod-a to node2/pod-a (across the flannel
//!    VXLAN overlay), in rounds of four arms run back to back in rotating order: nothing
//!    attached, `bench_noop` alone, `bench_counter` alone (on the hooks flowtrace uses), and
//!    flowtrace's agents on both nodes as shipped (latency tracking on, one packet in 64) and
//!    with latency tracking off. Ratios are per round against that round's bare run.
//! b) Per-packet cost from the kernel's own statistics (kernel.bpf_stats_enabled): flowtrace's
//!    programs and two reference programs run on the same hooks for the same packets; the
//!    no-op program's time is the floor every program pays (including the statistics
//!    themselves) and is subtracted to get each program's net cost. Each round measures the
//!    agents with latency tracking off and on, back to back, for the cost of latency tracking.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flowtrace_tests::iperf::{iperf_client, IperfRun, IperfServer};
use flowtrace_tests::{baselines, Agent, Cluster, ClusterOptions, Pod};
use serde_json::json;

use crate::baselines::Holder;
use crate::proc::{self, median};

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Length of every iperf3 run, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
    seconds: u32,
    /// Rounds of each measurement (throughput: this many without and this many with flowtrace).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
    /// CPUs of the iperf3 client and server, as iperf3's `-A client,server`. Both on CPU 0 by
    /// default: the whole emulated path then runs on one CPU, so throughput is the inverse of
    /// the CPU cost per byte; split over two CPUs the path reorders packets (data is sent from
    /// both) and spurious retransmits dominate the variance.
    #[arg(long, default_value = "0,0")]
    cpus: String,
    /// Only the throughput part (a), e.g. to study the measurement itself.
    #[arg(long, hide = true)]
    throughput_only: bool,
    /// Print the results as JSON on stdout (the human report then goes to stderr).
    #[arg(long)]
    json: bool,
}

const IPERF_PORT: u16 = 5201;
/// Goals the figures are judged against.
const GOAL_THROUGHPUT_RATIO: f64 = 0.98;
const GOAL_COST_RATIO: f64 = 1.0;
/// Latency tracking (issue 4): at most +25% on flowtrace's net per-packet cost, and at
/// least 0.97 of the throughput without flowtrace.
const GOAL_LATENCY_COST_RATIO: f64 = 1.25;
const GOAL_LATENCY_THROUGHPUT_RATIO: f64 = 0.97;

/// Run time and run count of one kind of program, summed over its instances.
#[derive(Clone, Copy, Debug, Default)]
struct Runs {
    time_ns: u64,
    count: u64,
}

impl Runs {
    fn add(&mut self, time_ns: u64, count: u64) {
        self.time_ns += time_ns;
        self.count += count;
    }

    fn ns_per_run(self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.time_ns as f64 / self.count as f64
        }
    }

    fn plus(self, other: Runs) -> Runs {
        Runs {
            time_ns: self.time_ns + other.time_ns,
            count: self.count + other.count,
        }
    }
}

/// One round of the per-packet cost measurement.
#[derive(Clone, Debug, Default)]
struct CostRound {
    noop: Runs,
    counter: Runs,
    ingress: Runs,
    egress: Runs,
    gbps: f64,
}

impl CostRound {
    fn noop_ns(&self) -> f64 {
        self.noop.ns_per_run()
    }
    fn counter_net(&self) -> f64 {
        self.counter.ns_per_run() - self.noop_ns()
    }
    fn ingress_net(&self) -> f64 {
        self.ingress.ns_per_run() - self.noop_ns()
    }
    fn egress_net(&self) -> f64 {
        self.egress.ns_per_run() - self.noop_ns()
    }
    /// Ingress and egress together, weighted by how often each ran.
    fn flowtrace_net(&self) -> f64 {
        self.ingress.plus(self.egress).ns_per_run() - self.noop_ns()
    }
    fn ratio(&self) -> f64 {
        self.flowtrace_net() / self.counter_net()
    }
}

/// What is attached during one throughput run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Absent = 0,
    Noop = 1,
    Counter = 2,
    /// The agents as shipped: latency tracking on (one packet in 64).
    Flowtrace = 3,
    /// The agents with latency tracking off (`--latency-sample 0`).
    NoLatency = 4,
}

/// Agent flags that turn latency tracking off.
const NO_LATENCY: &[&str] = &["--latency-sample", "0"];

impl Arm {
    const ALL: [Arm; 5] = [
        Arm::Absent,
        Arm::Noop,
        Arm::Counter,
        Arm::Flowtrace,
        Arm::NoLatency,
    ];

    fn name(self) -> &'static str {
        match self {
            Arm::Absent => "absent",
            Arm::Noop => "noop",
            Arm::Counter => "counter",
            Arm::Flowtrace => "flowtrace",
            Arm::NoLatency => "no-latency",
        }
    }

    /// Attaches this arm's programs on both nodes: the reference program alone on the
    /// devices flowtrace traces by default (pod veths, flannel.1), or flowtrace's agents.
    fn start(self, cluster: &Cluster) -> Result<Attached> {
        let program = match self {
            Arm::Absent => return Ok(Attached::Nothing),
            Arm::Flowtrace => return Ok(Attached::Agents(start_agents(cluster, &[])?)),
            Arm::NoLatency => return Ok(Attached::Agents(start_agents(cluster, NO_LATENCY)?)),
            Arm::Noop => baselines::BENCH_NOOP,
            Arm::Counter => baselines::BENCH_COUNTER,
        };
        let mut holders = Vec::new();
        for node in &cluster.nodes {
            let mut ifaces: Vec<String> = node.pods.iter().map(|p| p.host_veth.clone()).collect();
            ifaces.push("flannel.1".into());
            holders.push(Holder::start_programs(&node.netns, &ifaces, &[program])?);
        }
        Ok(Attached::References(holders))
    }
}

/// The programs of one arm, detached by `stop`.
enum Attached {
    Nothing,
    References(Vec<Holder>),
    Agents(Vec<Agent>),
}

impl Attached {
    fn stop(self) -> Result<()> {
        match self {
            Attached::Nothing => Ok(()),
            Attached::References(hs) => hs.into_iter().try_for_each(Holder::stop),
            Attached::Agents(agents) => stop_agents(agents),
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    for tool in ["iperf3", "bpftool", "ss", "ip"] {
        proc::require_tool(tool)?;
    }
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let (ncpu, cpu_model) = proc::cpus();
    let kernel = proc::kernel_release();
    let mut report = String::new();
    let _ = writeln!(report, "flowtrace bench");
    let _ = writeln!(report, "  kernel   Linux {kernel}");
    let _ = writeln!(report, "  cpus     {ncpu} x {cpu_model}");
    let _ = writeln!(report, "  command  {command}");
    let _ = writeln!(
        report,
        "  traffic  one iperf3 TCP stream node1/pod-a -> node2/pod-a over flannel VXLAN, {} s per run",
        args.seconds
    );
    eprint!("{report}");

    crate::build::release_binaries()?;
    eprintln!("xtask: bringing the emulated cluster up");
    let cluster = Cluster::up(&ClusterOptions::default()).context(
        "bringing the emulated cluster up (needs root, iproute2, iptables; see scripts/setup.sh)",
    )?;
    let client = cluster.pod(1, "pod-a")?;
    let server_pod = cluster.pod(2, "pod-a")?;
    let server_ip = IpAddr::V4(server_pod.ipv4);
    let server = IperfServer::start(server_pod, IPERF_PORT, Duration::from_secs(10))?;

    // Warm-up (not counted): first-run effects such as neighbour resolution and page faults.
    eprintln!("xtask: warm-up run (1 s, not counted)");
    iperf(client, server_ip, 1, &args.cpus)?;

    // a) Throughput, alternating absent / attached.
    let _ = writeln!(
        report,
        "\na) throughput (iperf3 -t {}; end.sum_received)",
        args.seconds
    );
    // Four arms per round: nothing attached, the two reference programs alone (no agent) on
    // the hooks flowtrace uses, and flowtrace's agents. The reference arms say what this
    // emulation charges any TC program, so flowtrace's ratio can be read against them.
    let arms = Arm::ALL;
    let mut gbps: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for round in 1..=args.rounds {
        // Rotate the order every round so slow drift of the machine (other tenants, thermal)
        // favours no arm.
        let mut order = arms;
        order.rotate_left((round as usize - 1) % arms.len());
        let mut this_round = [0.0f64; Arm::ALL.len()];
        for arm in order {
            let holders = arm.start(&cluster)?;
            // A short discarded run first: the first transfer after programs are attached or
            // detached ran measurably slower in every arm.
            iperf(client, server_ip, 1, &args.cpus)?;
            let r = iperf(client, server_ip, args.seconds, &args.cpus)?;
            holders.stop()?;
            let line = format!(
                "  round {round:2}  {:<9}  {:7.2} Gbit/s  ({} retransmits)",
                arm.name(),
                r.gbps,
                r.retransmits
            );
            eprintln!("{line}");
            let _ = writeln!(report, "{line}");
            this_round[arm as usize] = r.gbps;
        }
        for arm in arms {
            gbps[arm as usize].push(this_round[arm as usize]);
            ratios[arm as usize].push(this_round[arm as usize] / this_round[Arm::Absent as usize]);
        }
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    for arm in arms {
        let rs = &ratios[arm as usize];
        let (lo, hi) = rs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        let _ = writeln!(
            report,
            "  median   {:<9}  {:7.2} Gbit/s   ratio to absent {:.3} (rounds {lo:.3}-{hi:.3})",
            arm.name(),
            med(&gbps[arm as usize]),
            med(rs),
        );
    }
    let absent = gbps[Arm::Absent as usize].clone();
    let attached = gbps[Arm::Flowtrace as usize].clone();
    let med_absent = med(&absent);
    let med_attached = med(&attached);
    // The median of the per-round ratios: each round ran its arms back to back.
    let tp_ratio = med(&ratios[Arm::Flowtrace as usize]);
    let noop_tp_ratio = med(&ratios[Arm::Noop as usize]);
    let counter_tp_ratio = med(&ratios[Arm::Counter as usize]);
    let nolat_tp_ratio = med(&ratios[Arm::NoLatency as usize]);
    let _ = writeln!(
        report,
        "  flowtrace/absent {tp_ratio:.3} (goal >= {GOAL_THROUGHPUT_RATIO}); for scale: bench_noop/absent {noop_tp_ratio:.3}, bench_counter/absent {counter_tp_ratio:.3}"
    );

    if args.throughput_only {
        eprintln!("{report}");
        return Ok(());
    }

    // b) Per-packet cost from bpf_stats.
    let stats = proc::SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    let _ = writeln!(
        report,
        "\nb) per-packet cost (kernel.bpf_stats_enabled=1, was {}; run_time_ns / run_cnt per program,\n   \
         flowtrace + bench_noop + bench_counter on the same TCX hooks of both nodes; net = program - bench_noop)",
        stats.old()
    );
    let mut rounds = Vec::new();
    let mut rounds_off: Vec<CostRound> = Vec::new();
    for round in 1..=args.rounds {
        // The first program on a hook to touch the packet pays its cache misses; alternate
        // who goes first so neither flowtrace nor the reference counter is favoured.
        let flowtrace_first = round % 2 == 1;
        // Latency tracking off, then on (the shipped default), or the other way round.
        let mut off = None;
        let mut on = None;
        for latency in if round % 4 < 2 {
            [false, true]
        } else {
            [true, false]
        } {
            let c = cost_round(
                &cluster,
                client,
                server_ip,
                args.seconds,
                &args.cpus,
                flowtrace_first,
                if latency { &[] } else { NO_LATENCY },
            )
            .with_context(|| {
                format!("per-packet cost round {round}, latency tracking {latency}")
            })?;
            if latency {
                on = Some(c);
            } else {
                off = Some(c);
            }
        }
        let (Some(c), Some(off)) = (on, off) else {
            bail!("cost round {round} did not run both arms");
        };
        let line = format!(
            "  round {round}  latency off: flowtrace net {:6.1} ns  (in {:6.1} out {:6.1}; noop {:6.1})  latency on: net {:6.1}  on/off {:.3}",
            off.flowtrace_net(),
            off.ingress_net(),
            off.egress_net(),
            off.noop_ns(),
            c.flowtrace_net(),
            c.flowtrace_net() / off.flowtrace_net(),
        );
        eprintln!("{line}");
        let _ = writeln!(report, "{line}");
        rounds_off.push(off);
        let line = format!(
            "  round {round} ({})  noop {:6.1} ns  counter {:6.1} (net {:6.1})  flowtrace in {:6.1} (net {:6.1})  out {:6.1} (net {:6.1})  both net {:6.1}  ratio {:.2}  [runs: noop {} counter {} in {} out {}; {:.2} Gbit/s]",
            if flowtrace_first { "flowtrace first" } else { "references first" },
            c.noop_ns(),
            c.counter.ns_per_run(),
            c.counter_net(),
            c.ingress.ns_per_run(),
            c.ingress_net(),
            c.egress.ns_per_run(),
            c.egress_net(),
            c.flowtrace_net(),
            c.ratio(),
            c.noop.count,
            c.counter.count,
            c.ingress.count,
            c.egress.count,
            c.gbps,
        );
        eprintln!("{line}");
        let _ = writeln!(report, "{line}");
        rounds.push(c);
    }
    drop(stats);
    drop(server);

    let m = |f: &dyn Fn(&CostRound) -> f64| {
        median(&rounds.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let mc = |f: &dyn Fn(&CostRound) -> u64| {
        median(&rounds.iter().map(|r| f(r) as f64).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let noop = m(&|r| r.noop_ns());
    let counter = m(&|r| r.counter.ns_per_run());
    let counter_net = m(&|r| r.counter_net());
    let ing = m(&|r| r.ingress.ns_per_run());
    let ing_net = m(&|r| r.ingress_net());
    let eg = m(&|r| r.egress.ns_per_run());
    let eg_net = m(&|r| r.egress_net());
    let ft_net = m(&|r| r.flowtrace_net());
    let cost_ratio = m(&|r| r.ratio());
    let ft_net_off = median(
        &rounds_off
            .iter()
            .map(|r| r.flowtrace_net())
            .collect::<Vec<_>>(),
    )
    .unwrap_or(f64::NAN);
    // Per round: each round ran both arms back to back.
    let latency_cost_ratio = median(
        &rounds
            .iter()
            .zip(&rounds_off)
            .map(|(on, off)| on.flowtrace_net() / off.flowtrace_net())
            .collect::<Vec<_>>(),
    )
    .unwrap_or(f64::NAN);
    let runs_noop = mc(&|r| r.noop.count);
    let runs_counter = mc(&|r| r.counter.count);
    let runs_in = mc(&|r| r.ingress.count);
    let runs_out = mc(&|r| r.egress.count);
    let _ = writeln!(report, "  median over {} round(s):", rounds.len());
    let _ = writeln!(
        report,
        "    {:<20} {:>9} {:>9} {:>14}",
        "program", "ns/run", "net ns", "run_cnt"
    );
    let _ = writeln!(
        report,
        "    {:<20} {:>9.1} {:>9} {:>14.0}",
        "bench_noop", noop, "-", runs_noop
    );
    let _ = writeln!(
        report,
        "    {:<20} {:>9.1} {:>9.1} {:>14.0}",
        "bench_counter", counter, counter_net, runs_counter
    );
    let _ = writeln!(
        report,
        "    {:<20} {:>9.1} {:>9.1} {:>14.0}",
        "flowtrace_ingress", ing, ing_net, runs_in
    );
    let _ = writeln!(
        report,
        "    {:<20} {:>9.1} {:>9.1} {:>14.0}",
        "flowtrace_egress", eg, eg_net, runs_out
    );
    let _ = writeln!(
        report,
        "    {:<20} {:>9} {:>9.1} {:>14.0}",
        "flowtrace (both)",
        "",
        ft_net,
        runs_in + runs_out
    );
    let _ = writeln!(
        report,
        "    flowtrace net / bench_counter net = {cost_ratio:.2} (goal <= {GOAL_COST_RATIO})"
    );
    let _ = writeln!(
        report,
        "    latency tracking: flowtrace net {ft_net_off:.1} ns off, {ft_net:.1} ns on; on/off {latency_cost_ratio:.3} (goal <= {GOAL_LATENCY_COST_RATIO})"
    );

    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(report, "\n--- summary (paste into docs/benchmarks.md) ---");
    let _ = writeln!(report, "Linux {kernel}, {ncpu} x {cpu_model}; `{command}`");
    let _ = writeln!(report, "Emulated 2-node cluster (netns, flannel VXLAN), one iperf3 TCP stream pod -> pod across nodes.\n");
    let _ = writeln!(report, "| figure | value | goal |");
    let _ = writeln!(report, "|---|---|---|");
    let _ = writeln!(
        report,
        "| throughput without flowtrace (median of {}) | {med_absent:.2} Gbit/s | |",
        absent.len()
    );
    let _ = writeln!(
        report,
        "| throughput with flowtrace (median of {}) | {med_attached:.2} Gbit/s | |",
        attached.len()
    );
    let _ = writeln!(
        report,
        "| throughput ratio with/without (median of per-round ratios) | {tp_ratio:.3} | >= {GOAL_THROUGHPUT_RATIO} ({}) |",
        verdict(tp_ratio >= GOAL_THROUGHPUT_RATIO)
    );
    let _ = writeln!(
        report,
        "| for scale: throughput ratio bench_noop alone / bench_counter alone | {noop_tp_ratio:.3} / {counter_tp_ratio:.3} | |"
    );
    let _ = writeln!(
        report,
        "| bench_noop (floor incl. bpf_stats) | {noop:.1} ns/run | |"
    );
    let _ = writeln!(report, "| bench_counter net | {counter_net:.1} ns/run | |");
    let _ = writeln!(report, "| flowtrace_ingress net | {ing_net:.1} ns/run | |");
    let _ = writeln!(report, "| flowtrace_egress net | {eg_net:.1} ns/run | |");
    let _ = writeln!(
        report,
        "| flowtrace net (both, weighted by run_cnt) | {ft_net:.1} ns/run | |"
    );
    let _ = writeln!(
        report,
        "| flowtrace net / bench_counter net | {cost_ratio:.2} | <= {GOAL_COST_RATIO} ({}) |",
        verdict(cost_ratio <= GOAL_COST_RATIO)
    );
    let _ = writeln!(
        report,
        "| flowtrace net, latency tracking off | {ft_net_off:.1} ns/run | |"
    );
    let _ = writeln!(
        report,
        "| latency tracking on / off, net per-packet cost (median of per-round ratios) | {latency_cost_ratio:.3} | <= {GOAL_LATENCY_COST_RATIO} ({}) |",
        verdict(latency_cost_ratio <= GOAL_LATENCY_COST_RATIO)
    );
    let _ = writeln!(
        report,
        "| throughput ratio latency tracking on / flowtrace absent | {tp_ratio:.3} | >= {GOAL_LATENCY_THROUGHPUT_RATIO} ({}) |",
        verdict(tp_ratio >= GOAL_LATENCY_THROUGHPUT_RATIO)
    );
    let _ = writeln!(
        report,
        "| throughput ratio latency tracking off / flowtrace absent | {nolat_tp_ratio:.3} | |"
    );
    let _ = writeln!(
        report,
        "| runs per round (median): noop / counter / flowtrace in / out | {runs_noop:.0} / {runs_counter:.0} / {runs_in:.0} / {runs_out:.0} | |"
    );
    let _ = writeln!(report, "--- end summary ---");

    if args.json {
        eprint!("{report}");
        let rounds_json: Vec<_> = rounds
            .iter()
            .map(|r| {
                json!({
                    "gbps": r.gbps,
                    "bench_noop": {"run_time_ns": r.noop.time_ns, "run_cnt": r.noop.count, "ns_per_run": r.noop_ns()},
                    "bench_counter": {"run_time_ns": r.counter.time_ns, "run_cnt": r.counter.count, "ns_per_run": r.counter.ns_per_run(), "net_ns": r.counter_net()},
                    "flowtrace_ingress": {"run_time_ns": r.ingress.time_ns, "run_cnt": r.ingress.count, "ns_per_run": r.ingress.ns_per_run(), "net_ns": r.ingress_net()},
                    "flowtrace_egress": {"run_time_ns": r.egress.time_ns, "run_cnt": r.egress.count, "ns_per_run": r.egress.ns_per_run(), "net_ns": r.egress_net()},
                    "flowtrace_net_ns": r.flowtrace_net(),
                    "ratio_flowtrace_to_counter": r.ratio(),
                })
            })
            .collect();
        let doc = json!({
            "kernel": kernel,
            "cpus": ncpu,
            "cpu_model": cpu_model,
            "command": command,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "throughput": {
                "absent_gbps": absent,
                "attached_gbps": attached,
                "median_absent_gbps": med_absent,
                "median_attached_gbps": med_attached,
                "ratio": tp_ratio,
                "noop_ratio": noop_tp_ratio,
                "counter_ratio": counter_tp_ratio,
                "no_latency_ratio": nolat_tp_ratio,
                "no_latency_gbps": gbps[Arm::NoLatency as usize],
                "noop_gbps": gbps[Arm::Noop as usize],
                "counter_gbps": gbps[Arm::Counter as usize],
                "goal_min_ratio": GOAL_THROUGHPUT_RATIO,
            },
            "cost": {
                "rounds": rounds_json,
                "median": {
                    "bench_noop_ns": noop,
                    "bench_counter_ns": counter,
                    "bench_counter_net_ns": counter_net,
                    "flowtrace_ingress_ns": ing,
                    "flowtrace_ingress_net_ns": ing_net,
                    "flowtrace_egress_ns": eg,
                    "flowtrace_egress_net_ns": eg_net,
                    "flowtrace_net_ns": ft_net,
                    "ratio_flowtrace_to_counter": cost_ratio,
                    "flowtrace_net_ns_latency_off": ft_net_off,
                    "ratio_latency_on_to_off": latency_cost_ratio,
                },
                "goal_max_latency_ratio": GOAL_LATENCY_COST_RATIO,
                "goal_max_ratio": GOAL_COST_RATIO,
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("rendering the JSON report")?
        );
    } else {
        print!("{report}");
    }
    cluster
        .down()
        .context("tearing the emulated cluster down")?;
    Ok(())
}

/// One `iperf3 -c` run from `client` to the bench's server, pinned to `cpus` (see
/// `BenchArgs::cpus`: fewer scheduler-placement swings between runs).
fn iperf(client: &Pod, server: IpAddr, seconds: u32, cpus: &str) -> Result<IperfRun> {
    proc::check_interrupted()?;
    Ok(iperf_client(
        client,
        server,
        IPERF_PORT,
        u64::from(seconds),
        Some(cpus),
    )?)
}

fn start_agents(cluster: &Cluster, extra: &[&str]) -> Result<Vec<Agent>> {
    proc::check_interrupted()?;
    let mut agents = Vec::new();
    for node in &cluster.nodes {
        // On error the agents started so far are killed by their Drop.
        let agent = Agent::start(&node.netns, extra)
            .with_context(|| format!("starting the flowtrace agent in {}", node.name))?;
        agents.push(agent);
    }
    Ok(agents)
}

fn stop_agents(agents: Vec<Agent>) -> Result<()> {
    for a in agents {
        let ns = a.netns.clone();
        a.stop()
            .with_context(|| format!("stopping the flowtrace agent in {ns}"))?;
    }
    Ok(())
}

/// Agents + reference programs on the same hooks, one iperf3 run, then the kernel's counters
/// of exactly the programs this round loaded.
fn cost_round(
    cluster: &Cluster,
    client: &Pod,
    server: IpAddr,
    seconds: u32,
    cpus: &str,
    flowtrace_first: bool,
    agent_extra: &[&str],
) -> Result<CostRound> {
    let before: BTreeSet<u32> = flowtrace_tests::bpftool_progs()?
        .iter()
        .map(|p| p.id)
        .collect();
    let mut holders = Vec::new();
    if !flowtrace_first {
        // The devices the agent will trace: pod veths and the overlay (checked below).
        for node in &cluster.nodes {
            holders.push(Holder::start(
                &node.netns,
                &flowtrace_tests::traced_devices(node),
            )?);
        }
    }
    let agents = start_agents(cluster, agent_extra)?;
    for (node, agent) in cluster.nodes.iter().zip(&agents) {
        if !flowtrace_first {
            continue;
        }
        let ifaces: Vec<String> = agent
            .interfaces()
            .with_context(|| {
                format!(
                    "asking the agent in {} which interfaces it traces",
                    node.name
                )
            })?
            .interfaces
            .into_iter()
            .map(|i| i.name)
            .collect();
        holders.push(Holder::start(&node.netns, &ifaces)?);
    }
    let r = iperf(client, server, seconds, cpus)?;

    // Programs this round's processes hold, loaded after the round began.
    let mut ours = BTreeSet::new();
    for a in &agents {
        let pid = a
            .pid()
            .context("the flowtrace agent has already been reaped")?;
        ours.extend(proc::prog_ids_held_by(pid)?);
    }
    for h in &holders {
        ours.extend(proc::prog_ids_held_by(h.pid())?);
    }
    let progs = flowtrace_tests::bpftool_progs()?;
    let mut c = CostRound {
        gbps: r.gbps,
        ..CostRound::default()
    };
    for p in progs
        .iter()
        .filter(|p| ours.contains(&p.id) && !before.contains(&p.id))
    {
        let slot = match p.name.as_str() {
            n if n == baselines::BENCH_NOOP => &mut c.noop,
            n if n == baselines::BENCH_COUNTER => &mut c.counter,
            n if n.starts_with("flowtrace_ingre") => &mut c.ingress,
            n if n.starts_with("flowtrace_egres") => &mut c.egress,
            _ => continue,
        };
        slot.add(p.run_time_ns, p.run_cnt);
    }
    for h in holders {
        h.stop()?;
    }
    stop_agents(agents)?;
    for (what, runs) in [
        ("bench_noop", c.noop),
        ("bench_counter", c.counter),
        ("flowtrace_ingress", c.ingress),
        ("flowtrace_egress", c.egress),
    ] {
        if runs.count == 0 {
            bail!(
                "{what} has run_cnt 0 after the traffic: either it was not attached to the traced \
                 interfaces or kernel.bpf_stats_enabled did not take effect (check `bpftool prog show`)"
            );
        }
    }
    Ok(c)
}
