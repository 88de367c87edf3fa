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
//!   default), then the metrics count the traffic by workload pair and hook.
//!
//! The kernel's side (the programs writing the ring, the cache read) is not in these figures:
//! `bench-flood` runs the whole path. Memory is the heap at the drain's peak, counted by
//! `bench-metadata`'s allocator.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use anyhow::Result;
use flowtrace::{
    enrich::Namer,
    kernel::drain::fold_records,
    metrics::{DrainView, Level, Metrics, MetricsConfig},
    state::{flows::FlowTable, nat::NatTable},
    util::monotonic_ns,
};
use flowtrace_common::{CacheSlot, FlowKey, FlowStats, EVENT_FLOW};

use crate::metabench::{live, peak, pod_ip, reset_peak, synthetic_cache};

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
    /// Pods of the synthetic cluster the tuples run between.
    #[arg(long, default_value_t = 5_000)]
    pods: usize,
    /// The flow table's cap (the agent's --max-flows).
    #[arg(long, default_value_t = 100_000)]
    max_flows: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One ring record of tuple `t` at hook `h`, as the kernel writes it.
fn record(t: usize, h: usize, pods: usize) -> Vec<u8> {
    let addr = |ip: std::net::Ipv4Addr| {
        let mut a = [0u32; 4];
        a[0] = u32::from_ne_bytes(ip.octets());
        a
    };
    let now = 1_000_000_000 + t as u64;
    let slot = CacheSlot {
        kind: EVENT_FLOW,
        key: FlowKey {
            src_addr: addr(pod_ip(t % pods)),
            dst_addr: addr(pod_ip((t * 7 + 1) % pods)),
            src_port: (1024 + (t / pods) % 64_000) as u16,
            dst_port: 8080,
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
    // One buffer, record after record, as the ring holds them (without its 8-byte headers).
    let size = std::mem::size_of::<CacheSlot>();
    let ring: Vec<u8> = (0..per_hops)
        .flat_map(|r| (0..hops).map(move |h| (r % tuples, h)))
        .flat_map(|(t, h)| record(t, h, args.pods))
        .collect();
    let records = || ring.chunks_exact(size);
    let links = HashMap::new();
    let (mut fold_ms, mut table_ms, mut metrics_ms, mut peak_mib) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut held, mut entries) = (0usize, 0usize);
    for _ in 0..args.rounds.max(1) {
        let before = live();
        reset_peak();
        let t = Instant::now();
        // Sized as the agent sizes a period's table under a sustained burst: from the last.
        let drained = fold_records(records(), records().len());
        fold_ms.push(t.elapsed().as_secs_f64() * 1000.0);
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
        let nat = NatTable::new(u64::MAX / 2);
        let t = Instant::now();
        flows.fold(
            &drained.flows,
            now,
            &|i| Some(format!("veth{i}")),
            &|ip: &IpAddr| meta.resolve(ip),
        );
        table_ms.push(t.elapsed().as_secs_f64() * 1000.0);

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
            new_translations: &[],
            namer: &namer,
            now_ns: now,
            duration_s: 0.0,
        });
        metrics_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        peak_mib.push(peak().saturating_sub(before) as f64 / 1048576.0);
        held = flows.len();
    }
    let (fold, table, metrics) = (median(fold_ms), median(table_ms), median(metrics_ms));
    let total = fold + table + metrics;
    let per = |ms: f64| ms * 1e6 / args.records.max(1) as f64;
    println!(
        "bench-ingest: {} flow records ({tuples} tuples x {hops} hooks{}) between {} pods, folded into {entries} entries, median of {} rounds",
        args.records,
        if tuples < per_hops {
            format!(", {:.1} passes over them", per_hops as f64 / tuples as f64)
        } else {
            String::new()
        },
        args.pods,
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
