//! An HTTPS client for the agents' mTLS data API, with every way a test needs to knock on it:
//! no client certificate, a certificate of another CA, one of the right CA with a name that is
//! not allowed, the relay's own. It speaks rustls directly (not an HTTP library that would hide
//! the TLS failure in a generic error), so a test can tell "the handshake was refused" from "an
//! HTTP error status" from "nothing listens there".
//!
//! Certificates come from `flowtrace certs` ([`Certs`]); a leaf with an arbitrary name from an
//! existing CA from the `openssl` CLI ([`issue_client_cert`]), an independent implementation.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use crate::{agent::in_netns, netns, Error, Result};

/// The files `flowtrace certs --out DIR` writes, in a fresh temporary directory removed on drop.
#[derive(Debug)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// Runs `flowtrace certs --out <fresh dir>`; `tag` makes the directory recognisable.
    pub fn generate(tag: &str) -> Result<Certs> {
        let dir = std::env::temp_dir().join(format!(
            "flowtrace-certs-{}-{tag}-{}",
            std::process::id(),
            netns::new_prefix()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = crate::flowtrace_bin()?;
        let out = std::process::Command::new(&bin)
            .args(["certs", "--out"])
            .arg(&dir)
            .output()
            .map_err(|source| Error::Spawn {
                cmd: format!("{} certs --out {}", bin.display(), dir.display()),
                source,
            })?;
        let certs = Certs { dir };
        if !out.status.success() {
            return Err(Error::Command {
                cmd: format!("{} certs --out {}", bin.display(), certs.dir.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        for f in [
            "ca.crt",
            "ca.key",
            "agent.crt",
            "agent.key",
            "relay.crt",
            "relay.key",
            "secrets.yaml",
        ] {
            if !certs.dir.join(f).is_file() {
                return Err(Error::Check(format!(
                    "`flowtrace certs --out {}` wrote no {f}",
                    certs.dir.display()
                )));
            }
        }
        Ok(certs)
    }

    /// `DIR/name` as a command-line argument.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The relay's client certificate and key.
    pub fn relay_identity(&self) -> Identity {
        Identity {
            cert: self.dir.join("relay.crt"),
            key: self.dir.join("relay.key"),
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client certificate (chain) and its key, PEM files.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Issues a client certificate for DNS name `name` (extended key usage clientAuth, ECDSA
/// P-256, valid a day) from the CA `ca_cert`/`ca_key` with the `openssl` CLI, into `dir`.
pub fn issue_client_cert(
    ca_cert: &Path,
    ca_key: &Path,
    name: &str,
    dir: &Path,
) -> Result<Identity> {
    issue_cert(ca_cert, ca_key, name, "clientAuth", dir)
}

/// [`issue_client_cert`] with extended key usage `usage` (`clientAuth`, `serverAuth`).
pub fn issue_cert(
    ca_cert: &Path,
    ca_key: &Path,
    name: &str,
    usage: &str,
    dir: &Path,
) -> Result<Identity> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage={usage}\nsubjectAltName=DNS:{name}\n"
        ),
    )
    .map_err(|source| Error::Io {
        what: format!("writing {}", ext.display()),
        source,
    })?;
    let p = |p: &Path| p.display().to_string();
    netns::run(&[
        "openssl",
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ])?;
    // Distinct serials for every certificate a CA issues here (the clock's nanoseconds).
    let serial = format!(
        "0x{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    netns::run(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(ca_cert),
        "-CAkey",
        &p(ca_key),
        "-set_serial",
        &serial,
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ])?;
    Ok(Identity { cert, key })
}

/// What an HTTPS request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The TLS session was set up and the server answered with this status and body.
    Http { status: u16, body: String },
    /// The TLS handshake failed: the server sent an alert or closed the connection before
    /// answering (in TLS 1.3 a client learns that its certificate was refused only when it
    /// reads); the rustls or I/O error.
    Refused(String),
    /// The TCP connection was refused: nothing listens there.
    ConnectionRefused,
}

/// How a client verifies the server and presents itself.
#[derive(Clone, Debug)]
pub struct Client {
    /// CA file the server's certificate must chain to.
    pub ca: PathBuf,
    /// The name the server's certificate must carry (the agents': `flowtrace-agent`).
    pub server_name: String,
    /// The client certificate, if any.
    pub identity: Option<Identity>,
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("reading PEM from {}: {e}", path.display()))
}

impl Client {
    fn config(&self) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).map_err(|e| pem_err(&self.ca, e))? {
            roots
                .add(c.map_err(|e| pem_err(&self.ca, e))?)
                .map_err(|e| pem_err(&self.ca, e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Invalid(format!("TLS client configuration: {e}")))?
            .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some(id) => {
                let chain = CertificateDer::pem_file_iter(&id.cert)
                    .map_err(|e| pem_err(&id.cert, e))?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| pem_err(&id.cert, e))?;
                let key = PrivateKeyDer::from_pem_file(&id.key).map_err(|e| pem_err(&id.key, e))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::Invalid(format!("client certificate {}: {e}", id.cert.display()))
                })
            }
        }
    }

    /// `GET path` on `addr` over TLS, from a thread inside network namespace `netns`.
    pub fn get(&self, netns: &str, addr: SocketAddr, path: &str) -> Result<Outcome> {
        let (config, name) = self.prepare()?;
        let target = path.to_string();
        in_netns(netns, move || request(config, name, addr, &target))?
            .map_err(|e| Error::Invalid(format!("GET https://{addr}{path} in {netns}: {e}")))
    }

    /// `GET path` on `addr` over TLS from the caller's own namespace.
    pub fn get_here(&self, addr: SocketAddr, path: &str) -> Result<Outcome> {
        let (config, name) = self.prepare()?;
        request(config, name, addr, path)
            .map_err(|e| Error::Invalid(format!("GET https://{addr}{path}: {e}")))
    }

    fn prepare(&self) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
        let config = Arc::new(self.config()?);
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| Error::Invalid(format!("server name {:?}: {e}", self.server_name)))?;
        Ok((config, name))
    }
}

