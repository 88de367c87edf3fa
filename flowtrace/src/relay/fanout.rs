//! The relay's HTTP client to the agents: one pooled client (TLS with the relay's
//! certificate for `https://` agents, plain HTTP for `http://` ones), every request bounded
//! in time and in the size of its answer.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use crate::tls::Reloading;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Most bytes one agent's answer may take (100 000 flows with names is ~60 MB).
pub const MAX_ANSWER_BYTES: usize = 256 << 20;

/// The client and the TLS configuration it was built with.
type Pooled = (Arc<rustls::ClientConfig>, Client<Https, Empty<Bytes>>);

/// The pooled client, rebuilt when the relay's certificate files change.
pub struct Fanout {
    tls: Option<Arc<Reloading<rustls::ClientConfig>>>,
    client: std::sync::RwLock<Pooled>,
}

fn build(cfg: Arc<rustls::ClientConfig>) -> Client<Https, Empty<Bytes>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    http.set_nodelay(true);
    // The connector sets ALPN itself (http/1.1 here) and refuses a config that has it.
    let mut tls = (*cfg).clone();
    tls.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(4)
        .build(https)
}

/// Without certificates: `https://` agents fail verification against an empty CA set, with
/// an error that says the relay has no certificates.
fn no_tls() -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }),
    )
}

/// Why an agent did not answer.
#[derive(Debug)]
pub enum Failure {
    Timeout,
    Status(u16, String),
    Transport(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => write!(f, "no answer within the agent timeout"),
            Failure::Status(code, body) => write!(f, "HTTP {code}: {body}"),
            Failure::Transport(e) => write!(f, "{e}"),
        }
    }
}

impl Failure {
    /// For the relay's metrics: `timeout`, `http_error` or `unreachable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Status(..) => "http_error",
            Failure::Transport(_) => "unreachable",
        }
    }
}

/// The cause chain of an error on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Fanout {
    pub fn new(tls: Option<Arc<Reloading<rustls::ClientConfig>>>) -> Self {
        let cfg = tls.as_ref().map_or_else(no_tls, |t| t.current());
        Self {
            client: std::sync::RwLock::new((cfg.clone(), build(cfg))),
            tls,
        }
    }

    fn client(&self) -> Client<Https, Empty<Bytes>> {
        let current = self.tls.as_ref().map(|t| t.current());
        {
            let g = match self.client.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match &current {
                Some(c) if !Arc::ptr_eq(c, &g.0) => {}
                _ => return g.1.clone(),
            }
        }
        // The certificates were rotated: new connections use the new ones.
        let cfg = current.unwrap_or_else(no_tls);
        let client = build(cfg.clone());
        let mut g = match self.client.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = (cfg, client.clone());
        client
    }

    fn request(url: &str) -> Result<hyper::Request<Empty<Bytes>>, Failure> {
        hyper::Request::get(url)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| Failure::Transport(format!("bad agent URL {url}: {e}")))
    }

    /// GETs `url` and returns the whole body, within `timeout` for everything.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Bytes, Failure> {
        let req = Self::request(url)?;
        let client = self.client();
        let work = async move {
            let resp = client
                .request(req)
                .await
                .map_err(|e| Failure::Transport(chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| Failure::Transport(format!("reading the answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                let msg = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| text.chars().take(300).collect());
                return Err(Failure::Status(status.as_u16(), msg));
            }
            Ok(body)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Opens a streaming GET (the trace): the response once its headers came, within
    /// `timeout`.
    pub async fn stream(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<hyper::body::Incoming, Failure> {
        let req = Self::request(url)?;
        let client = self.client();
        let resp = match tokio::time::timeout(timeout, client.request(req)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(Failure::Transport(chain(&e))),
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            let code = resp.status().as_u16();
            let body = match tokio::time::timeout(
                timeout,
                Limited::new(resp.into_body(), 64 << 10).collect(),
            )
            .await
            {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                _ => String::new(),
            };
            return Err(Failure::Status(code, body));
        }
        Ok(resp.into_body())
    }
}
