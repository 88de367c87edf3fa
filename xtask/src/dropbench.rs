//! `cargo xtask bench-drops`: what recording drops costs, and whether a flood of them is
//! counted and leaves the node working.
//!
//! On the emulated cluster, an iptables DROP rule on node2's FORWARD chain (UDP ports
//! 20000-60999) kills what pod-a on node1 sends to pod-c on node2, at `--rate` datagrams per
//! second for `--seconds`, in two shapes: one flow (one tuple), and fresh tuples (the
//! destination port walks the whole range, 41 000 tuples, more than the default drop buffer
//! holds between two drains). Each arm runs alone on the same tracepoint and traffic, in
//! `--rounds` interleaved rounds:
//!
//! - `flowtrace`: the agent on node2 with its defaults (its `kfree_skb` program, and its TC
//!   programs on node2's interfaces);
//! - `kfree_noop`: a raw tracepoint program on `kfree_skb` that does nothing (the floor);
//! - `kfree_count`: one that counts drops per reason in a per-CPU array (the least a drop
//!   counter does).
//!
//! Per arm: ns per run of the `kfree_skb` program (kernel.bpf_stats_enabled run_time_ns /
//! run_cnt), net of the floor. Ground truth is the DROP rule's own packet counter; for
//! flowtrace, what it recorded as NETFILTER_DROP on node2 plus what it counted lost
//! (`drop_map_full`) must add up to it. The node's own forwarding during the flood is a ping
//! from pod-a to pod-c (ICMP, not matched by the rule) every 10 ms: its loss and round trip.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{programs::RawTracePoint, Ebpf};
use flowtrace_tests::{
    baselines, drops::DropRule, http_get, netns, Agent, Cluster, ClusterOptions,
};
use serde_json::Value;

use crate::proc;

const PORT_FIRST: u16 = 20_000;
const PORT_LAST: u16 = 60_999;

