//! The `flowtrace` binary: `flowtrace agent` (the daemon), `flowtrace flows`,
//! `flowtrace path` and `flowtrace trace` (the CLI).

use std::{net::SocketAddr, time::Duration};

use clap::{Args, CommandFactory, Parser, Subcommand};
use flowtrace::{
    agent::AgentConfig,
    host::links::Selector,
    k8s::source::MetaSource,
    model::{wire::AttachMode, IpFilter},
    query::filter::{self, FlowFilter, ObjectName, ProtoFilter},
    server,
};

/// eBPF flow tracer for Kubernetes: packets and bytes per flow per hop, in the kernel.
#[derive(Parser)]
#[command(name = "flowtrace", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach to pod veths and overlay devices, serve the flow table over HTTP.
    Agent(AgentArgs),
    /// Print the flows the local agent has seen.
    Flows(FlowsArgs),
    /// Print the hops from SRC to DST (request and reply, NAT steps included) with the
    /// latency measured at each, over one or more agents (give every node's agent to see
    /// a cross-node path whole, and the round trip between the nodes).
    Path(PathArgs),
    /// Print the application's map: workloads, Services and addresses, and for each edge
    /// between them the connections, bytes each way, rate, round trips (network and server
    /// time) and the nodes it crosses; over the relay or one or more agents.
    Map(MapArgs),
    /// Follow matching traffic now: every TCP SYN and the sampled packets, hook by hook,
    /// with the time between hooks, names and the NAT step. Runs until Ctrl-C, --count
    /// or --duration-s.
    Trace(Box<TraceArgs>),
    /// Make the certificates of the data API: a CA, the agents' server certificate, the
    /// relay's client certificate, and secrets.yaml with the two Secrets the manifests mount.
    /// With --ca-cert/--ca-key, issue new certificates from an existing CA (rotation).
    Certs(CertsArgs),
    /// Run the relay: one API for every node's agent (flows, path, trace, nodes), finding
    /// the agents through their EndpointSlices or taking a list.
    Relay(RelayArgs),
}

#[derive(Args)]
struct RelayArgs {
    /// Address of the relay's API (plain HTTP). Loopback by default: reach it with
    /// `kubectl port-forward`.
    #[arg(long, env = "FLOWTRACE_RELAY_LISTEN", default_value = "127.0.0.1:9660")]
    listen: SocketAddr,
    /// Also serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:9661).
    #[arg(long, env = "FLOWTRACE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Agents to ask (e.g. https://10.0.0.1:9652 or, for an agent's loopback listener,
    /// http://127.0.0.1:9650), instead of finding them through the Kubernetes API.
    #[arg(long, env = "FLOWTRACE_RELAY_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// Namespace of the agents' headless Service.
    #[arg(long, env = "FLOWTRACE_RELAY_NAMESPACE", default_value = "flowtrace")]
    namespace: String,
    /// Name of the agents' headless Service (its EndpointSlices list the agents; their port
    /// named `api` is the data API).
    #[arg(
        long,
        env = "FLOWTRACE_RELAY_AGENT_SERVICE",
        default_value = "flowtrace"
    )]
    agent_service: String,
    /// Kubeconfig for finding the agents (in-cluster credentials otherwise).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The relay's client certificate (PEM; `flowtrace certs` writes relay.crt).
    #[arg(long, env = "FLOWTRACE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert.
    #[arg(long, env = "FLOWTRACE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// CA certificates (PEM) the agents' certificates must chain to.
    #[arg(long, env = "FLOWTRACE_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<std::path::PathBuf>,
    /// The DNS name every agent's certificate carries.
    #[arg(long, env = "FLOWTRACE_AGENT_SERVER_NAME", default_value = flowtrace::tls::AGENT_NAME)]
    agent_server_name: String,
    /// Longest wait for one agent's answer, in milliseconds; a slower agent is reported
    /// missing from that answer.
    #[arg(long, env = "FLOWTRACE_AGENT_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=120_000))]
    agent_timeout_ms: u64,
}

