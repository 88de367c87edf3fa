//! The relay's HTTP API (docs/api.md, "The relay") and its run loop:
//!
//! - `GET /v1/flows[?filters&limit=N]`: every node's flows, each with its node, and the
//!   nodes missing from the answer.
//! - `GET /v1/path?src=&dst=[&window_s=]`: the paths joined over every node.
//! - `GET /v1/map[?window_s=&namespace=&workload=]`: the application's map over every node;
//!   `GET /map`: the page that draws it, refreshing itself (`server::page`).
//! - `GET /v1/trace[?filters]`: one live stream merged from every node's.
//! - `GET /v1/nodes`: every agent known, asked for its status now.
//! - `GET /metrics`, `/healthz`, `/readyz` (also on `--metrics-listen`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use http_body_util::BodyExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::{
    bind,
    routes::{error_response, json_line, metrics_response},
};
use crate::{
    error::Result,
    model::wire::{MissingNode, RelayTraceLine, TraceLine},
    query::{
        filter::{percent_decode, FlowFilter, FlowQuery},
        path::PathEnd,
    },
    relay::{agents::Discovery, Relay, RelayConfig},
};

/// Runs the relay until SIGINT or SIGTERM.
pub async fn run(cfg: RelayConfig, listen: SocketAddr, metrics: Option<SocketAddr>) -> Result<()> {
    let api = bind(listen, "--listen").await?;
    let ops = match metrics {
        Some(a) => Some(bind(a, "--metrics-listen").await?),
        None => None,
    };
    let (relay, _tasks) = Relay::start(&cfg).await?;
    info!(%listen, agents = cfg.agents.len(), discover = cfg.agents.is_empty(), "flowtrace relay serving");
    let mut servers = vec![tokio::spawn(super::routes::serve(
        api,
        router(relay.clone()),
    ))];
    if let Some(l) = ops {
        servers.push(tokio::spawn(super::routes::serve(
            l,
            ops_router(relay.clone()),
        )));
    }
    super::wait_for_signal().await;
    info!("relay shutting down");
    for s in &servers {
        s.abort();
    }
    Ok(())
}

pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/drops", get(drops))
        .route("/v1/path", get(path))
        .route("/v1/map", get(map))
        .route(
            "/map",
            get(|| async { axum::response::Html(super::page::MAP_PAGE) }),
        )
        .route("/v1/trace", get(trace))
        .route("/v1/nodes", get(nodes))
        .with_state(relay.clone())
        .merge(ops_router(relay))
}

pub fn ops_router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(relay)
}

/// Counts and times one answer of route `route`.
fn served(relay: &Relay, route: &str, started: Instant, r: Response) -> Response {
    relay
        .metrics
        .requests
        .with_label_values(&[route, r.status().as_str()])
        .inc();
    relay
        .metrics
        .request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    r
}

fn json<T: Serialize>(v: &T) -> Response {
    Json(v).into_response()
}

async fn flows(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let r = match FlowQuery::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            relay.flows(&q).await,
        )
            .into_response(),
        Err(e) => error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    served(&relay, "flows", started, r)
}

async fn drops(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let r = match FlowQuery::from_query(query.as_deref().unwrap_or("")) {
        Ok(q) => json(&relay.drops(&q).await),
        Err(e) => error_response(StatusCode::BAD_REQUEST, e.to_string()),
    };
    served(&relay, "drops", started, r)
}

/// `src=`, `dst=` and `window_s=` of `/v1/path`.
fn path_query(query: &str) -> std::result::Result<(PathEnd, PathEnd, Duration), String> {
    let (mut src, mut dst, mut window) = (None, None, Duration::from_secs(60));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "src" => src = Some(PathEnd::parse(&v).map_err(|e| format!("src: {e}"))?),
            "dst" => dst = Some(PathEnd::parse(&v).map_err(|e| format!("dst: {e}"))?),
            "window_s" => {
                window = Duration::from_secs(v.parse().map_err(|_| {
                    format!("window_s `{v}` is not a number of seconds (0: everything held)")
                })?)
            }
            other => {
                return Err(format!(
                    "unknown parameter `{other}`: /v1/path takes src, dst and window_s"
                ))
            }
        }
    }
    match (src, dst) {
        (Some(s), Some(d)) => Ok((s, d, window)),
        _ => Err("/v1/path needs src= and dst= (an IP address, pod/NS/NAME, workload/NS/NAME or svc/NS/NAME)".into()),
    }
}

