//! TLS between the relay and the agents' data API (docs/design.md, "Who may read the data
//! API"): the certificate files (PEM), the agent's side (every client is asked for a
//! certificate from the flowtrace CA, then named), the relay's side (an agent's certificate
//! is checked against the fixed name [`AGENT_NAME`], as agents are reached by address),
//! re-reading the files when a Secret is rotated, and `issue`: what `flowtrace certs` writes.

pub mod issue;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The DNS name in every agent's certificate, which the relay checks.
pub const AGENT_NAME: &str = "flowtrace-agent";
/// The DNS name in the relay's client certificate, which agents accept by default.
pub const RELAY_NAME: &str = "flowtrace-relay";
/// How often the certificate files are read again to notice a rotation.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// A certificate, its key and the CA bundle that vouches for the other side.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The files' contents, parsed.
pub struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// The three files as read, to notice a change.
    raw: Vec<u8>,
}

fn tls_error(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Tls {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl TlsFiles {
    fn read_all(&self) -> Result<[Vec<u8>; 3]> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| tls_error(p, e));
        Ok([read(&self.cert)?, read(&self.key)?, read(&self.ca)?])
    }

    /// Reads and parses the three files.
    pub fn load(&self) -> Result<Material> {
        let [cert, key, ca] = self.read_all()?;
        Self::parse(self, cert, key, ca)
    }

    fn parse(&self, cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<Material> {
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| tls_error(&self.cert, format!("not PEM certificates: {e}")))?;
        if chain.is_empty() {
            return Err(tls_error(&self.cert, "holds no certificate"));
        }
        let private = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| tls_error(&self.key, format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| tls_error(&self.ca, format!("not PEM certificates: {e}")))?;
            roots
                .add(c)
                .map_err(|e| tls_error(&self.ca, format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(tls_error(&self.ca, "holds no CA certificate"));
        }
        let mut raw = cert;
        raw.extend_from_slice(&key);
        raw.extend_from_slice(&ca);
        Ok(Material {
            chain,
            key: private,
            roots: Arc::new(roots),
            raw,
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's side: TLS 1.2/1.3, a client certificate asked for but not required at the
/// handshake (a client without one gets an HTTP 401 that says why, rather than a bare TLS
/// alert), and verified against the CA bundle when presented (a certificate from another CA
/// fails the handshake).
pub fn server_config(m: &Material) -> Result<ServerConfig> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), p.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::TlsSetup {
            detail: format!("client certificate verifier: {e}"),
        })?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsSetup {
            detail: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| Error::TlsSetup {
            detail: format!("the certificate and key do not go together: {e}"),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The relay's side: presents its certificate and accepts an agent whose certificate chains
/// to the CA bundle and names `server_name`, whatever address it was reached at.
pub fn client_config(m: &Material, server_name: &str) -> Result<ClientConfig> {
    let p = provider();
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| Error::TlsSetup {
        detail: format!("`{server_name}` is not a DNS name for the agents' certificates: {e}"),
    })?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), p.clone())
            .build()
            .map_err(|e| Error::TlsSetup {
                detail: format!("agent certificate verifier: {e}"),
            })?;
    let mut cfg = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsSetup {
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| Error::TlsSetup {
            detail: format!("the certificate and key do not go together: {e}"),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The standard WebPKI verification, against a fixed name instead of the address dialled.
#[derive(Debug)]
struct FixedName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How a configuration is built from the files.
type Build<T> = Box<dyn Fn(&Material) -> Result<T> + Send + Sync>;

/// A TLS configuration built from files, rebuilt when they change (a rotated Secret): new
/// connections use the new one, open ones keep theirs. A change that does not parse is
/// logged and the last good configuration kept.
pub struct Reloading<T> {
    files: TlsFiles,
    build: Build<T>,
    current: RwLock<(Arc<T>, Vec<u8>)>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads the files now (an error stops the caller: the operator named unusable files).
    pub fn load(
        files: TlsFiles,
        build: impl Fn(&Material) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let m = files.load()?;
        let cfg = build(&m)?;
        Ok(Arc::new(Self {
            files,
            build: Box::new(build),
            current: RwLock::new((Arc::new(cfg), m.raw)),
        }))
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<T> {
        match self.current.read() {
            Ok(g) => g.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Reads the files again; returns whether the configuration changed.
    pub fn reload(&self) -> bool {
        let m = match self.files.load() {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "re-reading the TLS files failed; keeping the certificates loaded before");
                return false;
            }
        };
        let unchanged = match self.current.read() {
            Ok(g) => g.1 == m.raw,
            Err(poisoned) => poisoned.into_inner().1 == m.raw,
        };
        if unchanged {
            return false;
        }
        match (self.build)(&m) {
            Ok(cfg) => {
                let mut g = match self.current.write() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *g = (Arc::new(cfg), m.raw);
                info!(cert = %self.files.cert.display(), "TLS certificates changed on disk: new connections use them");
                true
            }
            Err(e) => {
                warn!(error = %e, "the TLS files changed but are unusable; keeping the certificates loaded before");
                false
            }
        }
    }

    /// Re-reads the files every [`RELOAD_EVERY`] until the task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.reload();
            }
        })
    }
}

/// Who a client of the data API is, from the certificate it presented (already verified
/// against the CA by the handshake).
#[derive(Debug, PartialEq, Eq)]
pub enum Peer {
    /// No certificate: HTTP 401.
    Anonymous,
    /// A certificate from the CA naming none of the allowed clients: HTTP 403.
    NotAllowed,
    /// Allowed, by this name.
    Allowed(String),
}

/// Names the client: the first of `allowed` its certificate is valid for (a DNS SAN).
pub fn identify(certs: Option<&[CertificateDer<'_>]>, allowed: &[String]) -> Peer {
    let Some(ee) = certs.and_then(|c| c.first()) else {
        return Peer::Anonymous;
    };
    let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
        return Peer::NotAllowed;
    };
    allowed
        .iter()
        .find(|name| {
            ServerName::try_from(name.as_str())
                .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
        })
        .map_or(Peer::NotAllowed, |n| Peer::Allowed(n.clone()))
}

/// Why a connection or request to the data API was refused (`flowtrace_api_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request without a client certificate (401).
    NoClientCertificate,
    /// A request with a certificate from the CA for a name not allowed (403).
    ClientNotAllowed,
    /// A TLS handshake that failed: not TLS, a certificate from another CA, a timeout.
    TlsHandshake,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::NoClientCertificate,
        Refusal::ClientNotAllowed,
        Refusal::TlsHandshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }
}

#[cfg(test)]
mod tests;
