//! `cargo xtask bench-latency`: what latency tracking costs per program run, measured on ONE
//! agent whose sampling is switched on and off in short windows of one iperf3 run (issue 16).
//!
//! `cargo xtask bench` compares latency on and off as two arms (two agents, one after the
//! other, each with its own iperf3 run): on this shared machine two runs a minute apart differ
//! by 20-30% in their own right, more than the 15% the goal allows, so its on/off ratio moves
//! by ±0.2-0.3 from one bench to the next. Here the same programs stay on the same hooks under
//! the same TCP stream or UDP flood for the whole measurement, and only
//! `CONTROL[CONTROL_LATENCY_SAMPLE]` changes (written with bpftool, as the agent writes it at
//! start): `--windows` windows of `--window-ms`, on and off in the order on, off, off, on (so a
//! drift in the machine's speed weighs on both alike), the kernel's run_time_ns / run_cnt of the
//! agent's `sched_cls` programs read at each window's start and end. A `bench_noop` is attached
//! behind the agent on every hook for the whole run, its own run_time / run_cnt read with the
//! agent's: each window's net figure is the agent's ns per run less the noop's in that same
//! window (the floor every program run pays, bpf_stats included). The noop is the same in both
//! kinds of window, so it weighs on neither.
//!
//! Reported per shape and traffic: the net ns per run with latency on (the agent's default
//! sampling) and off, median and min-max over the windows; the ratio of each pair of
//! neighbouring windows (on / off), median and min-max; the ratio of the medians. Goal: on/off
//! <= 1.15.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowtrace_common::{
    latency_control, latency_rate, latency_window_shift, maps, window_shift_for_ms,
    CONTROL_LATENCY_SAMPLE, DEFAULT_LATENCY_PER_FLOW_MS, LATENCY_RATE_BITS,
};
use flowtrace_tests::iperf::IperfJob;
use serde_json::{json, Value};

use crate::bench::{
    arm_programs, attach, counters, fmt_num, fmt_spread, reporter, sleep_interruptible, spread,
    wait_gone, Arm, Bed, LoadArgs, Runs, Shape, Traffic, GOAL_LATENCY_ON_TO_OFF, IPERF_PORT,
};
use crate::proc;

/// The agent's default latency sampling (`flowtrace --latency-sample`), what "on" means here.
const DEFAULT_SAMPLE: u32 = 64;

/// Arguments of `cargo xtask bench-latency`.
#[derive(clap::Args)]
pub struct LatencyBenchArgs {
    /// Shapes to measure (as `cargo xtask bench`).
    #[arg(long, value_delimiter = ',', default_values = ["veth", "cluster"])]
    shapes: Vec<Shape>,
    /// Traffic (as `cargo xtask bench`).
    #[arg(long, value_delimiter = ',', default_values = ["tcp", "udp"])]
    traffic: Vec<Traffic>,
    /// Windows per shape and traffic, half with latency on (a multiple of 4: on, off, off, on).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(4..=400))]
    windows: u32,
    /// Length of one window.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    window_ms: u64,
    /// Seconds of traffic before the first window.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// Sampling rate of the "on" windows (a power of two). Without it and --per-flow-ms,
    /// "on" is what the agent itself wrote at start (its defaults, also for --binary).
    #[arg(long)]
    sample: Option<u32>,
    /// Per-flow window of the "on" windows, in milliseconds (`flowtrace
    /// --latency-per-flow-ms`: at most one sampled packet per flow and hook in each; 0 = every
    /// sampled packet). Given alone, the rate is 64.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=600_000))]
    per_flow_ms: Option<u32>,
    #[command(flatten)]
    load: LoadArgs,
    /// Another build's `flowtrace` binary to measure instead of this tree's (e.g. the build
    /// before a change, copied aside before rebuilding), with its defaults.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Print the results as JSON on stdout (the human report then goes to stderr).
    #[arg(long)]
    json: bool,
}

/// One window: the agent's and the noop's runs in it.
struct Window {
    on: bool,
    agent: Runs,
    noop: Runs,
}

impl Window {
    fn net(&self) -> f64 {
        self.agent.ns_per_run() - self.noop.ns_per_run()
    }
}

/// Whether window `w` has latency on: on, off, off, on, ...
fn window_on(w: u32) -> bool {
    matches!(w % 4, 0 | 3)
}

