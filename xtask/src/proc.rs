//! Small process and system helpers shared by `demo` and `bench`: waiting for sinks, reading
//! `bpftool`, finding which BPF programs a process holds, and a sysctl that restores itself.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowtrace_tests::{ChildGuard, Pod};

/// A per-run path in the temp directory for a sink's `--ready-file`; removed on drop.
pub struct ReadyFile(PathBuf);

impl ReadyFile {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "flowtrace-xtask-{}-{tag}.ready",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        Self(p)
    }

    pub fn arg(&self) -> Result<&str> {
        crate::build::path_str(&self.0)
    }

    /// Waits until the sink created the file; fails early if the sink exited instead.
    pub fn wait(&self, sink: &mut ChildGuard, what: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.0.exists() {
            if sink.has_exited() {
                bail!("{what} exited before it was ready (port in use? see its error when it is reaped)");
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready after {timeout:?} (no {})",
                    self.0.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until a TCP listener on `port` exists inside `pod` (checked with `ss`, which does not
/// disturb the server the way a probe connection would).
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
            bail!(
                "the server in {} exited before it listened on port {port}",
                pod.netns
            );
        }
        let out = pod.exec(&["ss", "-H", "-l", "-t", "-n", filter.as_str()])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                pod.netns
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses the one JSON object an `ftgen` command prints.
pub fn ftgen_json(stdout: &[u8], what: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(stdout).with_context(|| {
        format!(
            "{what}: ftgen printed no JSON: {:?}",
            String::from_utf8_lossy(stdout)
        )
    })
}

/// One program as `bpftool -j prog show` lists it.
#[derive(Clone, Debug)]
pub struct ProgRecord {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Every loaded BPF program (`bpftool -j prog show`). run_time_ns/run_cnt are 0 unless
/// kernel.bpf_stats_enabled was on while they ran (bpftool omits them then).
pub fn bpftool_progs() -> Result<Vec<ProgRecord>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running `bpftool -j prog show` (install bpftool with `bash scripts/setup.sh`)")?;
    if !out.status.success() {
        bail!(
            "`bpftool -j prog show` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("`bpftool -j prog show` printed something that is not JSON")?;
    let arr = v
        .as_array()
        .context("`bpftool -j prog show` did not print a JSON array")?;
    let mut progs = Vec::with_capacity(arr.len());
    for p in arr {
        let id = p
            .get("id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| {
                format!("a program in `bpftool -j prog show` has no numeric id: {p}")
            })?;
        let num = |k: &str| p.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        progs.push(ProgRecord {
            id,
            name: p
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string(),
            run_time_ns: num("run_time_ns"),
            run_cnt: num("run_cnt"),
        });
    }
    Ok(progs)
}

/// IDs of the BPF programs process `pid` holds open (from `/proc/<pid>/fdinfo`, whose entries
/// for program fds carry a `prog_id:` line). This ties a program to the process that loaded
/// it, so programs other runs load at the same time are not counted.
pub fn prog_ids_held_by(pid: u32) -> Result<BTreeSet<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    let entries = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir} (has process {pid} exited?)"))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        // An fd can close between listing and reading; that one is simply not ours any more.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("prog_id:") {
                if let Ok(id) = rest.trim().parse() {
                    ids.insert(id);
                }
            }
        }
    }
    Ok(ids)
}

/// Set by the first SIGINT/SIGTERM/SIGHUP; long-running steps check it and bail out, so the
/// RAII guards (agents, helpers, namespaces, sysctl) clean up on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The sysctl to put back from the signal handler itself: (path, old value), prepared in
/// advance so the handler only makes async-signal-safe system calls.
static SYSCTL_RESTORE: OnceLock<(CString, Vec<u8>)> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second signal: the user wants out now.
        // SAFETY: signal and raise are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    restore_sysctl_now();
}

/// Writes the saved sysctl value back with raw system calls (usable from a signal handler).
fn restore_sysctl_now() {
    if let Some((path, old)) = SYSCTL_RESTORE.get() {
        // SAFETY: open/write/close are async-signal-safe; the buffers outlive the calls.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                let _ = libc::write(fd, old.as_ptr().cast(), old.len());
                libc::close(fd);
            }
        }
    }
}

/// Turns SIGINT/SIGTERM/SIGHUP into "stop at the next check and clean up" (a second signal
/// ends the process at once). Any sysctl changed through [`SysctlGuard`] is restored
/// immediately in the handler, since that is the one thing a namespace sweep cannot undo.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only touches atomics and makes async-signal-safe calls.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// Fails if a termination signal arrived; call between steps.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; cleaning up (agents, helpers, namespaces, sysctl) and stopping");
    }
    Ok(())
}

/// Sets a sysctl through /proc/sys and puts the old value back when dropped (also on error
/// paths, panics and — through the handler above — SIGINT/SIGTERM; not on SIGKILL).
pub struct SysctlGuard {
    key: String,
    path: PathBuf,
    old: String,
}

impl SysctlGuard {
    pub fn set(key: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| {
                format!(
                    "reading sysctl {key} ({}); does this kernel have it?",
                    path.display()
                )
            })?
            .trim()
            .to_string();
        if let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) {
            // Only one sysctl is ever guarded per run; a second `set` keeps the first entry.
            let _ = SYSCTL_RESTORE.set((cpath, old.clone().into_bytes()));
        }
        std::fs::write(&path, value)
            .with_context(|| format!("setting sysctl {key}={value} (needs root)"))?;
        Ok(Self {
            key: key.to_string(),
            path,
            old,
        })
    }

    pub fn old(&self) -> &str {
        &self.old
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "xtask: could not restore sysctl {}={}: {e}; restore it by hand with `sysctl -w {}={}`",
                self.key, self.old, self.key, self.old
            );
        }
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// CPUs this process may run on, and the CPU model name.
pub fn cpus() -> (usize, String) {
    let n = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    (n, model)
}

/// Fails with a pointer to the setup script if `tool` is not on PATH.
pub fn require_tool(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("`{tool}` is not installed (not on PATH); install it with `bash scripts/setup.sh`");
    }
    Ok(())
}

/// Fails unless running as root (network namespaces, eBPF and sysctls need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this command needs root (it creates network namespaces and loads eBPF programs); run it with sudo");
    }
    Ok(())
}

/// Median of `values` (mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // For an odd count both indices name the middle element.
    let n = v.len();
    Some((v[(n - 1) / 2] + v[n / 2]) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
