//! The agent's HTTP server: the routes (`routes`, documented in docs/api.md) and the run loop
//! that binds the listener, starts the agent and stops both on a signal.

pub mod routes;

use std::{future::Future, net::SocketAddr};

use tracing::{error, info};

use crate::{
    agent::{self, AgentConfig},
    error::{Error, Result},
};

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    run_until(cfg, |_| {}, std::future::pending()).await
}

/// Runs the agent and its HTTP server until SIGINT, SIGTERM or `stop`, whichever comes
/// first; all three leave through the same shutdown path (tasks stopped, programs and
/// qdiscs detached). `listening` is told the API's address once it is bound (`--listen`
/// port 0 picks a free one: `flowtrace trace --standalone` runs the agent in-process that
/// way).
pub async fn run_until(
    cfg: AgentConfig,
    listening: impl FnOnce(SocketAddr),
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let mut running = agent::start(&cfg).await?;
    if let Ok(addr) = listener.local_addr() {
        listening(addr);
    }
    let api = tokio::spawn(routes::serve(listener, running.agent()));
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
    api.abort();
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
