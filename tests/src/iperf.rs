//! iperf3 between two pods: a server that is known to listen before a client starts, and client
//! runs read from iperf3's own JSON report (`-J`), the ground truth for throughput figures.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{netns::ChildGuard, Error, Pod, Result};

/// `iperf3 -s` in a pod; killed when dropped.
pub struct IperfServer {
    /// The server process.
    pub guard: ChildGuard,
    /// Its TCP port.
    pub port: u16,
}

impl IperfServer {
    /// Starts `iperf3 -s -p port` in `pod` and returns once it listens (at most `timeout`).
    /// Its output is discarded: a pipe nobody reads would eventually block it.
    pub fn start(pod: &Pod, port: u16, timeout: Duration) -> Result<Self> {
        Self::start_in(&pod.netns, port, timeout)
    }

    /// [`IperfServer::start`] in any network namespace (e.g. a node's, where a pod's traffic
    /// ends at the node itself).
    pub fn start_in(netns: &str, port: u16, timeout: Duration) -> Result<Self> {
        let port_s = port.to_string();
        let argv = ["ip", "netns", "exec", netns, "iperf3", "-s", "-p", &port_s];
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: argv.join(" "),
                source,
            })?;
        let mut guard = ChildGuard::new(child, format!("iperf3 -s (in {netns})"));
        wait_listening_in(netns, port, &mut guard, timeout)?;
        Ok(Self { guard, port })
    }
}

/// Waits until a TCP listener on `port` exists inside `pod` (checked with `ss`, which does not
/// disturb the server the way a probe connection would); fails early if `server` exits.
pub fn wait_listening(
    pod: &Pod,
    port: u16,
    server: &mut ChildGuard,
    timeout: Duration,
) -> Result<()> {
    wait_listening_in(&pod.netns, port, server, timeout)
}

/// [`wait_listening`] in any network namespace.
pub fn wait_listening_in(
    netns: &str,
    port: u16,
    server: &mut ChildGuard,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        if server.has_exited() {
            return Err(Error::Invalid(format!(
                "the server in {netns} exited before it listened on port {port}"
            )));
        }
        let out = crate::netns::exec(netns, &["ss", "-H", "-l", "-t", "-n", filter.as_str()])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "nothing listens on TCP port {port} in {netns} after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one iperf3 client run reported.
#[derive(Clone, Debug, PartialEq)]
pub struct IperfRun {
    /// Throughput the receiver saw (`end.sum_received.bits_per_second`), Gbit/s.
    pub gbps: f64,
    /// Segments the sender retransmitted (`end.sum_sent.retransmits`).
    pub retransmits: u64,
    /// CPU the client and the server used, millicores (`end.cpu_utilization_percent`,
    /// `host_total + remote_total`, each a percentage of one CPU).
    pub cpu_mcpu: f64,
}

/// One `iperf3 -c server -p port -t seconds -J` run from `client`, pinned with `-A cpus` when
/// given (iperf3's `client,server` CPU list). Retried up to three times while the server is
/// still busy with the previous run.
pub fn iperf_client(
    client: &Pod,
    server: IpAddr,
    port: u16,
    seconds: u64,
    cpus: Option<&str>,
) -> Result<IperfRun> {
    let (server_s, port_s, secs) = (server.to_string(), port.to_string(), seconds.to_string());
    let mut argv = vec![
        "iperf3",
        "-c",
        server_s.as_str(),
        "-p",
        port_s.as_str(),
        "-t",
        secs.as_str(),
        "-J",
    ];
    if let Some(cpus) = cpus {
        argv.extend_from_slice(&["-A", cpus]);
    }
    let shown = format!("ip netns exec {} {}", client.netns, argv.join(" "));
    let mut last_err = String::new();
    for attempt in 1..=3 {
        if attempt > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &client.netns])
            .args(&argv)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                cmd: shown.clone(),
                source,
            })?;
        let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
            Ok(v) => v,
            Err(_) => {
                last_err = format!(
                    "no JSON (exit {}): {} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
        };
        if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
            last_err = e.to_string();
            continue;
        }
        return parse_run(&v).map_err(|detail| Error::Parse {
            cmd: shown.clone(),
            detail,
        });
    }
    Err(Error::Invalid(format!(
        "`{shown}` failed 3 times; last error: {last_err}"
    )))
}