impl RelayArgs {
    fn config(self) -> flowtrace::relay::RelayConfig {
        let source = match &self.kubeconfig {
            Some(k) => MetaSource::Kubeconfig {
                path: k.clone(),
                context: None,
            },
            None => MetaSource::InCluster,
        };
        flowtrace::relay::RelayConfig {
            discover: Some(flowtrace::relay::Discover {
                source,
                namespace: self.namespace,
                service: self.agent_service,
            }),
            agents: self.agents,
            tls: match (self.tls_cert, self.tls_key, self.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => {
                    Some(flowtrace::tls::TlsFiles { cert, key, ca })
                }
                _ => None,
            },
            agent_server_name: self.agent_server_name,
            agent_timeout: Duration::from_millis(self.agent_timeout_ms),
        }
    }
}

#[derive(Args)]
struct CertsArgs {
    /// Directory to write into (created if missing; files there are replaced).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Validity of the agent and relay certificates, in days (the CA: ten times as long).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Namespace of the agents' Secret (flowtrace-agent-tls) in secrets.yaml.
    #[arg(long, default_value = "flowtrace")]
    namespace: String,
    /// Namespace of the relay's Secret (flowtrace-relay-tls) in secrets.yaml.
    #[arg(long, default_value = "flowtrace-relay")]
    relay_namespace: String,
    /// Issue from this CA certificate instead of making a new CA.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<std::path::PathBuf>,
    /// The key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<std::path::PathBuf>,
    /// Also issue a client certificate for this name (NAME.crt, NAME.key; repeatable), for
    /// another reader the agents then allow with --tls-client-name.
    #[arg(long)]
    client: Vec<String>,
}

#[derive(Args)]
struct TraceArgs {
    /// Base URL of the agent's API.
    #[arg(
        long,
        env = "FLOWTRACE_AGENT",
        default_value = "http://127.0.0.1:9650",
        conflicts_with = "standalone"
    )]
    agent: String,
    /// Follow every node at once through the relay at this URL (e.g. after `kubectl -n
    /// flowtrace-relay port-forward deploy/flowtrace-relay 9660`: http://127.0.0.1:9660).
    #[arg(long, env = "FLOWTRACE_RELAY", conflicts_with = "standalone")]
    relay: Option<String>,
    /// No agent runs on this node: load and attach the programs in this process for the
    /// trace's duration (needs the agent's privileges), and detach them when it ends.
    #[arg(long)]
    standalone: bool,
    /// Print each packet as a JSON line (the API's /v1/trace lines) instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this many packets.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration_s: Option<u64>,
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten, next_help_heading = "With --standalone")]
    settings: AgentSettings,
}

#[derive(Args)]
struct PathArgs {
    /// Where the traffic starts: an IP address, pod/NAMESPACE/NAME, workload/NAMESPACE/NAME
    /// (or deploy/, ds/, sts/...).
    #[arg(value_parser = flowtrace::query::path::PathEnd::parse)]
    src: flowtrace::query::path::PathEnd,
    /// Where it goes: the same forms, or svc/NAMESPACE/NAME for a Service.
    #[arg(value_parser = flowtrace::query::path::PathEnd::parse)]
    dst: flowtrace::query::path::PathEnd,
    #[command(flatten)]
    join: JoinArgs,
    /// Print JSON (a list of paths) instead of text.
    #[arg(long)]
    json: bool,
}

/// Where `flowtrace path` and `flowtrace map` get every node's view from, and how far back.
#[derive(Args)]
struct JoinArgs {
    /// Base URL of an agent's API (repeatable: one per node to join).
    #[arg(
        long,
        env = "FLOWTRACE_AGENT",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9650"
    )]
    agent: Vec<String>,
    /// Join every node through the relay at this URL instead of asking agents.
    #[arg(long, env = "FLOWTRACE_RELAY")]
    relay: Option<String>,
    /// Only connections seen in the last this many seconds (0: everything the agents hold).
    #[arg(long, default_value_t = 60)]
    window_s: u64,
}

