//! Prometheus metrics: what `GET /metrics` serves, in the text format of the `prometheus`
//! crate's encoder (which escapes label values).
//!
//! Traffic, translations and latency are counted here as each drain brings them, not read
//! from the flow table at scrape time: the table forgets idle flows, and a counter must not
//! go down when it does. Their labels name workloads (or pods, or namespaces only: the
//! aggregation `Level`), never addresses or ports, and every family holds at most
//! `max_series` series: beyond that, updates go to one series whose labels all say
//! `other`, and `flowtrace_metrics_folded_total` counts them. A series nothing updated for
//! `series_ttl` is dropped (that is how a deleted pod's or workload's series go away).
//!
//! The agent's health (attachments, kernel counters, map occupancy, drains, metadata sync,
//! the programs' run time) is read at scrape time from what the agent already keeps.

mod families;

use std::{collections::HashMap, sync::Arc};

use flowtrace_common::FlowKey;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use crate::{
    enrich::{Namer, NamingForm},
    host::netns::NsPlace,
    kernel::drain::{Drained, DrainedFlow},
    model::{
        drop_reason_name, protocol_name, Direction, Endpoint, EndpointKind, FlowTuple, LatencyKind,
        ServiceRef,
    },
    state::drops::PlacedDrop,
    util::FastHash,
};

pub use families::FAMILIES;

/// How finely traffic is labelled.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Namespaces only (`*_workload` and `*_pod` empty for pods).
    Namespace,
    /// Namespace and workload (Deployment, StatefulSet, DaemonSet, Job, ...): the default.
    Workload,
    /// Namespace, workload and pod: one series per pod pair, for small clusters or a while.
    Pod,
}

/// Settings of the metrics (flags `--metrics-*`).
#[derive(Clone, Copy, Debug)]
pub struct MetricsConfig {
    pub level: Level,
    /// Most series in each family, the `other` series included.
    pub max_series: usize,
    /// A series not updated for this long is dropped, in nanoseconds.
    pub series_ttl_ns: u64,
}

/// The label value of every label of a folded series.
pub const OTHER: &str = "other";

const PEER_LABELS: [&str; 6] = [
    "src_namespace",
    "src_workload",
    "src_pod",
    "dst_namespace",
    "dst_workload",
    "dst_pod",
];

/// One family's series: label values (in the family's label order) to value.
struct SeriesSet<V> {
    series: HashMap<Box<[String]>, Series<V>, FastHash>,
    folded: u64,
    expired: u64,
}

struct Series<V> {
    value: V,
    updated_ns: u64,
}

impl<V: Default> SeriesSet<V> {
    fn new() -> Self {
        Self {
            series: HashMap::default(),
            folded: 0,
            expired: 0,
        }
    }

    /// The series of `labels` to update, or the `other` series when a new one would pass
    /// `max` (which counts the `other` series too, so the family never holds more).
    fn get(&mut self, labels: Box<[String]>, max: usize, now_ns: u64) -> &mut V {
        self.get_n(labels, max, now_ns, 1)
    }

    /// `get` for `updates` updates summed before (each one folded if the series is).
    fn get_n(&mut self, labels: Box<[String]>, max: usize, now_ns: u64, updates: u64) -> &mut V {
        let labels = if self.series.contains_key(&labels)
            || self.series.len() + 1 < max
            || (self.series.len() < max && self.series.contains_key(&other(labels.len())))
        {
            labels
        } else {
            self.folded += updates;
            other(labels.len())
        };
        let s = self.series.entry(labels).or_insert_with(|| Series {
            value: V::default(),
            updated_ns: now_ns,
        });
        s.updated_ns = now_ns;
        &mut s.value
    }

    /// (series held, updates folded into `other`, series expired).
    fn counts(&self) -> (usize, u64, u64) {
        (self.series.len(), self.folded, self.expired)
    }

    fn expire(&mut self, now_ns: u64, ttl_ns: u64) {
        let before = self.series.len();
        self.series
            .retain(|_, s| now_ns.saturating_sub(s.updated_ns) <= ttl_ns);
        self.expired += (before - self.series.len()) as u64;
    }
}

