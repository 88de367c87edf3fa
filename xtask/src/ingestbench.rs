//! `cargo run --release -p xtask -- bench-ingest`: what the agent does with the kernel's flow
//! records, for a drain of N records (default 1 000 000), in process, no root. The records
//! are built as the event ring carries them (`CacheSlot`, `kind = EVENT_FLOW`): distinct
//! tuples between the pods of a synthetic cluster (`bench-metadata`'s, 5 000 pods by
//! default), each seen at `--hops` hooks. Timed, each over `--rounds` rounds:
//!
//! - fold: the records summed per (tuple, hook) where the fold's index of recent keys finds
//!   them, as `EventRing::pump` and `Drainer::drain` do (`kernel::drain::fold_records`, the
//!   same code), with room for as many as the agent gives a sustained burst (the last
//!   period's count). Every record here is a distinct tuple and hook, so none is summed:
//!   the flood's case, not that of busy flows coming back;
//! - tables: what the agent's drain does with them next, in its order: the flow table makes
//!   room, merges, names both ends and expires (capped at `--max-flows`, the agent's
//!   default), the NAT table takes in the drain's rewrites, then the metrics count the
//!   traffic by workload pair, Service and hook.
//!
//! `--services` of the tuples (10% by default) are connections to a Service: the first hook
//! sees the client's packet to the Service's cluster IP, port 80, the others the packet
//! DNATed to the pod behind it, port 8080, and the drain carries that rewrite, which the NAT
//! table takes in (so the namer's NAT lookups find a table of that size, and these tuples are
//! named by Service).
//!
//! The kernel's side (the programs writing the ring, the cache read) is not in these figures:
//! `bench-flood` runs the whole path. Memory is the heap at the drain's peak, counted by
//! `bench-metadata`'s allocator.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::Result;
use flowtrace::{
    enrich::Namer,
    kernel::drain::{fold_records, DrainedNat},
    metrics::{DrainView, Level, Metrics, MetricsConfig},
    state::{flows::FlowTable, nat::NatTable},
    util::monotonic_ns,
};
use flowtrace_common::{CacheSlot, FlowKey, FlowStats, NatRecord, Tuple, EVENT_FLOW};

use crate::metabench::{
    live, peak, pod_ip, reset_peak, service_ip, synthetic_cache, PODS_PER_DEPLOYMENT,
};

/// The goal for a drain of 1M entries.
const GOAL_MS_PER_MILLION: f64 = 150.0;

