//! `cargo xtask bench-relay`: the relay at scale (issue 14's goal: a filtered cluster-wide
//! `/v1/flows` answered with p99 < 1 s at 100 nodes x 10 000 flows, relay RSS < 200 MiB).
//!
//! Everything runs on this machine's loopback, no root needed:
//!
//! - `ftagents` (tests/src/bin/ftagents.rs): N simulated agents in one process, each the
//!   agent's own mTLS data listener on its own address 127.1.X.Y:9652 with certificates from
//!   `flowtrace certs`, each holding a deterministic table of `--flows` named flows, filtering,
//!   limiting and JSON-encoding every answer as the agent does, timing its own handler;
//! - the real relay (`target/release/flowtrace relay --agents https://... --tls-*`), its own
//!   process, so its CPU and memory are read from /proc/<pid> alone;
//! - this process as the client, asking the relay one question at a time.
//!
//! Per scale point (`--agents 10,50,100`): a warm-up, then `--rounds` filtered queries
//! (`--filter`, the relay's default limit), `--rounds` `/v1/nodes`, `--unfiltered-rounds`
//! unfiltered queries. Figures: answer time (p50/p99/max, client side, until the last byte),
//! answer size and flows returned, nodes missing; the relay's CPU per query (utime + stime)
//! and resident memory (VmRSS polled every 10 ms, VmHWM); per-agent fan-out cost as the relay
//! sees it (each node's `elapsed_ms` in the answer: request, transfer and decoding of that
//! agent's answer) beside the simulated agents' own handler time and CPU.
//!
//! What it does not measure: network latency and bandwidth between nodes (loopback), the real
//! agents' own cost of a request (draining kernel maps, snapshotting and naming the table:
//! `bench-agent` territory), and machines where the agents do not share the relay's CPUs.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use flowtrace::model::wire::RelayFlowsResponse;
use serde::Deserialize;

use crate::{build, proc};

#[derive(clap::Args)]
pub struct RelayBenchArgs {
    /// Simulated agents at each scale point (comma separated); the goal is judged at the
    /// largest.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 50, 100])]
    agents: Vec<usize>,
    /// Flows in each simulated agent's table.
    #[arg(long, default_value_t = 10_000)]
    flows: usize,
    /// Timed rounds of the filtered query and of /v1/nodes.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Untimed filtered queries first (connections to every agent opened).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// The filtered query's parameters (each of the ten namespaces is an end of ~12% of the flows).
    #[arg(long, default_value = "namespace=payments")]
    filter: String,
    /// Timed rounds of the unfiltered query (every agent sends its limit, 10 000 flows).
    #[arg(long, default_value_t = 3)]
    unfiltered_rounds: usize,
    /// The relay's --agent-timeout-ms.
    #[arg(long, default_value_t = 5_000)]
    agent_timeout_ms: u64,
    /// The flowtrace binary to run as the relay (default: this workspace's release build),
    /// to compare relay builds against the same simulated agents.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
}

/// The goal of issue 14.
const GOAL_P99_S: f64 = 1.0;
const GOAL_RSS_MIB: f64 = 200.0;

/// A child process killed (by its own handle) and reaped when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("checking a child process")? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's CPU and memory from /proc at one moment.
/// Polls a process's VmRSS every 10 ms; the largest seen since the last `take`.
struct RssPoller {
    max_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssPoller {
    fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max_kib.clone(), stop.clone());
        let path = format!("/proc/{pid}/status");
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    m.fetch_max(proc::status_kib(&text, "VmRSS:"), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            max_kib,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak since the last call, and a fresh start.
    fn take(&self) -> u64 {
        self.max_kib.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A free loopback port (bound, read, released: the relay binds it right after).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr().context("a bound port's address")?.port())
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// GETs `url`; the body and how long until its last byte.
fn get(agent: &ureq::Agent, url: &str) -> Result<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    let mut body = Vec::new();
    resp.into_reader()
        .read_to_end(&mut body)
        .with_context(|| format!("reading the answer of {url}"))?;
    Ok((body, started.elapsed()))
}

/// What `ftagents` says once every listener is bound.
#[derive(Deserialize)]
struct SimReady {
    agents: Vec<String>,
    control: String,
    flows_held: usize,
    build_s: f64,
}

/// `ftagents`' `/stats`.
#[derive(Deserialize)]
struct SimStats {
    flows: SimRoute,
    status: SimRoute,
    refused: u64,
}

#[derive(Deserialize)]
struct SimRoute {
    server_s: Vec<f64>,
    bytes: Vec<usize>,
}

/// Quantile `q` of `v` (nearest rank); 0 when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The relay's `flowtrace_relay_agent_request_seconds{route}`: (count, sum).
fn agent_histogram(agent: &ureq::Agent, metrics: &str, route: &str) -> Result<(f64, f64)> {
    let (body, _) = get(agent, &format!("http://{metrics}/metrics"))?;
    let text = String::from_utf8(body).context("the relay's /metrics is not UTF-8")?;
    let samples = flowtrace_tests::parse_exposition(&text)
        .map_err(|e| anyhow::anyhow!("parsing the relay's /metrics: {e}"))?;
    let find = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.label("route") == route)
            .map_or(0.0, |s| s.value)
    };
    Ok((
        find("flowtrace_relay_agent_request_seconds_count"),
        find("flowtrace_relay_agent_request_seconds_sum"),
    ))
}

