//! `cargo xtask bench-agent`: what the agent itself costs a node, the figures behind the
//! DaemonSet's resource requests and limits (deploy/daemonset.yaml).
//!
//! One agent, with the shipped defaults, runs on node1 of the emulated cluster and follows a
//! fixture API server (a real HTTP server speaking the API's list/watch protocol) that holds the
//! emulated pods plus `--pods` synthetic ones, so its metadata cache has a real cluster's size.
//! `/metrics` is scraped every second throughout, as an aggressive Prometheus would. Phases:
//!
//! 1. idle: synced, no traffic;
//! 2. bulk: one iperf3 TCP stream node1/pod-a -> node2/pod-a (a high packet rate, few flows);
//! 3. churn: `--flows` new UDP flows node1/pod-a -> node1/pod-c at `--flow-rate`, more than
//!    the flow table's default cap (100 000), so the table fills and evicts (its worst-case
//!    memory). RSS peak is VmHWM, the process's peak since it started.
//!
//! Per phase: the agent's CPU (utime + stime from /proc, in millicores of wall time), its
//! resident memory (VmRSS at the end, VmHWM the peak), and the kernel memory of its BPF maps
//! (`memlock` of every map fd it holds, /proc/<pid>/fdinfo; charged to its cgroup since Linux
//! 5.11), with the maps' memory at 16 / 64 / 256 possible CPUs computed from their
//! definitions with defaults beside it (the flow cache shrinks per CPU as CPUs grow).
//! Baselines from the same run: the CPU of the traffic itself (iperf3's own
//! `cpu_utilization_percent`; the churn senders' rusage), and the DaemonSet's requests and limits
//! read from the manifest.

use std::{
    fmt::Write as _,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use flowtrace_tests::iperf::{iperf_client, IperfServer};
use flowtrace_tests::{apiserver, http_get, Agent, ApiServer, Cluster, ClusterOptions, Pod};
use serde_json::{json, Value};

use crate::proc;

const IPERF_PORT: u16 = 5211;
const CHURN_PORT: u16 = 7500;
/// Sockets (flows) per churn sender process; under the default 1024 open-file limit.
const SOCKETS_PER_SENDER: u64 = 500;
/// Source addresses the churn senders take turns with.
const CHURN_SOURCES: usize = 32;

#[derive(clap::Args)]
pub struct AgentBenchArgs {
    /// Synthetic pods in the fixture API server, besides the emulated ones.
    #[arg(long, default_value_t = 5_000)]
    pods: usize,
    /// Length of the idle and bulk phases, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// New UDP flows in the churn phase.
    #[arg(long, default_value_t = 120_000)]
    flows: u64,
    /// New flows per second in the churn phase (0: as fast as the senders go). The default
    /// stays under what the default kernel buffer holds between two drains (16 384 entries
    /// per second, two hops per flow here), so the table fills without kernel losses.
    #[arg(long, default_value_t = 5_000)]
    flow_rate: u64,
}

/// The agent process as /proc shows it at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// utime + stime, seconds.
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
    /// Kernel memory of the BPF maps the process holds.
    maps_kib: u64,
}

fn sample(pid: u32) -> Result<Sample> {
    let u = proc::usage(pid).context("sampling the agent")?;
    Ok(Sample {
        at: Instant::now(),
        cpu_s: u.cpu_s,
        rss_kib: u.rss_kib,
        hwm_kib: u.hwm_kib,
        maps_kib: map_memory(pid)?,
    })
}

/// Kernel memory of the distinct BPF maps whose fds `pid` holds: `memlock` summed, in KiB.
pub(crate) fn map_memory(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut seen = std::collections::BTreeSet::new();
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue; // an fd closed meanwhile
        };
        let field = |key: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            if seen.insert(id) {
                bytes += memlock;
            }
        }
    }
    Ok(bytes / 1024)
}