#[derive(Args)]
struct MapArgs {
    #[command(flatten)]
    join: JoinArgs,
    /// Only edges with an end (or their Service) in this namespace (repeatable).
    #[arg(long, value_parser = flowtrace::query::filter::parse_namespace)]
    namespace: Vec<String>,
    /// Only edges from or to this workload, NAMESPACE/NAME (repeatable).
    #[arg(long, value_parser = parse_workload)]
    workload: Vec<(String, String)>,
    /// Print JSON (what /v1/map serves) instead of a table.
    #[arg(long, conflicts_with = "dot")]
    json: bool,
    /// Print a Graphviz graph (`| dot -Tsvg > map.svg`) instead of a table.
    #[arg(long)]
    dot: bool,
}

fn parse_workload(s: &str) -> Result<(String, String), String> {
    flowtrace::query::filter::parse_object("--workload", s)
        .map(|o| (o.namespace, o.name))
        .map_err(|e| e.to_string())
}

#[derive(Args)]
struct AgentArgs {
    /// Address of the whole HTTP API without authentication, for the CLI on this node: a
    /// loopback address only (the agent refuses any other).
    #[arg(long, env = "FLOWTRACE_LISTEN", default_value = "127.0.0.1:9650")]
    listen: SocketAddr,
    /// Also serve /metrics, /healthz and /readyz (nothing else) here, e.g. 0.0.0.0:9651 for
    /// Prometheus and the kubelet's probes.
    #[arg(long, env = "FLOWTRACE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Also serve the data API here over mutual TLS, to clients with a certificate from the
    /// CA of --tls-client-ca naming a --tls-client-name (the relay), e.g. 0.0.0.0:9652.
    #[arg(long, env = "FLOWTRACE_API_LISTEN", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    api_listen: Option<SocketAddr>,
    /// The agent's certificate for --api-listen (PEM; `flowtrace certs` writes agent.crt).
    /// Re-read when it changes.
    #[arg(long, env = "FLOWTRACE_TLS_CERT", requires = "api_listen")]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "FLOWTRACE_TLS_KEY", requires = "api_listen")]
    tls_key: Option<std::path::PathBuf>,
    /// CA certificates (PEM, one or more: old and new during a CA rotation) that client
    /// certificates must chain to.
    #[arg(long, env = "FLOWTRACE_TLS_CLIENT_CA", requires = "api_listen")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// DNS names (in the client certificate's subjectAltName) allowed to read the data API.
    #[arg(
        long,
        env = "FLOWTRACE_TLS_CLIENT_NAME",
        value_delimiter = ',',
        default_value = flowtrace::tls::RELAY_NAME
    )]
    tls_client_name: Vec<String>,
    #[command(flatten)]
    settings: AgentSettings,
}

impl AgentArgs {
    fn listeners(&self) -> server::Listeners {
        let api = match (
            &self.api_listen,
            &self.tls_cert,
            &self.tls_key,
            &self.tls_client_ca,
        ) {
            (Some(addr), Some(cert), Some(key), Some(ca)) => Some(server::ApiListen {
                addr: *addr,
                tls: flowtrace::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                },
                clients: self.tls_client_name.clone(),
            }),
            // clap's `requires` makes the four come together.
            _ => None,
        };
        server::Listeners {
            local: self.listen,
            metrics: self.metrics_listen,
            api,
        }
    }
}

