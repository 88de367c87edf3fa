//! The test bed of `flowtrace relay`: an emulated cluster of three (or more) nodes on a shared
//! underlay bridge, an agent per node serving its data API over mTLS on the node's underlay
//! address, the fixture API server holding the agents' headless-Service EndpointSlice, and the
//! relay in a network namespace of its own, attached to the underlay bridge like one more
//! machine, finding the agents through the fixture (or a static `--agents` list).
//!
//! ```text
//!   <prefix>-relay (192.168.50.250)          flowtrace relay, 127.0.0.1:9660 (plain HTTP)
//!        | eth0 -- ulrelay
//!   <prefix>-underlay: br0 --- ul1 --- node1 eth0 192.168.50.1  agent: 127.0.0.1:9650 (loopback,
//!                          --- ul2 --- node2 eth0 192.168.50.2         all routes), :9651 metrics,
//!                          --- ul3 --- node3 eth0 192.168.50.3         :9652 data API over mTLS
//! ```
//!
//! The fixture API server listens on 127.0.0.1:16443 inside every node namespace and inside the
//! relay's, so the one kubeconfig serves the agents (metadata) and the relay (discovery).
//! Certificates are made by `flowtrace certs` ([`Certs`]). Everything is removed on drop: the
//! relay first, then the agents, the API server, the relay's namespace, the cluster.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    agent::{http_get_url, in_netns},
    apiserver::{self, AGENT_DATA_PORT, AGENT_METRICS_PORT},
    cluster, flowtrace_bin, netns,
    netns::ChildGuard,
    tls::{Certs, Client},
    Agent, ApiServer, Cluster, ClusterOptions, Error, Result,
};

/// The relay's API inside its namespace.
pub const RELAY_PORT: u16 = 9660;
/// The relay's metrics listener inside its namespace.
pub const RELAY_METRICS_PORT: u16 = 9661;
/// The relay API's URL, valid inside the relay's namespace.
pub const RELAY_URL: &str = "http://127.0.0.1:9660";
/// The relay's address on the underlay (beyond the 200 nodes a cluster may have).
pub const RELAY_UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 250);
/// The name the agents' certificate carries and the relay checks.
pub const AGENT_SERVER_NAME: &str = "flowtrace-agent";

/// How the relay finds the agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// The agents' EndpointSlices through the fixture API server (`--kubeconfig`).
    EndpointSlices,
    /// `--agents https://<node address>:9652,...` of every node, no Kubernetes API.
    Static,
}

/// What [`RelayBed::up`] builds.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Number of nodes (at least 3: fewer are wired back to back, without the bridge the
    /// relay's namespace joins).
    pub nodes: usize,
    /// Nodes (1-based) whose agents the EndpointSlice lists at start (all by default).
    pub listed: Option<Vec<usize>>,
    /// Start the relay, and how it finds agents; `None`: no relay (its namespace exists).
    pub relay: Option<Discovery>,
    /// The relay's `--agent-timeout-ms`.
    pub agent_timeout_ms: u64,
    /// Start an agent on every node (else the test starts them, with [`RelayBed::agent_args`]).
    pub agents: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            listed: None,
            relay: Some(Discovery::EndpointSlices),
            agent_timeout_ms: 1000,
            agents: true,
        }
    }
}

