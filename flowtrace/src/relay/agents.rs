//! Which agents the relay asks: a static list (`--agents`), or the agents' headless
//! Service's EndpointSlices followed through the Kubernetes API, so nodes that join are
//! asked from their first endpoint on and nodes that leave are dropped.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use tracing::{info, warn};

use crate::util::lock;

/// An agent the relay knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRef {
    /// Base URL, e.g. `https://10.0.0.1:9652`.
    pub url: String,
    /// The node, when the EndpointSlice said or the agent answered.
    pub node: Option<String>,
    /// `static` or `endpointslice`.
    pub source: &'static str,
}

/// The agents to ask now, and what was last heard of each.
#[derive(Default)]
pub struct AgentSet {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    statics: Vec<AgentRef>,
    /// By EndpointSlice name: the agents it lists.
    slices: HashMap<String, Vec<AgentRef>>,
    /// Node names agents gave in their answers, by URL.
    heard: HashMap<String, String>,
    /// Discovery state for `/v1/nodes` and `/readyz`.
    discovery: Discovery,
}

/// How the relay knows the agents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Discovery {
    /// `--agents`.
    #[default]
    Static,
    /// Following EndpointSlices; `synced` once the first list came.
    Following { synced: bool, error: Option<String> },
}

impl AgentSet {
    pub fn with_static(urls: &[String]) -> Arc<Self> {
        let set = Self::default();
        lock(&set.inner).statics = urls
            .iter()
            .map(|u| AgentRef {
                url: u.trim_end_matches('/').to_string(),
                node: None,
                source: "static",
            })
            .collect();
        Arc::new(set)
    }

    /// Every agent, static first, each URL once, with its node as best known.
    pub fn agents(&self) -> Vec<AgentRef> {
        let g = lock(&self.inner);
        let mut by_url: BTreeMap<String, AgentRef> = BTreeMap::new();
        for a in g.statics.iter().chain(g.slices.values().flatten()) {
            by_url.entry(a.url.clone()).or_insert_with(|| a.clone());
        }
        by_url
            .into_values()
            .map(|mut a| {
                if let Some(n) = g.heard.get(&a.url) {
                    a.node = Some(n.clone());
                }
                a
            })
            .collect()
    }

    /// Records the node an agent said it is.
    pub fn heard(&self, url: &str, node: &str) {
        let mut g = lock(&self.inner);
        if g.heard.get(url).map(String::as_str) != Some(node) {
            g.heard.insert(url.to_string(), node.to_string());
        }
    }

    pub fn discovery(&self) -> Discovery {
        lock(&self.inner).discovery.clone()
    }

    fn set_discovery(&self, d: Discovery) {
        lock(&self.inner).discovery = d;
    }

    fn replace_slices(&self, slices: HashMap<String, Vec<AgentRef>>) {
        let mut g = lock(&self.inner);
        let before: usize = g.slices.values().map(Vec::len).sum();
        g.slices = slices;
        let after: usize = g.slices.values().map(Vec::len).sum();
        if before != after {
            info!(before, after, "agents from EndpointSlices");
        }
    }

    fn put_slice(&self, name: String, agents: Vec<AgentRef>) {
        let mut g = lock(&self.inner);
        if g.slices.get(&name) != Some(&agents) {
            info!(slice = %name, agents = agents.len(), "EndpointSlice changed");
            g.slices.insert(name, agents);
        }
    }

    fn drop_slice(&self, name: &str) {
        if lock(&self.inner).slices.remove(name).is_some() {
            info!(slice = %name, "EndpointSlice deleted");
        }
    }
}

/// The agents an EndpointSlice lists: every address (ready or not: an agent that is not
/// ready still counts and answers), at the port named `port`.
pub fn agents_of(slice: &EndpointSlice, port: &str) -> Vec<AgentRef> {
    let Some(p) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port))
        .and_then(|p| p.port)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        for addr in &ep.addresses {
            let host = match addr.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                _ => addr.clone(),
            };
            out.push(AgentRef {
                url: format!("https://{host}:{p}"),
                node: ep.node_name.clone(),
                source: "endpointslice",
            });
        }
    }
    out.sort_by(|a, b| a.url.cmp(&b.url));
    out
}

/// Follows the EndpointSlices of Service `service` in `namespace` until the task is
/// aborted; the watcher re-lists and backs off by itself when the API server goes away.
pub async fn follow(set: Arc<AgentSet>, client: kube::Client, namespace: String, service: String) {
    use kube::runtime::WatchStreamExt as _;
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    set.set_discovery(Discovery::Following {
        synced: false,
        error: None,
    });
    let mut pending: HashMap<String, Vec<AgentRef>> = HashMap::new();
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let name_of = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => pending.clear(),
            Ok(watcher::Event::InitApply(s)) => {
                pending.insert(name_of(&s), agents_of(&s, "api"));
            }
            Ok(watcher::Event::InitDone) => {
                set.replace_slices(std::mem::take(&mut pending));
                set.set_discovery(Discovery::Following {
                    synced: true,
                    error: None,
                });
            }
            Ok(watcher::Event::Apply(s)) => set.put_slice(name_of(&s), agents_of(&s, "api")),
            Ok(watcher::Event::Delete(s)) => set.drop_slice(&name_of(&s)),
            Err(e) => {
                warn!(error = %e, %namespace, %service, "following the agents' EndpointSlices; retrying (the agents known stay)");
                let synced = matches!(set.discovery(), Discovery::Following { synced: true, .. });
                set.set_discovery(Discovery::Following {
                    synced,
                    error: Some(e.to_string()),
                });
            }
        }
    }
}
