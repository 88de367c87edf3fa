//! Who may read an agent's data API on its node address: only a client presenting a certificate
//! of the agents' CA with an allowed name (the relay's). Requests come from other network
//! namespaces than the agent's (the relay's, a pod's on another node) over the underlay, with
//! certificates made by `flowtrace certs` (twice: a second CA is a stranger) and, for a name that
//! is not allowed, by the `openssl` CLI from the agents' own CA. Ground truth for the counters:
//! the requests the test itself made. Needs root.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use flowtrace_tests::{
    http_get_url, parse_exposition,
    relay::{RelayBed, RelayOptions, AGENT_SERVER_NAME},
    tls::issue_client_cert,
    Agent, Certs, Client, Outcome,
};

/// The data routes of the spec; each must be served only over mTLS.
const DATA_ROUTES: [&str; 7] = [
    "/v1/flows",
    "/v1/nat",
    "/v1/latency",
    "/v1/interfaces",
    "/v1/stats",
    "/v1/metadata",
    "/v1/pathdata?window_s=60",
];

fn no_relay(agents: bool) -> RelayBed {
    RelayBed::up(&RelayOptions {
        relay: None,
        agents,
        ..RelayOptions::default()
    })
    .unwrap()
}

/// `flowtrace_api_refused_total` by `reason`, from the agent's metrics listener (plain HTTP,
/// no credentials) as a scraper in `netns` reads it.
fn refused(netns: &str, metrics: SocketAddr) -> BTreeMap<String, f64> {
    let (status, text) = http_get_url(netns, &format!("http://{metrics}/metrics")).unwrap();
    assert_eq!(status, 200, "{text}");
    parse_exposition(&text)
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "flowtrace_api_refused_total")
        .map(|s| (s.label("reason").to_string(), s.value))
        .collect()
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, reason: &str) -> f64 {
    after.get(reason).copied().unwrap_or(0.0) - before.get(reason).copied().unwrap_or(0.0)
}

fn status(o: &Outcome) -> Option<u16> {
    match o {
        Outcome::Http { status, .. } => Some(*status),
        _ => None,
    }
}

#[test]
fn the_data_api_on_the_node_address_serves_only_the_relays_certificate() {
    let bed = no_relay(true);
    let relay_ns = bed.net.netns.clone();
    let pod_ns = bed.cluster.pod(2, "pod-a").unwrap().netns.clone();
    let (data, metrics) = (bed.data_addr(1).unwrap(), bed.metrics_addr(1).unwrap());
    let ca = bed.certs.dir.join("ca.crt");
    let client = |identity| Client {
        ca: ca.clone(),
        server_name: AGENT_SERVER_NAME.into(),
        identity,
    };
    // A stranger: the relay's certificate of another CA, with the right name.
    let stranger = Certs::generate("stranger").unwrap();
    // One of the agents' own CA whose name is not an allowed client's.
    let intruder = issue_client_cert(
        &ca,
        &bed.certs.dir.join("ca.key"),
        "flowtrace-intruder",
        &bed.certs.dir,
    )
    .unwrap();

    let before = refused(&relay_ns, metrics);
    let mut no_cert = 0.0;
    // No certificate, from the relay's namespace and from a pod on another node: 401 with a
    // JSON error, on every data route.
    for ns in [&relay_ns, &pod_ns] {
        for route in DATA_ROUTES {
            let o = client(None).get(ns, data, route).unwrap();
            match &o {
                Outcome::Http { status: 401, body } => {
                    let v: serde_json::Value = serde_json::from_str(body)
                        .unwrap_or_else(|e| panic!("{route}: 401 body is not JSON ({e}): {body}"));
                    assert!(v["error"].is_string(), "{route}: {body}");
                }
                other => panic!("{route} from {ns} without a certificate: {other:?}"),
            }
            no_cert += 1.0;
        }
    }
    // Another CA's certificate: the handshake is refused.
    let o = client(Some(stranger.relay_identity()))
        .get(&relay_ns, data, "/v1/flows")
        .unwrap();
    assert!(
        matches!(o, Outcome::Refused(_)),
        "another CA's certificate: {o:?}"
    );
    // The right CA, a name not allowed: 403.
    let o = client(Some(intruder))
        .get(&relay_ns, data, "/v1/flows")
        .unwrap();
    assert_eq!(status(&o), Some(403), "{o:?}");
    // The relay's certificate: every data route answers (and the agent's own certificate
    // verified as flowtrace-agent against the CA on the way).
    for route in DATA_ROUTES {
        let o = bed.relay_client().get(&relay_ns, data, route).unwrap();
        let Outcome::Http { status: 200, body } = &o else {
            panic!(
                "{route} with the relay's certificate: {o:?}\n{}",
                bed.agent(1).log_text()
            );
        };
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{route}: not JSON ({e}): {body}"));
        if route.starts_with("/v1/flows") || route.starts_with("/v1/pathdata") {
            assert_eq!(v["node"], "node1", "{route}: {body}");
        }
    }
    // Each refusal counted once, by reason; the relay's requests not at all.
    let after = refused(&relay_ns, metrics);
    assert_eq!(
        delta(&before, &after, "no_client_certificate"),
        no_cert,
        "{after:?}"
    );
    assert_eq!(
        delta(&before, &after, "client_not_allowed"),
        1.0,
        "{after:?}"
    );
    assert_eq!(delta(&before, &after, "tls_handshake"), 1.0, "{after:?}");

    // The metrics listener: scrapeable without credentials from a pod, probes answer, and
    // no data route is served there.
    assert!(!refused(&pod_ns, metrics).is_empty());
    for probe in ["/healthz", "/readyz"] {
        let (s, body) = http_get_url(&pod_ns, &format!("http://{metrics}{probe}")).unwrap();
        assert_eq!(s, 200, "{probe}: {body}");
    }
    for route in DATA_ROUTES.iter().chain(&["/v1/trace"]) {
        let (s, body) = http_get_url(&relay_ns, &format!("http://{metrics}{route}")).unwrap();
        assert_eq!(s, 404, "{route} on the metrics listener: {body}");
    }
    // Plain HTTP to the data port is not an answer either.
    let plain = http_get_url(&relay_ns, &format!("http://{data}/v1/flows"));
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain HTTP on the mTLS port answered: {plain:?}"
    );
}