/// The relay's own network namespace, a veth into the underlay bridge. Deleted on drop.
#[derive(Debug)]
pub struct RelayNet {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl RelayNet {
    /// Creates `<prefix>-relay` with `eth0` at [`RELAY_UNDERLAY_IP`] bridged into the cluster's
    /// underlay (`<prefix>-underlay`'s `br0`, which exists for three nodes or more).
    pub fn attach(cluster: &Cluster) -> Result<RelayNet> {
        let ul = cluster.underlay_netns();
        if !netns::list_netns()?.contains(&ul) {
            return Err(Error::Invalid(format!(
                "cluster {} has no underlay bridge namespace {ul}: the relay needs a cluster of \
                 at least three nodes",
                cluster.prefix
            )));
        }
        let ns = format!("{}-relay", cluster.prefix);
        netns::add_netns(&ns)?;
        let net = RelayNet {
            netns: ns,
            ip: RELAY_UNDERLAY_IP,
        };
        let ip = |n: &str, args: &str| {
            let mut argv = vec!["ip", "-n", n];
            argv.extend(args.split_whitespace());
            netns::run(&argv).map(drop)
        };
        cluster::quiet(&net.netns)?;
        ip(&net.netns, "link set lo up")?;
        ip(
            &ul,
            &format!(
                "link add ulrelay type veth peer name eth0 netns {}",
                net.netns
            ),
        )?;
        ip(&ul, "link set ulrelay master br0")?;
        ip(&ul, "link set ulrelay up")?;
        ip(&net.netns, &format!("addr add {}/24 dev eth0", net.ip))?;
        ip(&net.netns, "link set eth0 up")?;
        Ok(net)
    }
}

impl Drop for RelayNet {
    fn drop(&mut self) {
        if let Err(e) = netns::del_netns(&self.netns) {
            eprintln!(
                "flowtrace-tests: deleting the relay's namespace {}: {e}",
                self.netns
            );
        }
    }
}

/// A `flowtrace relay` process in its namespace. Killed on drop if still running.
pub struct Relay {
    guard: Option<ChildGuard>,
    pub netns: String,
    pub log: PathBuf,
}

impl Relay {
    /// Starts `flowtrace relay --listen 127.0.0.1:9660 --metrics-listen 127.0.0.1:9661 <args>`
    /// in `netns` and waits until its API answers.
    pub fn start(netns: &str, args: &[String]) -> Result<Relay> {
        let bin = flowtrace_bin()?;
        let log = std::env::temp_dir().join(format!("flowtrace-relay-{netns}.log"));
        let logfile = std::fs::File::create(&log)
            .map_err(|e| Error::Invalid(format!("creating {}: {e}", log.display())))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&bin)
            .arg("relay")
            .args(["--listen", &format!("127.0.0.1:{RELAY_PORT}")])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{RELAY_METRICS_PORT}"),
            ])
            .args(args)
            // Discovery only through the kubeconfig a test passes.
            .env_remove("KUBECONFIG")
            .env("FLOWTRACE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .map_err(|e| Error::Invalid(format!("starting {} relay: {e}", bin.display())))?;
        let mut relay = Relay {
            guard: Some(ChildGuard::new(
                child,
                format!("flowtrace relay in {netns}"),
            )),
            netns: netns.to_string(),
            log,
        };
        relay.wait_listening(Duration::from_secs(20))?;
        Ok(relay)
    }

    /// Waits until `/v1/nodes` answers at all (the listener is up; which agents it has found
    /// is for the test to poll).
    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.guard.as_mut() {
                if g.has_exited() {
                    return Err(Error::Invalid(format!(
                        "flowtrace relay in {} exited during start-up:\n{}",
                        self.netns,
                        self.log_text()
                    )));
                }
            }
            if self.get("/v1/nodes").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "flowtrace relay in {} does not answer on {RELAY_URL} after {timeout:?}:\n{}",
                    self.netns,
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET {RELAY_URL}{path}` from inside the relay's namespace: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get_url(&self.netns, &format!("{RELAY_URL}{path}"))
    }

    /// `GET path` on the relay's metrics listener.
    pub fn get_metrics(&self, path: &str) -> Result<(u16, String)> {
        http_get_url(
            &self.netns,
            &format!("http://127.0.0.1:{RELAY_METRICS_PORT}{path}"),
        )
    }

    /// GETs `path` and decodes the JSON body; non-200 is an error carrying the body and the
    /// relay's log.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            return Err(Error::Invalid(format!(
                "GET {RELAY_URL}{path} in {}: HTTP {status}: {body}\nrelay log:\n{}",
                self.netns,
                self.log_text()
            )));
        }
        serde_json::from_str(&body)
            .map_err(|e| Error::Invalid(format!("GET {RELAY_URL}{path}: bad JSON ({e}): {body}")))
    }

    /// Polls `GET path` (JSON) until `ok` holds for it, for at most `timeout`; returns that
    /// answer, or an error with the last one.
    pub fn wait_for(
        &self,
        path: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.get_json(path);
            if let Ok(v) = &last {
                if ok(v) {
                    return Ok(v.clone());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "GET {RELAY_URL}{path}: the condition did not hold within {timeout:?}; last \
                     answer: {}\nrelay log:\n{}",
                    match &last {
                        Ok(v) => v.to_string(),
                        Err(e) => e.to_string(),
                    },
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `/v1/nodes` lists exactly `nodes` (names), every one `ok`.
    pub fn wait_nodes_ok(&self, nodes: &[&str], timeout: Duration) -> Result<Value> {
        let mut want: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        want.sort();
        self.wait_for("/v1/nodes", timeout, |v| {
            let Some(list) = v.as_array() else {
                return false;
            };
            let mut got: Vec<String> = list
                .iter()
                .filter(|n| n["ok"] == true)
                .filter_map(|n| n["node"].as_str().map(str::to_string))
                .collect();
            got.sort();
            got == want && list.len() == want.len()
        })
    }

    /// The `flowtrace <sub> --relay http://127.0.0.1:9660 <args>` command line, run inside the
    /// relay's namespace.
    pub fn cli_command(&self, sub: &str, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(flowtrace_bin()?)
            .arg(sub)
            .args(["--relay", RELAY_URL])
            .args(args)
            .env_remove("FLOWTRACE_RELAY")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs `flowtrace <sub> --relay ... <args>` in the relay's namespace to completion.
    pub fn cli(&self, sub: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.cli_command(sub, args)?;
        cmd.output().map_err(|source| Error::Spawn {
            cmd: format!(
                "flowtrace {sub} --relay {RELAY_URL} {args:?} in {}",
                self.netns
            ),
            source,
        })
    }

    /// SIGTERM, then waits for the relay to exit; returns its log.
    pub fn stop(mut self) -> Result<String> {
        let guard = self
            .guard
            .take()
            .ok_or_else(|| Error::Invalid("relay already reaped".into()))?;
        if let Some(pid) = guard.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = guard.wait_status(Duration::from_secs(15));
        let log = self.log_text();
        let status =
            status.map_err(|e| Error::Invalid(format!("relay did not stop: {e}\n{log}")))?;
        if !status.success() {
            return Err(Error::Invalid(format!(
                "relay exited {status} on SIGTERM:\n{log}"
            )));
        }
        Ok(log)
    }
}

