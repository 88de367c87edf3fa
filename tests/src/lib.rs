//! Test bed for flowtrace's integration tests: an emulated Kubernetes cluster built from network
//! namespaces on one machine, the `ftgen` traffic helper binary, and the helpers the tests and
//! `cargo xtask` share (agents per node, lookups in the agents' JSON, ground truth from
//! `conntrack`, `bpftool`, `tc`, `promtool`, `iperf3`, iptables counters and the kernel's SNMP
//! counters).
//!
//! The topology mirrors what flowtrace meets in production (a flannel VXLAN cluster with
//! kube-proxy in iptables mode; the addressing is tabled in [`cluster`]): every node is a network
//! namespace with an underlay `eth0`, a `cni0` bridge holding the pod gateway, a flannel-style
//! VXLAN device `flannel.1`, and kube-proxy's iptables-mode `nat` chains for one Service. Every pod
//! is its own namespace with `eth0` as one end of a veth pair whose other end is enslaved to the
//! node's `cni0`. The interfaces are settled before [`Cluster::up`] returns: nothing in the
//! cluster sends a frame (router solicitations, late MLD/IGMP reports) that a test did not ask for.
//!
//! Helpers return [`Result`]: the library is also used by `cargo xtask`, and a test turns an
//! error into its failure with `unwrap()` (the error's `Debug` is its message).
//!
//! Nothing is created in the root namespace, and every namespace name carries a per-run prefix
//! (`ft<pid>x<counter>`), so parallel runs cannot collide and leftovers of a killed run can be
//! recognised and swept ([`sweep_stale`]).
//!
//! ```no_run
//! use flowtrace_tests::{Cluster, ClusterOptions};
//! # fn main() -> flowtrace_tests::Result<()> {
//! let cluster = Cluster::up(&ClusterOptions::default())?;
//! let a = cluster.pod(1, "pod-a")?;
//! let b = cluster.pod(2, "pod-a")?;
//! a.exec(&["ping", "-c1", "-W2", &b.ipv4.to_string()])?;
//! cluster.down()?;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod apiserver;
pub mod baselines;
pub mod bed;
pub mod browser;
pub mod cluster;
pub mod conntrack;
pub mod drops;
pub mod host;
pub mod image;
pub mod iperf;
pub mod kubeproxy;
pub mod lookup;
pub mod netns;
pub mod prometheus;
pub mod promtext;
pub mod relay;
pub mod sockshop;
pub mod tcpdump;
pub mod tls;
pub mod traffic;
pub mod vethpair;

pub use agent::{flowtrace_bin, http_get, http_get_url, in_netns, Agent};
pub use apiserver::ApiServer;
pub use bed::Bed;
pub use cluster::{Cluster, ClusterOptions, Cni, Node, Pod};
pub use conntrack::{conntrack_list, Tuple};
pub use drops::{DropRule, JsonTuple};
pub use host::{
    bpftool_progs, check_nothing_left, check_unloaded, flowtrace_program_ids, require_root,
    tc_show, traced_devices, ProgRecord,
};
pub use kubeproxy::{Endpoint, Protocol, ServicePort, ServiceSpec};
pub use lookup::{find, hop_names, hops};
pub use netns::{exec, list_netns, spawn, sweep_stale, ChildGuard, ReadyFile};
pub use prometheus::Prometheus;
pub use promtext::{parse_exposition, promtool, Sample};
pub use relay::{Discovery, PortForward, Relay, RelayBed, RelayOptions};
pub use tls::{Certs, Client, Identity, Outcome};
pub use traffic::{
    finish, ftgen, ftgen_bg, ftgen_bg_in, ftgen_bin, ftgen_json, service_connections,
    udp_all_received,
};
pub use vethpair::VethPair;

/// Everything the test bed can fail with. Each variant's message names what failed and what to do.
///
/// `Debug` prints the same message as `Display`, so a test's `unwrap()` reports it readably.
#[derive(thiserror::Error)]
pub enum Error {
    /// The caller is not root; the test bed creates namespaces and loads eBPF programs.
    #[error(
        "this needs root: it creates network namespaces and loads eBPF programs; run it as \
         root (`bash scripts/test.sh`, or `cargo xtask ...` from a root shell)"
    )]
    NotRoot,
    /// A check against ground truth failed; the message says what was expected and what was
    /// seen.
    #[error("{0}")]
    Check(String),
    /// A command ran but exited unsuccessfully.
    #[error(
        "command `{cmd}` failed ({status}): {stderr}\n\
         hint: the test bed needs root, iproute2, iptables and sysctl; run the tests as root and \
         check the command's message above"
    )]
    Command {
        /// The full command line, shell-quoted for copy/paste.
        cmd: String,
        /// Exit status as printed by std.
        status: String,
        /// Trimmed standard error of the command.
        stderr: String,
    },
    /// A command could not even be started (missing binary, no permission).
    #[error("could not start `{cmd}`: {source}; is the program installed and on PATH?")]
    Spawn {
        /// The full command line.
        cmd: String,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// Output of a tool (e.g. `ip -j`) did not have the expected shape.
    #[error("could not understand the output of `{cmd}`: {detail}")]
    Parse {
        /// The command whose output was parsed.
        cmd: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The caller asked for something the cluster cannot do or does not have.
    #[error("{0}")]
    Invalid(String),
    /// Some other I/O failure (waiting on a child, reading its pipes).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// Several failures during teardown; each was attempted regardless of the others.
    #[error("teardown left problems behind (remove them with `ip netns del NAME`):\n{}", .0.join("\n"))]
    Teardown(Vec<String>),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Result type of the test bed.
pub type Result<T, E = Error> = std::result::Result<T, E>;
