//! Network namespace plumbing: creating and deleting namespaces, running commands inside them,
//! child-process guards and ready files, and sweeping namespaces left behind by killed runs.
//!
//! Everything shells out to iproute2 (`ip netns ...`). That is deliberate: this is test
//! infrastructure, and the commands printed in error messages can be pasted into a shell to
//! reproduce a failure by hand.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Process-wide counter that makes every cluster's prefix unique within one test binary, so tests
/// running on parallel threads never share a namespace name.
static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace prefix `ft<pid>x<counter>`.
///
/// The pid lets [`sweep_stale`] tell whether the run that owns a namespace is still alive.
pub fn new_prefix() -> String {
    let n = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
    format!("ft{}x{}", std::process::id(), n)
}

/// Shell-quotes a command line for error messages, so it can be pasted into a terminal.
pub(crate) fn display_cmd<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| {
            let a = a.as_ref();
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+[]".contains(c));
            if plain {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `args` (program first) to completion, feeding `stdin` if given; fails unless it exits 0.
fn run_checked<S: AsRef<str>>(args: &[S], stdin: Option<&str>) -> Result<Output> {
    let cmd = display_cmd(args);
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| Error::Invalid("empty command line: pass at least a program name".into()))?;
    let mut command = Command::new(program.as_ref());
    command
        .args(rest.iter().map(|a| a.as_ref()))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small (an iptables-restore script), far below the pipe buffer, so writing
        // before reading the output cannot deadlock.
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Io {
                what: format!("writing standard input of `{cmd}`"),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| Error::Io {
        what: format!("waiting for `{cmd}`"),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            cmd,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs a command in the caller's own namespace (used only for `ip netns add/del/list` and
/// `ip -n NS ...`, which themselves act on our namespaces).
pub fn run<S: AsRef<str>>(args: &[S]) -> Result<Output> {
    run_checked(args, None)
}

/// The argument vector for `ip netns exec <netns> <args...>`.
fn netns_exec_argv<S: AsRef<str>>(netns: &str, args: &[S]) -> Vec<String> {
    let mut argv: Vec<String> = vec!["ip".into(), "netns".into(), "exec".into(), netns.into()];
    argv.extend(args.iter().map(|a| a.as_ref().to_string()));
    argv
}

/// Runs `args` inside `netns` (`ip netns exec <netns> ...`) and waits for it.
///
/// Fails unless the command exits 0; the error carries the full command line and its stderr.
pub fn exec<S: AsRef<str>>(netns: &str, args: &[S]) -> Result<Output> {
    run_checked(&netns_exec_argv(netns, args), None)
}

/// Like [`exec`] but feeds `input` on standard input (e.g. to `iptables-restore`).
pub fn exec_with_stdin<S: AsRef<str>>(netns: &str, args: &[S], input: &str) -> Result<Output> {
    run_checked(&netns_exec_argv(netns, args), Some(input))
}

/// Starts `args` inside `netns` without waiting; stdout and stderr are piped, stdin is null.
///
/// `ip netns exec` replaces itself with the program (it `exec`s), so the returned child's pid is
/// the program's own pid and killing it kills the program. Wrap it in a [`ChildGuard`] so it cannot
/// outlive a failing test.
pub fn spawn<S: AsRef<str>>(netns: &str, args: &[S]) -> Result<Child> {
    let argv = netns_exec_argv(netns, args);
    let cmd = display_cmd(&argv);
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { cmd, source })
}

/// Owns a child process and kills and reaps it when dropped, so a panicking test does not leave
/// servers running (which would also keep deleted namespaces alive).
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    /// Command line, for error messages.
    what: String,
}

impl ChildGuard {
    /// Guards `child`; `what` describes it in error messages (e.g. the command line).
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    /// The child's pid.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Mutable access to the child, e.g. to take its stdout for streaming.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether the child has exited already (without reaping its output).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits up to `timeout` for the child to exit and returns its output; on timeout it is killed
    /// and an error says so (with whatever it printed). A non-zero exit is also an error.
    ///
    /// stdout and stderr are drained on helper threads while waiting, so a child printing more than
    /// a pipe buffer (e.g. a long `raw-capture`) cannot deadlock.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Invalid(format!(
                "`{}` was already waited for",
                self.what
            )));
        };
        let out_reader = child.stdout.take().map(drain_on_thread);
        let err_reader = child.stderr.take().map(drain_on_thread);
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    let _ = child.kill();
                    match child.wait() {
                        Ok(status) => break status,
                        Err(source) => {
                            return Err(Error::Io {
                                what: format!("reaping `{}`", self.what),
                                source,
                            })
                        }
                    }
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("waiting for `{}`", self.what),
                        source,
                    })
                }
            }
        };
        let stdout = out_reader.map(join_reader).unwrap_or_default();
        let stderr = err_reader.map(join_reader).unwrap_or_default();
        if timed_out {
            return Err(Error::Command {
                cmd: self.what.clone(),
                status: format!("killed after {timeout:?} timeout"),
                stderr: format!(
                    "{}\nstdout so far: {}",
                    String::from_utf8_lossy(&stderr).trim(),
                    String::from_utf8_lossy(&stdout).trim()
                ),
            });
        }
        if !status.success() {
            return Err(Error::Command {
                cmd: self.what.clone(),
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            });
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Waits up to `timeout` for the child to exit by itself and returns its status, whatever
    /// it is; on timeout it is killed and that is the error. Its pipes are not read: for
    /// children whose output goes elsewhere (a log file).
    pub fn wait_status(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Invalid(format!(
                "`{}` was already waited for",
                self.what
            )));
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Invalid(format!(
                        "`{}` still ran after {timeout:?}; killed",
                        self.what
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(Error::Io {
                        what: format!("waiting for `{}`", self.what),
                        source,
                    })
                }
            }
        }
    }

    /// Kills the child (if still running) and reaps it.
    pub fn kill(mut self) {
        self.reap();
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.reap();
    }
}