/// One timed phase of queries.
struct Phase {
    name: String,
    rounds: usize,
    /// Client-side answer times, seconds.
    times: Vec<f64>,
    bytes: Vec<usize>,
    flows: Vec<usize>,
    /// Nodes missing from answers, summed over rounds.
    missing: usize,
    /// Per agent per round, as the relay reported (elapsed_ms), seconds.
    per_agent: Vec<f64>,
    /// The relay's agent-request histogram over the phase: (count, sum).
    relay_hist: (f64, f64),
    relay_cpu_s: f64,
    sim_cpu_s: f64,
    sim: Option<SimRoute>,
    /// Relay VmRSS peak during the phase, and at its end.
    rss_peak_kib: u64,
    rss_end_kib: u64,
}

struct Point {
    agents: usize,
    flows_held: usize,
    sim_build_s: f64,
    sim_rss_kib: u64,
    relay_rss_idle_kib: u64,
    relay_hwm_kib: u64,
    phases: Vec<Phase>,
    refused: u64,
    /// One agent's answer timed step by step in ftagents (query, `/cost` answer).
    costs: Vec<(String, Cost)>,
}

/// ftagents' `/cost`: one answer's encode, decode and re-encode, seconds.
#[derive(Deserialize)]
struct Cost {
    answer_bytes: usize,
    reencoded_bytes: usize,
    agent_encode_s: f64,
    relay_decode_s: f64,
    relay_reencode_s: f64,
}

enum Query<'a> {
    Flows(&'a str),
    Nodes,
}

/// The environment of one scale point: simulated agents and the relay.
struct Bed {
    sim: Proc,
    relay: Proc,
    ready: SimReady,
    api: String,
    metrics: String,
    client: ureq::Agent,
    poller: RssPoller,
}

impl Bed {
    fn start(bins: &Bins, certs: &Path, agents: usize, args: &RelayBenchArgs) -> Result<Bed> {
        eprintln!("xtask: {agents} simulated agents x {} flows", args.flows);
        let mut child = Command::new(&bins.ftagents)
            .args(["--certs", build::path_str(certs)?])
            .args(["--agents", &agents.to_string()])
            .args(["--flows", &args.flows.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bins.ftagents.display()))?;
        let stdout = child.stdout.take().context("ftagents' stdout")?;
        let mut sim = Proc {
            name: "ftagents",
            child,
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading ftagents' ready line")?;
        sim.check_alive()?;
        let ready: SimReady = serde_json::from_str(&line)
            .with_context(|| format!("ftagents' ready line `{}`", line.trim()))?;
        let (api, metrics) = (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        );
        let log = std::fs::File::create(certs.join(format!("relay-{agents}.log")))
            .context("creating the relay's log file")?;
        let relay = Command::new(&bins.flowtrace)
            .arg("relay")
            .args(["--agents", &ready.agents.join(",")])
            .args(["--tls-cert", build::path_str(&certs.join("relay.crt"))?])
            .args(["--tls-key", build::path_str(&certs.join("relay.key"))?])
            .args(["--tls-ca", build::path_str(&certs.join("ca.crt"))?])
            .args(["--agent-timeout-ms", &args.agent_timeout_ms.to_string()])
            .args(["--listen", &api, "--metrics-listen", &metrics])
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} relay", bins.flowtrace.display()))?;
        let mut relay = Proc {
            name: "flowtrace relay",
            child: relay,
        };
        let client = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            relay.check_alive()?;
            if get(&client, &format!("http://{api}/healthz")).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the relay did not answer /healthz on {api} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the relay's first status round (at its start) finish.
        std::thread::sleep(Duration::from_secs(1));
        let poller = RssPoller::start(relay.pid());
        Ok(Bed {
            sim,
            relay,
            ready,
            api,
            metrics,
            client,
            poller,
        })
    }

