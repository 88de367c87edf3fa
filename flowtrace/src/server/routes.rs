//! The agent's HTTP API (JSON). Documented in docs/api.md. Each handler parses its request,
//! asks the agent one question and writes the answer; the answers are built in `agent`.
//!
//! - `GET /v1/flows[?ip=&port=&proto=&iface=&pod=&namespace=&workload=&service=]`: the flow
//!   table, drained fresh for the request, with names and Service translations.
//! - `GET /v1/drops[?same filters as /v1/flows]`: packets the kernel dropped on this node per
//!   flow, where and why, and TCP retransmissions.
//! - `GET /v1/interfaces`: what flowtrace is attached to.
//! - `GET /v1/nat`: NAT translations (kernel programs vs conntrack) and the cross-check counters.
//! - `GET /v1/metadata`: where names come from and whether each kind is synced.
//! - `GET /v1/latency`: hop latency and TCP round-trip histograms of sampled packets.
//! - `GET /v1/status`: node, version, readiness (what the relay's `/v1/nodes` shows).
//! - `GET /v1/pathdata[?window_s=N]`: flows, latency and tunnels in one answer (one drain),
//!   what `flowtrace path` and the relay's `/v1/path` join.
//! - `GET /v1/map[?window_s=N&namespace=NS&workload=NS/NAME]`: this node's share of the
//!   application's map (`query::map`); `GET /map`: the page that draws it (`server::page`).
//! - `GET /v1/trace[?same filters as /v1/flows]`: live tracing, a stream of JSON lines
//!   (one per packet, hook by hook) for as long as the client reads.
//! - `GET /v1/stats`: kernel counters (packets seen, every loss) and agent counters.
//! - `GET /metrics`: Prometheus text format (traffic, translations, latency, health).
//! - `GET /healthz`: liveness. `GET /readyz`: 200 once the interfaces present at start are
//!   attached and metadata (if any source is configured) is synced.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Serialize;
use tracing::error;

use crate::{
    agent::{state::NameError, Agent},
    model::wire::{ApiError, TraceLine},
    query::filter::{FlowFilter, FlowQuery},
};

pub(super) fn error_response(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

/// Everything: the loopback listener's routes (the local CLI, no credentials).
pub fn router(agent: Arc<Agent>) -> Router {
    data_router(agent.clone()).merge(ops_router(agent))
}

/// The data API: every connection of the node, live traces with names. Served on loopback
/// and, to authenticated clients only, on the `--api-listen` address.
pub fn data_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/drops", get(drops))
        .route("/v1/interfaces", get(interfaces))
        .route("/v1/nat", get(nat))
        .route("/v1/stats", get(stats))
        .route("/v1/metadata", get(metadata))
        .route("/v1/latency", get(latency))
        .route("/v1/pathdata", get(pathdata))
        .route("/v1/map", get(map))
        .route("/map", get(map_page))
        .route(
            "/v1/status",
            get(|State(agent): State<Arc<Agent>>| async move { Json(agent.status()) }),
        )
        .route("/v1/trace", get(trace))
        .with_state(agent)
}

/// What any exporter serves on the node address: `/metrics` and the probes.
pub fn ops_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(agent)
}

/// Serves `app` on a plain-HTTP listener until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) {
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "HTTP server stopped");
    }
}

/// The request's filter, its names checked against the agent's metadata.
fn filter_of(agent: &Agent, query: Option<&str>) -> Result<FlowFilter, (StatusCode, String)> {
    let filter = FlowFilter::from_query(query.unwrap_or(""))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    check_names(agent, &filter)?;
    Ok(filter)
}

fn check_names(agent: &Agent, filter: &FlowFilter) -> Result<(), (StatusCode, String)> {
    agent.check_names(filter).map_err(|e| match e {
        NameError::NoMetadata(m) => (StatusCode::BAD_REQUEST, m),
        NameError::Missing(m) => (StatusCode::NOT_FOUND, m),
    })
}