/// Scrapes the agent's /metrics every second until `stop`; returns (scrapes, largest body).
fn scraper(netns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, usize)> {
    std::thread::spawn(move || {
        let (mut n, mut largest) = (0u64, 0usize);
        while !stop.load(Ordering::Relaxed) {
            if let Ok((200, body)) = http_get(&netns, "/metrics") {
                n += 1;
                largest = largest.max(body.len());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        (n, largest)
    })
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    traffic: String,
    /// Agent CPU over the phase, millicores.
    agent_mcpu: f64,
    /// The traffic's own CPU over the phase, millicores (the baseline), if measured.
    traffic_mcpu: Option<f64>,
    end: Sample,
    flows: u64,
}

fn phase(name: &'static str, a: &Sample, b: &Sample, traffic: String) -> Phase {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    Phase {
        name,
        traffic,
        agent_mcpu: (b.cpu_s - a.cpu_s) / wall * 1000.0,
        traffic_mcpu: None,
        end: *b,
        flows: 0,
    }
}

/// `len` synthetic running pods: 50 per (made-up) node, Deployments of 10, 20 namespaces.
fn synthetic_pods(len: usize) -> Vec<Value> {
    (0..len)
        .map(|i| {
            let (ns, deploy) = (format!("team-{}", i % 20), format!("app-{}", i / 10));
            let ip = format!(
                "10.{}.{}.{}",
                100 + i / 65_000,
                (i / 250) % 256,
                2 + i % 250
            );
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": ns, "name": format!("{deploy}-{i:06}"),
                    "labels": {"app": deploy, "pod-template-hash": "6b7c8d"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": format!("{deploy}-6b7c8d"), "uid": format!("uid-rs-{deploy}"),
                        "controller": true}]},
                "spec": {"nodeName": format!("worker-{}", i / 50),
                    "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            })
        })
        .collect()
}

/// CPU seconds of this process's reaped children (user + system).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// The agent container's requests and limits as deploy/daemonset.yaml writes them.
fn daemonset_resources() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not a DaemonSet", path.display()))?;
    let res = ds
        .spec
        .template
        .spec
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.resources)
        .context("deploy/daemonset.yaml: the agent container has no resources")?;
    let show = |m: Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >|
     -> String {
        m.unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k} {}", v.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "requests {}; limits {}",
        show(res.requests),
        show(res.limits)
    ))
}