fn other(n: usize) -> Box<[String]> {
    vec![OTHER.to_string(); n].into_boxed_slice()
}

/// A latency histogram as the kernel keeps it: log2 buckets of nanoseconds.
#[derive(Clone, Debug, Default)]
struct Hist {
    buckets: [u64; flowtrace_common::LATENCY_BUCKETS],
    count: u64,
    sum_ns: u64,
}

impl Hist {
    fn add(&mut self, h: &flowtrace_common::LatencyHist) {
        for (b, n) in self.buckets.iter_mut().zip(h.buckets.iter()) {
            *b += u64::from(*n);
        }
        self.count += u64::from(h.count);
        self.sum_ns = self.sum_ns.saturating_add(h.sum_ns);
    }
}

/// Bucket `i` of a kernel histogram holds [2^i, 2^(i+1)) ns. The exported bucket bounds
/// are 2^FIRST_EXPORTED_BUCKET ns (`le` 2.56e-07 s, everything shorter included) to 2^31
/// ns (2.1 s), one per power of two; the last kernel bucket (from 2.1 s up) only reaches
/// `+Inf`.
const FIRST_EXPORTED_BUCKET: usize = 8;

/// Bucket upper bounds of the drain duration histogram, in seconds.
const DRAIN_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Everything one drain contributes, with what is needed to name it.
pub struct DrainView<'a> {
    pub drained: &'a Drained,
    /// The drain's drops and retransmissions placed on this node.
    pub drops: &'a [PlacedDrop],
    /// The kernel's drop reasons by code.
    pub reasons: &'a HashMap<u32, String>,
    /// Translations seen for the first time in this drain, as (original, translated).
    pub new_translations: &'a [(FlowTuple, FlowTuple)],
    /// Names the flows, hops and Services (the same namer as every other view).
    pub namer: &'a Namer<'a>,
    pub now_ns: u64,
    pub duration_s: f64,
}

/// The metrics the drains feed.
pub struct Metrics {
    cfg: MetricsConfig,
    /// (packets, bytes) by `TRAFFIC_LABELS`.
    traffic: SeriesSet<(u64, u64)>,
    translations: SeriesSet<u64>,
    hop_latency: SeriesSet<Hist>,
    rtt: SeriesSet<Hist>,
    /// Dropped packets by `DROP_EXTRA`; retransmitted segments by the peers.
    drops: SeriesSet<u64>,
    retransmits: SeriesSet<u64>,
    drain_buckets: [u64; DRAIN_BUCKETS.len()],
    drain_count: u64,
    drain_sum_s: f64,
    /// Entries in the kernel buffers at the last drain: flows, NAT, latency.
    /// Cache slots used in the drained half (all CPUs), the event ring's largest backlog
    /// in bytes (see `BufferFill`).
    map_entries: [u64; 2],
}

const TRAFFIC_EXTRA: [&str; 4] = ["service", "hop", "direction", "protocol"];
const NAT_EXTRA: [&str; 2] = ["service", "protocol"];
const HOP_LATENCY_EXTRA: [&str; 2] = ["from_hop", "to_hop"];
const RTT_EXTRA: [&str; 2] = ["kind", "hop"];
const DROP_EXTRA: [&str; 2] = ["reason", "hop"];
const RETRANSMIT_EXTRA: [&str; 1] = ["protocol"];

/// What the flows of one drain are summed by before their traffic labels are built: both
/// ends (the endpoints' addresses in the metadata cache, whose `Arc`s `TrafficSum` holds for
/// as long as the key lives, so an address is never reused by another endpoint meanwhile),
/// the Service, the hook and the protocol. Two keys may still give the same labels (e.g.
/// two pods of one workload); the series set adds them up.
#[derive(PartialEq, Eq, Hash)]
struct TrafficKey {
    src: Option<*const Endpoint>,
    dst: Option<*const Endpoint>,
    service: Option<ServiceRef>,
    ifindex: u32,
    direction: u8,
    protocol: u8,
}

/// The flows summed under one `TrafficKey`, with the endpoints they were named by.
#[derive(Default)]
struct TrafficSum {
    src: Option<Arc<Endpoint>>,
    dst: Option<Arc<Endpoint>>,
    packets: u64,
    bytes: u64,
    /// The drain's entries summed here (each an update of the series).
    updates: u64,
}

