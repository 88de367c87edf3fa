//! Running flowtrace agents inside emulated nodes, as a hostNetwork DaemonSet pod would, and
//! talking to their HTTP API from the test process.
//!
//! Each node namespace has its own loopback, so every agent listens on 127.0.0.1:9650 of its
//! node. The test reaches it from a short-lived thread that enters the node's network namespace
//! (`setns` changes only the calling thread's namespace) and speaks plain HTTP there.

use std::{
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flowtrace::{
    model::wire::{FlowsResponse, InterfacesResponse, StatsResponse},
    model::FlowRecord,
};
use serde::de::DeserializeOwned;

use crate::{netns::ChildGuard, Error, Result};

/// The agent's API port inside each node namespace.
pub const API_PORT: u16 = 9650;

/// Path of the `flowtrace` binary built beside the running test or tool
/// (`target/<profile>/flowtrace`), or `$FLOWTRACE_BIN`.
pub fn flowtrace_bin() -> Result<PathBuf> {
    sibling_binary("flowtrace", "FLOWTRACE_BIN", "flowtrace")
}

/// Finds binary `name` next to the running executable (tools live in `target/<profile>`, test
/// binaries in `target/<profile>/deps`), unless `env` names it.
pub(crate) fn sibling_binary(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Invalid(format!("current_exe: {e}")))?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    for _ in 0..2 {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            break;
        }
    }
    Err(Error::Invalid(format!(
        "no {name} binary next to {}; build it first with `cargo build --release -p {package}` (or set {env})",
        exe.display()
    )))
}

/// Runs `f` on a thread that has entered network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file =
        std::fs::File::open(&path).map_err(|e| Error::Invalid(format!("opening {path}: {e}")))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| Error::Invalid(format!("thread inside {netns} panicked")))?
        .map_err(|e| Error::Invalid(format!("setns into {netns}: {e}")))
}

/// `GET http://127.0.0.1:9650{path}` inside `netns`: (status, body).
pub fn http_get(netns: &str, path: &str) -> Result<(u16, String)> {
    http_get_url(netns, &format!("http://127.0.0.1:{API_PORT}{path}"))
}

/// `GET url` (plain HTTP) from inside `netns`: (status, body).
pub fn http_get_url(netns: &str, url: &str) -> Result<(u16, String)> {
    let u = url.to_string();
    let res = in_netns(netns, move || {
        match ureq::get(&u).timeout(Duration::from_secs(10)).call() {
            Ok(r) => Ok((r.status(), r.into_string().unwrap_or_default())),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
            Err(e) => Err(e.to_string()),
        }
    })?;
    res.map_err(|e| Error::Invalid(format!("GET {url} in {netns}: {e}")))
}

