//! The agent's HTTP server: the routes (`routes`, documented in docs/api.md), the map page
//! (`page`), the authenticated data listener (`mtls`) and the run loop that binds the
//! listeners, starts the agent and stops both on a signal.
//!
//! Three listeners, by purpose (docs/design.md, "Who may read the data API"):
//! - `--listen`, loopback only: everything, without credentials (the CLI on the node);
//! - `--metrics-listen`: `/metrics` and the probes, for Prometheus and the kubelet;
//! - `--api-listen`: the data API over TLS, to clients with a certificate from the
//!   flowtrace CA naming an allowed client (the relay).

pub mod mtls;
pub mod page;
pub mod relay;
pub mod routes;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tracing::{error, info};

use crate::{
    agent::{self, AgentConfig},
    error::{Error, Result},
    tls::TlsFiles,
};

/// Where the agent serves what.
#[derive(Clone, Debug)]
pub struct Listeners {
    /// Everything, unauthenticated: must be a loopback address.
    pub local: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz` only.
    pub metrics: Option<SocketAddr>,
    /// The data API over mutual TLS.
    pub api: Option<ApiListen>,
}

/// The authenticated data listener.
#[derive(Clone, Debug)]
pub struct ApiListen {
    pub addr: SocketAddr,
    /// The agent's certificate and key, and the CA client certificates must chain to.
    pub tls: TlsFiles,
    /// DNS names a client certificate must carry one of.
    pub clients: Vec<String>,
}

impl Listeners {
    /// Refuses what would serve the data API without authentication beyond this host.
    pub fn check(&self) -> Result<()> {
        if !self.local.ip().is_loopback() {
            return Err(Error::Usage(format!(
                "--listen {} is not a loopback address: it serves the data API (every connection of the node, live traces with names) without authentication. Keep --listen on 127.0.0.1 (or ::1) for the CLI on the node; serve /metrics and the probes with --metrics-listen, and the data API to the relay with --api-listen plus --tls-cert, --tls-key and --tls-client-ca",
                self.local
            )));
        }
        if let Some(api) = &self.api {
            if api.clients.is_empty() {
                return Err(Error::Usage(
                    "--api-listen needs at least one --tls-client-name (the relay's is flowtrace-relay)".into(),
                ));
            }
        }
        Ok(())
    }
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen {
            addr: addr.to_string(),
            flag,
            source,
        })
}

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(cfg: AgentConfig, listeners: Listeners) -> Result<()> {
    run_until(cfg, listeners, |_| {}, std::future::pending()).await
}

/// Runs the agent and its HTTP listeners until SIGINT, SIGTERM or `stop`, whichever comes
/// first; all three leave through the same shutdown path (tasks stopped, programs and
/// qdiscs detached). `listening` is told the loopback listener's address once it is bound
/// (`--listen` port 0 picks a free one: `flowtrace trace --standalone` runs the agent
/// in-process that way).
pub async fn run_until(
    cfg: AgentConfig,
    listeners: Listeners,
    listening: impl FnOnce(SocketAddr),
    stop: impl Future<Output = ()>,
) -> Result<()> {
    listeners.check()?;
    // Everything that can fail on the operator's input fails before the programs load.
    let local = bind(listeners.local, "--listen").await?;
    let metrics = match listeners.metrics {
        Some(a) => Some(bind(a, "--metrics-listen").await?),
        None => None,
    };
    let api = match &listeners.api {
        Some(a) => {
            let tls = crate::tls::Reloading::load(a.tls.clone(), crate::tls::server_config)?;
            Some((bind(a.addr, "--api-listen").await?, tls, a.clients.clone()))
        }
        None => None,
    };
    let mut running = agent::start(&cfg).await?;
    if let Ok(addr) = local.local_addr() {
        listening(addr);
    }
    let agent = running.agent();
    let mut tasks = vec![tokio::spawn(routes::serve(
        local,
        routes::router(agent.clone()),
    ))];
    if let Some(l) = metrics {
        tasks.push(tokio::spawn(routes::serve(
            l,
            routes::ops_router(agent.clone()),
        )));
    }
    if let Some((l, tls, clients)) = api {
        info!(addr = ?l.local_addr().ok(), ?clients, "data API served over mutual TLS");
        tasks.push(tls.spawn_reloader());
        let counter = agent.clone();
        tasks.push(tokio::spawn(mtls::serve(
            l,
            tls,
            Arc::new(clients),
            routes::data_router(agent.clone()),
            Arc::new(move |why| counter.count_refused(why)),
        )));
    }
    // Without the link watcher new pods would silently go untraced: exit instead, so the
    // DaemonSet restarts the agent (and the operator sees why in the log).
    let outcome = tokio::select! {
        _ = wait_for_signal() => Ok(()),
        _ = stop => Ok(()),
        res = running.watcher_stopped() => res,
    };
    if let Err(e) = &outcome {
        error!(error = %e, "the link watcher stopped; detaching and exiting so the agent can be restarted");
    }
    info!("shutting down");
    for t in &tasks {
        t.abort();
    }
    running.shutdown().await;
    outcome
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; waiting for Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
