//! Developer commands for flowtrace, run as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! - `demo`: brings up the emulated two-node cluster, runs one agent per node, sends pod-to-pod,
//!   cross-node and Service traffic, and prints what `flowtrace flows` shows on each node.
//! - `bench-metadata`: memory and lookup cost of the Kubernetes metadata cache.
//! - `bench`: per-run cost of flowtrace's TC programs under iperf3 load (the kernel's own BPF
//!   run-time statistics), each arm alone on the same hooks: a no-op, a minimal counter,
//!   flowtrace with and without latency sampling, optionally a peer's prebuilt object; on a
//!   plain veth pair and on the emulated cluster, TCP bulk and 64-byte UDP.
//! - `bench-latency`: latency tracking's cost on one agent whose sampling is switched on and
//!   off in short windows of one iperf3 run, net of a no-op behind it on the same hooks.
//! - `layers`: checks that flowtrace/src imports follow the layer order, without cycles.
//! - `bench-agent`: the agent's own CPU and memory at idle, under a packet load and under flow
//!   churn, against the DaemonSet's requests and limits.
//! - `bench-drops`: the cost per recorded drop against a no-op and a minimal per-reason
//!   counter on the same tracepoint, and a flood of drops: recorded or counted lost (against
//!   the DROP rule's own counter), the agent's CPU and memory, the node's forwarding (ping).
//! - `bench-relay`: the relay at scale: 100 simulated agents (mTLS, 10 000 named flows each)
//!   on loopback, the real relay binary in front; answer time of a filtered cluster-wide
//!   `/v1/flows` (p50/p99), the relay's memory and CPU, the fan-out cost per agent.
//! - `bench-map`: the relay's `/v1/map` for 1 000 workloads and 10 000 edges, in process:
//!   build time and memory.
//! - `image`: the OCI image `localhost/flowtrace:<version>` built with buildah from the release
//!   binary on `FROM scratch` (no registry needed), optionally saved as an OCI archive.
//!
//! All but `bench-metadata`, `bench-map` and `bench-relay` need root (network namespaces, eBPF) and the tools
//! `scripts/setup.sh` installs.

mod agentbench;
mod baselines;
mod bench;
mod build;
mod demo;
mod dropbench;
mod floodbench;
mod image;
mod ingestbench;
mod latencybench;
mod layers;
mod mapbench;
mod mapmem;
mod metabench;
mod microbench;
mod peer;
mod proc;
mod relaybench;

use clap::{Parser, Subcommand};

/// Counts heap bytes for `bench-metadata` (a pass-through to the system allocator).
#[global_allocator]
static ALLOC: metabench::Counting = metabench::Counting;

