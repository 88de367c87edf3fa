//! The agent's HTTP API (JSON). Documented in docs/api.md.
//!
//! - `GET /v1/flows[?ip=&port=&proto=&iface=&pod=&namespace=&workload=&service=]`: the flow
//!   table, drained fresh for the request, with names and Service translations.
//! - `GET /v1/interfaces`: what flowtrace is attached to.
//! - `GET /v1/nat`: NAT translations (kernel programs vs conntrack) and the cross-check counters.
//! - `GET /v1/metadata`: where names come from and whether each kind is synced.
//! - `GET /v1/latency`: hop latency and TCP round-trip histograms of sampled packets.
//! - `GET /v1/trace[?same filters as /v1/flows]`: live tracing, a stream of JSON lines
//!   (one per packet, hook by hook) for as long as the client reads.
//! - `GET /v1/stats`: kernel counters (packets seen, every loss) and agent counters.
//! - `GET /metrics`: Prometheus text format (traffic, translations, latency, health).
//! - `GET /healthz`: liveness. `GET /readyz`: 200 once the interfaces present at start are
//!   attached and metadata (if any source is configured) is synced.

use std::sync::{atomic::Ordering, Arc};

use axum::{
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use flowtrace_common::Counter;
use serde::{Deserialize, Serialize};
use tracing::error;

use crate::{
    agent::{lock, mono_to_unix_offset_ns, Shared},
    filter::{parse_iface, parse_namespace, parse_object, parse_port, FlowFilter},
    flows::{FlowRecord, FlowTuple},
    k8s::{source::KindStatus, MetaCache},
    nat::Translation,
};

/// Body of `GET /v1/flows`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub node: String,
    pub flows: Vec<FlowRecord>,
}

/// One entry of `GET /v1/interfaces`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InterfaceRecord {
    pub ifindex: u32,
    pub name: String,
    pub kind: Option<String>,
}

/// A loaded kernel program.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProgramRecord {
    pub name: String,
    pub id: u32,
}

/// Body of `GET /v1/interfaces`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InterfacesResponse {
    pub attach_mode: crate::attach::AttachMode,
    /// Kernel IDs of flowtrace's programs (see `bpftool prog show id N`).
    pub programs: Vec<ProgramRecord>,
    pub synced: bool,
    pub interfaces: Vec<InterfaceRecord>,
}

/// Body of `GET /v1/stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Kernel counters by name (see `flowtrace_common::Counter`), summed over CPUs.
    pub kernel: std::collections::BTreeMap<String, u64>,
    /// Sum of the counters of packets that were malformed or not flow-shaped.
    pub unparsed_packets: u64,
    pub flows: usize,
    pub flows_evicted: u64,
    pub flows_expired: u64,
    pub drains: u64,
    pub drain_errors: u64,
    pub attach_failures: u64,
    /// NAT cross-check counters (see `/v1/nat`).
    pub nat: crate::nat::NatCounters,
    /// Live tracers attached to `/v1/trace`.
    #[serde(default)]
    pub tracers: usize,
    /// Whether the kernel programs are writing trace events now (read back from the
    /// programs' control word: on exactly while `tracers` > 0).
    #[serde(default)]
    pub kernel_tracing: bool,
    /// Packets joined from trace events since the agent started.
    #[serde(default)]
    pub traced_packets: u64,
}

/// Body of `GET /v1/latency`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyResponse {
    pub node: String,
    /// One packet in `sample_rate` is measured (0: latency tracking is off).
    pub sample_rate: u32,
    pub latency: Vec<crate::latency::LatencyRecord>,
}

/// Body of `GET /v1/metadata`.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetadataResponse {
    /// `none`, `in-cluster`, `kubeconfig PATH` or `file PATH`.
    pub source: String,
    /// Every followed kind is synced (always true with no source).
    pub synced: bool,
    pub kinds: std::collections::BTreeMap<String, KindStatus>,
    /// Objects held, by kind.
    pub objects: std::collections::BTreeMap<String, usize>,
    /// Objects skipped because a field was missing or malformed, by kind.
    pub skipped: std::collections::BTreeMap<String, u64>,
}

/// Body of `GET /v1/nat`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NatResponse {
    pub node: String,
    /// Whether the agent reads conntrack (off with `--no-conntrack`).
    pub conntrack: bool,
    /// How conntrack is followed: events, dumps, translated connections held.
    pub conntrack_source: crate::conntrack::CtStats,
    pub counters: crate::nat::NatCounters,
    /// Sum of the disagreement counters (mismatch + not_in_conntrack + missed).
    pub disagreements: u64,
    pub translations: Vec<crate::nat::Translation>,
}