fn json_or_500<T: Serialize>(r: crate::Result<T>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn flows(State(agent): State<Arc<Agent>>, RawQuery(query): RawQuery) -> Response {
    let q = match FlowQuery::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err((status, msg)) = check_names(&agent, &q.filter) {
        return error_response(status, msg);
    }
    json_or_500(agent.flows(&q.filter, q.limit).await)
}

async fn drops(State(agent): State<Arc<Agent>>, RawQuery(query): RawQuery) -> Response {
    let q = match FlowQuery::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err((status, msg)) = check_names(&agent, &q.filter) {
        return error_response(status, msg);
    }
    json_or_500(agent.drops(&q.filter, q.limit).await)
}

async fn pathdata(State(agent): State<Arc<Agent>>, RawQuery(query): RawQuery) -> Response {
    let window = match window_of(query.as_deref().unwrap_or("")) {
        Ok(w) => w,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, msg),
    };
    json_or_500(agent.pathdata(window).await)
}

/// The map page (it fetches `v1/map` from where it was served).
async fn map_page() -> Response {
    axum::response::Html(crate::server::page::MAP_PAGE).into_response()
}

/// This node's share of the map: its own connections' paths, grouped as the relay groups
/// every node's (an edge that crosses nodes shows only its hops here).
async fn map(State(agent): State<Arc<Agent>>, RawQuery(query): RawQuery) -> Response {
    let (filter, window) = match crate::query::map::map_query(query.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, msg),
    };
    let data = match agent.pathdata(window).await {
        Ok(d) => d,
        Err(e) => return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let view = crate::query::path::NodeView::from_pathdata(data);
    let now = crate::util::unix_now_ns();
    let window_ns = window.as_nanos() as u64;
    match tokio::task::spawn_blocking(move || {
        crate::query::map::map(&[view], &filter, window_ns, now)
    })
    .await
    {
        Ok(m) => Json(m).into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("building the map failed: {e}"),
        ),
    }
}

/// `window_s=N` of a query (0, the default: everything held).
pub fn window_of(query: &str) -> Result<std::time::Duration, String> {
    let mut window = std::time::Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("window_s", v)) => {
                let s: u64 = v.parse().map_err(|_| {
                    format!("window_s `{v}` is not a number of seconds (0: everything held)")
                })?;
                window = std::time::Duration::from_secs(s);
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{pair}`: /v1/pathdata takes window_s"
                ))
            }
        }
    }
    Ok(window)
}

async fn metadata(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.metadata()).into_response()
}

async fn latency(State(agent): State<Arc<Agent>>) -> Response {
    json_or_500(agent.latency().await)
}

async fn interfaces(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.interfaces().await).into_response()
}

async fn stats(State(agent): State<Arc<Agent>>) -> Response {
    json_or_500(agent.stats().await)
}

async fn nat(State(agent): State<Arc<Agent>>) -> Response {
    json_or_500(agent.nat().await)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    metrics_response(agent.metrics_text().await)
}

/// A Prometheus text-format answer, or 500 saying the encoding failed.
pub(super) fn metrics_response(text: Result<String, prometheus::Error>) -> Response {
    match text {
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

async fn ready(State(agent): State<Arc<Agent>>) -> Response {
    match agent.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => error_response(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// While a tracer is attached: unregisters it when its response is dropped (the client
/// went away) and makes the kernel stop writing trace events if it was the last.
struct Tracer {
    agent: Arc<Agent>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.agent.unsubscribe();
        let agent = self.agent.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = agent.apply_tracing().await {
                    error!(error = %e, "turning trace events off after the last tracer left");
                }
            });
        }
    }
}

/// An idle stream writes an empty line this often, so a tracer that went away is noticed
/// (and the kernel stops tracing) even when no packet matches.
const TRACE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);

async fn trace(State(agent): State<Arc<Agent>>, RawQuery(query): RawQuery) -> Response {
    use tokio::sync::broadcast::error::RecvError;

    let filter = match filter_of(&agent, query.as_deref()) {
        Ok(f) => f,
        Err((status, msg)) => return error_response(status, msg),
    };
    let rx = agent.subscribe();
    let tracer = Tracer {
        agent: agent.clone(),
    };
    if let Err(e) = agent.apply_tracing().await {
        drop(tracer);
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let start = TraceLine::Start {
        node: agent.node().to_string(),
        sample: agent.trace_sample(),
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
                Ok(Ok(p)) => match tracer.agent.describe(&p, &filter) {
                    Some(line) => json_line(&line),
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

pub(super) fn json_line<T: Serialize>(v: &T) -> String {
    // Serialising these types cannot fail (string keys, no maps with other keys).
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    s
}