/// The ids of the CONTROL maps the programs `ids` use (one per agent).
fn control_maps(ids: &BTreeMap<u32, String>) -> Result<BTreeSet<u32>> {
    let mut maps_found = BTreeSet::new();
    for id in ids.keys() {
        let v = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        let map_ids: Vec<u32> = v
            .get("map_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .filter_map(|m| u32::try_from(m).ok())
                    .collect()
            })
            .unwrap_or_default();
        for m in map_ids {
            let mv = bpftool_json(&["map", "show", "id", &m.to_string()])?;
            if mv.get("name").and_then(Value::as_str) == Some(maps::CONTROL) {
                maps_found.insert(m);
            }
        }
    }
    if maps_found.is_empty() {
        bail!(
            "none of the agent's programs {:?} uses a map named {}: is this flowtrace's object?",
            ids.values().collect::<Vec<_>>(),
            maps::CONTROL
        );
    }
    Ok(maps_found)
}

/// The `CONTROL_LATENCY_SAMPLE` word the agent wrote at start (its own latency sampling).
fn agent_word(control: &BTreeSet<u32>) -> Result<u32> {
    let Some(m) = control.first() else {
        bail!("the agent has no CONTROL map");
    };
    let mut args = vec!["-j", "map", "lookup", "id"];
    let id = m.to_string();
    args.push(&id);
    args.push("key");
    let key: Vec<String> = CONTROL_LATENCY_SAMPLE
        .to_le_bytes()
        .iter()
        .map(u8::to_string)
        .collect();
    args.extend(key.iter().map(String::as_str));
    let v: Value = serde_json::from_slice(&bpftool(&args)?)
        .with_context(|| format!("reading bpftool's answer for CONTROL map {m}"))?;
    let word = match v.get("value") {
        // A map without BTF: the value's bytes as hex strings, little-endian.
        Some(Value::Array(bytes)) => {
            let mut b = [0u8; 4];
            for (slot, x) in b.iter_mut().zip(bytes) {
                let s = x.as_str().unwrap_or_default().trim_start_matches("0x");
                *slot = u8::from_str_radix(s, 16)
                    .with_context(|| format!("CONTROL map {m}: value byte {x} is not hex"))?;
            }
            u32::from_le_bytes(b)
        }
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("CONTROL map {m}: value {n} is not a u32"))?,
        other => bail!("CONTROL map {m}: no value in bpftool's answer ({other:?})"),
    };
    if latency_rate(word) == 0 {
        bail!("the agent runs with latency off (CONTROL word {word:#x}): nothing to switch on");
    }
    Ok(word)
}

/// Runs bpftool with `args`; its stdout, or an error with its stderr.
fn bpftool<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<Vec<u8>> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool {}", shown.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed ({}): {}",
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_slice(&bpftool(&all)?)
        .with_context(|| format!("bpftool -j {}: not JSON", args.join(" ")))
}

/// Writes `word` (`latency_control`'s) into slot `CONTROL_LATENCY_SAMPLE` of every map in
/// `control`.
fn set_rate(control: &BTreeSet<u32>, word: u32) -> Result<()> {
    let key: Vec<String> = CONTROL_LATENCY_SAMPLE
        .to_le_bytes()
        .iter()
        .map(u8::to_string)
        .collect();
    let value: Vec<String> = word.to_le_bytes().iter().map(u8::to_string).collect();
    for m in control {
        let mut args = vec![
            "map".to_string(),
            "update".into(),
            "id".into(),
            m.to_string(),
        ];
        args.push("key".into());
        args.extend(key.iter().cloned());
        args.push("value".into());
        args.extend(value.iter().cloned());
        bpftool(&args)?;
    }
    Ok(())
}

/// What the programs `of` ran between the readings `before` and `after`, summed.
fn sum(
    of: &BTreeMap<u32, String>,
    before: &BTreeMap<u32, Runs>,
    after: &BTreeMap<u32, Runs>,
) -> Runs {
    let mut total = Runs::default();
    for id in of.keys() {
        if let (Some(a), Some(b)) = (after.get(id), before.get(id)) {
            total.add(a.since(*b));
        }
    }
    total
}