    fn sim_stats(&self, reset: bool) -> Result<SimStats> {
        let (body, _) = get(
            &self.client,
            &format!("http://{}/stats", self.ready.control),
        )?;
        let s = serde_json::from_slice(&body).context("ftagents' /stats")?;
        if reset {
            get(
                &self.client,
                &format!("http://{}/reset", self.ready.control),
            )?;
        }
        Ok(s)
    }

    fn phase(&mut self, name: &str, q: &Query<'_>, rounds: usize) -> Result<Phase> {
        proc::check_interrupted()?;
        eprintln!("xtask:   {name}: {rounds} rounds");
        let route = match q {
            Query::Flows(_) => "flows",
            Query::Nodes => "status",
        };
        let url = match q {
            Query::Flows("") => format!("http://{}/v1/flows", self.api),
            Query::Flows(p) => format!("http://{}/v1/flows?{p}", self.api),
            Query::Nodes => format!("http://{}/v1/nodes", self.api),
        };
        self.sim_stats(true)?;
        let hist0 = agent_histogram(&self.client, &self.metrics, route)?;
        let (r0, s0) = (proc::usage(self.relay.pid())?, proc::usage(self.sim.pid())?);
        self.poller.take();
        let mut p = Phase {
            name: name.to_string(),
            rounds,
            times: Vec::new(),
            bytes: Vec::new(),
            flows: Vec::new(),
            missing: 0,
            per_agent: Vec::new(),
            relay_hist: (0.0, 0.0),
            relay_cpu_s: 0.0,
            sim_cpu_s: 0.0,
            sim: None,
            rss_peak_kib: 0,
            rss_end_kib: 0,
        };
        for _ in 0..rounds {
            let (body, took) = get(&self.client, &url)?;
            p.times.push(took.as_secs_f64());
            p.bytes.push(body.len());
            // Decoding here (a debug build) is outside the timed answer; its CPU is this
            // process's, not the relay's or the agents'.
            match q {
                Query::Flows(_) => {
                    let a: RelayFlowsResponse =
                        serde_json::from_slice(&body).context("the relay's /v1/flows answer")?;
                    p.flows.push(a.flows.len());
                    p.missing += a.missing.len();
                    p.per_agent
                        .extend(a.nodes.iter().map(|n| n.elapsed_ms as f64 / 1000.0));
                }
                Query::Nodes => {
                    let a: Vec<serde_json::Value> =
                        serde_json::from_slice(&body).context("the relay's /v1/nodes answer")?;
                    p.flows.push(0);
                    p.missing += a
                        .iter()
                        .filter(|n| n.get("ok").and_then(|v| v.as_bool()) != Some(true))
                        .count();
                }
            }
        }
        let (r1, s1) = (proc::usage(self.relay.pid())?, proc::usage(self.sim.pid())?);
        let hist1 = agent_histogram(&self.client, &self.metrics, route)?;
        p.relay_cpu_s = r1.cpu_s - r0.cpu_s;
        p.sim_cpu_s = s1.cpu_s - s0.cpu_s;
        p.relay_hist = (hist1.0 - hist0.0, hist1.1 - hist0.1);
        p.rss_peak_kib = self.poller.take().max(r1.rss_kib);
        p.rss_end_kib = r1.rss_kib;
        let stats = self.sim_stats(true)?;
        p.sim = Some(if route == "flows" {
            stats.flows
        } else {
            stats.status
        });
        Ok(p)
    }
}

struct Bins {
    flowtrace: PathBuf,
    ftagents: PathBuf,
}