/// The traffic of one drain summed by `TrafficKey`. A drain holds entries per tuple and
/// hook (a tuple at a hook may repeat, see `kernel::drain::DrainedFlow`), up to hundreds of
/// thousands in a burst of new connections, nearly all between a few endpoints, and labels
/// are built once per sum. An entry whose tuple is named by its addresses alone (no
/// translation touches it, `Namer::translated`, and no Service may be reached at either end,
/// `Namer::serves_either`: most of a node's traffic) is first summed with the others between
/// the same addresses at the same hook, ports aside, and each such sum is named once; the
/// rest (Service traffic) are summed by their naming form (`Namer::naming_form`: the
/// translation chain, client ports aside) at their hook, and each form is named once.
fn traffic_sums(v: &DrainView<'_>) -> HashMap<TrafficKey, TrafficSum, FastHash> {
    let mut sums: HashMap<TrafficKey, TrafficSum, FastHash> = HashMap::default();
    // The entry's key with its ports zeroed: addresses, hook and protocol.
    let mut between: HashMap<FlowKey, AddressSum, FastHash> = HashMap::default();
    let mut by_form: HashMap<(NamingForm, (u32, u8, u8)), AddressSum, FastHash> =
        HashMap::default();
    for f in &v.drained.flows {
        let t = FlowTuple::from_key(&f.key);
        if !v.namer.translated(&t) {
            let key = FlowKey {
                src_port: 0,
                dst_port: 0,
                _pad: 0,
                ..f.key
            };
            // Not translated (just asked): whether they are named by their addresses alone
            // is whether a Service may be reached at either end, the same for all of them.
            let s = between.entry(key).or_insert_with(|| AddressSum {
                by_addresses: !v.namer.serves_either(&t),
                ..AddressSum::default()
            });
            if s.by_addresses {
                s.add(f);
                continue;
            }
        }
        by_form
            .entry((v.namer.naming_form(&t), hook(&f.key)))
            .or_default()
            .add(f);
    }
    for ((form, hook), s) in by_form {
        let a = v.namer.name_form(&form);
        summed(
            &mut sums,
            a.src_peer.or(a.src),
            a.dst_peer.or(a.dst),
            a.service,
            hook,
        )
        .add(&s);
    }
    for (key, s) in between {
        if !s.by_addresses {
            continue;
        }
        let t = FlowTuple::from_key(&key);
        let (src, dst) = (v.namer.endpoint(&t.src), v.namer.endpoint(&t.dst));
        summed(&mut sums, src, dst, None, hook(&key)).add(&s);
    }
    sums
}

/// A kernel key's (ifindex, direction, protocol), what `summed` sums by beside the ends.
fn hook(key: &FlowKey) -> (u32, u8, u8) {
    (key.ifindex, key.direction, key.protocol)
}

/// The sum of `sums` for these ends and Service at this (ifindex, direction, protocol).
fn summed(
    sums: &mut HashMap<TrafficKey, TrafficSum, FastHash>,
    src: Option<Arc<Endpoint>>,
    dst: Option<Arc<Endpoint>>,
    service: Option<ServiceRef>,
    (ifindex, direction, protocol): (u32, u8, u8),
) -> &mut TrafficSum {
    let k = TrafficKey {
        src: src.as_ref().map(Arc::as_ptr),
        dst: dst.as_ref().map(Arc::as_ptr),
        service,
        ifindex,
        direction,
        protocol,
    };
    sums.entry(k).or_insert_with(|| TrafficSum {
        src,
        dst,
        ..TrafficSum::default()
    })
}

/// A drain's entries summed before they are named (see `traffic_sums`): between two
/// addresses at one hook, ports aside, or of one naming form at one hook.
#[derive(Default)]
struct AddressSum {
    /// Of a sum by addresses: whether their tuples are named by the addresses alone; when
    /// not, the entries are summed by naming form instead and this sum stays empty.
    by_addresses: bool,
    packets: u64,
    bytes: u64,
    updates: u64,
}

