//! The relay's own `/metrics`: its agents, what asking them cost, its requests, its memory
//! and CPU.

use prometheus::{
    core::Collector, Encoder as _, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    Opts, Registry,
};

/// The relay's metric families.
pub struct RelayMetrics {
    registry: Registry,
    pub agents: GaugeVec,
    pub agents_answering: Gauge,
    pub agent_requests: IntCounterVec,
    pub agent_seconds: HistogramVec,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub trace_streams: Gauge,
    rss: Gauge,
    cpu: Gauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl RelayMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = Self {
            agents: GaugeVec::new(
                opts("flowtrace_relay_agents", "Agents the relay knows, by how (static or endpointslice)."),
                &["source"],
            )?,
            agents_answering: Gauge::with_opts(opts(
                "flowtrace_relay_agents_answering",
                "Agents that answered the relay's last status round.",
            ))?,
            agent_requests: IntCounterVec::new(
                opts("flowtrace_relay_agent_requests_total", "Requests the relay made to agents, by route and result (ok, timeout, http_error, unreachable, bad_answer)."),
                &["route", "result"],
            )?,
            agent_seconds: HistogramVec::new(
                HistogramOpts::new("flowtrace_relay_agent_request_seconds", "Time an agent took to answer the relay, by route (the fan-out cost per agent).").buckets(BUCKETS.to_vec()),
                &["route"],
            )?,
            requests: IntCounterVec::new(
                opts("flowtrace_relay_requests_total", "Requests served by the relay, by route and HTTP status."),
                &["route", "code"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new("flowtrace_relay_request_seconds", "Time the relay took to answer, by route.").buckets(BUCKETS.to_vec()),
                &["route"],
            )?,
            trace_streams: Gauge::with_opts(opts("flowtrace_relay_trace_streams", "Live merged traces being served."))?,
            rss: Gauge::with_opts(opts("flowtrace_relay_resident_memory_bytes", "The relay's resident memory."))?,
            cpu: Gauge::with_opts(opts("flowtrace_relay_cpu_seconds", "CPU time the relay has used (user + system), a counter read from /proc."))?,
            registry,
        };
        let all: [Box<dyn Collector>; 10] = [
            Box::new(m.agents.clone()),
            Box::new(m.agents_answering.clone()),
            Box::new(m.agent_requests.clone()),
            Box::new(m.agent_seconds.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.trace_streams.clone()),
            Box::new(m.rss.clone()),
            Box::new(m.cpu.clone()),
            Box::new(
                GaugeVec::new(
                    opts(
                        "flowtrace_relay_build_info",
                        "Always 1; the version label says which flowtrace runs.",
                    ),
                    &["version"],
                )
                .inspect(|g| g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0))?,
            ),
        ];
        for c in all {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// The text format, with memory and CPU read now.
    pub fn text(&self) -> Result<String, prometheus::Error> {
        if let Some((rss, cpu)) = own_usage() {
            self.rss.set(rss);
            self.cpu.set(cpu);
        }
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// (resident bytes, CPU seconds) of this process, from /proc.
pub fn own_usage() -> Option<(f64, f64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a valid name has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((pages * page, (utime + stime) / tick))
}