fn run_point(bins: &Bins, certs: &Path, agents: usize, args: &RelayBenchArgs) -> Result<Point> {
    let mut bed = Bed::start(bins, certs, agents, args)?;
    let idle = proc::usage(bed.relay.pid())?;
    let sim_rss = proc::usage(bed.sim.pid())?.rss_kib;
    let mut costs = Vec::new();
    for q in [args.filter.as_str(), ""] {
        let (body, _) = get(
            &bed.client,
            &format!("http://{}/cost?{q}", bed.ready.control),
        )?;
        let c: Cost = serde_json::from_slice(&body).context("ftagents' /cost")?;
        costs.push((
            if q.is_empty() {
                "unfiltered".to_string()
            } else {
                q.to_string()
            },
            c,
        ));
    }
    let warm_url = format!("http://{}/v1/flows?{}", bed.api, args.filter);
    for _ in 0..args.warmup {
        get(&bed.client, &warm_url)?;
    }
    let mut phases = vec![bed.phase(
        &format!("flows?{}", args.filter),
        &Query::Flows(&args.filter),
        args.rounds,
    )?];
    phases.push(bed.phase("nodes", &Query::Nodes, args.rounds)?);
    if args.unfiltered_rounds > 0 {
        phases.push(bed.phase(
            "flows (unfiltered)",
            &Query::Flows(""),
            args.unfiltered_rounds,
        )?);
    }
    let end = proc::usage(bed.relay.pid())?;
    let refused = bed.sim_stats(false)?.refused;
    bed.sim.check_alive()?;
    bed.relay.check_alive()?;
    Ok(Point {
        agents,
        flows_held: bed.ready.flows_held,
        sim_build_s: bed.ready.build_s,
        sim_rss_kib: sim_rss,
        relay_rss_idle_kib: idle.rss_kib,
        relay_hwm_kib: end.hwm_kib,
        phases,
        refused,
        costs,
    })
}