/// A flowtrace agent running in a node namespace. Killed on drop if still running.
pub struct Agent {
    guard: Option<ChildGuard>,
    pub netns: String,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `flowtrace agent` in `netns` with `extra` flags and waits until it is ready
    /// (every interface present at start attached, metadata synced if a source is given).
    pub fn start(netns: &str, extra: &[&str]) -> Result<Agent> {
        let mut agent = Self::spawn(netns, extra)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts `flowtrace agent` in `netns` without waiting for readiness (for agents that
    /// are expected not to become ready, or to exit).
    pub fn spawn(netns: &str, extra: &[&str]) -> Result<Agent> {
        Self::spawn_wrapped(netns, extra, &[])
    }

    /// As `spawn`, with the `flowtrace` binary at `bin` (another build, e.g. the one before
    /// a change a benchmark compares with).
    pub fn spawn_binary(netns: &str, bin: &std::path::Path, extra: &[&str]) -> Result<Agent> {
        Self::spawn_from(bin.to_path_buf(), netns, extra, &[])
    }

    /// Starts `flowtrace agent` in `netns` confined as the DaemonSet's container is: uid 0
    /// holding only `caps` (capability names as `setpriv --list-caps` spells them, e.g.
    /// `net_admin`) in its bounding, permitted and effective sets, none inheritable or
    /// ambient, `no_new_privs`, and every filesystem but /proc and /dev read-only in a mount namespace of its
    /// own (no bpffs or tracefs in it either: `ip netns exec` mounts a fresh sysfs without
    /// them). Does not wait for readiness.
    pub fn spawn_confined(netns: &str, extra: &[&str], caps: &[&str]) -> Result<Agent> {
        let caps: String = caps.iter().map(|c| format!(",+{c}")).collect();
        // Mounts are made read-only while the shell still holds every capability; setpriv
        // then drops them and execs the agent, so the agent keeps the shell's pid.
        let read_only = r#"set -e
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case "$m" in /proc|/proc/*|/dev|/dev/*) ;; *) mount -o remount,bind,ro "$m" 2>/dev/null || true ;; esac
done
mount -o remount,bind,ro /
exec "$@""#;
        let wrapper: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            read_only,
            "sh",
            "setpriv",
            "--reuid=0",
            "--regid=0",
            "--clear-groups",
            "--inh-caps=-all",
            "--ambient-caps=-all",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("--bounding-set=-all{caps}"),
            "--no-new-privs".to_string(),
            "--".to_string(),
        ])
        .collect();
        Self::spawn_wrapped(netns, extra, &wrapper)
    }

    /// `ip netns exec <netns> <wrapper...> flowtrace agent ...`: every wrapper execs the next
    /// command, so the child's pid is the agent's.
    fn spawn_wrapped(netns: &str, extra: &[&str], wrapper: &[String]) -> Result<Agent> {
        Self::spawn_from(flowtrace_bin()?, netns, extra, wrapper)
    }

    fn spawn_from(bin: PathBuf, netns: &str, extra: &[&str], wrapper: &[String]) -> Result<Agent> {
        let log = std::env::temp_dir().join(format!("flowtrace-agent-{netns}.log"));
        let logfile = std::fs::File::create(&log)
            .map_err(|e| Error::Invalid(format!("creating {}: {e}", log.display())))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .args(wrapper)
            .arg(&bin)
            .arg("agent")
            // Every agent serves on its node's loopback; a test may ask for more (the
            // port must stay API_PORT: requests go to 127.0.0.1:API_PORT).
            .args(if extra.contains(&"--listen") {
                vec![]
            } else {
                vec!["--listen".to_string(), format!("127.0.0.1:{API_PORT}")]
            })
            .args(if extra.contains(&"--drain-interval-ms") {
                &[][..]
            } else {
                &["--drain-interval-ms", "500"][..]
            })
            // No interface flags: the emulated node's `eth0` is a veth into another namespace
            // (as on kind nodes), and the agent must tell by itself that it is the uplink.
            .args(["--node-name", netns.rsplit('-').next().unwrap_or(netns)])
            .args(extra)
            .env(
                "FLOWTRACE_LOG",
                std::env::var("FLOWTRACE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile);
        let child = cmd
            .spawn()
            .map_err(|e| Error::Invalid(format!("starting {}: {e}", bin.display())))?;
        Ok(Agent {
            guard: Some(ChildGuard::new(
                child,
                format!("flowtrace agent in {netns}"),
            )),
            netns: netns.to_string(),
            log,
        })
    }

    /// Whether the agent process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.guard.as_mut().is_none_or(ChildGuard::has_exited)
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.guard.as_mut() {
                if g.has_exited() {
                    return Err(Error::Invalid(format!(
                        "flowtrace agent in {} exited during start-up:\n{}",
                        self.netns,
                        self.log_text()
                    )));
                }
            }
            if let Ok((200, _)) = http_get(&self.netns, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "flowtrace agent in {} not ready after {timeout:?}:\n{}",
                    self.netns,
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().and_then(ChildGuard::id)
    }

    /// GETs `path` and decodes the JSON body; non-200 is an error carrying the body.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = http_get(&self.netns, path)?;
        if status != 200 {
            return Err(Error::Invalid(format!(
                "GET {path} in {}: HTTP {status}: {body}",
                self.netns
            )));
        }
        serde_json::from_str(&body).map_err(|e| {
            Error::Invalid(format!(
                "GET {path} in {}: bad JSON ({e}): {body}",
                self.netns
            ))
        })
    }

    /// Every flow of the agent's table. An answer holds at most `limit` flows (the largest
    /// first, 10 000 unless asked): ask for the most there can be, and refuse a truncated one,
    /// which would make counts silently short.
    pub fn flows(&self) -> Result<Vec<FlowRecord>> {
        let limit = flowtrace::query::filter::MAX_FLOW_LIMIT;
        let path = format!("/v1/flows?limit={limit}");
        let answer = self.get::<FlowsResponse>(&path)?;
        if answer.truncated {
            return Err(Error::Invalid(format!(
                "GET {path} in {}: truncated ({} flows matched)",
                self.netns, answer.matched
            )));
        }
        Ok(answer.flows)
    }

    pub fn stats(&self) -> Result<StatsResponse> {
        self.get("/v1/stats")
    }

    pub fn interfaces(&self) -> Result<InterfacesResponse> {
        self.get("/v1/interfaces")
    }

    /// SIGSTOP: the agent hangs (its sockets still accept connections, nothing answers), as
    /// an overloaded or wedged agent would.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Agent::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Waits up to `timeout` for an agent expected to exit by itself (e.g. refusing its
    /// configuration); returns its exit code (`None` if a signal ended it) and its log. An
    /// agent still running after `timeout` is killed and that is an error.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(Option<i32>, String)> {
        let guard = self
            .guard
            .take()
            .ok_or_else(|| Error::Invalid("agent already reaped".into()))?;
        let status = guard.wait_status(timeout);
        let log = self.log_text();
        let status = status.map_err(|e| {
            Error::Invalid(format!(
                "agent in {} did not exit: {e}
{log}",
                self.netns
            ))
        })?;
        Ok((status.code(), log))
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| Error::Invalid("agent already reaped".into()))?;
        // SAFETY: plain kill(2) on our own child's pid.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(Error::Invalid(format!(
                "kill({pid}, {sig}): {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit; returns the log.
    pub fn stop(mut self) -> Result<String> {
        self.signal(libc::SIGTERM)?;
        let guard = self
            .guard
            .take()
            .ok_or_else(|| Error::Invalid("agent already reaped".into()))?;
        let out = guard.wait_output(Duration::from_secs(15));
        let log = self.log_text();
        out.map_err(|e| {
            Error::Invalid(format!("agent did not exit cleanly on SIGTERM: {e}\n{log}"))
        })?;
        Ok(log)
    }

    /// SIGKILL and reap: the agent gets no chance to clean up.
    pub fn kill(mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        if let Some(guard) = self.guard.take() {
            // A killed child "fails"; we only need it reaped.
            let _ = guard.wait_output(Duration::from_secs(10));
        }
        Ok(())
    }
}