impl AddressSum {
    /// Counts drained entry `f` in.
    fn add(&mut self, f: &DrainedFlow) {
        self.packets += f.stats.packets;
        self.bytes += f.stats.bytes;
        self.updates += 1;
    }
}

impl TrafficSum {
    /// Counts the entries summed in `s` in.
    fn add(&mut self, s: &AddressSum) {
        self.packets += s.packets;
        self.bytes += s.bytes;
        self.updates += s.updates;
    }
}

/// The peer labels of a flow (source then destination), named once per drain per tuple.
#[derive(Clone)]
struct Named {
    peers: [String; 6],
}

impl Metrics {
    pub fn new(cfg: MetricsConfig) -> Self {
        Self {
            cfg,
            traffic: SeriesSet::new(),
            translations: SeriesSet::new(),
            hop_latency: SeriesSet::new(),
            rtt: SeriesSet::new(),
            drops: SeriesSet::new(),
            retransmits: SeriesSet::new(),
            drain_buckets: [0; DRAIN_BUCKETS.len()],
            drain_count: 0,
            drain_sum_s: 0.0,
            map_entries: [0; 2],
        }
    }

    /// Counts one drain in.
    pub fn observe_drain(&mut self, v: &DrainView<'_>) {
        // Idle series go first, so the room they leave is there for this drain's.
        let ttl = self.cfg.series_ttl_ns;
        self.traffic.expire(v.now_ns, ttl);
        self.translations.expire(v.now_ns, ttl);
        self.hop_latency.expire(v.now_ns, ttl);
        self.rtt.expire(v.now_ns, ttl);
        self.drops.expire(v.now_ns, ttl);
        self.retransmits.expire(v.now_ns, ttl);
        let max = self.cfg.max_series;
        let level = self.cfg.level;
        let mut named: HashMap<FlowTuple, Named> = HashMap::new();
        let mut name = |t: &FlowTuple| -> Named {
            named
                .entry(*t)
                .or_insert_with(|| name_flow(t, v.namer, level))
                .clone()
        };
        let sums = traffic_sums(v);
        for (k, sum) in sums {
            let peers = peers(sum.src.as_deref(), sum.dst.as_deref(), level);
            let labels = join(
                &peers,
                [
                    k.service.map(|s| s.to_string()).unwrap_or_default(),
                    v.namer.hop_class(k.ifindex),
                    Direction::from_kernel(k.direction).as_str().to_string(),
                    protocol_name(k.protocol),
                ],
            );
            let s = self.traffic.get_n(labels, max, v.now_ns, sum.updates);
            s.0 += sum.packets;
            s.1 += sum.bytes;
        }
        // New translations are summed per client, backend, Service and protocol before
        // their labels are built, as the traffic is: a burst of connections through a
        // Service brings thousands between a few pods. (The hook is no label here.)
        let mut translated: HashMap<TrafficKey, TrafficSum, FastHash> = HashMap::default();
        for (o, x) in v.new_translations {
            // A DNAT to a Service backend; the reply's un-DNAT is the same connection.
            let Some(service) = v.namer.meta().service_at(&o.dst, o.dst_port, o.protocol) else {
                continue;
            };
            let (client, backend) = (v.namer.endpoint(&o.src), v.namer.endpoint(&x.dst));
            summed(
                &mut translated,
                client,
                backend,
                Some(service),
                (0, 0, o.protocol),
            )
            .updates += 1;
        }
        for (k, sum) in translated {
            let peers = peers(sum.src.as_deref(), sum.dst.as_deref(), level);
            let service = k.service.map(|s| s.to_string()).unwrap_or_default();
            let labels = join(&peers, [service, protocol_name(k.protocol)]);
            *self.translations.get_n(labels, max, v.now_ns, sum.updates) += sum.updates;
        }
        for l in &v.drained.latency {
            let k = &l.key;
            let t = FlowTuple::from_tuple(&k.tuple);
            let n = name(&t);
            let at = |ifindex: u32, direction: u8| {
                format!(
                    "{}/{}",
                    v.namer.hop_class(ifindex),
                    Direction::from_kernel(direction).as_str()
                )
            };
            let to = at(k.to_ifindex, k.to_direction);
            match LatencyKind::from_kernel(k.kind) {
                LatencyKind::Hop => {
                    let labels = join(&n.peers, [at(k.from_ifindex, k.from_direction), to]);
                    self.hop_latency.get(labels, max, v.now_ns).add(&l.hist);
                }
                kind => {
                    let labels = join(&n.peers, [kind.as_str().to_string(), to]);
                    self.rtt.get(labels, max, v.now_ns).add(&l.hist);
                }
            }
        }
        for d in v.drops {
            // A drop whose headers could not be read has no peers: its labels are empty.
            let n = d.tuple.map(|t| name(&t));
            let peers = n.map(|n| n.peers).unwrap_or_default();
            if d.retransmit {
                let labels = join(&peers, [protocol_name(6)]);
                *self.retransmits.get(labels, max, v.now_ns) += d.packets;
                continue;
            }
            let hop = match d.site.netns {
                NsPlace::Node if d.site.ifindex == 0 => "none".to_string(),
                NsPlace::Node => v.namer.hop_class(d.site.ifindex),
                NsPlace::Pod { .. } => "in_pod".to_string(),
            };
            let labels = join(&peers, [drop_reason_name(v.reasons, d.site.reason), hop]);
            *self.drops.get(labels, max, v.now_ns) += d.packets;
        }
        self.observe_drain_duration(v.duration_s);
        self.map_entries = [
            v.drained.fill.cache_slots_used as u64,
            v.drained.fill.ring_backlog_bytes as u64,
        ];
    }