/// Removes the bench's directory (certificates, relay logs) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(args: &RelayBenchArgs) -> Result<()> {
    if args.agents.is_empty() || args.agents.contains(&0) {
        bail!("--agents: give one or more agent counts, each at least 1");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    proc::install_interrupt_handler();
    let built = build::release_binaries()?;
    let bins = Bins {
        ftagents: built.ftagents,
        flowtrace: args.relay_bin.clone().unwrap_or(built.flowtrace),
    };
    let dir =
        TempDir(std::env::temp_dir().join(format!("flowtrace-bench-relay-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let status = Command::new(&bins.flowtrace)
        .args(["certs", "--out", build::path_str(&dir.0)?])
        .stdout(Stdio::null())
        .status()
        .context("running flowtrace certs")?;
    if !status.success() {
        bail!(
            "flowtrace certs --out {} failed ({status})",
            dir.0.display()
        );
    }
    let mut points = Vec::new();
    for &n in &args.agents {
        match run_point(&bins, &dir.0, n, args) {
            Ok(p) => points.push(p),
            Err(e) => {
                let log = std::fs::read_to_string(dir.0.join(format!("relay-{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("xtask: the relay's last log lines:");
                for l in tail.iter().rev() {
                    eprintln!("  {l}");
                }
                return Err(e.context(format!("the scale point of {n} agents")));
            }
        }
    }
    println!("{}", report(args, &points));
    Ok(())
}

fn report(args: &RelayBenchArgs, points: &[Point]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (cpus, model) = proc::cpus();
    let _ = writeln!(
        out,
        "\n  relay bench: {} flows per simulated agent, filter `{}`, {} rounds after {} warm-up, agent timeout {} ms",
        args.flows, args.filter, args.rounds, args.warmup, args.agent_timeout_ms
    );
    let _ = writeln!(
        out,
        "  machine: {cpus} CPUs ({model}), Linux {}; the relay, every simulated agent and this client share them, all on loopback",
        proc::kernel_release()
    );
    for p in points {
        let _ = writeln!(
            out,
            "\n  {} agents: {} flows held ({:.1} s to build), simulated agents' RSS {:.0} MiB; relay RSS idle {:.1} MiB, VmHWM at the end {:.1} MiB; TLS refusals {}",
            p.agents,
            p.flows_held,
            p.sim_build_s,
            mib(p.sim_rss_kib),
            mib(p.relay_rss_idle_kib),
            mib(p.relay_hwm_kib),
            p.refused
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>8} {:>8} {:>8} {:>9} {:>7} {:>4} | {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>9} | {:>9} {:>9}",
            "query", "p50", "p99", "max", "answer", "flows", "miss",
            "relayCPU", "RSS peak", "RSS end",
            "agent50", "agent99", "hist avg", "sim avg",
            "sim p99", "simCPU/q"
        );
        for ph in &p.phases {
            let sim = ph.sim.as_ref();
            let sim_s = sim.map(|s| s.server_s.clone()).unwrap_or_default();
            let sim_bytes = sim.map_or(0.0, |s| {
                mean(&s.bytes.iter().map(|b| *b as f64).collect::<Vec<_>>())
            });
            let r = ph.rounds.max(1) as f64;
            let _ = writeln!(
                out,
                "  {:<22} {:>6.0}ms {:>6.0}ms {:>6.0}ms {:>7.2}MB {:>7.0} {:>4} | {:>7.0}ms {:>7.1}Mi {:>7.1}Mi | {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>7.2}ms | {:>7.2}ms {:>7.0}ms",
                ph.name,
                quantile(&ph.times, 0.5) * 1e3,
                quantile(&ph.times, 0.99) * 1e3,
                quantile(&ph.times, 1.0) * 1e3,
                mean(&ph.bytes.iter().map(|b| *b as f64).collect::<Vec<_>>()) / 1e6,
                mean(&ph.flows.iter().map(|f| *f as f64).collect::<Vec<_>>()),
                ph.missing,
                ph.relay_cpu_s / r * 1e3,
                mib(ph.rss_peak_kib),
                mib(ph.rss_end_kib),
                quantile(&ph.per_agent, 0.5) * 1e3,
                quantile(&ph.per_agent, 0.99) * 1e3,
                if ph.relay_hist.0 > 0.0 { ph.relay_hist.1 / ph.relay_hist.0 * 1e3 } else { 0.0 },
                mean(&sim_s) * 1e3,
                quantile(&sim_s, 0.99) * 1e3,
                ph.sim_cpu_s / r * 1e3,
            );
            let _ = writeln!(
                out,
                "  {:<22} {} agent requests served, {:.1} kB per agent answer, {:.1} ms of agent handler time per query in all",
                "",
                sim_s.len(),
                sim_bytes / 1e3,
                sim_s.iter().sum::<f64>() / r * 1e3,
            );
        }
    }
    for p in points {
        for (q, c) in &p.costs {
            let _ = writeln!(
                out,
                "  one agent's answer ({q}), timed alone in ftagents: {:.0} kB; agent filter+limit+encode {:.1} ms; relay decode {:.1} ms, re-encode with its node {:.1} ms ({:.0} kB); x {} agents: decode {:.0} ms, encode {:.0} ms of CPU",
                c.answer_bytes as f64 / 1e3,
                c.agent_encode_s * 1e3,
                c.relay_decode_s * 1e3,
                c.relay_reencode_s * 1e3,
                c.reencoded_bytes as f64 / 1e3,
                p.agents,
                c.relay_decode_s * p.agents as f64 * 1e3,
                c.agent_encode_s * p.agents as f64 * 1e3,
            );
        }
    }
    let _ = writeln!(
        out,
        "\n  columns: p50/p99/max: answer time at the client (request to last byte); answer: body size; flows: flows in the answer;\n  miss: nodes missing summed over rounds; relayCPU: relay utime+stime per query; RSS peak: relay VmRSS polled every 10 ms in the phase;\n  agent50/agent99: per-agent time as the relay reports it (nodes[].elapsed_ms: request, transfer, decode; /v1/nodes: none, see hist avg);\n  hist avg: mean of the relay's flowtrace_relay_agent_request_seconds over the phase; sim avg/p99: the simulated agents' handler time\n  per request (filter, limit, JSON encode); simCPU/q: the simulated agents' process CPU per query (all agents, TLS included)."
    );
    if let Some(big) = points.iter().max_by_key(|p| p.agents) {
        if let Some(f) = big.phases.first() {
            let p99 = quantile(&f.times, 0.99);
            let rss = mib(big.relay_hwm_kib.max(f.rss_peak_kib));
            let rss_filtered = mib(f.rss_peak_kib);
            let _ = writeln!(
                out,
                "\n  goal at {} agents x {} flows: filtered p99 {:.0} ms vs {:.0} ms: {}; relay RSS peak in the filtered phase {:.1} MiB (VmHWM over the whole run, unfiltered included: {:.1} MiB) vs {:.0} MiB: {}",
                big.agents,
                args.flows,
                p99 * 1e3,
                GOAL_P99_S * 1e3,
                if p99 < GOAL_P99_S { "met" } else { "NOT met" },
                rss_filtered,
                rss,
                GOAL_RSS_MIB,
                if rss_filtered < GOAL_RSS_MIB { "met" } else { "NOT met" },
            );
        }
    }
    let _ = writeln!(
        out,
        "  caveat: 2 shared CPUs: the simulated agents' CPU (simCPU/q) competes with the relay's; on a cluster it is spent on the nodes.\n  not measured: network latency/bandwidth between nodes, the real agents' drain/snapshot/naming cost per request."
    );
    out
}