#[derive(Parser)]
#[command(name = "xtask", about = "flowtrace developer commands (run as root)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Emulated cluster + agents + traffic; prints each node's `flowtrace flows` table.
    Demo,
    /// Per-run cost of flowtrace's TC programs against a no-op, a minimal counter and optionally
    /// a peer's object, each alone on the same hooks under iperf3 load (bpf_stats).
    Bench(bench::BenchArgs),
    /// The agent's CPU and memory (idle, bulk traffic, flow churn): the DaemonSet's resources.
    BenchAgent(agentbench::AgentBenchArgs),
    /// Cost per recorded drop and a flood of drops (recorded or counted lost, node forwarding).
    BenchDrops(dropbench::DropBenchArgs),
    /// New flows at line rate: a flood of fresh tuples through two hooks of one node, the
    /// share of updates lost, the agent's CPU and memory, and the node's forwarding.
    BenchFlood(floodbench::FloodBenchArgs),
    /// What the agent does with a drain of N flow records (default 1 000 000), in process:
    /// folding the ring's records, the flow table, the metrics (no root needed).
    BenchIngest(ingestbench::IngestBenchArgs),
    /// Latency tracking's cost on one agent, its sampling switched on and off in windows of
    /// one iperf3 run (no second agent, no second run to compare against).
    BenchLatency(latencybench::LatencyBenchArgs),
    /// The relay at scale: simulated mTLS agents on loopback, the real relay binary; answer
    /// time, memory and fan-out cost (no root needed).
    BenchRelay(relaybench::RelayBenchArgs),
    /// The relay's `/v1/map` for a large application (1 000 workloads, 10 000 edges by
    /// default), in process: build time and the memory held (no root needed).
    BenchMap(mapbench::MapBenchArgs),
    /// Memory of the Kubernetes metadata cache for N pods and the cost of naming an address,
    /// against the same pods kept as whole objects.
    BenchMetadata {
        /// Cluster sizes, in pods (comma separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000])]
        pods: Vec<usize>,
        /// Lookups timed per size.
        #[arg(long, default_value_t = 2_000_000)]
        lookups: usize,
    },
    /// The OCI image localhost/flowtrace:<version>, built with buildah from the release binary
    /// and the libraries it links, on `FROM scratch` (no registry); prints its size.
    Image(image::ImageArgs),
    /// The kernel maps' memory for several numbers of possible CPUs (computed from the maps'
    /// definitions), and with root the kernel's own figure for this machine beside it.
    MapMemory {
        /// Possible CPU counts to compute for (comma separated).
        #[arg(long, value_delimiter = ',', default_values_t = [2u32, 16, 64, 256])]
        cpus: Vec<u32>,
    },
    /// Checks flowtrace/src's layer order and that no import cycle exists (run by CI).
    Layers,
    /// CPU cost per run of each TC program on fixed packets (BPF_PROG_TEST_RUN), no network.
    Microbench {
        /// Runs per figure.
        #[arg(long, default_value_t = 2_000_000)]
        repeat: u32,
        /// Rounds; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// MiB swept before each call of the cold rows (0: no cold rows).
        #[arg(long, default_value_t = 8)]
        sweep_mib: usize,
        /// Another build's kernel object (`target/release/build/flowtrace-*/out/flowtrace`),
        /// run in the same rounds for a before/after comparison.
        #[arg(long)]
        before_object: Option<std::path::PathBuf>,
    },
    /// (internal) Load a peer's prebuilt TC object (its maps in a private bpffs), attach two of
    /// its programs with TCX to the given interfaces and hold them until stdin closes.
    #[command(hide = true)]
    HoldPeer(peer::HoldPeerArgs),
    /// (internal) Attach the reference programs with TCX to the given interfaces of the
    /// current network namespace and hold them until stdin closes or SIGTERM.
    #[command(hide = true)]
    HoldBaselines {
        /// Interfaces to attach to (comma separated), on both ingress and egress.
        #[arg(long, value_delimiter = ',', required = true)]
        iface: Vec<String>,
        /// Which reference programs (comma separated; default both).
        #[arg(long, value_delimiter = ',', default_values_t = baselines::PROGRAMS.map(String::from))]
        program: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Bench(args) => bench::run(&args),
        Command::BenchAgent(args) => agentbench::run(&args),
        Command::BenchRelay(args) => relaybench::run(&args),
        Command::BenchMap(args) => mapbench::run(&args),
        Command::BenchDrops(args) => dropbench::run(&args),
        Command::BenchFlood(args) => floodbench::run(&args),
        Command::BenchIngest(args) => ingestbench::run(&args),
        Command::BenchLatency(args) => latencybench::run(&args),
        Command::BenchMetadata { pods, lookups } => metabench::run(&pods, lookups),
        Command::Image(args) => image::run(&args),
        Command::Layers => layers::run(),
        Command::MapMemory { cpus } => mapmem::run(&cpus),
        Command::Microbench {
            repeat,
            rounds,
            sweep_mib,
            before_object,
        } => microbench::run(repeat, rounds, sweep_mib, before_object.as_deref()),
        Command::HoldBaselines { iface, program } => baselines::hold(&iface, &program),
        Command::HoldPeer(args) => peer::hold(&args),
    }
}