/// Everything the agent needs but its listen address (shared by `agent` and
/// `trace --standalone`).
#[derive(Args)]
struct AgentSettings {
    /// How often to drain the kernel maps, in milliseconds (API reads also drain).
    #[arg(long, env = "FLOWTRACE_DRAIN_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    drain_interval_ms: u64,
    /// Size of the kernel's event ring, in MiB (a power of two): flow counters handed over
    /// from the per-CPU cache, NAT rewrites and latency samples wait there until the agent
    /// reads them (continuously). A full ring is counted (flowtrace_kernel_lost_total).
    #[arg(long, env = "FLOWTRACE_EVENT_RING_MIB", default_value_t = flowtrace_common::DEFAULT_EVENT_RING_BYTES / (1024 * 1024), value_parser = parse_ring_mib)]
    event_ring_mib: u32,
    /// Capacity of each of the two kernel drop buffers, in (tuple, reason, place) entries;
    /// drops beyond it are counted (flowtrace_kernel_lost_total{reason="drop_map_full"}).
    #[arg(long, env = "FLOWTRACE_DROP_ENTRIES", default_value_t = flowtrace_common::drops::DEFAULT_DROP_ENTRIES, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    drop_entries: u32,
    /// Where the container runtime bind-mounts pod network namespaces; drops inside pods
    /// are placed on their pod through it (mount it read-only into the agent).
    #[arg(long, env = "FLOWTRACE_NETNS_DIR", default_value = flowtrace::host::netns::DEFAULT_NETNS_DIR)]
    netns_dir: std::path::PathBuf,
    /// Measure hop latency and TCP round trips on one packet in N (a power of two; the
    /// choice hashes fields NAT does not change, so a packet is sampled at every hook);
    /// 0 turns latency tracking off.
    #[arg(long, env = "FLOWTRACE_LATENCY_SAMPLE", default_value_t = 64, value_parser = parse_sample_rate)]
    latency_sample: u32,
    /// Of the sampled packets, take at most one per flow and hook in each window of this
    /// many milliseconds (rounded up to a power of two of nanoseconds: 16 is 16.8 ms), so a
    /// busy flow costs no more than a quiet one; every hook takes the same packets. 0 takes
    /// every sampled packet (with `--latency-sample 1`, every packet).
    #[arg(long, env = "FLOWTRACE_LATENCY_PER_FLOW_MS", default_value_t = flowtrace_common::DEFAULT_LATENCY_PER_FLOW_MS, value_parser = clap::value_parser!(u32).range(0..=600_000))]
    latency_per_flow_ms: u32,
    /// Do not read the conntrack table (NAT translations then come from the kernel programs
    /// alone and stay unchecked).
    #[arg(long, env = "FLOWTRACE_NO_CONNTRACK")]
    no_conntrack: bool,
    /// How often, in seconds, to dump the whole conntrack table to resynchronise what its
    /// events said (also done at start and after the kernel dropped events).
    #[arg(long, env = "FLOWTRACE_CONNTRACK_RESYNC_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    conntrack_resync_s: u64,
    /// Most flows kept in the agent's table; the least recently seen are evicted beyond it.
    #[arg(long, env = "FLOWTRACE_MAX_FLOWS", default_value_t = 100_000)]
    max_flows: usize,
    /// Forget a flow after this many seconds without packets.
    #[arg(long, env = "FLOWTRACE_FLOW_IDLE_TIMEOUT_S", default_value_t = 300)]
    flow_idle_timeout_s: u64,
    /// How to attach: tcx (kernel >= 6.6), clsact (older kernels), or auto.
    #[arg(long, env = "FLOWTRACE_ATTACH_MODE", value_enum, default_value_t = AttachMode::Auto)]
    attach_mode: AttachMode,
    /// Name of this node in the API (in a DaemonSet: `spec.nodeName` via the downward API).
    /// Defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Also trace interfaces matching this name or `*` glob (e.g. eth0 for the encapsulated packets).
    #[arg(
        long = "include-iface",
        env = "FLOWTRACE_INCLUDE_IFACE",
        value_delimiter = ','
    )]
    include: Vec<String>,
    /// Never trace interfaces matching this name or `*` glob.
    #[arg(
        long = "exclude-iface",
        env = "FLOWTRACE_EXCLUDE_IFACE",
        value_delimiter = ','
    )]
    exclude: Vec<String>,
    /// Names from `kubectl get pods,services,endpointslices,nodes -A -o json` output saved
    /// in this file (for a node with no API access); re-read when it changes. Takes
    /// precedence over --kubeconfig and in-cluster credentials.
    #[arg(long, env = "FLOWTRACE_METADATA_FILE")]
    metadata_file: Option<std::path::PathBuf>,
    /// Names from the API server of this kubeconfig. Without it (and without
    /// --metadata-file) the agent uses in-cluster credentials when KUBERNETES_SERVICE_HOST
    /// is set, and runs with addresses only otherwise.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Context of the kubeconfig to use (its current context by default).
    #[arg(long, env = "FLOWTRACE_KUBE_CONTEXT", requires = "kubeconfig")]
    kube_context: Option<String>,
    /// Longest wait, in milliseconds, between attempts to reach the API server again.
    #[arg(long, env = "FLOWTRACE_METADATA_BACKOFF_MAX_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    metadata_backoff_max_ms: u64,
    /// How finely /metrics labels traffic: namespace, workload or pod.
    #[arg(long, env = "FLOWTRACE_METRICS_LEVEL", value_enum, default_value_t = flowtrace::metrics::Level::Workload)]
    metrics_level: flowtrace::metrics::Level,
    /// Most series any one /metrics family holds (the `other` series included); updates
    /// beyond it are folded into `other` and counted.
    #[arg(long, env = "FLOWTRACE_METRICS_MAX_SERIES", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    metrics_max_series: u64,
    /// Drop a /metrics series after this many seconds without updates (series of deleted
    /// pods and workloads go this way).
    #[arg(long, env = "FLOWTRACE_METRICS_SERIES_TTL_S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    metrics_series_ttl_s: u64,
    /// Settings from this TOML file, keys being the long flag names (e.g.
    /// `drain-interval-ms = 500`). Flags and FLOWTRACE_* variables win over it.
    #[arg(long, env = "FLOWTRACE_CONFIG")]
    #[allow(dead_code)]
    // read from the parsed arguments before this struct is built (flowtrace::config)
    config: Option<std::path::PathBuf>,
}

