//! `cargo xtask map-memory`: the kernel maps' memory for several numbers of possible CPUs,
//! computed from their definitions (`flowtrace::kernel::memory`) with the sizes the agent
//! picks for each (the flow cache is sized from the CPU count), against the goal of issue 16
//! (at most 32 MiB at 256 CPUs with defaults). With root, the object is also loaded here and
//! each map's `memlock` as the kernel reports it (/proc/self/fdinfo) is printed beside the
//! computed figure for this machine's CPU count: the check that the formula is the kernel's.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use flowtrace::kernel::{attach, memory};
use flowtrace_common::{cache_slots_for, drops::DEFAULT_DROP_ENTRIES, DEFAULT_EVENT_RING_BYTES};

/// The goal: kernel maps at most this many bytes at 256 possible CPUs with defaults.
const GOAL_BYTES_AT_256: u64 = 32 * 1024 * 1024;

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The kernel maps' bytes with defaults at `cpus` possible CPUs, from their definitions.
pub fn default_total_bytes(cpus: u32) -> u64 {
    let specs = memory::specs(
        cache_slots_for(cpus),
        DEFAULT_EVENT_RING_BYTES,
        DEFAULT_DROP_ENTRIES,
    );
    memory::total(&specs, u64::from(cpus))
}

pub fn run(cpus: &[u32]) -> Result<()> {
    println!(
        "kernel map memory with defaults (event ring {} MiB, {} drop entries per buffer)",
        DEFAULT_EVENT_RING_BYTES >> 20,
        DEFAULT_DROP_ENTRIES
    );
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>10}  largest maps",
        "CPUs", "cache slots", "total MiB", "per-CPU", "shared"
    );
    for &n in cpus {
        let specs = memory::specs(
            cache_slots_for(n),
            DEFAULT_EVENT_RING_BYTES,
            DEFAULT_DROP_ENTRIES,
        );
        let total = memory::total(&specs, u64::from(n));
        let shared = memory::total(&specs, 0);
        let mut by_size: Vec<_> = specs
            .iter()
            .map(|s| (s.bytes(u64::from(n)), s.name))
            .collect();
        by_size.sort_by(|a, b| b.cmp(a));
        let largest: Vec<String> = by_size
            .iter()
            .take(3)
            .map(|(b, name)| format!("{name} {:.2}", mib(*b)))
            .collect();
        println!(
            "{n:>6} {:>12} {:>10.2} {:>10.2} {:>10.2}  {}",
            cache_slots_for(n),
            mib(total),
            mib(total - shared),
            mib(shared),
            largest.join(", ")
        );
    }
    let at256 = default_total_bytes(256);
    println!(
        "goal: <= {:.0} MiB at 256 CPUs: {:.2} MiB, {}",
        mib(GOAL_BYTES_AT_256),
        mib(at256),
        if at256 <= GOAL_BYTES_AT_256 {
            "met"
        } else {
            "NOT met"
        }
    );
    if nix_is_root() {
        measured()?;
    } else {
        println!("(not root: the kernel's own figures for this machine are not read)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Loads the object as the agent does and prints the kernel's `memlock` of each map beside
/// the computed bytes, for this machine.
fn measured() -> Result<()> {
    let ring_mib = DEFAULT_EVENT_RING_BYTES >> 20;
    let sizes = attach::buffer_sizes(ring_mib).context("sizing the buffers")?;
    let ebpf = attach::load(&sizes, DEFAULT_DROP_ENTRIES)
        .context("loading flowtrace's object (root, CAP_BPF)")?;
    let specs = memory::specs(sizes.cache_slots, sizes.ring_bytes, DEFAULT_DROP_ENTRIES);
    let cpus = u64::from(sizes.cpus);
    println!("this machine: {cpus} possible CPUs; kernel memlock (fdinfo) against the formula");
    let (mut kernel_total, mut computed_total) = (0u64, 0u64);
    for (name, map) in ebpf.maps() {
        let fd = map_fd(map)?;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .with_context(|| format!("reading fdinfo of map {name}"))?;
        let memlock: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no memlock line in fdinfo of map {name}"))?;
        let computed = specs.iter().find(|s| s.name == name).map(|s| s.bytes(cpus));
        if let Some(c) = computed {
            kernel_total += memlock;
            computed_total += c;
        }
        println!(
            "  {name:<14} kernel {memlock:>10}  computed {}",
            computed.map_or("-".into(), |c| c.to_string())
        );
    }
    println!(
        "  total          kernel {kernel_total:>10}  computed {computed_total} ({:+.1}%)",
        (computed_total as f64 / kernel_total.max(1) as f64 - 1.0) * 100.0
    );
    Ok(())
}

fn map_fd(map: &aya::maps::Map) -> Result<i32> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::RingBuf(d)
        | Map::ProgramArray(d) => d,
        other => anyhow::bail!("unexpected map type {other:?}"),
    };
    Ok(data.fd().as_fd().as_raw_fd())
}
