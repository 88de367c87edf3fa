//! The library's error type. Each variant names what failed and where, and its message
//! says what the operator can do about it.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading flowtrace's eBPF object failed: {source}. {hint}")]
    Load {
        #[source]
        source: aya::EbpfError,
        /// What the operator can do about it: the kernel and capability checklist, or the
        /// seccomp profile when a filter is the likely refuser (`kernel::seccomp`).
        hint: &'static str,
    },
    #[error("eBPF program `{program}` could not be loaded: {detail}. {hint}")]
    Program {
        program: &'static str,
        detail: String,
        /// What the operator can do about it.
        hint: &'static str,
    },
    #[error("eBPF map `{map}` is missing from the object or has the wrong type: {detail}. The agent binary and its embedded kernel object disagree: rebuild flowtrace")]
    Map { map: &'static str, detail: String },
    #[error("attaching `{program}` to {interface} ({direction}) failed: {detail}. Check that the interface still exists and the agent holds CAP_NET_ADMIN; on kernels before 6.6 use --attach-mode clsact; skip the interface with --exclude-iface")]
    Attach {
        program: &'static str,
        interface: String,
        direction: &'static str,
        detail: String,
    },
    #[error("reading eBPF map `{map}` failed: {detail}. The entries stay in the kernel and are read at the next drain; if this repeats, restart the agent")]
    MapIo { map: &'static str, detail: String },
    #[error("detaching `{program}` failed: {detail}. With TCX the kernel detaches when the agent exits; in clsact mode remove leftover filters with `tc filter del`")]
    Detach {
        program: &'static str,
        detail: String,
    },
    #[error("the agent at {url} answered HTTP {status}: {body}")]
    AgentError {
        url: String,
        status: u16,
        body: String,
    },
    #[error("the config file {path} {problem}")]
    Config { path: String, problem: String },
    #[error("printing the flows failed: {detail}")]
    Output { detail: String },
    #[error("netlink {what} failed: {source}. The agent needs CAP_NET_ADMIN in the node's network namespace (hostNetwork)")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}. Pick another address with {flag}")]
    Listen {
        addr: String,
        flag: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the flowtrace agent at {url}: {detail}. Is `flowtrace agent` running on this node (and in this network namespace)? Use --agent to point elsewhere")]
    AgentUnreachable { url: String, detail: String },
    #[error("the agent at {url} answered with something that is not flowtrace's API: {detail}")]
    AgentResponse { url: String, detail: String },
    #[error("the TLS file {path} is unusable: {detail}. Make the data API's certificates with `flowtrace certs --out DIR` (or cert-manager, deploy/README.md) and point --tls-cert, --tls-key and the CA flag at them")]
    Tls { path: String, detail: String },
    #[error("setting up TLS failed: {detail}")]
    TlsSetup { detail: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Metadata(#[from] SourceError),
    #[error("invalid filter {flag} `{value}`: {reason}")]
    Filter {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors that stop the agent at start: the operator asked for a source that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the kubeconfig {path} failed: {detail}. Point --kubeconfig (or KUBECONFIG) at a valid kubeconfig, or drop it to run without names")]
    Kubeconfig { path: String, detail: String },
    #[error("in-cluster Kubernetes credentials are unusable: {detail}. Mount the service account token (automountServiceAccountToken) or use --kubeconfig / --metadata-file")]
    InCluster { detail: String },
    #[error("building the Kubernetes client failed: {detail}")]
    Client { detail: String },
    #[error("the metadata file {path} is unusable: {detail}. Give the output of `kubectl get pods,services,endpointslices,nodes -A -o json`")]
    File { path: String, detail: String },
}