#[derive(clap::Args)]
pub struct DropBenchArgs {
    /// Datagrams per second to drop.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000u64])]
    rate: Vec<u64>,
    /// Seconds of flood per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Arm {
    Flowtrace,
    KfreeNoop,
    KfreeCount,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Flowtrace, Arm::KfreeNoop, Arm::KfreeCount];
    fn name(self) -> &'static str {
        match self {
            Arm::Flowtrace => "flowtrace",
            Arm::KfreeNoop => "kfree_noop",
            Arm::KfreeCount => "kfree_count",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    OneFlow,
    FreshTuples,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::OneFlow => "one flow",
            Shape::FreshTuples => "fresh tuples",
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Run {
    sent: u64,
    /// The DROP rule's own counter over the run.
    rule: u64,
    /// flowtrace: NETFILTER_DROP recorded on node2, and counted lost (map full).
    recorded: u64,
    lost: u64,
    /// ns per run of the kfree_skb program, and runs.
    ns_per_run: f64,
    runs: u64,
    ping_loss: f64,
    ping_avg_ms: f64,
    /// flowtrace: the agent's CPU over the run (millicores) and its resident memory.
    agent_mcpu: f64,
    agent_rss_mib: f64,
}

pub fn run(args: &DropBenchArgs) -> Result<()> {
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    proc::require_tool("ping")?;
    crate::build::release_binaries()?;
    let cluster =
        Cluster::up(&ClusterOptions::default()).context("bringing up the emulated cluster")?;
    let node2 = cluster.node(2)?;
    let client = cluster.pod(1, "pod-a")?.clone();
    let server = cluster.pod(2, "pod-c")?.clone();
    let comment = format!("ftbench-drops-{}", std::process::id());
    let ports = format!("{PORT_FIRST}:{PORT_LAST}");
    let rule = DropRule::insert(
        &node2.netns,
        "FORWARD",
        &["-p", "udp", "--dport", &ports],
        &comment,
    )?;
    let _stats = proc::SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    let (cpus, cpu_model) = proc::cpus();
    println!(
        "bench-drops: {} rounds x {} s per arm and shape; kernel {}, {cpus} CPUs ({cpu_model})",
        args.rounds,
        args.seconds,
        proc::kernel_release()
    );
    println!(
        "flood: pod-a (node1) -> pod-c (node2) UDP, dropped by an iptables DROP rule on node2's FORWARD chain"
    );
    let mut results: BTreeMap<(u64, Shape, Arm), Vec<Run>> = BTreeMap::new();
    for &rate in &args.rate {
        for round in 0..args.rounds {
            for shape in [Shape::OneFlow, Shape::FreshTuples] {
                for arm in Arm::ALL {
                    proc::check_interrupted()?;
                    let r = measure(
                        arm,
                        shape,
                        rate,
                        args.seconds,
                        &node2.netns,
                        &client,
                        &server,
                        &rule,
                    )
                    .with_context(|| format!("round {round}, {} {}", arm.name(), shape.name()))?;
                    println!(
                        "  {rate}/s round {round} {:<12} {:<11} sent {:>8} rule {:>8} ns/run {:>7.1} ping loss {:>5.1}%",
                        shape.name(),
                        arm.name(),
                        r.sent,
                        r.rule,
                        r.ns_per_run,
                        r.ping_loss * 100.0
                    );
                    results.entry((rate, shape, arm)).or_default().push(r);
                }
            }
        }
    }
    report(&results);
    drop(rule);
    Ok(())
}

fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    proc::median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

fn report(results: &BTreeMap<(u64, Shape, Arm), Vec<Run>>) {
    println!("\nmedians (net = minus kfree_noop of the same rate and shape):");
    println!(
        "{:>7}  {:<12} {:<11} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7} {:>6} {:>8} {:>7}",
        "rate/s",
        "shape",
        "arm",
        "sent",
        "rule",
        "recorded",
        "lost",
        "unacc.",
        "ns/run",
        "net ns",
        "ping%",
        "agent mc",
        "RSS MiB"
    );
    for ((rate, shape, arm), runs) in results {
        let floor = results
            .get(&(*rate, *shape, Arm::KfreeNoop))
            .map(|r| med(r, |x| x.ns_per_run))
            .unwrap_or(f64::NAN);
        let ns = med(runs, |x| x.ns_per_run);
        let ft = *arm == Arm::Flowtrace;
        let sum = |f: fn(&Run) -> u64| runs.iter().map(f).sum::<u64>();
        let (rule, recorded, lost) = (sum(|r| r.rule), sum(|r| r.recorded), sum(|r| r.lost));
        println!(
            "{rate:>7}  {:<12} {:<11} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7.1} {:>7.1} {:>6.2} {:>8} {:>7}",
            shape.name(),
            arm.name(),
            sum(|r| r.sent),
            rule,
            if ft { recorded.to_string() } else { "-".into() },
            if ft { lost.to_string() } else { "-".into() },
            if ft { (rule as i64 - recorded as i64 - lost as i64).to_string() } else { "-".into() },
            ns,
            ns - floor,
            med(runs, |x| x.ping_loss) * 100.0,
            if ft { format!("{:.0}", med(runs, |x| x.agent_mcpu)) } else { "-".into() },
            if ft { format!("{:.1}", med(runs, |x| x.agent_rss_mib)) } else { "-".into() },
        );
    }
    println!(
        "(sent/rule/recorded/lost summed over rounds; unacc. = rule - recorded - lost, 0 when every drop is either recorded or counted lost)"
    );
}

#[allow(clippy::too_many_arguments)]
fn measure(
    arm: Arm,
    shape: Shape,
    rate: u64,
    seconds: u64,
    node_netns: &str,
    client: &flowtrace_tests::Pod,
    server: &flowtrace_tests::Pod,
    rule: &DropRule,
) -> Result<Run> {
    let mut run = Run::default();
    let mut agent = None;
    let mut held = None;
    match arm {
        Arm::Flowtrace => agent = Some(Agent::start(node_netns, &[])?),
        Arm::KfreeNoop | Arm::KfreeCount => {
            let name = if arm == Arm::KfreeNoop {
                baselines::BENCH_KFREE_NOOP
            } else {
                baselines::BENCH_KFREE_COUNT
            };
            let mut ebpf = Ebpf::load(baselines::OBJECT).context("loading the baselines")?;
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .context("baseline program missing")?
                .try_into()?;
            prog.load()?;
            prog.attach("kfree_skb")?;
            held = Some((ebpf, name));
        }
    }
    let before = FtCounters::read(agent.as_ref())?;
    let prog_before = prog_stats(arm, agent.as_ref(), held.as_ref())?;
    let usage_before = match &agent {
        Some(a) => Some(proc::usage(a.pid().context("agent pid")?)?),
        None => None,
    };
    let rule_before = rule.packets()?;
    let started = Instant::now();
    let ping = start_ping(&client.netns, server.ipv4, seconds)?;
    let target = server.ipv4;
    let sent =
        flowtrace_tests::in_netns(&client.netns, move || flood(target, rate, seconds, shape))??;
    let ping_out = ping.wait_output(Duration::from_secs(seconds + 10))?;
    let elapsed = started.elapsed().as_secs_f64();
    // One drain interval for the agent's last kernel records.
    std::thread::sleep(Duration::from_millis(1_200));
    run.sent = sent;
    run.rule = rule.packets()? - rule_before;
    let after = FtCounters::read(agent.as_ref())?;
    run.recorded = after.netfilter - before.netfilter;
    run.lost = after.map_full - before.map_full;
    let prog_after = prog_stats(arm, agent.as_ref(), held.as_ref())?;
    let runs = prog_after.1 - prog_before.1;
    run.runs = runs;
    run.ns_per_run = (prog_after.0 - prog_before.0) as f64 / runs.max(1) as f64;
    (run.ping_loss, run.ping_avg_ms) = parse_ping(&String::from_utf8_lossy(&ping_out.stdout));
    if let (Some(a), Some(u0)) = (&agent, usage_before) {
        let u1 = proc::usage(a.pid().context("agent pid")?)?;
        run.agent_mcpu = (u1.cpu_s - u0.cpu_s) / elapsed * 1000.0;
        run.agent_rss_mib = u1.rss_kib as f64 / 1024.0;
    }
    if let Some(a) = agent {
        a.stop()?;
    }
    drop(held);
    Ok(run)
}

/// Sends UDP datagrams to `dst` at `rate` per second for `seconds` (paced every ms);
/// returns how many the socket accepted.
fn flood(dst: std::net::Ipv4Addr, rate: u64, seconds: u64, shape: Shape) -> Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding the flood socket")?;
    let payload = [0u8; 18];
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let (mut sent, mut port) = (0u64, PORT_FIRST);
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let p = match shape {
                Shape::OneFlow => PORT_FIRST,
                Shape::FreshTuples => {
                    port = if port >= PORT_LAST {
                        PORT_FIRST
                    } else {
                        port + 1
                    };
                    port
                }
            };
            if socket.send_to(&payload, SocketAddr::from((dst, p))).is_ok() {
                sent += 1;
            } else {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(sent)
}

/// A ping from network namespace `netns` to `target` every 10 ms for `seconds`: how the
/// node's own forwarding fares during a flood (read with `parse_ping`).
pub(crate) fn start_ping(
    netns: &str,
    target: std::net::Ipv4Addr,
    seconds: u64,
) -> Result<netns::ChildGuard> {
    let pings = (seconds * 100).to_string();
    let target = target.to_string();
    let child = netns::spawn(
        netns,
        &["ping", "-n", "-q", "-i", "0.01", "-c", &pings, &target],
    )?;
    Ok(netns::ChildGuard::new(child, "ping"))
}

/// (loss fraction, average round trip in ms) from ping's summary.
pub(crate) fn parse_ping(out: &str) -> (f64, f64) {
    let loss = out
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|p| p / 100.0)
        .unwrap_or(f64::NAN);
    let avg = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    (loss, avg)
}