/// The windows of one shape and traffic.
fn measure(bed: &Bed, traffic: Traffic, args: &LatencyBenchArgs) -> Result<Vec<Window>> {
    let (agents, _) = match &args.binary {
        Some(bin) => attach(Arm::Before, bed, None, Some(bin))?,
        None => attach(Arm::Flowtrace, bed, None, None)?,
    };
    let (noops, _) = attach(Arm::Noop, bed, None, None)?;
    let ids = arm_programs(&agents).and_then(|(a, _)| Ok((a, arm_programs(&noops)?.0)));
    let result = (|| {
        let (agent_ids, noop_ids) = ids.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        if agent_ids.is_empty() || noop_ids.is_empty() {
            bail!("the agent or the noop holds no sched_cls program after attaching");
        }
        let control = control_maps(agent_ids)?;
        let on_word = match (args.sample, args.per_flow_ms) {
            (None, None) => agent_word(&control)?,
            (sample, per_flow) => latency_control(
                sample.unwrap_or(DEFAULT_SAMPLE),
                window_shift_for_ms(per_flow.unwrap_or(DEFAULT_LATENCY_PER_FLOW_MS)),
            ),
        };
        eprintln!(
            "xtask: {} {}: latency on is 1 in {}, {}",
            bed.shape.name(),
            traffic.name(),
            latency_rate(on_word),
            match latency_window_shift(on_word) {
                0 => "no per-flow window".to_string(),
                s => format!(
                    "at most one per flow and hook per {:.1} ms",
                    (1u64 << s) as f64 / 1e6
                ),
            }
        );
        let total_s = args.warmup + (u64::from(args.windows) * args.window_ms).div_ceil(1000) + 2;
        let spec = args.load.spec(traffic, total_s, 0);
        let mut job = IperfJob::spawn(&bed.client_netns, bed.server_ip, IPERF_PORT, &spec)?;
        sleep_interruptible(Duration::from_secs(args.warmup))?;
        // One reading of both at each end of a window.
        let both: BTreeMap<u32, String> = agent_ids
            .iter()
            .chain(noop_ids)
            .map(|(id, name)| (*id, name.clone()))
            .collect();
        let mut windows = Vec::new();
        for w in 0..args.windows {
            let on = window_on(w);
            set_rate(&control, if on { on_word } else { 0 })?;
            if job.has_exited() {
                bail!("iperf3 ended before window {} of {}", w + 1, args.windows);
            }
            let start = counters(&both)?;
            let t0 = Instant::now();
            sleep_interruptible(Duration::from_millis(args.window_ms))?;
            let end = counters(&both)?;
            let win = Window {
                on,
                agent: sum(agent_ids, &start, &end),
                noop: sum(noop_ids, &start, &end),
            };
            if win.agent.count == 0 || win.noop.count == 0 {
                bail!(
                    "window {}: the agent's programs ran {} times, the noop's {}: the traffic \
                     does not cross the hooks, or kernel.bpf_stats_enabled is off",
                    w + 1,
                    win.agent.count,
                    win.noop.count
                );
            }
            eprintln!(
                "xtask: {} {} window {:>3} latency {:<3} {:>8.1} ns net ({:.0} runs/s)",
                bed.shape.name(),
                traffic.name(),
                w + 1,
                if on { "on" } else { "off" },
                win.net(),
                win.agent.count as f64 / t0.elapsed().as_secs_f64()
            );
            windows.push(win);
        }
        set_rate(&control, on_word)?;
        job.wait(Duration::from_secs(total_s + 30))
            .context("waiting for iperf3 to end")?;
        Ok(windows)
    })();
    let stop_noops = noops.stop();
    let stop_agents = agents.stop();
    if let Ok((agent_ids, noop_ids)) = &ids {
        wait_gone(agent_ids)?;
        wait_gone(noop_ids)?;
    }
    stop_noops?;
    stop_agents?;
    result
}