    fn observe_drain_duration(&mut self, seconds: f64) {
        for (b, le) in self.drain_buckets.iter_mut().zip(DRAIN_BUCKETS) {
            if seconds <= le {
                *b += 1;
            }
        }
        self.drain_count += 1;
        self.drain_sum_s += seconds;
    }

    /// Every family, the agent's health (`h`) included, ready for the text encoder.
    pub fn families(&self, h: &Health) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let traffic_names = label_names(&TRAFFIC_EXTRA);
        let mut packets = family("flowtrace_packets_total", MetricType::COUNTER);
        let mut bytes = family("flowtrace_bytes_total", MetricType::COUNTER);
        for (labels, s) in sorted(&self.traffic) {
            packets
                .mut_metric()
                .push(counter(&traffic_names, labels, s.0 as f64));
            bytes
                .mut_metric()
                .push(counter(&traffic_names, labels, s.1 as f64));
        }
        out.push(packets);
        out.push(bytes);

        let nat_names = label_names(&NAT_EXTRA);
        let mut nat = family("flowtrace_nat_translations_total", MetricType::COUNTER);
        for (labels, n) in sorted(&self.translations) {
            nat.mut_metric()
                .push(counter(&nat_names, labels, *n as f64));
        }
        out.push(nat);

        for (name, extra, set) in [
            (
                "flowtrace_hop_latency_seconds",
                &HOP_LATENCY_EXTRA,
                &self.hop_latency,
            ),
            ("flowtrace_tcp_rtt_seconds", &RTT_EXTRA, &self.rtt),
        ] {
            let names = label_names(extra);
            let mut f = family(name, MetricType::HISTOGRAM);
            for (labels, hist) in sorted(set) {
                f.mut_metric().push(latency_histogram(&names, labels, hist));
            }
            out.push(f);
        }

        for (name, names, set) in [
            (
                "flowtrace_drops_total",
                label_names(&DROP_EXTRA),
                &self.drops,
            ),
            (
                "flowtrace_tcp_retransmits_total",
                label_names(&RETRANSMIT_EXTRA),
                &self.retransmits,
            ),
        ] {
            let mut f = family(name, MetricType::COUNTER);
            for (labels, n) in sorted(set) {
                f.mut_metric().push(counter(&names, labels, *n as f64));
            }
            out.push(f);
        }

        let mut d = family("flowtrace_drain_duration_seconds", MetricType::HISTOGRAM);
        let mut hist = Histogram::default();
        hist.set_sample_count(self.drain_count);
        hist.set_sample_sum(self.drain_sum_s);
        hist.set_bucket(
            DRAIN_BUCKETS
                .iter()
                .zip(self.drain_buckets)
                .map(|(le, n)| bucket(*le, n))
                .collect(),
        );
        let mut m = Metric::default();
        m.set_histogram(hist);
        d.mut_metric().push(m);
        out.push(d);

