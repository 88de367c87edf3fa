use std::{path::Path, sync::Arc};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{issue, *};

fn issue_into(dir: &Path) -> issue::Issued {
    issue::issue(&issue::Request {
        out: dir.to_path_buf(),
        days: 30,
        namespace: "flowtrace".into(),
        relay_namespace: "flowtrace-relay".into(),
        ca: None,
        clients: vec!["intruder".into()],
    })
    .expect("issue")
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flowtrace-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn files(dir: &Path, leaf: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{leaf}.crt")),
        key: dir.join(format!("{leaf}.key")),
        ca: dir.join("ca.crt"),
    }
}

/// A TLS handshake over an in-memory pipe: the agent's server config against a client
/// config, then one request byte each way. Err when the handshake fails on either side.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
) -> std::result::Result<Peer, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    // Dialled by address, as the relay reaches agents.
    let dialled = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
        let peer = identify(s.get_ref().1.peer_certificates(), &[RELAY_NAME.to_string()]);
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(&byte).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let cli = async {
        let mut c = connector
            .connect(dialled, a)
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let client_res = cli.await;
    let server_res = srv.await.map_err(|e| e.to_string())?;
    client_res?;
    server_res
}

#[tokio::test]
async fn the_relay_certificate_is_accepted_by_name_and_the_agent_is_checked_by_its_fixed_name() {
    let dir = tempdir("ok");
    let issued = issue_into(&dir);
    assert!(issued.new_ca);
    let server = server_config(&files(&dir, "agent").load().expect("agent files")).expect("srv");
    let client = client_config(
        &files(&dir, "relay").load().expect("relay files"),
        AGENT_NAME,
    )
    .expect("client");
    assert_eq!(
        handshake(server, client).await,
        Ok(Peer::Allowed(RELAY_NAME.to_string()))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_certificate_of_another_ca_fails_the_handshake_and_a_wrong_name_is_not_allowed() {
    let (ours, theirs) = (tempdir("ours"), tempdir("theirs"));
    issue_into(&ours);
    issue_into(&theirs);
    let server = || server_config(&files(&ours, "agent").load().expect("agent")).expect("srv");
    // Their relay certificate, trusting our CA for the server: refused by our agent.
    let mut foreign = files(&theirs, "relay");
    foreign.ca = ours.join("ca.crt");
    let client = client_config(&foreign.load().expect("files"), AGENT_NAME).expect("client");
    assert!(handshake(server(), client).await.is_err());
    // A client certificate from our CA for a name the agent does not allow: 403.
    let client = client_config(&files(&ours, "intruder").load().expect("files"), AGENT_NAME)
        .expect("client");
    assert_eq!(handshake(server(), client).await, Ok(Peer::NotAllowed));
    // Our agent's certificate used as a client certificate: it is for servers only.
    let client =
        client_config(&files(&ours, "agent").load().expect("files"), AGENT_NAME).expect("client");
    assert!(handshake(server(), client).await.is_err());
    // The relay expecting another name for the agents refuses our agent.
    let client =
        client_config(&files(&ours, "relay").load().expect("files"), "other-agent").expect("c");
    assert!(handshake(server(), client).await.is_err());
    let _ = std::fs::remove_dir_all(&ours);
    let _ = std::fs::remove_dir_all(&theirs);
}

#[test]
fn no_certificate_is_anonymous() {
    assert_eq!(identify(None, &[RELAY_NAME.to_string()]), Peer::Anonymous);
    assert_eq!(
        identify(Some(&[]), &[RELAY_NAME.to_string()]),
        Peer::Anonymous
    );
}

#[test]
fn leaves_reissued_from_the_same_ca_are_picked_up_by_reload_and_garbage_is_not() {
    let dir = tempdir("reload");
    issue_into(&dir);
    let r = Reloading::load(files(&dir, "agent"), server_config).expect("load");
    let before = r.current();
    assert!(!r.reload(), "nothing changed on disk");
    // Rotation: new leaves from the same CA.
    issue::issue(&issue::Request {
        out: dir.clone(),
        days: 30,
        namespace: "flowtrace".into(),
        relay_namespace: "flowtrace-relay".into(),
        ca: Some((dir.join("ca.crt"), dir.join("ca.key"))),
        clients: vec![],
    })
    .expect("reissue");
    assert!(r.reload(), "new certificates on disk");
    assert!(!Arc::ptr_eq(&before, &r.current()));
    let good = r.current();
    std::fs::write(dir.join("agent.crt"), "not a certificate").expect("write");
    assert!(
        !r.reload(),
        "an unusable file keeps the last good configuration"
    );
    assert!(Arc::ptr_eq(&good, &r.current()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_files_are_named() {
    let dir = tempdir("bad");
    std::fs::write(dir.join("x.crt"), "hello").expect("write");
    let f = TlsFiles {
        cert: dir.join("x.crt"),
        key: dir.join("x.key"),
        ca: dir.join("ca.crt"),
    };
    let e = f.load().err().expect("missing key").to_string();
    assert!(e.contains("x.key") && e.contains("flowtrace certs"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
