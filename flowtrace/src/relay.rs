//! The relay: one API for the whole cluster (docs/api.md, "The relay"). It knows the agents
//! (`agents`: a static list or the agents' EndpointSlices), asks each once per question over
//! mutual TLS (`fanout`), with a timeout per agent, and merges what came back: flows with
//! their node, paths joined over every node, one live trace stream. An answer always says
//! which nodes are missing from it and why. Its own cost is in `metrics`.

pub mod agents;
pub mod fanout;
pub mod merge;
pub mod metrics;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde::de::DeserializeOwned;

use self::{
    agents::{AgentRef, AgentSet, Discovery},
    fanout::{Failure, Fanout},
    metrics::RelayMetrics,
};
use crate::{
    error::{Error, Result},
    k8s::source::MetaSource,
    model::wire::{
        DropsResponse, MissingNode, NodeStatus, PathDataResponse, RelayDropsResponse,
        StatusResponse,
    },
    query::{
        filter::FlowQuery,
        path::{NodeView, PathAnswer, PathEnd},
    },
    tls::{Reloading, TlsFiles},
};

/// Where the relay finds the agents through the Kubernetes API.
#[derive(Clone, Debug)]
pub struct Discover {
    pub source: MetaSource,
    /// Namespace of the agents' headless Service.
    pub namespace: String,
    /// Its name (the EndpointSlices carry `kubernetes.io/service-name=<service>`).
    pub service: String,
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Static agent URLs (`--agents`).
    pub agents: Vec<String>,
    /// Discovery, when there is no static list.
    pub discover: Option<Discover>,
    /// The relay's client certificate and the CA that vouches for the agents.
    pub tls: Option<TlsFiles>,
    /// The name agents' certificates carry.
    pub agent_server_name: String,
    /// Longest wait for one agent's answer.
    pub agent_timeout: Duration,
}

/// The relay's state: the agents, the client, the metrics.
pub struct Relay {
    set: Arc<AgentSet>,
    fanout: Fanout,
    timeout: Duration,
    pub metrics: RelayMetrics,
}

