//! The authenticated data listener: TLS with client certificates, then HTTP/1.1 for the
//! clients the certificate names. A connection that fails the handshake is closed; a
//! request without a certificate gets 401, one whose certificate names no allowed client
//! 403; each is counted (`flowtrace_api_refused_total`).

use std::{sync::Arc, time::Duration};

use axum::{
    http::{Request, StatusCode},
    response::IntoResponse,
    Json, Router,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use crate::{
    model::wire::ApiError,
    tls::{identify, Peer, Refusal, Reloading},
};

/// Longest a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once (the relay needs one or two; a client opening more
/// waits in the kernel's accept queue instead of costing the agent memory).
const MAX_CONNECTIONS: usize = 64;

/// Where refusals are counted.
pub type Count = Arc<dyn Fn(Refusal) + Send + Sync>;

/// Accepts connections on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<Reloading<rustls::ServerConfig>>,
    allowed: Arc<Vec<String>>,
    app: Router,
    count: Count,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                warn!(error = %e, "accepting a data API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let (allowed, app, count) = (allowed.clone(), app.clone(), count.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    count(Refusal::TlsHandshake);
                    debug!(peer = %peer_addr, error = %e, "data API: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    count(Refusal::TlsHandshake);
                    debug!(peer = %peer_addr, "data API: TLS handshake timed out");
                    return;
                }
            };
            let who = Arc::new(identify(stream.get_ref().1.peer_certificates(), &allowed));
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (app, who, count) = (app.clone(), who.clone(), count.clone());
                async move {
                    let refused = match &*who {
                        Peer::Allowed(_) => None,
                        Peer::Anonymous => Some((
                            Refusal::NoClientCertificate,
                            StatusCode::UNAUTHORIZED,
                            "the data API needs a client certificate from the flowtrace CA (the relay's); on the node itself use the loopback listener (--listen)",
                        )),
                        Peer::NotAllowed => Some((
                            Refusal::ClientNotAllowed,
                            StatusCode::FORBIDDEN,
                            "this client certificate names no client the agent allows (--tls-client-name)",
                        )),
                    };
                    match refused {
                        None => app.oneshot(req.map(axum::body::Body::new)).await,
                        Some((why, status, msg)) => {
                            count(why);
                            Ok((
                                status,
                                Json(ApiError {
                                    error: msg.to_string(),
                                }),
                            )
                                .into_response())
                        }
                    }
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(peer = %peer_addr, error = %e, "data API connection ended");
            }
        });
    }
}