impl AgentSettings {
    fn config(self) -> AgentConfig {
        let metadata = self.metadata_source();
        AgentConfig {
            drain_interval: Duration::from_millis(self.drain_interval_ms),
            event_ring_mib: self.event_ring_mib,
            drop_entries: self.drop_entries,
            netns_dir: self.netns_dir,
            latency_sample: self.latency_sample,
            latency_window_shift: flowtrace_common::window_shift_for_ms(self.latency_per_flow_ms),
            conntrack: !self.no_conntrack,
            conntrack_resync: Duration::from_secs(self.conntrack_resync_s),
            max_flows: self.max_flows,
            flow_idle_timeout: Duration::from_secs(self.flow_idle_timeout_s),
            attach_mode: self.attach_mode,
            selector: Selector {
                include: self.include,
                exclude: self.exclude,
            },
            node_name: self.node_name,
            metadata,
            metadata_backoff_max: Duration::from_millis(self.metadata_backoff_max_ms),
            metrics: flowtrace::metrics::MetricsConfig {
                level: self.metrics_level,
                max_series: self.metrics_max_series as usize,
                series_ttl_ns: self.metrics_series_ttl_s.saturating_mul(1_000_000_000),
            },
        }
    }

    fn metadata_source(&self) -> MetaSource {
        if let Some(f) = &self.metadata_file {
            MetaSource::File(f.clone())
        } else if let Some(k) = &self.kubeconfig {
            MetaSource::Kubeconfig {
                path: k.clone(),
                context: self.kube_context.clone(),
            }
        } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            MetaSource::InCluster
        } else {
            MetaSource::None
        }
    }
}

#[derive(Args)]
struct FlowsArgs {
    /// Base URL of the agent's API.
    #[arg(long, env = "FLOWTRACE_AGENT", default_value = "http://127.0.0.1:9650")]
    agent: String,
    /// Every node's flows through the relay at this URL (a NODE column is added).
    #[arg(long, env = "FLOWTRACE_RELAY")]
    relay: Option<String>,
    /// Print JSON (the API's `/v1/flows` body) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    filter: FilterArgs,
}