/// What the relay's tasks are, to stop them.
pub struct RelayTasks(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for RelayTasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Answers that know their node.
trait FromNode {
    fn node(&self) -> &str;
}
impl FromNode for merge::RawFlows {
    fn node(&self) -> &str {
        &self.node
    }
}
impl FromNode for PathDataResponse {
    fn node(&self) -> &str {
        &self.node
    }
}
impl FromNode for DropsResponse {
    fn node(&self) -> &str {
        &self.node
    }
}
impl FromNode for StatusResponse {
    fn node(&self) -> &str {
        &self.node
    }
}

/// One agent's answer to a fan-out.
struct Answer<T> {
    agent: AgentRef,
    value: T,
    elapsed: Duration,
}

/// Agents asked at once for `/v1/flows` (each answer is up to tens of MB until folded in).
pub const FLOWS_AT_ONCE: usize = 16;

/// How often the relay asks every agent for its status (for `/metrics`; `/v1/nodes` asks
/// afresh).
const STATUS_EVERY: Duration = Duration::from_secs(10);

impl Relay {
    /// Loads the certificates, starts discovery and the status rounds.
    pub async fn start(cfg: &RelayConfig) -> Result<(Arc<Relay>, RelayTasks)> {
        let tls = match &cfg.tls {
            Some(files) => {
                let name = cfg.agent_server_name.clone();
                Some(Reloading::load(files.clone(), move |m| {
                    crate::tls::client_config(m, &name)
                })?)
            }
            None => None,
        };
        if tls.is_none() && cfg.agents.iter().any(|a| a.starts_with("https://")) {
            return Err(Error::Usage(
                "https:// agents need the relay's certificate: give --tls-cert, --tls-key and --tls-ca".into(),
            ));
        }
        let set = AgentSet::with_static(&cfg.agents);
        let mut tasks = Vec::new();
        if let Some(t) = &tls {
            tasks.push(t.spawn_reloader());
        }
        if let (true, Some(d)) = (cfg.agents.is_empty(), &cfg.discover) {
            if tls.is_none() {
                return Err(Error::Usage(
                    "discovered agents serve the data API over mutual TLS: give --tls-cert, --tls-key and --tls-ca (or list plain http:// agents with --agents)".into(),
                ));
            }
            let client = crate::k8s::source::client(&d.source).await?;
            tasks.push(tokio::spawn(agents::follow(
                set.clone(),
                client,
                d.namespace.clone(),
                d.service.clone(),
            )));
        } else if cfg.agents.is_empty() {
            return Err(Error::Usage(
                "the relay has no agents to ask: give --agents URL,... or let it find them through the Kubernetes API (in a cluster, or with --kubeconfig)".into(),
            ));
        }
        let relay = Arc::new(Relay {
            set,
            fanout: Fanout::new(tls),
            timeout: cfg.agent_timeout,
            metrics: RelayMetrics::new()
                .map_err(|e| Error::Usage(format!("relay metrics: {e}")))?,
        });
        let r = relay.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_EVERY);
            loop {
                tick.tick().await;
                r.nodes().await;
            }
        }));
        Ok((relay, RelayTasks(tasks)))
    }

    /// The agents known now.
    pub fn agents(&self) -> Vec<AgentRef> {
        self.set.agents()
    }

    pub fn discovery(&self) -> Discovery {
        self.set.discovery()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn fanout(&self) -> &Fanout {
        &self.fanout
    }

    /// Records that an agent said it is `node`.
    pub fn heard(&self, url: &str, node: &str) {
        self.set.heard(url, node);
    }

    /// Asks every agent `path` at once; each answer within the timeout or missing.
    async fn ask_all<T: DeserializeOwned + FromNode>(
        &self,
        route: &'static str,
        path: &str,
    ) -> (Vec<Answer<T>>, Vec<MissingNode>) {
        let mut answers = Vec::new();
        let mut missing = Vec::new();
        let mut each = self.ask_each::<T>(route, path, usize::MAX);
        while let Some(r) = each.next().await {
            match r {
                Ok(a) => answers.push(a),
                Err(m) => missing.push(m),
            }
        }
        (answers, missing)
    }

    /// Asks every agent `path`, at most `at_once` at a time, yielding each answer (or why
    /// it is missing) as it comes, so a caller can fold answers in and let them go.
    fn ask_each<'a, T: DeserializeOwned + FromNode + 'a>(
        &'a self,
        route: &'static str,
        path: &'a str,
        at_once: usize,
    ) -> impl futures::Stream<Item = std::result::Result<Answer<T>, MissingNode>> + 'a {
        let asks = self.set.agents().into_iter().map(move |agent| async move {
            let started = Instant::now();
            let url = format!("{}{path}", agent.url);
            let res = match self.fanout.get(&url, self.timeout).await {
                Ok(body) => serde_json::from_slice::<T>(&body).map_err(|e| {
                    (
                        "bad_answer",
                        format!("the answer is not flowtrace's API ({e}): is this a flowtrace agent of the same version?"),
                    )
                }),
                Err(f) => Err((f.kind(), failure_text(&f))),
            };
            let elapsed = started.elapsed();
            self.metrics
                .agent_seconds
                .with_label_values(&[route])
                .observe(elapsed.as_secs_f64());
            let result = match &res {
                Ok(_) => "ok",
                Err((kind, _)) => kind,
            };
            self.metrics
                .agent_requests
                .with_label_values(&[route, result])
                .inc();
            match res {
                Ok(value) => {
                    self.set.heard(&agent.url, value.node());
                    Ok(Answer {
                        agent,
                        value,
                        elapsed,
                    })
                }
                Err((_, error)) => Err(MissingNode {
                    agent: agent.url,
                    node: agent.node,
                    error,
                }),
            }
        });
        futures::stream::iter(asks).buffer_unordered(at_once.max(1))
    }

    /// `/v1/flows` over every node: each node filters and limits its own, the relay keeps
    /// the `q.limit` largest of all (the JSON body of a [`RelayFlowsResponse`]). Answers
    /// are folded in as they come, [`FLOWS_AT_ONCE`] agents at a time, and each flow is
    /// kept as the agent wrote it: only its size is decoded, so the relay's cost and memory
    /// follow the limit, not the sum of every node's answers.
    pub async fn flows(&self, q: &FlowQuery) -> String {
        let path = format!("/v1/flows?{}", q.filter.to_query_with_limit(q.limit));
        let mut merge = merge::TopFlows::new(q.limit);
        let mut missing = Vec::new();
        let mut each = self.ask_each::<merge::RawFlows>("flows", &path, FLOWS_AT_ONCE);
        while let Some(r) = each.next().await {
            match r {
                Ok(a) => merge.add(a.agent.url, a.value, a.elapsed),
                Err(m) => missing.push(m),
            }
        }
        merge.into_json(missing)
    }

    /// `/v1/path`: every node's flows, latency and tunnels, joined.
    pub async fn path(&self, src: &PathEnd, dst: &PathEnd, window: Duration) -> PathAnswer {
        let (views, missing) = self.views(window).await;
        let now = crate::util::unix_now_ns();
        let paths = crate::query::path::paths(&views, src, dst, window.as_nanos() as u64, now);
        PathAnswer {
            nodes: views.iter().map(|v| v.node.clone()).collect(),
            paths,
            missing,
        }
    }

    /// Every node's `/v1/pathdata` for `window`, by node name, and the agents that did not
    /// answer.
    async fn views(&self, window: Duration) -> (Vec<NodeView>, Vec<MissingNode>) {
        let path = format!("/v1/pathdata?window_s={}", window.as_secs());
        let (answers, missing) = self.ask_all::<PathDataResponse>("pathdata", &path).await;
        let mut views: Vec<NodeView> = answers
            .into_iter()
            .map(|a| NodeView::from_pathdata(a.value))
            .collect();
        views.sort_by(|a, b| a.node.cmp(&b.node));
        (views, missing)
    }

    /// `/v1/map` over every node: the paths of every connection joined, grouped into the
    /// application's map (computed off the async workers: thousands of edges take
    /// milliseconds).
    pub async fn map(
        &self,
        filter: crate::query::map::MapFilter,
        window: Duration,
    ) -> crate::query::map::MapAnswer {
        let (views, missing) = self.views(window).await;
        let now = crate::util::unix_now_ns();
        let window_ns = window.as_nanos() as u64;
        let built = tokio::task::spawn_blocking(move || {
            crate::query::map::map(&views, &filter, window_ns, now)
        })
        .await;
        let mut answer = match built {
            Ok(a) => a,
            // Only a panic in the map's code gets here: answer with what is known.
            Err(e) => {
                tracing::error!(error = %e, "building the map failed");
                crate::query::map::MapAnswer::default()
            }
        };
        answer.missing = missing;
        answer
    }

    /// `/v1/drops` over every node: each node's answer as it gave it (drops are placed on
    /// the node they happened on, so nothing is joined across nodes).
    pub async fn drops(&self, q: &crate::query::filter::FlowQuery) -> RelayDropsResponse {
        let path = format!("/v1/drops?{}", q.filter.to_query_with_limit(q.limit));
        let (answers, missing) = self.ask_all::<DropsResponse>("drops", &path).await;
        let mut nodes: Vec<DropsResponse> = answers.into_iter().map(|a| a.value).collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        RelayDropsResponse { nodes, missing }
    }

    /// `/v1/nodes`: every agent known, asked for its status now.
    pub async fn nodes(&self) -> Vec<NodeStatus> {
        let known = self.set.agents();
        let (answers, missing) = self.ask_all::<StatusResponse>("status", "/v1/status").await;
        let now_ms = crate::util::unix_now_ns() / 1_000_000;
        let mut by_source: std::collections::BTreeMap<&str, f64> = Default::default();
        for a in &known {
            *by_source.entry(a.source).or_default() += 1.0;
        }
        for source in ["static", "endpointslice"] {
            self.metrics
                .agents
                .with_label_values(&[source])
                .set(by_source.get(source).copied().unwrap_or(0.0));
        }
        self.metrics.agents_answering.set(answers.len() as f64);
        let mut out: Vec<NodeStatus> = answers
            .into_iter()
            .map(|a| NodeStatus {
                node: Some(a.value.node),
                agent: a.agent.url,
                source: a.agent.source.to_string(),
                ok: true,
                version: Some(a.value.version),
                ready: Some(a.value.ready),
                not_ready: a.value.not_ready,
                interfaces_synced: Some(a.value.interfaces_synced),
                metadata_synced: Some(a.value.metadata_synced),
                last_ok_unix_ms: Some(now_ms),
                error: None,
            })
            .chain(missing.into_iter().map(|m| {
                NodeStatus {
                    source: known
                        .iter()
                        .find(|k| k.url == m.agent)
                        .map_or("static", |k| k.source)
                        .to_string(),
                    agent: m.agent,
                    ok: false,
                    node: m.node,
                    version: None,
                    ready: None,
                    not_ready: None,
                    interfaces_synced: None,
                    metadata_synced: None,
                    last_ok_unix_ms: None,
                    error: Some(m.error),
                }
            }))
            .collect();
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        out
    }
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Status(401 | 403, _) => format!(
            "{f} (the agent refused the relay's certificate: is it from the agents' CA, and does the agent allow its name with --tls-client-name?)"
        ),
        _ => f.to_string(),
    }
}

#[cfg(test)]
mod tests;