/// A process's stdout lines, each with the moment it arrived, read on a thread.
pub struct Lines {
    pub guard: ChildGuard,
    pub started: Instant,
    pub lines: mpsc::Receiver<(Instant, String)>,
}

impl Lines {
    /// Spawns `cmd` with stdout and stderr piped and starts reading its stdout.
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Lines> {
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: what.to_string(),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Invalid(format!("{what}: no stdout pipe")))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Lines {
            guard: ChildGuard::new(child, what),
            started,
            lines,
        })
    }

    /// The next line within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.lines.recv_timeout(timeout).ok()
    }
}

/// A TCP port forward across network namespaces, as `kubectl port-forward` gives an operator:
/// `127.0.0.1:port` inside `listen_netns` carries each connection to `target` as seen from
/// `target_netns` (e.g. an agent's loopback-only API). Stops accepting on drop.
pub struct PortForward {
    stop: Arc<AtomicBool>,
    pub port: u16,
}

impl PortForward {
    pub fn start(
        listen_netns: &str,
        port: u16,
        target_netns: &str,
        target: SocketAddr,
    ) -> Result<PortForward> {
        let listener = in_netns(listen_netns, move || {
            let l = TcpListener::bind(("127.0.0.1", port))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })?
        .map_err(|e| {
            Error::Invalid(format!(
                "port forward: binding 127.0.0.1:{port} in {listen_netns}: {e}"
            ))
        })?;
        let target_ns = PathBuf::from(format!("/run/netns/{target_netns}"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let ns = target_ns.clone();
                        thread::spawn(move || forward(client, &ns, target));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PortForward { stop, port })
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Connects to `target` from inside the namespace at `ns` and copies bytes both ways until
/// both sides are done.
fn forward(client: TcpStream, ns: &std::path::Path, target: SocketAddr) {
    let Ok(file) = std::fs::File::open(ns) else {
        return;
    };
    let upstream = thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()
    })
    .join()
    .ok()
    .flatten();
    let Some(upstream) = upstream else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let (Ok(mut c_read), Ok(mut u_write)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = std::io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// The cluster, its agents with their data API on the node addresses over mTLS, the fixture
/// API server with the agents' EndpointSlice, and the relay in its own namespace.
pub struct RelayBed {
    /// Dropped first.
    pub relay: Option<Relay>,
    /// `agents[i - 1]` on node `i`; `None` while stopped by the test.
    pub agents: Vec<Option<Agent>>,
    pub api: ApiServer,
    pub certs: Certs,
    pub net: RelayNet,
    /// Declared last: dropped after everything that lives in its namespaces.
    pub cluster: Cluster,
}

impl RelayBed {
    pub fn up(opts: &RelayOptions) -> Result<RelayBed> {
        crate::require_root()?;
        if opts.nodes < 3 {
            return Err(Error::Invalid(format!(
                "RelayOptions.nodes is {}: the relay's namespace joins the underlay bridge, which \
                 a cluster has from three nodes on",
                opts.nodes
            )));
        }
        let cluster = Cluster::up(&ClusterOptions {
            nodes: opts.nodes,
            ..ClusterOptions::default()
        })?;
        let objects = apiserver::cluster_objects(&cluster);
        Self::up_on(cluster, objects, opts)
    }

    /// [`RelayBed::up`] on a cluster the caller built (of `opts.nodes` nodes), whose fixture
    /// API server serves `objects` (and the agents' Service and EndpointSlice).
    pub fn up_on(
        cluster: Cluster,
        mut objects: Vec<Value>,
        opts: &RelayOptions,
    ) -> Result<RelayBed> {
        if cluster.nodes.len() != opts.nodes {
            return Err(Error::Invalid(format!(
                "RelayOptions.nodes is {} for a cluster of {} nodes",
                opts.nodes,
                cluster.nodes.len()
            )));
        }
        let net = RelayNet::attach(&cluster)?;
        let certs = Certs::generate(&cluster.prefix)?;
        let listed: Vec<usize> = opts
            .listed
            .clone()
            .unwrap_or_else(|| (1..=opts.nodes).collect());
        let endpoints = listed
            .iter()
            .map(|&i| cluster.node(i).map(|n| (n.name.as_str(), n.underlay_ip)))
            .collect::<Result<Vec<_>>>()?;
        objects.push(apiserver::agents_service());
        objects.push(apiserver::agents_endpointslice(&endpoints));
        let mut namespaces: Vec<&str> = cluster.nodes.iter().map(|n| n.netns.as_str()).collect();
        namespaces.push(&net.netns);
        let api = ApiServer::start_in(&namespaces, objects)?;
        let mut bed = RelayBed {
            relay: None,
            agents: Vec::new(),
            api,
            certs,
            net,
            cluster,
        };
        for i in 1..=opts.nodes {
            bed.agents.push(None);
            if opts.agents {
                bed.start_agent(i)?;
            }
        }
        if let Some(d) = opts.relay {
            bed.start_relay(d, opts.agent_timeout_ms)?;
        }
        Ok(bed)
    }

    /// The flags every agent of the bed runs with: metadata from the fixture, metrics on
    /// `<node address>:9651`, the data API on `<node address>:9652` over mTLS with the
    /// `flowtrace certs` agent certificate, client certificates checked against its CA.
    pub fn agent_args(&self, i: usize) -> Result<Vec<String>> {
        let ip = self.node_ip(i)?;
        Ok([
            "--kubeconfig",
            &self.api.kubeconfig().display().to_string(),
            "--metadata-backoff-max-ms",
            "1000",
            "--metrics-listen",
            &format!("{ip}:{AGENT_METRICS_PORT}"),
            "--api-listen",
            &format!("{ip}:{AGENT_DATA_PORT}"),
            "--tls-cert",
            &self.certs.path("agent.crt"),
            "--tls-key",
            &self.certs.path("agent.key"),
            "--tls-client-ca",
            &self.certs.path("ca.crt"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect())
    }

    /// Starts the relay (replacing one that runs).
    pub fn start_relay(&mut self, discovery: Discovery, agent_timeout_ms: u64) -> Result<()> {
        self.relay = None;
        let mut args: Vec<String> = [
            "--tls-cert",
            &self.certs.path("relay.crt"),
            "--tls-key",
            &self.certs.path("relay.key"),
            "--tls-ca",
            &self.certs.path("ca.crt"),
            "--agent-timeout-ms",
            &agent_timeout_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match discovery {
            Discovery::EndpointSlices => {
                args.push("--kubeconfig".into());
                args.push(self.api.kubeconfig().display().to_string());
            }
            Discovery::Static => {
                let urls = (1..=self.cluster.nodes.len())
                    .map(|i| self.agent_url(i))
                    .collect::<Result<Vec<_>>>()?;
                args.push("--agents".into());
                args.push(urls.join(","));
            }
        }
        self.relay = Some(Relay::start(&self.net.netns, &args)?);
        Ok(())
    }

    /// The running relay.
    pub fn relay(&self) -> Result<&Relay> {
        self.relay
            .as_ref()
            .ok_or_else(|| Error::Invalid("this bed runs no relay".into()))
    }

    /// Node `i`'s underlay address.
    pub fn node_ip(&self, i: usize) -> Result<Ipv4Addr> {
        Ok(self.cluster.node(i)?.underlay_ip)
    }

    /// Node `i`'s name.
    pub fn node_name(&self, i: usize) -> Result<String> {
        Ok(self.cluster.node(i)?.name.clone())
    }

    /// `https://<node i address>:9652`, the URL the relay reaches agent `i` at.
    pub fn agent_url(&self, i: usize) -> Result<String> {
        Ok(format!("https://{}:{AGENT_DATA_PORT}", self.node_ip(i)?))
    }

    /// Agent `i`'s data API address.
    pub fn data_addr(&self, i: usize) -> Result<SocketAddr> {
        Ok(SocketAddr::from((self.node_ip(i)?, AGENT_DATA_PORT)))
    }

    /// Agent `i`'s metrics address.
    pub fn metrics_addr(&self, i: usize) -> Result<SocketAddr> {
        Ok(SocketAddr::from((self.node_ip(i)?, AGENT_METRICS_PORT)))
    }

    /// A TLS client of the agents' data API presenting the relay's certificate.
    pub fn relay_client(&self) -> Client {
        Client {
            ca: self.certs.dir.join("ca.crt"),
            server_name: AGENT_SERVER_NAME.into(),
            identity: Some(self.certs.relay_identity()),
        }
    }

    /// Agent of node `i`.
    ///
    /// # Panics
    /// If there is no node `i` or its agent is stopped, like indexing out of bounds.
    pub fn agent(&self, i: usize) -> &Agent {
        match i.checked_sub(1).and_then(|k| self.agents.get(k)) {
            Some(Some(a)) => a,
            Some(None) => panic!("agent {i} is stopped"),
            None => panic!(
                "no agent {i}: agents are numbered 1..={}",
                self.agents.len()
            ),
        }
    }

    /// Starts agent `i` with [`RelayBed::agent_args`] (after [`RelayBed::stop_agent`], or in a
    /// bed made without agents) and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let netns = self.cluster.node(i)?.netns.clone();
        let args = self.agent_args(i)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let slot = i
            .checked_sub(1)
            .and_then(|k| self.agents.get_mut(k))
            .ok_or_else(|| Error::Invalid(format!("no agent slot {i}")))?;
        if slot.is_some() {
            return Err(Error::Invalid(format!("agent {i} runs already")));
        }
        *slot = Some(Agent::start(&netns, &args)?);
        Ok(())
    }

    /// Stops agent `i` with SIGTERM and returns its log.
    pub fn stop_agent(&mut self, i: usize) -> Result<String> {
        let agent = i
            .checked_sub(1)
            .and_then(|k| self.agents.get_mut(k))
            .and_then(Option::take)
            .ok_or_else(|| Error::Invalid(format!("agent {i} does not run")))?;
        agent.stop()
    }
}