#[test]
fn without_api_listen_the_node_address_serves_no_data_and_a_public_listen_is_refused() {
    let bed = no_relay(false);
    let relay_ns = bed.net.netns.clone();
    let node1 = bed.cluster.node(1).unwrap().netns.clone();
    let ip = bed.node_ip(1).unwrap();

    // The whole API on a non-loopback address: refused at start, naming the way to do it.
    for listen in [format!("{ip}:9650"), "0.0.0.0:9650".to_string()] {
        let agent = Agent::spawn(&node1, &["--listen", &listen]).unwrap();
        let (code, log) = agent.wait_exit(Duration::from_secs(20)).unwrap();
        assert!(
            code.is_some_and(|c| c != 0),
            "--listen {listen}: exit {code:?}\n{log}"
        );
        assert!(log.contains("--api-listen"), "--listen {listen}: {log}");
    }
    // The data API on the node address without its certificates: refused at start.
    let agent = Agent::spawn(&node1, &["--api-listen", &format!("{ip}:9652")]).unwrap();
    let (code, log) = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(
        code.is_some_and(|c| c != 0),
        "--api-listen without TLS: exit {code:?}\n{log}"
    );
    assert!(log.contains("--tls-cert"), "{log}");

    // Metrics on the node address, no --api-listen: the address is reachable (metrics
    // answer from the relay's namespace) but nothing serves data there, on the data port
    // nor on the old all-routes port.
    let _agent = Agent::start(&node1, &["--metrics-listen", &format!("{ip}:9651")]).unwrap();
    let (s, _) = http_get_url(&relay_ns, &format!("http://{ip}:9651/metrics")).unwrap();
    assert_eq!(s, 200);
    for port in [9652u16, 9650] {
        let o = bed
            .relay_client()
            .get(&relay_ns, SocketAddr::from((ip, port)), "/v1/flows")
            .unwrap();
        assert_eq!(o, Outcome::ConnectionRefused, "{ip}:{port}");
    }
    // The local CLI keeps its loopback API without credentials.
    let (s, body) = flowtrace_tests::http_get(&node1, "/v1/flows").unwrap();
    assert_eq!(s, 200, "{body}");
}