async fn path(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let r = match path_query(query.as_deref().unwrap_or("")) {
        Ok((src, dst, window)) => json(&relay.path(&src, &dst, window).await),
        Err(msg) => error_response(StatusCode::BAD_REQUEST, msg),
    };
    served(&relay, "path", started, r)
}

async fn map(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let started = Instant::now();
    let r = match crate::query::map::map_query(query.as_deref().unwrap_or("")) {
        Ok((filter, window)) => json(&relay.map(filter, window).await),
        Err(msg) => error_response(StatusCode::BAD_REQUEST, msg),
    };
    served(&relay, "map", started, r)
}

async fn nodes(State(relay): State<Arc<Relay>>) -> Response {
    let started = Instant::now();
    let r = json(&relay.nodes().await);
    served(&relay, "nodes", started, r)
}

async fn metrics(State(relay): State<Arc<Relay>>) -> Response {
    metrics_response(relay.metrics.text())
}

async fn ready(State(relay): State<Arc<Relay>>) -> Response {
    match relay.discovery() {
        Discovery::Following {
            synced: false,
            error,
        } => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the agents' EndpointSlices are not listed yet{}",
                error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        ),
        _ => (StatusCode::OK, "ready\n").into_response(),
    }
}

/// How often the merged trace looks for agents that joined.
const TRACE_REDISCOVER: Duration = Duration::from_secs(2);
/// An agent's trace stream with nothing, not even its keep-alive (every 2 s), for this
/// long is taken for dead and reopened.
const TRACE_SILENCE: Duration = Duration::from_secs(7);
/// Lines waiting for a slow client; beyond, packets are dropped and counted.
const TRACE_QUEUE: usize = 4096;