/// The flow filters of `flows` and `trace`.
#[derive(Args)]
struct FilterArgs {
    /// Only flows from or to this address or CIDR (repeatable).
    #[arg(long, value_parser = |s: &str| s.parse::<IpFilter>().map_err(|e| e.to_string()))]
    ip: Vec<IpFilter>,
    /// Only flows from or to this port (repeatable; ICMP flows have no ports).
    #[arg(long, value_parser = |s: &str| filter::parse_port(s).map_err(|e| e.to_string()))]
    port: Vec<u16>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp or a number (repeatable).
    #[arg(long, value_parser = |s: &str| s.parse::<ProtoFilter>().map_err(|e| e.to_string()))]
    proto: Vec<ProtoFilter>,
    /// Only flows seen on this interface (name or `*` glob, repeatable).
    #[arg(long, value_parser = |s: &str| filter::parse_iface(s).map_err(|e| e.to_string()))]
    iface: Vec<String>,
    /// Only flows from or to this pod, as NAMESPACE/NAME (repeatable).
    #[arg(long, value_parser = |s: &str| filter::parse_object("--pod", s).map_err(|e| e.to_string()))]
    pod: Vec<ObjectName>,
    /// Only flows from or to pods or Services of this namespace (repeatable).
    #[arg(long, short = 'n', value_parser = |s: &str| filter::parse_namespace(s).map_err(|e| e.to_string()))]
    namespace: Vec<String>,
    /// Only flows from or to pods of this workload (Deployment, StatefulSet, DaemonSet,
    /// Job, CronJob...), as NAMESPACE/NAME (repeatable).
    #[arg(long, value_parser = |s: &str| filter::parse_object("--workload", s).map_err(|e| e.to_string()))]
    workload: Vec<ObjectName>,
    /// Only flows to this Service (by its cluster IP or NodePort, and to its backends after
    /// the translation), as NAMESPACE/NAME (repeatable).
    #[arg(long, value_parser = |s: &str| filter::parse_object("--service", s).map_err(|e| e.to_string()))]
    service: Vec<ObjectName>,
}

impl FilterArgs {
    fn into_filter(self) -> FlowFilter {
        FlowFilter {
            ips: self.ip,
            ports: self.port,
            protos: self.proto,
            ifaces: self.iface,
            pods: self.pod,
            namespaces: self.namespace,
            workloads: self.workload,
            services: self.service,
        }
    }
}

fn parse_sample_rate(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n == 0 || (n.is_power_of_two() && n <= 1 << 20) => Ok(n),
        _ => Err(format!(
            "`{s}` is not 0 (off) or a power of two up to 1048576 (1 = every packet, 64 = one in 64)"
        )),
    }
}

fn parse_ring_mib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 1024 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a power of two from 1 to 1024 (MiB of the kernel's event ring; 4 is the default)"
        )),
    }
}