pub fn run(args: &AgentBenchArgs) -> Result<()> {
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    for tool in ["iperf3", "ip"] {
        proc::require_tool(tool)?;
    }
    let (ncpu, cpu_model) = proc::cpus();
    let mut report = String::new();
    let _ = writeln!(report, "flowtrace bench-agent");
    let _ = writeln!(report, "  kernel   Linux {}", proc::kernel_release());
    let _ = writeln!(report, "  cpus     {ncpu} x {cpu_model}");
    let _ = writeln!(
        report,
        "  command  cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    eprint!("{report}");

    crate::build::release_binaries()?;
    eprintln!("xtask: bringing the emulated cluster up");
    let cluster = Cluster::up(&ClusterOptions::default())
        .context("bringing the emulated cluster up (needs root; see scripts/setup.sh)")?;
    let node1 = cluster.node(1)?;
    let mut objects = apiserver::cluster_objects(&cluster);
    objects.extend(synthetic_pods(args.pods));
    let netns: Vec<&str> = cluster.nodes.iter().map(|n| n.netns.as_str()).collect();
    let api = ApiServer::start_in(&netns, objects).context("starting the fixture API server")?;
    let kubeconfig = crate::build::path_str(api.kubeconfig())?.to_string();
    // The shipped defaults (drain every second, workload level, 2000 series, 100 000 flows)
    // but for the interface the emulation uses as the node's NIC.
    let mut agent = Agent::start(
        &node1.netns,
        &["--kubeconfig", &kubeconfig, "--drain-interval-ms", "1000"],
    )
    .context("starting the agent on node1")?;
    let pid = agent.pid().context("the agent has no pid")?;
    let meta: Value = agent.get("/v1/metadata")?;
    let _ = writeln!(
        report,
        "  agent    node1, defaults; metadata: {} pods, {} nodes (fixture API server)",
        meta["objects"]["pods"], meta["objects"]["nodes"]
    );
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = scraper(node1.netns.clone(), stop.clone());
    let mut phases = Vec::new();

    // 1. idle
    eprintln!("xtask: idle, {} s", args.seconds);
    let s0 = sample(pid)?;
    std::thread::sleep(Duration::from_secs(args.seconds));
    let s1 = sample(pid)?;
    phases.push(phase("idle", &s0, &s1, "none".into()));

    // 2. bulk
    eprintln!("xtask: bulk, iperf3 {} s", args.seconds);
    let (client, server) = (cluster.pod(1, "pod-a")?, cluster.pod(2, "pod-a")?);
    let _server = IperfServer::start(server, IPERF_PORT, Duration::from_secs(10))?;
    let pkts = |pod: &Pod| -> Result<u64> {
        let out = pod.exec(&["cat", "/sys/class/net/eth0/statistics/tx_packets"])?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("reading pod-a's eth0 tx_packets")
    };
    let p0 = pkts(client)?;
    let s2 = sample(pid)?;
    let run = iperf_client(client, server.ipv4.into(), IPERF_PORT, args.seconds, None)?;
    let (gbps, iperf_mcpu) = (run.gbps, run.cpu_mcpu);
    let s3 = sample(pid)?;
    let pps = (pkts(client)? - p0) as f64 / s3.at.duration_since(s2.at).as_secs_f64();
    let mut bulk = phase(
        "bulk",
        &s2,
        &s3,
        format!(
            "{gbps:.2} Gbit/s, {pps:.0} packets/s sent by the client (its eth0, GSO aggregates)"
        ),
    );
    bulk.traffic_mcpu = Some(iperf_mcpu);
    phases.push(bulk);

    // 3. churn
    eprintln!("xtask: churn, {} new UDP flows", args.flows);
    let dst = cluster.pod(1, "pod-c")?;
    let _sink = dst.spawn_guarded(&[
        flowtrace_tests::ftgen_bin()?.display().to_string().as_str(),
        "udp-sink",
        "--bind",
        &format!("0.0.0.0:{CHURN_PORT}"),
        "--count",
        "100000000",
        "--timeout-ms",
        "3600000",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let to = format!("{}:{CHURN_PORT}", dst.ipv4);
    // One address has ~28 000 ephemeral ports, and a new socket may get a port an earlier
    // sender had (the same flow again), so the senders take turns over CHURN_SOURCES extra
    // addresses of pod-a and the distinct (address, port) pairs are counted.
    let sources: Vec<String> = (0..CHURN_SOURCES)
        .map(|i| format!("10.244.1.{}", 200 + i))
        .collect();
    for ip in &sources {
        client.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    }
    let c0 = children_cpu_s();
    let s4 = sample(pid)?;
    let mut distinct = std::collections::HashSet::new();
    let mut turn = 0usize;
    if args.flows > CHURN_SOURCES as u64 * 25_000 {
        bail!(
            "--flows {} is more than {CHURN_SOURCES} source addresses can open (~25 000 ports each)",
            args.flows
        );
    }
    while (distinct.len() as u64) < args.flows {
        proc::check_interrupted()?;
        let n = SOCKETS_PER_SENDER.to_string();
        let out = flowtrace_tests::ftgen(
            client,
            &[
                "udp-send",
                "--to",
                &to,
                "--bind",
                &sources[turn % sources.len()],
                "--count",
                &n,
                "--sockets",
                &n,
                "--size",
                "64",
            ],
        )?;
        let before = distinct.len();
        for port in out["local_ports"].as_array().into_iter().flatten() {
            if let Some(port) = port.as_u64() {
                distinct.insert((turn % sources.len(), port));
            }
        }
        if distinct.len() == before {
            bail!("a churn sender opened no new flow (ftgen printed {out})");
        }
        turn += 1;
        if args.flow_rate > 0 {
            // Pace: the next sender starts when the flows so far are due.
            let due =
                s4.at + Duration::from_secs_f64(distinct.len() as f64 / args.flow_rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let sent = distinct.len();
    let s5 = sample(pid)?;
    let secs = s5.at.duration_since(s4.at).as_secs_f64();
    let senders_mcpu = (children_cpu_s() - c0) / secs * 1000.0;
    // Two drains more, so the last flows are in the table; memory is read after them.
    std::thread::sleep(Duration::from_secs(2));
    let mut churn = phase(
        "churn",
        &s4,
        &s5,
        format!(
            "{sent} distinct new flows in {secs:.1} s ({:.0} flows/s)",
            sent as f64 / secs
        ),
    );
    churn.traffic_mcpu = Some(senders_mcpu);
    churn.end = sample(pid)?;
    let stats: Value = agent.get("/v1/stats")?;
    churn.flows = stats["flows"].as_u64().unwrap_or(0);
    let evicted = stats["flows_evicted"].as_u64().unwrap_or(0);
    let lost_full = stats["kernel"]["flow_map_full"].as_u64().unwrap_or(0);
    churn.traffic += &format!("; flow table evictions {evicted}, kernel flow map full {lost_full}");
    phases.push(churn);

    stop.store(true, Ordering::Relaxed);
    let (n_scrapes, largest) = scrapes.join().unwrap_or((0, 0));
    if agent.has_exited() {
        bail!(
            "the agent exited during the benchmark:\n{}",
            agent.log_text()
        );
    }
    agent.stop()?;

    let _ = writeln!(
        report,
        "\n  phase  agent CPU   traffic CPU (baseline)  agent/traffic  RSS end  RSS peak  BPF maps  flows  traffic"
    );
    for p in &phases {
        let (base, ratio) = match p.traffic_mcpu {
            Some(t) => (format!("{t:7.0} m"), format!("{:.3}", p.agent_mcpu / t)),
            None => ("      -  ".into(), "-".into()),
        };
        let _ = writeln!(
            report,
            "  {:<5}  {:7.1} m   {base:<22}  {ratio:<13}  {:4.1} MiB  {:5.1} MiB  {:5.1} MiB  {:>6}  {}",
            p.name,
            p.agent_mcpu,
            p.end.rss_kib as f64 / 1024.0,
            p.end.hwm_kib as f64 / 1024.0,
            p.end.maps_kib as f64 / 1024.0,
            if p.flows > 0 { p.flows.to_string() } else { "-".into() },
            p.traffic
        );
    }
    let peak = phases.iter().map(|p| p.end.hwm_kib).max().unwrap_or(0);
    let maps = phases.iter().map(|p| p.end.maps_kib).max().unwrap_or(0);
    let _ = writeln!(
        report,
        "\n  peak agent memory: {:.1} MiB resident + {:.1} MiB of BPF maps = {:.1} MiB (both charged to the container's memory cgroup)",
        peak as f64 / 1024.0,
        maps as f64 / 1024.0,
        (peak + maps) as f64 / 1024.0
    );
    let at = |cpus: u32| crate::mapmem::default_total_bytes(cpus) as f64 / (1024.0 * 1024.0);
    let _ = writeln!(
        report,
        "  BPF maps with defaults at 16 / 64 / 256 possible CPUs (computed from the maps' definitions, as `cargo xtask map-memory`): {:.1} / {:.1} / {:.1} MiB",
        at(16),
        at(64),
        at(256)
    );
    let _ = writeln!(
        report,
        "  /metrics scraped {n_scrapes} times (every second), largest body {largest} bytes"
    );
    let _ = writeln!(
        report,
        "  deploy/daemonset.yaml resources: {}",
        daemonset_resources()?
    );
    let _ = writeln!(
        report,
        "  (the TC programs' own run time is charged to the packets' senders and receivers, not to the agent: `cargo xtask bench` measures it)"
    );
    drop(api);
    cluster.down()?;
    println!("{report}");
    Ok(())
}