pub fn run(args: &LatencyBenchArgs) -> Result<()> {
    flowtrace_tests::require_root()?;
    proc::install_interrupt_handler();
    for tool in ["iperf3", "bpftool", "ss", "ip", "ping"] {
        proc::require_tool(tool)?;
    }
    if !args.windows.is_multiple_of(4) {
        bail!(
            "--windows {}: must be a multiple of 4 (on, off, off, on)",
            args.windows
        );
    }
    if let Some(s) = args.sample {
        if !s.is_power_of_two() || s >= 1 << LATENCY_RATE_BITS {
            bail!("--sample {s}: must be a power of two below 2^{LATENCY_RATE_BITS}");
        }
    }
    let json_mode = args.json;
    let out = reporter(json_mode);
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let (ncpu, cpu_model) = proc::cpus();
    out("flowtrace bench-latency: latency on/off on one agent, sampling switched in windows of one iperf3 run".into());
    out(format!("  kernel    Linux {}", proc::kernel_release()));
    out(format!("  cpus      {ncpu} x {cpu_model}"));
    out(format!("  command   {command}"));
    out(format!(
        "  windows   {} of {} ms after {} s of traffic, latency on ({}) / off as on, off, off, on; iperf3 -A {}",
        args.windows,
        args.window_ms,
        args.warmup,
        match (args.sample, args.per_flow_ms) {
            (None, None) => "the agent's own sampling".to_string(),
            (s, p) => format!(
                "1 in {}, --latency-per-flow-ms {}",
                s.unwrap_or(DEFAULT_SAMPLE),
                p.unwrap_or(DEFAULT_LATENCY_PER_FLOW_MS)
            ),
        },
        args.load.cpus
    ));
    if let Some(bin) = &args.binary {
        out(format!("  agent     {} (--binary)", bin.display()));
        std::fs::metadata(bin)
            .with_context(|| format!("--binary {}: cannot read it", bin.display()))?;
    }
    crate::build::release_binaries()?;
    let stats = proc::SysctlGuard::set("kernel.bpf_stats_enabled", "1")?;
    out(format!(
        "  measure   kernel.bpf_stats_enabled=1 (was {}); net = the agent's ns per run - the noop's behind it, same window",
        stats.old()
    ));
    let mut shapes = args.shapes.clone();
    shapes.dedup();
    let mut traffics = args.traffic.clone();
    traffics.dedup();
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for &shape in &shapes {
        eprintln!("xtask: bringing the {} shape up", shape.name());
        let bed = Bed::up(shape)?;
        out(format!("  {:<9} {}", shape.name(), bed.describe()));
        let mut failed = None;
        for &traffic in &traffics {
            match measure(&bed, traffic, args).with_context(|| {
                format!("{} traffic on the {} shape", traffic.name(), shape.name())
            }) {
                Ok(w) => rows.push((shape, traffic, w)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        bed.down()?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    out(format!(
        "\n  {:<8} {:<4} {:>24} {:>24} {:>24} {:>10} {:>6}",
        "shape", "load", "on: net ns/run", "off: net ns/run", "on/off per pair", "on/off", "goal"
    ));
    for (shape, traffic, windows) in &rows {
        let on: Vec<f64> = windows.iter().filter(|w| w.on).map(Window::net).collect();
        let off: Vec<f64> = windows.iter().filter(|w| !w.on).map(Window::net).collect();
        let pairs: Vec<f64> = windows
            .chunks(2)
            .filter_map(|p| match p {
                [a, b] if a.on != b.on => {
                    let (on, off) = if a.on { (a, b) } else { (b, a) };
                    Some(on.net() / off.net())
                }
                _ => None,
            })
            .collect();
        let (son, soff, spair) = (spread(&on), spread(&off), spread(&pairs));
        let of_medians = son.median / soff.median;
        let met = spair.median <= GOAL_LATENCY_ON_TO_OFF;
        out(format!(
            "  {:<8} {:<4} {:>24} {:>24} {:>24} {:>10} {:>6}",
            shape.name(),
            traffic.name(),
            fmt_spread(son, 1),
            fmt_spread(soff, 1),
            fmt_spread(spair, 3),
            fmt_num(of_medians, 3),
            if met { "met" } else { "NOT met" }
        ));
        json_rows.push(json!({
            "shape": shape.name(),
            "traffic": traffic.name(),
            "on_net_ns": son.json(),
            "off_net_ns": soff.json(),
            "on_off_per_pair": spair.json(),
            "on_off_of_medians": of_medians,
            "noop_ns": spread(&windows.iter().map(|w| w.noop.ns_per_run()).collect::<Vec<_>>()).json(),
            "goal": GOAL_LATENCY_ON_TO_OFF,
            "met": met,
        }));
    }
    out(format!(
        "\n  goal: latency on/off <= {GOAL_LATENCY_ON_TO_OFF} (the median of the pairs' ratios)"
    ));
    if json_mode {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"command": command, "rows": json_rows}))?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_alternate_on_off_off_on() {
        let got: Vec<bool> = (0..8).map(window_on).collect();
        assert_eq!(
            got,
            vec![true, false, false, true, true, false, false, true]
        );
    }

    #[test]
    fn pairs_are_neighbours_of_opposite_kinds() {
        // Every chunk of two windows holds one on and one off.
        for w in (0..40).step_by(2) {
            assert_ne!(window_on(w), window_on(w + 1));
        }
    }
}
