//! `flowtrace certs`: a CA and the two leaf certificates of the data API (the agents' server
//! certificate naming [`AGENT_NAME`], the relay's client certificate naming [`RELAY_NAME`]),
//! and the two Secrets that carry them into the cluster. Given an existing CA it issues new
//! leaves from it (rotation without touching what trusts the CA).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::{AGENT_NAME, RELAY_NAME};
use crate::error::{Error, Result};

/// What to issue.
pub struct Request {
    pub out: PathBuf,
    /// Validity of the leaves (the CA gets ten times as long).
    pub days: u32,
    /// Namespace of the agents' Secret in `secrets.yaml`.
    pub namespace: String,
    /// Namespace of the relay's Secret (its own: who may port-forward to the relay need not
    /// reach the hostNetwork agents' pods).
    pub relay_namespace: String,
    /// An existing CA (certificate, key) to issue from instead of making one.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// More client certificates, one per name (`NAME.crt`, `NAME.key`): for another reader
    /// the agents are told to accept with --tls-client-name. Not put in `secrets.yaml`.
    pub clients: Vec<String>,
}

/// The files written, for the caller to tell the operator.
pub struct Issued {
    pub files: Vec<PathBuf>,
    pub new_ca: bool,
}

fn issue_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::TlsSetup {
        detail: format!("{what}: {e}"),
    }
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past, so a node whose clock is slightly behind accepts it at once.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn ca_params(days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "flowtrace data API CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days.saturating_mul(10));
    p
}

fn leaf(name: &str, usage: ExtendedKeyUsagePurpose, days: u32) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(vec![name.to_string()])
        .map_err(|e| issue_error("certificate parameters", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    Ok(p)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Tls {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Writes `path` readable by its owner only when it is a key.
fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        o.mode(0o600);
    }
    let res = o
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    res.map_err(|e| Error::Tls {
        path: path.display().to_string(),
        detail: format!("writing: {e}"),
    })
}

/// Issues the certificates into `req.out` (created if missing).
pub fn issue(req: &Request) -> Result<Issued> {
    std::fs::create_dir_all(&req.out).map_err(|e| Error::Tls {
        path: req.out.display().to_string(),
        detail: format!("creating the directory: {e}"),
    })?;
    let (ca_pem, ca_key, new_ca) = match &req.ca {
        Some((cert, key)) => {
            let (pem, key_pem) = (read(cert)?, read(key)?);
            let k = KeyPair::from_pem(&key_pem).map_err(|e| Error::Tls {
                path: key.display().to_string(),
                detail: format!("not a PEM private key rcgen can sign with: {e}"),
            })?;
            (pem, k, false)
        }
        None => {
            let k = KeyPair::generate().map_err(|e| issue_error("generating the CA key", e))?;
            let cert = ca_params(req.days)
                .self_signed(&k)
                .map_err(|e| issue_error("signing the CA", e))?;
            (cert.pem(), k, true)
        }
    };
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| Error::Tls {
        path: req
            .ca
            .as_ref()
            .map_or_else(|| "the new CA".to_string(), |c| c.0.display().to_string()),
        detail: format!("not a CA certificate matching its key: {e}"),
    })?;
    let mut files = Vec::new();
    let mut put = |name: &str, text: &str, secret: bool| -> Result<()> {
        let p = req.out.join(name);
        write(&p, text, secret)?;
        files.push(p);
        Ok(())
    };
    put("ca.crt", &ca_pem, false)?;
    if new_ca {
        put("ca.key", &ca_key_pem, true)?;
    }
    let mut pems = Vec::new();
    for (file, name, usage) in [
        ("agent", AGENT_NAME, ExtendedKeyUsagePurpose::ServerAuth),
        ("relay", RELAY_NAME, ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let k = KeyPair::generate().map_err(|e| issue_error("generating a key", e))?;
        let cert = leaf(name, usage, req.days)?
            .signed_by(&k, &issuer)
            .map_err(|e| issue_error("signing a certificate", e))?;
        let (crt, key) = (cert.pem(), k.serialize_pem());
        put(&format!("{file}.crt"), &crt, false)?;
        put(&format!("{file}.key"), &key, true)?;
        pems.push((file, crt, key));
    }
    for name in &req.clients {
        if !valid_client_name(name) {
            return Err(Error::Usage(format!(
                "--client `{name}` is not a DNS-style name (letters, digits, `-` and `.`): it becomes the certificate's name and its file name"
            )));
        }
        let k = KeyPair::generate().map_err(|e| issue_error("generating a key", e))?;
        let cert = leaf(name, ExtendedKeyUsagePurpose::ClientAuth, req.days)?
            .signed_by(&k, &issuer)
            .map_err(|e| issue_error("signing a certificate", e))?;
        put(&format!("{name}.crt"), &cert.pem(), false)?;
        put(&format!("{name}.key"), &k.serialize_pem(), true)?;
    }
    let mut yaml = String::from(
        "# The data API's certificates (flowtrace certs). Apply with kubectl apply -f; keep ca.key\n# out of the cluster: it is needed only to issue new certificates.\n",
    );
    for (file, crt, key) in &pems {
        let namespace = if *file == "relay" {
            &req.relay_namespace
        } else {
            &req.namespace
        };
        yaml.push_str(&secret_yaml(
            &format!("flowtrace-{file}-tls"),
            namespace,
            &ca_pem,
            crt,
            key,
        ));
    }
    put("secrets.yaml", &yaml, true)?;
    Ok(Issued { files, new_ca })
}

fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !["ca", "agent", "relay", "secrets"].contains(&name)
}

/// A `kubernetes.io/tls` Secret with `ca.crt` beside the pair, as cert-manager writes them.
fn secret_yaml(name: &str, namespace: &str, ca: &str, crt: &str, key: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls"
    );
    let _ = writeln!(s, "metadata:\n  name: {name}\n  namespace: {namespace}");
    let _ = writeln!(s, "  labels:\n    app.kubernetes.io/name: flowtrace");
    s.push_str("stringData:\n");
    for (k, v) in [("ca.crt", ca), ("tls.crt", crt), ("tls.key", key)] {
        let _ = writeln!(s, "  {k}: |");
        for line in v.lines() {
            let _ = writeln!(s, "    {line}");
        }
    }
    s
}
