//! Latency histograms in the kernel's log2 layout (`flowtrace_common::LatencyHist`): their
//! summary statistics, and the API record of one.

use flowtrace_common::{LatencyHist, LATENCY_BUCKETS};

use super::{
    tuple::{HookView, TupleView},
    wire::{LatencyKind, LatencyRecord},
};

/// Upper bound (ns) of bucket `i`.
fn bucket_upper(i: usize) -> u64 {
    if i + 1 >= 64 {
        u64::MAX
    } else {
        (1u64 << (i + 1)) - 1
    }
}

fn percentile(h: &LatencyHist, q: f64) -> u64 {
    let target = ((h.count as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, n) in h.buckets.iter().enumerate().take(LATENCY_BUCKETS) {
        seen += u64::from(*n);
        if seen >= target {
            return bucket_upper(i).min(h.max_ns).max(h.min_ns);
        }
    }
    h.max_ns
}

/// Mean, p50, p90 and p99 of a histogram (ns).
pub fn summarize(h: &LatencyHist) -> (u64, u64, u64, u64) {
    let mean = if h.count == 0 {
        0
    } else {
        h.sum_ns / u64::from(h.count)
    };
    (
        mean,
        percentile(h, 0.5),
        percentile(h, 0.9),
        percentile(h, 0.99),
    )
}

/// One histogram as the API serves it (also how tests build records).
pub fn record(
    kind: LatencyKind,
    tuple: TupleView,
    from: Option<HookView>,
    to: HookView,
    h: &LatencyHist,
) -> LatencyRecord {
    let (mean, p50, p90, p99) = summarize(h);
    LatencyRecord {
        kind,
        tuple,
        from,
        to,
        samples: u64::from(h.count),
        mean_ns: mean,
        min_ns: h.min_ns,
        max_ns: h.max_ns,
        p50_ns: p50,
        p90_ns: p90,
        p99_ns: p99,
        buckets: h
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (bucket_upper(i), u64::from(*n)))
            .collect(),
    }
}