#[derive(Debug, Serialize)]
pub struct ApiError {
    error: String,
}

fn error_response(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/interfaces", get(interfaces))
        .route("/v1/nat", get(nat))
        .route("/v1/stats", get(stats))
        .route("/v1/metadata", get(metadata))
        .route("/v1/latency", get(latency))
        .route("/v1/trace", get(trace))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared)
}

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        error!(error = %e, "HTTP server stopped");
    }
}

/// Parses the query of `/v1/flows`: `ip`, `port`, `proto`, `iface`, `pod`, `namespace`,
/// `workload`, `service`, each repeatable and comma-separated. Anything else is an error
/// rather than silently unfiltered output.
fn parse_query(query: &str) -> crate::error::Result<FlowFilter> {
    let mut f = FlowFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        for v in value.split(',').filter(|v| !v.is_empty()) {
            match key {
                "ip" => f.ips.push(v.parse()?),
                "port" => f.ports.push(parse_port(v)?),
                "proto" => f.protos.push(v.parse()?),
                "iface" => f.ifaces.push(parse_iface(v)?),
                "pod" => f.pods.push(parse_object("--pod", v)?),
                "namespace" => f.namespaces.push(parse_namespace(v)?),
                "workload" => f.workloads.push(parse_object("--workload", v)?),
                "service" => f.services.push(parse_object("--service", v)?),
                other => return Err(crate::error::Error::Filter {
                    flag: "query parameter",
                    value: other.to_string(),
                    reason:
                        "unknown; use ip, port, proto, iface, pod, namespace, workload or service"
                            .into(),
                }),
            }
        }
    }
    Ok(f)
}

/// Decodes `%XX` escapes and `+` (filter values are ASCII: addresses, numbers, names, globs).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn flows(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let filter = match parse_query(query.as_deref().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err((status, msg)) = check_names(&shared, &filter) {
        return error_response(status, msg);
    }
    if let Err(e) = shared.drain_now().await {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let names = shared.iface_names();
    let names = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
    let meta = shared.meta_read();
    let mut flows: Vec<FlowRecord> =
        lock(&shared.table).snapshot(mono_to_unix_offset_ns(), &|ip| meta.resolve(ip));
    {
        let nat = lock(&shared.nat);
        let by_translated = nat.by_translated();
        for f in &mut flows {
            let t = FlowTuple {
                protocol: f.protocol_number,
                src: f.src,
                dst: f.dst,
                src_port: f.src_port,
                dst_port: f.dst_port,
            };
            let original = by_translated.get(&t).copied().unwrap_or(t);
            f.nat = nat.get(&original, &names);
            if let Some(n) = f.nat.as_mut() {
                name_translation(n, &meta);
            }
            f.service = meta
                .service_at(&f.dst, f.dst_port, f.protocol_number)
                .or_else(|| meta.service_at(&f.src, f.src_port, f.protocol_number))
                .or_else(|| f.nat.as_ref().and_then(|n| n.service.clone()));
        }
    }
    drop(meta);
    flows.retain(|f| filter.matches(f));
    Json(FlowsResponse {
        node: shared.node.clone(),
        flows,
    })
    .into_response()
}

/// The Service a translation is for: the original destination of a DNAT (client to
/// VIP), or the translated source of the reply's un-DNAT (VIP back to the client).
fn name_translation(t: &mut Translation, meta: &MetaCache) {
    let (o, x) = (&t.original, &t.translated);
    t.service = meta
        .service_at(&o.dst, o.dst_port, o.protocol)
        .or_else(|| meta.service_at(&x.src, x.src_port, x.protocol));
}

/// Name filters must name objects that exist; without metadata they cannot be checked.
fn check_names(shared: &Shared, f: &FlowFilter) -> Result<(), (StatusCode, String)> {
    if !f.has_names() {
        return Ok(());
    }
    let status = lock(&shared.meta_status);
    if !status.has_source() {
        return Err((
            StatusCode::BAD_REQUEST,
            "pod, namespace, workload and service filters need Kubernetes metadata; start the agent with --kubeconfig, in-cluster credentials or --metadata-file".into(),
        ));
    }
    let synced = status.synced();
    drop(status);
    let meta = shared.meta_read();
    let missing = |what: &str, name: &str| {
        let hint = if synced {
            String::new()
        } else {
            " (metadata is not synced yet, see /v1/metadata; retry shortly)".into()
        };
        Err((
            StatusCode::NOT_FOUND,
            format!("{what} {name} does not exist in the agent's metadata{hint}"),
        ))
    };
    for p in &f.pods {
        if !meta.has_pod(&p.namespace, &p.name) {
            return missing("pod", &p.to_string());
        }
    }
    for n in &f.namespaces {
        if !meta.has_namespace(n) {
            return missing("namespace (no pod or Service in it)", n);
        }
    }
    for w in &f.workloads {
        if !meta.has_workload(&w.namespace, &w.name) {
            return missing("workload (no pod of it)", &w.to_string());
        }
    }
    for s in &f.services {
        if !meta.has_service(&s.namespace, &s.name) {
            return missing("service", &s.to_string());
        }
    }
    Ok(())
}