fn parse_run(v: &serde_json::Value) -> std::result::Result<IperfRun, String> {
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or("no end.sum_received.bits_per_second in its JSON")?;
    let num = |p: &str| v.pointer(p).and_then(serde_json::Value::as_f64);
    Ok(IperfRun {
        gbps: bps / 1e9,
        retransmits: v
            .pointer("/end/sum_sent/retransmits")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        cpu_mcpu: (num("/end/cpu_utilization_percent/host_total").unwrap_or(0.0)
            + num("/end/cpu_utilization_percent/remote_total").unwrap_or(0.0))
            * 10.0,
    })
}

/// How one iperf3 client run sends: TCP (one stream) or UDP datagrams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IperfTraffic {
    /// One TCP stream as fast as it goes (iperf3's default).
    Tcp,
    /// UDP datagrams of `len` payload bytes at `bitrate` (iperf3's `-b`: `0` is as fast as the
    /// sender goes, `200M` is 200 Mbit/s), `-u -l len -b bitrate`.
    Udp { len: u32, bitrate: String },
}

/// One iperf3 client run's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IperfSpec {
    /// Seconds that count (`-t`).
    pub seconds: u64,
    /// Seconds sent first and left out of the report (`-O`), e.g. past slow start; the run
    /// lasts `omit + seconds`.
    pub omit: u64,
    /// iperf3's `-A client,server` CPU list, if pinned.
    pub cpus: Option<String>,
    pub traffic: IperfTraffic,
}

impl IperfSpec {
    /// The iperf3 client's arguments (after `iperf3`).
    fn argv(&self, server: IpAddr, port: u16) -> Vec<String> {
        let mut argv: Vec<String> = [
            "-c".to_string(),
            server.to_string(),
            "-p".into(),
            port.to_string(),
            "-t".into(),
            self.seconds.to_string(),
            "-J".into(),
        ]
        .into();
        if self.omit > 0 {
            argv.extend(["-O".into(), self.omit.to_string()]);
        }
        if let Some(cpus) = &self.cpus {
            argv.extend(["-A".into(), cpus.clone()]);
        }
        if let IperfTraffic::Udp { len, bitrate } = &self.traffic {
            argv.extend([
                "-u".into(),
                "-l".into(),
                len.to_string(),
                "-b".into(),
                bitrate.clone(),
            ]);
        }
        argv
    }
}

/// What one iperf3 client run reported over its counted seconds (omitted ones excluded).
#[derive(Clone, Debug, PartialEq)]
pub struct IperfReport {
    /// Throughput the receiver saw, Gbit/s (`end.sum_received`).
    pub gbps: f64,
    /// TCP segments the sender retransmitted (0 for UDP).
    pub retransmits: u64,
    /// UDP datagrams sent and received (the bytes of `end.sum_sent` / `end.sum_received`
    /// divided by the datagram size; iperf3's own `packets` / `lost_packets` count sequence
    /// numbers, omitted seconds included); 0 for TCP.
    pub sent_datagrams: u64,
    pub received_datagrams: u64,
    /// Counted seconds, as the receiver measured them.
    pub seconds: f64,
}

impl IperfReport {
    /// UDP datagrams that reached the receiver, per second (0 for TCP).
    pub fn received_pps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.received_datagrams as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// An iperf3 client running in the background, so a caller can act while traffic flows
/// (e.g. read counters once the omitted seconds are over). Killed when dropped.
pub struct IperfJob {
    guard: Option<ChildGuard>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    shown: String,
    /// The UDP datagram size (None for TCP).
    udp_len: Option<u32>,
}

impl IperfJob {
    /// Starts `iperf3 -c server` inside `netns` with `spec`.
    pub fn spawn(netns: &str, server: IpAddr, port: u16, spec: &IperfSpec) -> Result<Self> {
        let argv = spec.argv(server, port);
        let shown = format!("ip netns exec {netns} iperf3 {}", argv.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3"])
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: shown.clone(),
                source,
            })?;
        // Drained on a thread: iperf3 -J prints its report (or its error) at the end, and a
        // long report must not block it on a full pipe.
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = std::io::Read::read_to_end(&mut out, &mut buf);
                buf
            })
        });
        Ok(Self {
            guard: Some(ChildGuard::new(child, shown.clone())),
            stdout,
            shown,
            udp_len: match spec.traffic {
                IperfTraffic::Udp { len, .. } => Some(len),
                IperfTraffic::Tcp => None,
            },
        })
    }

    /// Whether the client has ended (a run that ends early failed: the server was busy or
    /// unreachable; [`IperfJob::wait`] says why).
    pub fn has_exited(&mut self) -> bool {
        self.guard.as_mut().is_none_or(ChildGuard::has_exited)
    }

    /// Waits for the client to end (at most `timeout`, then it is killed) and reads its report.
    pub fn wait(mut self, timeout: Duration) -> Result<IperfReport> {
        let guard = self
            .guard
            .take()
            .ok_or_else(|| Error::Invalid(format!("`{}` was already waited for", self.shown)))?;
        let status = guard.wait_status(timeout)?;
        let out = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(|_| {
            Error::Invalid(format!(
                "`{}` ended ({status}) without a JSON report: {}",
                self.shown,
                String::from_utf8_lossy(&out).trim()
            ))
        })?;
        if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
            return Err(Error::Invalid(format!("`{}` failed: {e}", self.shown)));
        }
        parse_report(&v, self.udp_len).map_err(|detail| Error::Parse {
            cmd: self.shown.clone(),
            detail,
        })
    }
}