#[derive(clap::Args)]
pub struct IngestBenchArgs {
    /// Flow records in the drain.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Hooks each tuple is seen at (records per tuple).
    #[arg(long, default_value_t = 2)]
    hops: usize,
    /// Distinct tuples (default: records / hops, every record a new tuple and hook). Fewer
    /// makes the records pass over the tuples again and again, as busy flows that keep losing
    /// their cache slots do.
    #[arg(long)]
    tuples: Option<usize>,
    /// Percent of the tuples that are connections to a Service's cluster IP, DNATed to the
    /// pod behind it between their first and second hook (none with `--hops 1`). The share
    /// printed is the one reached: the tuples of each pod pair are picked by number.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    services: u64,
    /// Pods of the synthetic cluster the tuples run between.
    #[arg(long, default_value_t = 5_000)]
    pods: usize,
    /// The flow table's cap (the agent's --max-flows).
    #[arg(long, default_value_t = 100_000)]
    max_flows: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// An IPv4 address as the kernel stores it.
fn kernel_addr(ip: Ipv4Addr) -> [u32; 4] {
    let mut a = [0u32; 4];
    a[0] = u32::from_ne_bytes(ip.octets());
    a
}

/// Tuple `t` as seen at hook `h` (see the module's header): between two pods, or from a pod
/// to a Service's cluster IP before the DNAT (hook 0) and to the pod behind it after.
fn tuple(t: usize, h: usize, pods: usize, services: usize) -> Tuple {
    let backend = (t * 7 + 1) % pods;
    let (dst, dst_port) = if h == 0 && via_service(t, pods, services) {
        (service_ip(backend / PODS_PER_DEPLOYMENT), 80)
    } else {
        (pod_ip(backend), 8080)
    };
    Tuple {
        src_addr: kernel_addr(pod_ip(t % pods)),
        dst_addr: kernel_addr(dst),
        src_port: (1024 + (t / pods) % 64_000) as u16,
        dst_port,
        ip_version: 4,
        protocol: 6,
        _pad: 0,
    }
}

/// Whether tuple `t` is a connection to a Service (`services` percent of them, evenly over
/// the pod pairs).
fn via_service(t: usize, pods: usize, services: usize) -> bool {
    (t / pods) % 100 < services
}

/// The DNAT of tuple `t`, as the kernel records it between its first two hooks.
fn rewrite(t: usize, pods: usize, services: usize) -> DrainedNat {
    DrainedNat {
        original: tuple(t, 0, pods, services),
        record: NatRecord {
            translated: tuple(t, 1, pods, services),
            from_ifindex: 10,
            to_ifindex: 11,
            from_direction: 0,
            to_direction: 1,
            sightings: 1,
            first_seen_ns: 1_000_000_000 + t as u64,
            last_seen_ns: 1_000_000_000 + t as u64,
            ..NatRecord::default()
        },
    }
}

/// One ring record of tuple `t` at hook `h`, as the kernel writes it.
fn record(t: usize, h: usize, pods: usize, services: usize) -> Vec<u8> {
    let now = 1_000_000_000 + t as u64;
    let x = tuple(t, h, pods, services);
    let slot = CacheSlot {
        kind: EVENT_FLOW,
        key: FlowKey {
            src_addr: x.src_addr,
            dst_addr: x.dst_addr,
            src_port: x.src_port,
            dst_port: x.dst_port,
            ifindex: 10 + h as u32,
            direction: (h % 2) as u8,
            ip_version: 4,
            protocol: 6,
            _pad: 0,
        },
        stats: FlowStats {
            packets: 3,
            bytes: 300,
            payload_bytes: 180,
            first_seen_ns: now,
            last_seen_ns: now,
            tcp_flags: 0x12,
            ..FlowStats::default()
        },
    };
    // SAFETY: CacheSlot is plain old data without implicit padding (repr(C): a u32, the
    // 44-byte key, then the 8-aligned counters at offset 48), read as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(&slot).cast::<u8>(),
            std::mem::size_of::<CacheSlot>(),
        )
    };
    bytes.to_vec()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: &IngestBenchArgs) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "bench-ingest: an unoptimised build; use `cargo run --release -p xtask -- bench-ingest`"
        );
    }
    let meta = synthetic_cache(args.pods)?;
    let hops = args.hops.max(1);
    let per_hops = args.records / hops;
    let tuples = args.tuples.unwrap_or(per_hops).clamp(1, per_hops.max(1));
    // A DNAT needs a hook before and one after it.
    let services = if hops > 1 { args.services as usize } else { 0 };
    // One buffer, record after record, as the ring holds them (without its 8-byte headers).
    let size = std::mem::size_of::<CacheSlot>();
    let ring: Vec<u8> = (0..per_hops)
        .flat_map(|r| (0..hops).map(move |h| (r % tuples, h)))
        .flat_map(|(t, h)| record(t, h, args.pods, services))
        .collect();
    let rewrites: Vec<DrainedNat> = (0..tuples)
        .filter(|&t| via_service(t, args.pods, services))
        .map(|t| rewrite(t, args.pods, services))
        .collect();
    let records = || ring.chunks_exact(size);
    let links = HashMap::new();
    let (mut fold_ms, mut table_ms, mut nat_ms, mut metrics_ms, mut peak_mib) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut held, mut entries) = (0usize, 0usize);
    for _ in 0..args.rounds.max(1) {
        let before = live();
        reset_peak();
        let t = Instant::now();
        // Sized as the agent sizes a period's table under a sustained burst: from the last.
        let mut drained = fold_records(records(), records().len());
        fold_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        drained.nat = rewrites.clone();
        let packets: u64 = drained.flows.iter().map(|f| f.stats.packets).sum();
        anyhow::ensure!(
            packets == 3 * (per_hops * hops) as u64
                && (tuples * hops..=per_hops * hops).contains(&drained.flows.len()),
            "folded {} entries with {packets} packets, want {}-{} entries with {} packets",
            drained.flows.len(),
            tuples * hops,
            per_hops * hops,
            3 * per_hops * hops
        );
        entries = drained.flows.len();

        let now = monotonic_ns();
        let mut flows = FlowTable::new(args.max_flows, u64::MAX / 2);
        let mut nat = NatTable::new(u64::MAX / 2);
        let t = Instant::now();
        flows.fold(
            &drained.flows,
            now,
            &|i| Some(format!("veth{i}")),
            &|ip: &IpAddr| meta.resolve(ip),
        );
        table_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let new_translations = nat.merge_kernel(&drained.nat, now);
        nat_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            new_translations.len() == rewrites.len(),
            "the NAT table took in {} new translations of the drain's {}",
            new_translations.len(),
            rewrites.len()
        );

        let mut metrics = Metrics::new(MetricsConfig {
            level: Level::Workload,
            max_series: 10_000,
            series_ttl_ns: u64::MAX / 2,
        });
        let namer = Namer::new(&meta, &nat, &links);
        let t = Instant::now();
        metrics.observe_drain(&DrainView {
            drained: &drained,
            drops: &[],
            reasons: &HashMap::new(),
            new_translations: &new_translations,
            namer: &namer,
            now_ns: now,
            duration_s: 0.0,
        });
        metrics_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        peak_mib.push(peak().saturating_sub(before) as f64 / 1048576.0);
        held = flows.len();
    }
    let (fold, table, nat, metrics) = (
        median(fold_ms),
        median(table_ms),
        median(nat_ms),
        median(metrics_ms),
    );
    let total = fold + table + nat + metrics;
    let per = |ms: f64| ms * 1e6 / args.records.max(1) as f64;
    println!(
        "bench-ingest: {} flow records ({tuples} tuples x {hops} hooks{}) between {} pods, {} of the tuples ({:.1}%) to a Service and DNATed, folded into {entries} entries, median of {} rounds",
        args.records,
        if tuples < per_hops {
            format!(", {:.1} passes over them", per_hops as f64 / tuples as f64)
        } else {
            String::new()
        },
        args.pods,
        rewrites.len(),
        100.0 * rewrites.len() as f64 / tuples as f64,
        args.rounds.max(1)
    );
    println!("  stage                              ms    ns/record");
    println!(
        "  fold (ring records -> drain)  {fold:>9.1} {:>10.0}",
        per(fold)
    );
    println!(
        "  flow table (room, merge, names, expire; cap {}) {table:>9.1} {:>10.0}",
        args.max_flows,
        per(table)
    );
    println!(
        "  NAT table ({} rewrites in)    {nat:>9.1} {:>10.0}",
        rewrites.len(),
        per(nat)
    );
    println!(
        "  metrics (traffic by workload)  {metrics:>9.1} {:>10.0}",
        per(metrics)
    );
    println!(
        "  all                           {total:>9.1} {:>10.0}",
        per(total)
    );
    println!(
        "  heap at the drain's peak: {:.1} MiB; the table holds {held} flows",
        median(peak_mib)
    );
    let scaled = total * 1_000_000.0 / args.records.max(1) as f64;
    println!(
        "goal: a drain of 1M entries in under {GOAL_MS_PER_MILLION:.0} ms: {scaled:.0} ms per 1M records, {}",
        if scaled < GOAL_MS_PER_MILLION {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
