//! tcpdump as an independent clock: packets captured on an interface of a namespace, with the
//! kernel's nanosecond timestamps, as ground truth for what flowtrace measures at its hooks.
//!
//! A packet socket's tap on an interface sits next to the TC hooks in the same softirq or
//! transmit call (ingress: taps, then TC ingress; egress: TC egress, then taps), so the
//! timestamps tcpdump prints are those of flowtrace's hooks to within microseconds, however
//! loaded the machine is: unlike a userspace relay's clock, they do not wait for a thread to
//! be scheduled.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    netns::{self, ChildGuard},
    Error, Result,
};

/// A running `tcpdump -w` in a namespace; [`Capture::stop`] returns what it caught.
pub struct Capture {
    guard: ChildGuard,
    netns: String,
    file: PathBuf,
}

/// One captured packet: its kernel timestamp (ns since the epoch) and the rest of the line
/// tcpdump prints for it (`IP 10.0.0.1.4000 > 10.0.0.2.80: Flags [S], ...`).
#[derive(Clone, Debug)]
pub struct Packet {
    pub at_ns: i128,
    pub text: String,
}

impl Packet {
    /// Source and destination as tcpdump prints them (`ADDR.PORT`), for IPv4 lines.
    pub fn endpoints(&self) -> Option<(&str, &str)> {
        let mut words = self.text.split_whitespace();
        if words.next()? != "IP" {
            return None;
        }
        let src = words.next()?;
        if words.next()? != ">" {
            return None;
        }
        Some((src, words.next()?.trim_end_matches(':')))
    }

    /// The TCP flags tcpdump prints (`S`, `S.`, `P.`, ...), if it is a TCP line.
    pub fn tcp_flags(&self) -> Option<&str> {
        let at = self.text.find("Flags [")? + "Flags [".len();
        let rest = &self.text[at..];
        Some(&rest[..rest.find(']')?])
    }
}

impl Capture {
    /// Starts capturing on `iface` in `netns` what matches the pcap `filter`; returns once the
    /// capture is live (tcpdump wrote its file header, which it does after opening the
    /// socket), so nothing sent afterwards is missed.
    pub fn start(netns: &str, iface: &str, filter: &str) -> Result<Capture> {
        let file = std::env::temp_dir().join(format!(
            "{netns}-{iface}-{}.pcap",
            crate::netns::new_prefix()
        ));
        let path = file.to_string_lossy().to_string();
        let args = [
            "tcpdump",
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "--time-stamp-precision",
            "nano",
            "-w",
            &path,
            filter,
        ];
        let child = netns::spawn(netns, &args)?;
        let mut guard = ChildGuard::new(child, format!("tcpdump -i {iface} in {netns}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let header = std::fs::metadata(&file).map(|m| m.len() >= 24);
            if matches!(header, Ok(true)) {
                break;
            }
            if guard.has_exited() || Instant::now() > deadline {
                let out = guard.wait_output(Duration::from_secs(1));
                let _ = std::fs::remove_file(&file);
                return Err(Error::Invalid(format!(
                    "tcpdump on {iface} in {netns} did not start capturing: {out:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Capture {
            guard,
            netns: netns.to_string(),
            file,
        })
    }

    /// Stops the capture (SIGINT: tcpdump flushes and exits 0) and returns its packets in
    /// the order captured.
    pub fn stop(self) -> Result<Vec<Packet>> {
        let Capture {
            guard,
            netns: ns,
            file,
        } = self;
        let path = file.to_string_lossy().to_string();
        let result = (|| {
            let pid = guard
                .id()
                .ok_or_else(|| Error::Invalid("tcpdump already reaped".into()))?;
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
            guard.wait_output(Duration::from_secs(10))?;
            let out = netns::exec(
                &ns,
                &[
                    "tcpdump",
                    "-r",
                    &path,
                    "-n",
                    "-tt",
                    "--time-stamp-precision",
                    "nano",
                ],
            )?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(parse_line)
                .collect()
        })();
        let _ = std::fs::remove_file(&file);
        result
    }
}

/// `1764640000.123456789 IP ...` into its timestamp and the rest.
fn parse_line(line: &str) -> Result<Packet> {
    let bad = || Error::Invalid(format!("tcpdump line without a timestamp: {line:?}"));
    let (ts, text) = line.split_once(' ').ok_or_else(bad)?;
    let (secs, frac) = ts.split_once('.').ok_or_else(bad)?;
    if frac.len() != 9 {
        return Err(Error::Invalid(format!(
            "tcpdump timestamp {ts:?} is not in nanoseconds"
        )));
    }
    let secs: i128 = secs.parse().map_err(|_| bad())?;
    let nanos: i128 = frac.parse().map_err(|_| bad())?;
    Ok(Packet {
        at_ns: secs * 1_000_000_000 + nanos,
        text: text.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // the workspace lint targets production code
mod tests {
    use super::*;

    #[test]
    fn lines_give_time_endpoints_and_flags() {
        let p = parse_line(
            "1764640000.000000123 IP 10.244.1.10.47718 > 10.244.2.10.9090: Flags [S.], seq 1, length 0",
        )
        .unwrap();
        assert_eq!(p.at_ns, 1_764_640_000_000_000_123);
        assert_eq!(
            p.endpoints(),
            Some(("10.244.1.10.47718", "10.244.2.10.9090"))
        );
        assert_eq!(p.tcp_flags(), Some("S."));
        assert!(parse_line("1764640000.123 IP x > y: Flags [S]").is_err());
        assert!(parse_line("garbage").is_err());
    }
}