fn parse_report(
    v: &serde_json::Value,
    udp_len: Option<u32>,
) -> std::result::Result<IperfReport, String> {
    let f = |p: &str| v.pointer(p).and_then(serde_json::Value::as_f64);
    let u = |p: &str| v.pointer(p).and_then(serde_json::Value::as_u64);
    let bps = f("/end/sum_received/bits_per_second")
        .ok_or("no end.sum_received.bits_per_second in its JSON")?;
    let seconds = f("/end/sum_received/seconds").unwrap_or(0.0);
    let datagrams = |p: &str| -> std::result::Result<u64, String> {
        let len = u64::from(udp_len.unwrap_or(1).max(1));
        Ok(u(p).ok_or_else(|| format!("no {p} in its JSON"))? / len)
    };
    Ok(match udp_len {
        Some(_) => IperfReport {
            gbps: bps / 1e9,
            retransmits: 0,
            sent_datagrams: datagrams("/end/sum_sent/bytes")?,
            received_datagrams: datagrams("/end/sum_received/bytes")?,
            seconds,
        },
        None => IperfReport {
            gbps: bps / 1e9,
            retransmits: u("/end/sum_sent/retransmits").unwrap_or(0),
            sent_datagrams: 0,
            received_datagrams: 0,
            seconds,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_read() {
        let v = serde_json::json!({"end": {
            "sum_sent": {"retransmits": 4},
            "sum_received": {"bits_per_second": 2.5e10},
            "cpu_utilization_percent": {"host_total": 60.0, "remote_total": 40.5}
        }});
        assert_eq!(
            parse_run(&v).unwrap(),
            IperfRun {
                gbps: 25.0,
                retransmits: 4,
                cpu_mcpu: 1005.0
            }
        );
        assert!(parse_run(&serde_json::json!({"end": {}})).is_err());
    }

    /// The shape iperf3 3.12 prints for `-u -l 64 -O 1 -J` (trimmed).
    #[test]
    fn a_udp_report_counts_datagrams_by_bytes() {
        let v = serde_json::json!({"end": {
            "sum": {"bits_per_second": 9.2e7, "packets": 360740, "lost_packets": 259976},
            "sum_sent": {"seconds": 1.99997, "bytes": 23087360, "bits_per_second": 9.2e7},
            "sum_received": {"seconds": 2.0, "bytes": 11787136, "bits_per_second": 4.7e7,
                             "packets": 360641, "lost_packets": 259976}
        }});
        let r = parse_report(&v, Some(64)).unwrap();
        assert_eq!(r.sent_datagrams, 360_740);
        assert_eq!(r.received_datagrams, 184_174);
        assert!((r.received_pps() - 92_087.0).abs() < 1.0);
        assert!((r.gbps - 0.047).abs() < 1e-9);
        let tcp = serde_json::json!({"end": {
            "sum_sent": {"retransmits": 2},
            "sum_received": {"seconds": 5.0, "bits_per_second": 2.0e10}
        }});
        let r = parse_report(&tcp, None).unwrap();
        assert_eq!((r.gbps, r.retransmits, r.received_datagrams), (20.0, 2, 0));
        assert!(parse_report(&serde_json::json!({"end": {}}), None).is_err());
    }
}