fn request(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    addr: SocketAddr,
    path: &str,
) -> std::result::Result<Outcome, String> {
    let mut tcp = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Ok(Outcome::ConnectionRefused)
        }
        Err(e) => return Err(format!("connecting: {e}")),
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| tcp.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    // The handshake first, so a refusal there is told apart from one after the request.
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Ok(Outcome::Refused(e.to_string()));
        }
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n");
    if let Err(e) = tls.write_all(req.as_bytes()).and_then(|()| tls.flush()) {
        return Ok(Outcome::Refused(e.to_string()));
    }
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify after a whole answer: keep what came.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) if raw.is_empty() => return Ok(Outcome::Refused(e.to_string())),
        Err(e) => return Err(format!("reading the answer: {e}")),
    }
    parse_response(&raw)
}

/// Status and body of an HTTP/1.1 answer (`Content-Length` or chunked).
fn parse_response(raw: &[u8]) -> std::result::Result<Outcome, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in the answer: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(Outcome::Http { status, body })
}

fn dechunk(mut s: &str) -> std::result::Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| format!("bad chunk header in {s:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = rest
            .get(..size)
            .ok_or_else(|| format!("a chunk of {size} bytes is cut short"))?;
        out.push_str(data);
        s = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A CA made by the openssl CLI in `dir`: (ca.crt, ca.key).
    fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (crt, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        netns::run(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            &key.display().to_string(),
            "-out",
            &crt.display().to_string(),
        ])
        .unwrap();
        (crt, key)
    }

    /// A TLS 1.3 server on an ephemeral loopback port with the certificate `server`, asking for
    /// a client certificate of `client_ca` but not requiring one: 401 without, 200 with.
    fn serve(server: Identity, client_ca: &Path) -> SocketAddr {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(client_ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let chain = CertificateDer::pem_file_iter(&server.cert)
            .unwrap()
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { continue };
                let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut ok = true;
                while ok && conn.is_handshaking() {
                    ok = conn.complete_io(&mut tcp).is_ok();
                }
                if !ok {
                    // Flush the alert.
                    let _ = conn.complete_io(&mut tcp);
                    continue;
                }
                let authenticated = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let (code, body) = if authenticated {
                    (200, "hello")
                } else {
                    (401, "{}")
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.send_close_notify();
                let _ = conn.complete_io(&mut tcp);
            }
        });
        addr
    }

    #[test]
    fn refusals_are_told_apart_from_answers_and_from_no_listener() {
        let dir = std::env::temp_dir().join(format!("flowtrace-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key) = make_ca(&dir, "ca");
        let (other_ca, other_key) = make_ca(&dir, "other-ca");
        let server = issue_cert(&ca, &ca_key, "flowtrace-agent", "serverAuth", &dir).unwrap();
        let good = issue_client_cert(&ca, &ca_key, "flowtrace-relay", &dir).unwrap();
        let other_dir = dir.join("other");
        std::fs::create_dir_all(&other_dir).unwrap();
        let stranger =
            issue_client_cert(&other_ca, &other_key, "flowtrace-relay", &other_dir).unwrap();
        let addr = serve(server, &ca);
        let client = |identity, server_name: &str| Client {
            ca: ca.clone(),
            server_name: server_name.into(),
            identity,
        };
        assert_eq!(
            client(None, "flowtrace-agent")
                .get_here(addr, "/v1/flows")
                .unwrap(),
            Outcome::Http {
                status: 401,
                body: "{}".into()
            }
        );
        assert_eq!(
            client(Some(good.clone()), "flowtrace-agent")
                .get_here(addr, "/v1/flows")
                .unwrap(),
            Outcome::Http {
                status: 200,
                body: "hello".into()
            }
        );
        let o = client(Some(stranger), "flowtrace-agent")
            .get_here(addr, "/")
            .unwrap();
        assert!(matches!(o, Outcome::Refused(_)), "{o:?}");
        // The server's certificate does not carry the name the client expects.
        let o = client(Some(good), "flowtrace-other")
            .get_here(addr, "/")
            .unwrap();
        assert!(matches!(o, Outcome::Refused(_)), "{o:?}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            client(None, "flowtrace-agent")
                .get_here(closed, "/")
                .unwrap(),
            Outcome::ConnectionRefused
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn answers_parse_with_a_length_or_in_chunks() {
        assert_eq!(
            parse_response(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}").unwrap(),
            Outcome::Http {
                status: 401,
                body: "{}".into()
            }
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            .unwrap(),
            Outcome::Http {
                status: 200,
                body: "abcde".into()
            }
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