        self.health_families(h, &mut out);
        // A family with no series yet is left out (the text format has nothing to say).
        out.retain(|f| !f.get_metric().is_empty());
        out
    }

    fn health_families(&self, h: &Health, out: &mut Vec<MetricFamily>) {
        out.push(single_gauge(
            "flowtrace_attached_interfaces",
            h.attached_interfaces as f64,
        ));
        out.push(single_counter(
            "flowtrace_interface_attach_failures_total",
            h.attach_failures as f64,
        ));
        out.push(single_counter(
            "flowtrace_kernel_packets_seen_total",
            h.kernel_counters
                .get(flowtrace_common::Counter::PacketsSeen as usize)
                .copied()
                .unwrap_or(0) as f64,
        ));
        let mut lost = family("flowtrace_kernel_lost_total", MetricType::COUNTER);
        for c in flowtrace_common::Counter::ALL {
            if matches!(
                c,
                flowtrace_common::Counter::PacketsSeen
                    | flowtrace_common::Counter::SlowHeaderReads
                    | flowtrace_common::Counter::DropEventsSeen
            ) {
                continue;
            }
            let v = h.kernel_counters.get(c as usize).copied().unwrap_or(0);
            lost.mut_metric()
                .push(counter(&["reason"], &[c.name().to_string()], v as f64));
        }
        out.push(lost);

        let maps = ["cache", "events"];
        let mut entries = family("flowtrace_kernel_map_entries", MetricType::GAUGE);
        let mut capacity = family("flowtrace_kernel_map_capacity", MetricType::GAUGE);
        for (i, map) in maps.iter().enumerate() {
            entries.mut_metric().push(gauge(
                &["map"],
                &[map.to_string()],
                self.map_entries[i] as f64,
            ));
            capacity.mut_metric().push(gauge(
                &["map"],
                &[map.to_string()],
                h.map_capacity[i] as f64,
            ));
        }
        out.push(entries);
        out.push(capacity);

        out.push(single_gauge(
            "flowtrace_flow_table_entries",
            h.flow_table_entries as f64,
        ));
        out.push(single_gauge(
            "flowtrace_flow_table_capacity",
            h.flow_table_capacity as f64,
        ));
        out.push(single_counter(
            "flowtrace_flow_table_evicted_total",
            h.flow_table_evicted as f64,
        ));
        out.push(single_counter("flowtrace_drains_total", h.drains as f64));
        out.push(single_counter(
            "flowtrace_drain_errors_total",
            h.drain_errors as f64,
        ));
        out.push(single_gauge(
            "flowtrace_metadata_synced",
            if h.metadata_synced { 1.0 } else { 0.0 },
        ));

        // The NAT cross-check's outcomes, every one present from the start (a rate() works
        // from the first): agreement, and the three kinds of disagreement.
        let mut nat = family("flowtrace_nat_checks_total", MetricType::COUNTER);
        for (result, n) in [
            ("confirmed", h.nat.confirmed),
            ("conntrack_only", h.nat.conntrack_only),
            ("mismatch", h.nat.mismatch),
            ("not_in_conntrack", h.nat.not_in_conntrack),
            ("missed", h.nat.missed),
        ] {
            nat.mut_metric()
                .push(counter(&["result"], &[result.to_string()], n as f64));
        }
        out.push(nat);
        out.push(single_counter(
            "flowtrace_conntrack_errors_total",
            h.nat.conntrack_errors as f64,
        ));

        let mut refused = family("flowtrace_api_refused_total", MetricType::COUNTER);
        // Every reason, zero included, so a rate() works from the first refusal.
        for r in crate::tls::Refusal::ALL {
            let n = h
                .api_refused
                .iter()
                .find(|(name, _)| *name == r.name())
                .map_or(0, |(_, n)| *n);
            refused
                .mut_metric()
                .push(counter(&["reason"], &[r.name().to_string()], n as f64));
        }
        out.push(refused);

        let mut run_s = family(
            "flowtrace_bpf_program_run_seconds_total",
            MetricType::COUNTER,
        );
        let mut runs = family("flowtrace_bpf_program_runs_total", MetricType::COUNTER);
        for (name, ns, n) in &h.programs {
            run_s.mut_metric().push(counter(
                &["program"],
                std::slice::from_ref(name),
                *ns as f64 / 1e9,
            ));
            runs.mut_metric()
                .push(counter(&["program"], std::slice::from_ref(name), *n as f64));
        }
        out.push(run_s);
        out.push(runs);

        let mut series = family("flowtrace_metrics_series", MetricType::GAUGE);
        let mut folded = family("flowtrace_metrics_folded_total", MetricType::COUNTER);
        let mut expired = family(
            "flowtrace_metrics_series_expired_total",
            MetricType::COUNTER,
        );
        for (name, (n, f, e)) in [
            ("flowtrace_bytes_total", self.traffic.counts()),
            ("flowtrace_packets_total", self.traffic.counts()),
            (
                "flowtrace_nat_translations_total",
                self.translations.counts(),
            ),
            ("flowtrace_drops_total", self.drops.counts()),
            ("flowtrace_tcp_retransmits_total", self.retransmits.counts()),
            ("flowtrace_hop_latency_seconds", self.hop_latency.counts()),
            ("flowtrace_tcp_rtt_seconds", self.rtt.counts()),
        ] {
            let l = [name.to_string()];
            series.mut_metric().push(gauge(&["metric"], &l, n as f64));
            folded.mut_metric().push(counter(&["metric"], &l, f as f64));
            expired
                .mut_metric()
                .push(counter(&["metric"], &l, e as f64));
        }
        out.push(series);
        out.push(folded);
        out.push(expired);
        out.push(single_gauge(
            "flowtrace_metrics_series_limit",
            self.cfg.max_series as f64,
        ));
        out.push(single_gauge("flowtrace_tracers", h.tracers as f64));
        let mut info = family("flowtrace_build_info", MetricType::GAUGE);
        info.mut_metric().push(gauge(
            &["version"],
            &[env!("CARGO_PKG_VERSION").to_string()],
            1.0,
        ));
        out.push(info);
    }
}

