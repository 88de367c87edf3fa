//! Small process and system helpers shared by `demo` and the benches: finding which BPF
//! programs a process holds, a process's CPU time and memory, interrupt handling, and a sysctl
//! that restores itself. What the test bed also
//! needs (ready files, `bpftool` listings, the root check, iperf3) lives in `flowtrace_tests`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

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

/// A process's CPU time and memory at one moment, from /proc.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak resident memory so far (VmHWM).
    pub hwm_kib: u64,
}

/// Reads [`Usage`] of process `pid`.
pub fn usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (did the process exit?)"))?;
    // Fields after the command name, which ends with the last ')': utime is field 14,
    // stime 15 (proc(5)).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/<pid>/stat without a command name")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {i}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Usage {
        cpu_s: (ticks(14)? + ticks(15)?) / hz,
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
    })
}

/// The KiB figure of line `key` (e.g. `VmRSS:`) of a /proc/<pid>/status text; 0 if absent.
pub fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