async fn metadata(State(shared): State<Arc<Shared>>) -> Json<MetadataResponse> {
    let (source, synced, kinds) = {
        let s = lock(&shared.meta_status);
        (
            s.source.clone(),
            s.synced(),
            s.kinds
                .iter()
                .map(|(k, v)| (k.name().to_string(), v.clone()))
                .collect(),
        )
    };
    let meta = shared.meta_read();
    Json(MetadataResponse {
        source,
        synced,
        kinds,
        objects: meta
            .counts()
            .into_iter()
            .map(|(k, n)| (k.name().to_string(), n))
            .collect(),
        skipped: meta
            .skipped()
            .iter()
            .map(|(k, n)| (k.name().to_string(), *n))
            .collect(),
    })
}

async fn latency(State(shared): State<Arc<Shared>>) -> Response {
    if let Err(e) = shared.drain_now().await {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let names = shared.iface_names();
    let names = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
    let latency = lock(&shared.latency).snapshot(&names);
    Json(LatencyResponse {
        node: shared.node.clone(),
        sample_rate: shared.latency_sample,
        latency,
    })
    .into_response()
}

async fn interfaces(State(shared): State<Arc<Shared>>) -> Json<InterfacesResponse> {
    let attached = shared.attacher.lock().await.interfaces();
    let links = lock(&shared.links);
    let interfaces = attached
        .into_iter()
        .map(|(ifindex, name)| InterfaceRecord {
            kind: links.get(&ifindex).and_then(|l| l.kind.clone()),
            ifindex,
            name,
        })
        .collect();
    drop(links);
    Json(InterfacesResponse {
        attach_mode: shared.attach_mode,
        programs: shared
            .program_ids
            .iter()
            .map(|(name, id)| ProgramRecord {
                name: name.clone(),
                id: *id,
            })
            .collect(),
        synced: shared.links_synced.load(Ordering::Relaxed),
        interfaces,
    })
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let counters = match shared.kernel_counters().await {
        Ok(c) => c,
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let kernel = Counter::ALL
        .iter()
        .map(|c| (c.name().to_string(), counters[*c as usize]))
        .collect();
    let unparsed_packets = Counter::ALL
        .iter()
        .filter(|c| c.is_unparsed())
        .map(|c| counters[*c as usize])
        .sum();
    let kernel_tracing = match shared.kernel_tracing().await {
        Ok(t) => t,
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let table = lock(&shared.table);
    Json(StatsResponse {
        kernel,
        unparsed_packets,
        flows: table.len(),
        flows_evicted: table.evicted(),
        flows_expired: table.expired(),
        drains: shared.drains.load(Ordering::Relaxed),
        drain_errors: shared.drain_errors.load(Ordering::Relaxed),
        attach_failures: shared.attach_failures.load(Ordering::Relaxed),
        nat: lock(&shared.nat).counters(),
        tracers: shared.trace.tracers(),
        kernel_tracing,
        traced_packets: shared.trace.packets.load(Ordering::Relaxed),
    })
    .into_response()
}

async fn nat(State(shared): State<Arc<Shared>>) -> Response {
    if let Err(e) = shared.drain_now().await {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let names = shared.iface_names();
    let names = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
    let meta = shared.meta_read();
    let nat = lock(&shared.nat);
    let counters = nat.counters();
    let mut translations = nat.snapshot(&names);
    drop(nat);
    for t in &mut translations {
        name_translation(t, &meta);
    }
    drop(meta);
    Json(NatResponse {
        node: shared.node.clone(),
        conntrack: shared.conntrack,
        conntrack_source: lock(&shared.ct).stats(),
        counters,
        disagreements: counters.disagreements(),
        translations,
    })
    .into_response()
}

/// Prometheus text format (see `crate::metrics`): traffic and latency up to the last drain
/// (a scrape does not drain), the agent's health as of now.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let health = shared.health().await;
    let families = lock(&shared.metrics).families(&health);
    match crate::metrics::encode(&families) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics: {e}"),
        ),
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if !shared.links_synced.load(Ordering::Relaxed) {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "interfaces present at start are not attached yet",
        );
    }
    if !lock(&shared.meta_status).synced() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "Kubernetes metadata is not synced (flows are counted with addresses only); see /v1/metadata",
        );
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// While a tracer is attached: unregisters it when its response is dropped (the client
/// went away) and makes the kernel stop writing trace events if it was the last.
struct Tracer {
    shared: Arc<Shared>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.shared.trace.unsubscribe();
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = shared.apply_tracing().await {
                    error!(error = %e, "turning trace events off after the last tracer left");
                }
            });
        }
    }
}

