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
        let port_s = port.to_string();
        let argv = [
            "ip", "netns", "exec", &pod.netns, "iperf3", "-s", "-p", &port_s,
        ];
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
        let mut guard = ChildGuard::new(child, format!("iperf3 -s (in {})", pod.netns));
        wait_listening(pod, port, &mut guard, timeout)?;
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
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        if server.has_exited() {
            return Err(Error::Invalid(format!(
                "the server in {} exited before it listened on port {port}",
                pod.netns
            )));
        }
        let out = pod.exec(&["ss", "-H", "-l", "-t", "-n", filter.as_str()])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                pod.netns
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
}