fn main() -> std::process::ExitCode {
    // Parsed twice when a config file is named: once to find it and what the command line
    // and environment set, once with the file's settings appended (see flowtrace::config).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cmd = Cli::command();
    let matches = cmd.clone().get_matches_from(args.clone());
    let args = match flowtrace::config::with_file(&cmd, &matches, args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWTRACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Keeps the agent's resident memory near what it holds. A drain in a burst of new flows
/// builds tables of tens of MiB and frees them; glibc's default raises its mmap threshold
/// after such a free, so the next ones come from the heap, whose freed pages stay resident
/// (the peak, not the live size, is what the node is charged). A fixed threshold keeps
/// every large table in its own mapping, returned when freed; two arenas (not eight per
/// CPU) serve the agent's few threads.
fn tune_allocator() {
    // SAFETY: mallopt only changes glibc's allocator parameters; called before the
    // runtime's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `flowtrace trace`: against an agent, or with `--standalone` against an agent run in
/// this process on a free loopback port. The standalone agent stops through its own
/// shutdown path (Ctrl-C/SIGTERM, or the end of the trace), so its programs and qdiscs
/// are removed.
fn trace(t: TraceArgs) -> anyhow::Result<()> {
    let filter = t.filter.into_filter();
    let until = flowtrace::cli::trace::Until {
        count: t.count,
        duration: t.duration_s.map(Duration::from_secs),
    };
    let mut stdout = std::io::stdout();
    if !t.standalone {
        let (base, relay) = match &t.relay {
            Some(r) => (r.as_str(), true),
            None => (t.agent.as_str(), false),
        };
        flowtrace::cli::trace::follow(base, relay, &filter, t.json, until, &mut stdout)?;
        return Ok(());
    }
    init_logging("warn");
    let cfg = t.settings.config();
    let listeners = server::Listeners {
        local: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics: None,
        api: None,
    };
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let agent_done = done_tx.clone();
    let agent_stop = stop.clone();
    let rt = agent_runtime()?;
    let agent = std::thread::spawn(move || {
        let res = rt.block_on(server::run_until(
            cfg,
            listeners,
            move |addr| {
                let _ = addr_tx.send(addr);
            },
            async move { agent_stop.notified().await },
        ));
        let _ = agent_done.send(res.map_err(anyhow::Error::from));
    });
    let Ok(addr) = addr_rx.recv() else {
        // The agent ended before listening: its error says why.
        return match done_rx.recv() {
            Ok(Err(e)) => Err(e),
            _ => Err(anyhow::anyhow!(
                "the standalone agent stopped before it started"
            )),
        };
    };
    let base = format!("http://{addr}");
    flowtrace::cli::trace::wait_ready(&base, Duration::from_secs(30))?;
    std::thread::spawn(move || {
        let res = flowtrace::cli::trace::follow(&base, false, &filter, t.json, until, &mut stdout);
        let _ = done_tx.send(res.map(|_| ()).map_err(anyhow::Error::from));
    });
    // Whichever ends first: the trace (count, duration, a broken pipe) or the agent (a
    // signal, or an error).
    let first = done_rx.recv().unwrap_or(Ok(()));
    stop.notify_one();
    let _ = agent.join();
    first
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => {
            init_logging("info");
            let listeners = a.listeners();
            let cfg = a.settings.config();
            agent_runtime()?.block_on(server::run(cfg, listeners))?;
        }
        Command::Trace(t) => trace(*t)?,
        Command::Relay(r) => {
            init_logging("info");
            let (listen, metrics) = (r.listen, r.metrics_listen);
            agent_runtime()?.block_on(server::relay::run(r.config(), listen, metrics))?;
        }
        Command::Certs(c) => {
            let issued = flowtrace::tls::issue::issue(&flowtrace::tls::issue::Request {
                out: c.out.clone(),
                days: c.days,
                namespace: c.namespace,
                relay_namespace: c.relay_namespace,
                ca: c.ca_cert.zip(c.ca_key),
                clients: c.client,
            })?;
            for f in &issued.files {
                println!("wrote {}", f.display());
            }
            println!(
                "next: kubectl apply -f {}  (and keep {} out of the cluster)",
                c.out.join("secrets.yaml").display(),
                if issued.new_ca {
                    "ca.key"
                } else {
                    "the CA key"
                }
            );
        }
        Command::Flows(f) => {
            let filter = f.filter.into_filter();
            match &f.relay {
                Some(r) => print!(
                    "{}",
                    flowtrace::cli::relay_flows(r, &filter, f.json, &mut std::io::stderr())?
                ),
                None => print!("{}", flowtrace::cli::flows(&f.agent, &filter, f.json)?),
            }
        }
        Command::Map(m) => {
            let filter = flowtrace::query::map::MapFilter {
                namespaces: m.namespace,
                workloads: m.workload,
            };
            let window = Duration::from_secs(m.join.window_s);
            let answer = match &m.join.relay {
                Some(r) => flowtrace::cli::map::fetch_from_relay(
                    r,
                    &filter,
                    window,
                    &mut std::io::stderr(),
                )?,
                None => flowtrace::cli::map::fetch_from_agents(&m.join.agent, &filter, window)?,
            };
            let format = if m.json {
                flowtrace::cli::map::MapFormat::Json
            } else if m.dot {
                flowtrace::cli::map::MapFormat::Dot
            } else {
                flowtrace::cli::map::MapFormat::Text
            };
            print!("{}", flowtrace::cli::map::render(&answer, format)?);
        }
        Command::Path(p) if p.join.relay.is_some() => {
            let relay = p.join.relay.as_deref().unwrap_or_default();
            print!(
                "{}",
                flowtrace::cli::relay_path(
                    relay,
                    &p.src,
                    &p.dst,
                    Duration::from_secs(p.join.window_s),
                    p.json,
                    &mut std::io::stderr()
                )?
            );
        }
        Command::Path(p) => {
            print!(
                "{}",
                flowtrace::cli::path(
                    &p.join.agent,
                    &p.src,
                    &p.dst,
                    Duration::from_secs(p.join.window_s),
                    p.json
                )?
            );
        }
    }
    Ok(())
}