/// What the agent on node2 recorded: NETFILTER_DROP packets, and drops counted lost.
#[derive(Default)]
struct FtCounters {
    netfilter: u64,
    map_full: u64,
}

impl FtCounters {
    fn read(agent: Option<&Agent>) -> Result<Self> {
        let Some(a) = agent else {
            return Ok(Self::default());
        };
        let (status, body) = http_get(&a.netns, "/v1/drops?limit=1")?;
        if status != 200 {
            bail!("/v1/drops answered {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        if v["available"] != Value::Bool(true) {
            bail!("the agent records no drops: {}", v["unavailable"]);
        }
        Ok(Self {
            netfilter: v["by_reason"]["NETFILTER_DROP"].as_u64().unwrap_or(0),
            map_full: v["lost"]["map_full"].as_u64().unwrap_or(0),
        })
    }
}

/// (run_time_ns, run_cnt) of the arm's kfree_skb program.
fn prog_stats(arm: Arm, agent: Option<&Agent>, held: Option<&(Ebpf, &str)>) -> Result<(u64, u64)> {
    match arm {
        Arm::Flowtrace => {
            let a = agent.context("no agent")?;
            let ids = proc::prog_ids_held_by(a.pid().context("agent pid")?)?;
            for info in aya::programs::loaded_programs().flatten() {
                if ids.contains(&info.id()) && info.name_as_str() == Some("flowtrace_kfree") {
                    return Ok((info.run_time().as_nanos() as u64, info.run_count()));
                }
            }
            bail!("the agent holds no flowtrace_kfree_skb program")
        }
        _ => {
            let (ebpf, name) = held.context("no baseline")?;
            let info = ebpf.program(name).context("baseline program")?.info()?;
            Ok((info.run_time().as_nanos() as u64, info.run_count()))
        }
    }
}