/// The agent's state that `/metrics` reports besides traffic, read at scrape time.
#[derive(Debug, Default)]
pub struct Health {
    pub attached_interfaces: usize,
    pub attach_failures: u64,
    pub kernel_counters: Vec<u64>,
    /// Capacity of each kernel buffer: the flow cache's slots per half over all CPUs, the
    /// event ring's bytes.
    pub map_capacity: [u64; 2],
    pub flow_table_entries: usize,
    pub flow_table_capacity: usize,
    pub flow_table_evicted: u64,
    pub drains: u64,
    pub drain_errors: u64,
    pub metadata_synced: bool,
    /// (program name, run time ns, runs).
    pub programs: Vec<(String, u64, u64)>,
    pub tracers: usize,
    /// Refusals of the data API by reason (`tls::Refusal::name`).
    pub api_refused: Vec<(&'static str, u64)>,
    /// The NAT table's cross-check against conntrack.
    pub nat: crate::model::wire::NatCounters,
}

/// Renders families in the Prometheus text format.
pub fn encode(families: &[MetricFamily]) -> Result<String, prometheus::Error> {
    prometheus::TextEncoder::new().encode_to_string(families)
}

/// The peer labels of tuple `t` as drained at some hook: the namer's
/// attribution, with the pods behind Service addresses as the peers (before the DNAT the
/// destination is the backend it is rewritten to; after the reply's un-DNAT the source is
/// the backend it came from).
fn name_flow(t: &FlowTuple, namer: &Namer<'_>, level: Level) -> Named {
    let a = namer.flow(t);
    Named {
        peers: peers(a.src_end(), a.dst_end(), level),
    }
}

/// The six peer labels (`PEER_LABELS`) of a flow from `src` to `dst`.
fn peers(src: Option<&Endpoint>, dst: Option<&Endpoint>, level: Level) -> [String; 6] {
    let [s0, s1, s2] = peer(src, level);
    let [d0, d1, d2] = peer(dst, level);
    [s0, s1, s2, d0, d1, d2]
}

/// (namespace, workload, pod) labels of one end of a flow at `level`. Ends that are no
/// pod say what they are in the workload label: `node/NAME`, `pod-network/NODE` (a pod
/// CIDR address no known pod holds), `service/NAME` (a Service address whose backend is
/// not known), or `unknown` (no metadata names the address).
fn peer(e: Option<&Endpoint>, level: Level) -> [String; 3] {
    let Some(e) = e else {
        return [String::new(), "unknown".into(), String::new()];
    };
    let ns = e.namespace.clone().unwrap_or_default();
    match e.kind {
        EndpointKind::Pod => {
            let workload = match level {
                Level::Namespace => String::new(),
                _ => e
                    .workload
                    .as_ref()
                    .map(|w| w.name.clone())
                    .unwrap_or_else(|| e.name.clone()),
            };
            let pod = if level == Level::Pod {
                e.name.clone()
            } else {
                String::new()
            };
            [ns, workload, pod]
        }
        EndpointKind::Service => [ns, format!("service/{}", e.name), String::new()],
        EndpointKind::Node => [String::new(), format!("node/{}", e.name), String::new()],
        EndpointKind::PodNetwork => [
            String::new(),
            format!("pod-network/{}", e.name),
            String::new(),
        ],
    }
}

fn join<const N: usize>(peers: &[String; 6], extra: [String; N]) -> Box<[String]> {
    peers
        .iter()
        .cloned()
        .chain(extra)
        .collect::<Vec<_>>()
        .into_boxed_slice()
}

fn label_names<const N: usize>(extra: &[&'static str; N]) -> Vec<&'static str> {
    PEER_LABELS.iter().chain(extra.iter()).copied().collect()
}

/// Series in label order, so the output is stable from scrape to scrape.
fn sorted<V>(set: &SeriesSet<V>) -> Vec<(&[String], &V)> {
    let mut v: Vec<_> = set.series.iter().map(|(k, s)| (&k[..], &s.value)).collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn family(name: &str, kind: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(families::help(name).to_string());
    f.set_field_type(kind);
    f
}

fn labels(names: &[&str], values: &[String]) -> Vec<LabelPair> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut p = LabelPair::default();
            p.set_name(n.to_string());
            p.set_value(v.clone());
            p
        })
        .collect()
}

fn counter(names: &[&str], values: &[String], v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels(names, values));
    m.set_counter(c);
    m
}