/// Stops an agent's trace task when the merged stream is dropped.
struct Followers {
    tasks: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl Followers {
    /// Follows every agent known now that is not followed yet; stops following those no
    /// longer known.
    fn sync(&mut self, relay: &Arc<Relay>, query: &str, tx: &mpsc::Sender<RelayTraceLine>) {
        let now: Vec<String> = relay.agents().into_iter().map(|a| a.url).collect();
        self.tasks.retain(|url, t| {
            let keep = now.contains(url);
            if !keep {
                t.abort();
            }
            keep
        });
        for url in now {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.tasks.entry(url) {
                let url = slot.key().clone();
                slot.insert(tokio::spawn(follow_agent(
                    relay.clone(),
                    url,
                    query.to_string(),
                    tx.clone(),
                )));
            }
        }
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

async fn trace(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    if let Err(e) = FlowFilter::from_query(&query) {
        return served(
            &relay,
            "trace",
            Instant::now(),
            error_response(StatusCode::BAD_REQUEST, e.to_string()),
        );
    }
    relay.metrics.trace_streams.inc();
    relay
        .metrics
        .requests
        .with_label_values(&["trace", "200"])
        .inc();
    let (tx, rx) = mpsc::channel::<RelayTraceLine>(TRACE_QUEUE);
    let start = RelayTraceLine::Start {
        agents: relay.agents().len(),
    };
    let mut followers = Followers {
        tasks: HashMap::new(),
    };
    followers.sync(&relay, &query, &tx);
    struct Stream {
        relay: Arc<Relay>,
        rx: mpsc::Receiver<RelayTraceLine>,
        tx: mpsc::Sender<RelayTraceLine>,
        followers: Followers,
        query: String,
        first: Option<RelayTraceLine>,
        /// When the followers were last matched to the agents known.
        synced: Instant,
    }
    impl Drop for Stream {
        fn drop(&mut self) {
            self.relay.metrics.trace_streams.dec();
        }
    }
    let state = Stream {
        relay,
        rx,
        tx,
        followers,
        query,
        first: Some(start),
        synced: Instant::now(),
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            return Some((Ok::<_, Infallible>(json_line(&first)), s));
        }
        // Nodes that joined since the last look are followed, those that left dropped, at
        // least every TRACE_REDISCOVER whether or not packets keep coming.
        if s.synced.elapsed() >= TRACE_REDISCOVER {
            s.followers.sync(&s.relay, &s.query, &s.tx);
            s.synced = Instant::now();
        }
        match tokio::time::timeout(TRACE_REDISCOVER, s.rx.recv()).await {
            Ok(Some(l)) => Some((Ok(json_line(&l)), s)),
            Ok(None) => None,
            // Keep-alive: a client that went away is noticed.
            Err(_) => Some((Ok("\n".to_string()), s)),
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Follows one agent's `/v1/trace` for the merged stream, reopening it (1 s, then up to
/// 10 s apart) when it fails, and says so in the stream each time.
async fn follow_agent(
    relay: Arc<Relay>,
    url: String,
    query: String,
    tx: mpsc::Sender<RelayTraceLine>,
) {
    let target = if query.is_empty() {
        format!("{url}/v1/trace")
    } else {
        format!("{url}/v1/trace?{query}")
    };
    let mut backoff = Duration::from_secs(1);
    let mut node: Option<String> = None;
    loop {
        let error = match relay.fanout().stream(&target, relay.timeout()).await {
            Err(f) => f.to_string(),
            Ok(body) => match pump(&relay, &url, body, &tx, &mut node).await {
                Pumped::ClientGone => return,
                Pumped::Ended(e) => {
                    backoff = Duration::from_secs(1);
                    e
                }
            },
        };
        let missing = RelayTraceLine::Missing(MissingNode {
            agent: url.clone(),
            node: node.clone(),
            error,
        });
        if tx.send(missing).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

enum Pumped {
    ClientGone,
    Ended(String),
}

/// Forwards an agent's trace lines until its stream ends, goes silent or the client goes.
async fn pump(
    relay: &Relay,
    url: &str,
    mut body: hyper::body::Incoming,
    tx: &mpsc::Sender<RelayTraceLine>,
    node: &mut Option<String>,
) -> Pumped {
    let mut buf: Vec<u8> = Vec::new();
    let mut lost = 0u64;
    loop {
        let frame = match tokio::time::timeout(TRACE_SILENCE, body.frame()).await {
            Err(_) => {
                return Pumped::Ended(format!(
                    "its trace stream went silent for {} s",
                    TRACE_SILENCE.as_secs()
                ))
            }
            Ok(None) => return Pumped::Ended("its trace stream ended (agent restarting?)".into()),
            Ok(Some(Err(e))) => return Pumped::Ended(format!("reading its trace stream: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let out = match serde_json::from_str::<TraceLine>(text) {
                Ok(TraceLine::Start { node: n, sample }) => {
                    relay.heard(url, &n);
                    *node = Some(n.clone());
                    RelayTraceLine::Joined {
                        agent: url.to_string(),
                        node: n,
                        sample,
                    }
                }
                Ok(TraceLine::Packet(p)) => RelayTraceLine::Packet(p),
                Ok(TraceLine::Drop(d)) => RelayTraceLine::Drop(d),
                Ok(TraceLine::Retransmit(d)) => RelayTraceLine::Retransmit(d),
                Ok(TraceLine::Lost { packets }) => RelayTraceLine::Lost {
                    node: node.clone().unwrap_or_else(|| url.to_string()),
                    packets,
                },
                Err(e) => {
                    error!(agent = %url, error = %e, "a trace line that is not flowtrace's API; skipped");
                    continue;
                }
            };
            // Packets are dropped (and counted) rather than slowing every node's stream
            // for one slow client; news of nodes always waits for room.
            match out {
                RelayTraceLine::Packet(_)
                | RelayTraceLine::Drop(_)
                | RelayTraceLine::Retransmit(_) => match tx.try_send(out) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => lost += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Pumped::ClientGone,
                },
                other => {
                    if tx.send(other).await.is_err() {
                        return Pumped::ClientGone;
                    }
                }
            }
            if lost > 0 {
                let note = RelayTraceLine::Lost {
                    node: node.clone().unwrap_or_else(|| url.to_string()),
                    packets: lost,
                };
                if tx.try_send(note).is_ok() {
                    lost = 0;
                }
            }
        }
    }
}