/// An idle stream writes an empty line this often, so a tracer that went away is noticed
/// (and the kernel stops tracing) even when no packet matches.
const TRACE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);

async fn trace(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    use crate::trace::TraceLine;
    use tokio::sync::broadcast::error::RecvError;

    let filter = match parse_query(query.as_deref().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err((status, msg)) = check_names(&shared, &filter) {
        return error_response(status, msg);
    }
    let rx = shared.trace.subscribe();
    let tracer = Tracer {
        shared: shared.clone(),
    };
    if let Err(e) = shared.apply_tracing().await {
        drop(tracer);
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let start = TraceLine::Start {
        node: shared.node.clone(),
        sample: shared.trace_sample(),
    };
    let state = (rx, tracer, filter, Some(start));
    let stream = futures::stream::unfold(state, |(mut rx, tracer, filter, start)| async move {
        if let Some(start) = start {
            let line = json_line(&start);
            return Some((
                Ok::<_, std::convert::Infallible>(line),
                (rx, tracer, filter, None),
            ));
        }
        loop {
            let line = match tokio::time::timeout(TRACE_KEEPALIVE, rx.recv()).await {
                Err(_) => "\n".to_string(),
                Ok(Ok(p)) => match describe(&tracer.shared, &p, &filter) {
                    Some(named) => json_line(&TraceLine::Packet(Box::new(named))),
                    None => continue,
                },
                Ok(Err(RecvError::Lagged(n))) => json_line(&TraceLine::Lost { packets: n }),
                Ok(Err(RecvError::Closed)) => return None,
            };
            return Some((Ok(line), (rx, tracer, filter, None)));
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

fn json_line<T: Serialize>(v: &T) -> String {
    // Serialising these types cannot fail (string keys, no maps with other keys).
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Names a traced packet with the agent's current metadata and translations, if it
/// passes the filter.
fn describe(
    shared: &Shared,
    p: &crate::trace::TracedPacket,
    filter: &FlowFilter,
) -> Option<crate::trace::TracePacket> {
    let names = shared.iface_names();
    let iface = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
    let meta = shared.meta_read();
    let nat = lock(&shared.nat);
    crate::trace::Namer {
        node: &shared.node,
        meta: &meta,
        nat: &nat,
        iface: &iface,
        mono_to_unix_ns: mono_to_unix_offset_ns(),
    }
    .describe(p, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_repeat_split_and_reject_unknown_keys() {
        let f = parse_query("ip=10.0.0.0%2F8&ip=fd00::1&port=53,80&proto=udp&iface=veth*").unwrap();
        assert_eq!(f.ips.len(), 2);
        assert_eq!(f.ips[0].prefix_len, 8);
        assert_eq!(f.ports, vec![53, 80]);
        assert_eq!(f.protos.len(), 1);
        assert_eq!(f.ifaces, vec!["veth*".to_string()]);
        let e = parse_query("protocol=tcp").unwrap_err().to_string();
        assert!(e.contains("unknown; use ip, port, proto, iface"), "{e}");
        let f =
            parse_query("pod=default%2Fpod-a&namespace=kube-system&service=default/web").unwrap();
        assert_eq!(f.pods[0].to_string(), "default/pod-a");
        assert_eq!(f.namespaces, vec!["kube-system".to_string()]);
        assert_eq!(f.services[0].name, "web");
        assert!(parse_query("pod=pod-a")
            .unwrap_err()
            .to_string()
            .contains("NAMESPACE/NAME"));
        // What the CLI sends is what the API reads.
        assert_eq!(parse_query(&f.to_query()).unwrap().to_query(), f.to_query());
        assert!(parse_query("port=0").is_err());
        assert!(parse_query("").unwrap().ips.is_empty());
    }
}