fn gauge(names: &[&str], values: &[String], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels(names, values));
    m.set_gauge(g);
    m
}

fn single_gauge(name: &str, v: f64) -> MetricFamily {
    let mut f = family(name, MetricType::GAUGE);
    f.mut_metric().push(gauge(&[], &[], v));
    f
}

fn single_counter(name: &str, v: f64) -> MetricFamily {
    let mut f = family(name, MetricType::COUNTER);
    f.mut_metric().push(counter(&[], &[], v));
    f
}

fn bucket(le: f64, cumulative: u64) -> Bucket {
    let mut b = Bucket::default();
    b.set_upper_bound(le);
    b.set_cumulative_count(cumulative);
    b
}

fn latency_histogram(names: &[&str], values: &[String], h: &Hist) -> Metric {
    let mut cumulative = 0u64;
    let mut buckets = Vec::new();
    for (i, n) in h.buckets.iter().enumerate() {
        cumulative += n;
        // Kernel bucket i ends at 2^(i+1) ns; the last one has no end (+Inf only).
        if i + 1 >= FIRST_EXPORTED_BUCKET && i + 1 < flowtrace_common::LATENCY_BUCKETS {
            buckets.push(bucket((1u64 << (i + 1)) as f64 / 1e9, cumulative));
        }
    }
    let mut hist = Histogram::default();
    hist.set_sample_count(h.count);
    hist.set_sample_sum(h.sum_ns as f64 / 1e9);
    hist.set_bucket(buckets);
    let mut m = Metric::from_label(labels(names, values));
    m.set_histogram(hist);
    m
}

#[cfg(test)]
mod tests;