/// Process-wide counter that keeps two ready files of one run apart even when their tags match
/// (two sinks of the same kind in one pod).
static NEXT_READY_FILE: AtomicU32 = AtomicU32::new(0);

/// A fresh path in the temporary directory that a server creates once it is ready (ftgen's
/// `--ready-file`), so a caller can wait for it instead of sleeping. Removed on drop.
#[derive(Debug)]
pub struct ReadyFile(PathBuf);

impl ReadyFile {
    /// A path that does not exist yet; `tag` (e.g. the namespace and the command) makes it
    /// recognisable.
    pub fn new(tag: &str) -> Self {
        let n = NEXT_READY_FILE.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let p = std::env::temp_dir().join(format!(
            "flowtrace-tests-{}-{n}-{tag}.ready",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        Self(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> Result<&str> {
        self.0.to_str().ok_or_else(|| {
            Error::Invalid(format!(
                "temporary path {} is not UTF-8; set TMPDIR to a UTF-8 path",
                self.0.display()
            ))
        })
    }

    /// Waits until the file exists; fails as soon as `server` exits instead, or after
    /// `timeout`. `what` names the server in the error.
    pub fn wait(&self, server: &mut ChildGuard, what: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.0.exists() {
            if server.has_exited() {
                return Err(Error::Invalid(format!(
                    "{what} exited before it was ready (port in use? its error shows when it is \
                     reaped)"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "{what} not ready after {timeout:?} (no {})",
                    self.0.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn drain_on_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn join_reader(h: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}

/// Creates the named network namespace.
pub fn add_netns(name: &str) -> Result<()> {
    run(&["ip", "netns", "add", name]).map(drop)
}

/// Deletes the named network namespace. Interfaces inside it (including veth ends whose peer is
/// elsewhere) disappear with it once no process holds the namespace any more.
pub fn del_netns(name: &str) -> Result<()> {
    run(&["ip", "netns", "del", name]).map(drop)
}

/// Names of all named network namespaces (`ip netns list`, which prints `name (id: N)` lines).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run(&["ip", "netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// The pid encoded in a test-bed namespace name `ft<pid>x<n>[-...]`, or `None` if the name does
/// not follow that pattern (and therefore is not ours to touch).
pub fn owner_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix("ft")?;
    let (pid, rest) = rest.split_once('x')?;
    let counter_end = rest.find('-').unwrap_or(rest.len());
    let counter = &rest[..counter_end];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// Deletes namespaces named `ft<pid>x*` whose owning process no longer exists — what a SIGKILLed
/// earlier run (whose `Drop` never ran) leaves behind. Returns the names it deleted.
///
/// Pods are deleted before their node (longer names first) for the same reason teardown does so:
/// it mirrors the creation order in reverse. A failure to delete one namespace does not stop the
/// sweep; the first error is returned after trying all of them.
pub fn sweep_stale() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut stale: Vec<String> = list_netns()?
        .into_iter()
        .filter(|n| match owner_pid(n) {
            Some(pid) => pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            None => false,
        })
        .collect();
    stale.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut first_err = None;
    let mut deleted = Vec::new();
    for n in stale {
        match del_netns(&n) {
            Ok(()) => deleted.push(n),
            Err(e) => {
                eprintln!("flowtrace-tests: could not delete stale namespace {n}: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(deleted),
    }
}

/// One interface as printed by `ip -j link show`.
#[derive(Debug, serde::Deserialize)]
struct IpLink {
    ifindex: u32,
    #[serde(default)]
    address: Option<String>,
}

fn ip_link(netns: &str, dev: &str) -> Result<IpLink> {
    let args = ["ip", "-n", netns, "-j", "link", "show", "dev", dev];
    let out = run(&args)?;
    let parse_err = |detail: String| Error::Parse {
        cmd: display_cmd(&args),
        detail,
    };
    let links: Vec<IpLink> =
        serde_json::from_slice(&out.stdout).map_err(|e| parse_err(e.to_string()))?;
    match <[IpLink; 1]>::try_from(links) {
        Ok([link]) => Ok(link),
        Err(links) => Err(parse_err(format!(
            "expected exactly one interface, got {}",
            links.len()
        ))),
    }
}

/// The ifindex of `dev` inside `netns`.
pub fn link_ifindex(netns: &str, dev: &str) -> Result<u32> {
    Ok(ip_link(netns, dev)?.ifindex)
}

/// The MAC address (lower-case, colon separated) of `dev` inside `netns`.
pub fn link_mac(netns: &str, dev: &str) -> Result<String> {
    ip_link(netns, dev)?.address.ok_or_else(|| Error::Parse {
        cmd: format!("ip -n {netns} -j link show dev {dev}"),
        detail: "interface has no link-layer address".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_accepts_only_our_pattern() {
        assert_eq!(owner_pid("ft1234x0-node1"), Some(1234));
        assert_eq!(owner_pid("ft1234x12-node1-pod-a"), Some(1234));
        assert_eq!(owner_pid("ft1234x3"), Some(1234));
        assert_eq!(owner_pid("ftx0-node1"), None);
        assert_eq!(owner_pid("ft12ax0-node1"), None);
        assert_eq!(owner_pid("ft12x-node1"), None);
        assert_eq!(owner_pid("fruit"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }

    #[test]
    fn prefixes_are_unique() {
        assert_ne!(new_prefix(), new_prefix());
    }

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(display_cmd(&["ip", "a b", "it's"]), r"ip 'a b' 'it'\''s'");
    }
}
