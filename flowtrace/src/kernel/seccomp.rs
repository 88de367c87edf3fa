//! Telling a seccomp filter's refusal of `bpf(2)` apart from a missing capability: both give
//! EPERM, and under podman's default profile (containers-common, measured with 0.50.1) the
//! agent, holding exactly the capabilities it needs, is refused its first map.

use std::io;

/// What the kernel says about this process's seccomp mode (`Seccomp:` in /proc/self/status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 0: no filter.
    Disabled,
    /// 1: strict mode (read, write, exit only).
    Strict,
    /// 2: a filter (a container runtime's profile) decides each system call.
    Filter,
    /// No `Seccomp:` line (a kernel without CONFIG_SECCOMP) or /proc unreadable.
    Unknown,
}

impl Mode {
    /// The mode of the calling process.
    pub fn current() -> Mode {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Mode::from_status(&s))
            .unwrap_or(Mode::Unknown)
    }

    /// The mode in the text of a /proc/<pid>/status file.
    pub fn from_status(status: &str) -> Mode {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim);
        match value {
            Some("0") => Mode::Disabled,
            Some("1") => Mode::Strict,
            Some("2") => Mode::Filter,
            _ => Mode::Unknown,
        }
    }
}

/// Said when the kernel refused with EPERM under a seccomp filter.
pub const FILTER_HINT: &str = "This process runs under a seccomp filter (Seccomp: 2 in /proc/self/status), which may be refusing bpf(2) or perf_event_open(2): podman's default profile (containers-common; seccompProfile RuntimeDefault under podman) allows them only with CAP_SYS_ADMIN. Run the agent with the profile deploy/seccomp/flowtrace.json (seccompProfile type Localhost; deploy/README.md, \"Container runtimes and seccomp\"). If the filter does allow bpf(2), the agent lacks one of CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON";

/// Said when loading the object failed for any other reason.
pub const LOAD_HINT: &str = "Is this Linux >= 5.15 with BTF, and are we root or holding CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON?";

/// What to tell the operator when creating a map or loading a program failed with `errno`
/// (None: not an OS error) while the process was in seccomp mode `mode`: [`FILTER_HINT`]
/// for EPERM under a filter, `otherwise` for everything else.
pub fn refusal_hint(mode: Mode, errno: Option<i32>, otherwise: &'static str) -> &'static str {
    if mode == Mode::Filter && errno == Some(libc::EPERM) {
        FILTER_HINT
    } else {
        otherwise
    }
}

/// The OS error number somewhere in `e`'s chain of sources (aya wraps the bpf() call's
/// `io::Error` in its map and program errors).
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(code) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_read_from_the_status_file() {
        let status = "Name:\tflowtrace\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(Mode::from_status(status), Mode::Filter);
        assert_eq!(Mode::from_status("Seccomp:\t0\n"), Mode::Disabled);
        assert_eq!(Mode::from_status("Seccomp:\t1\n"), Mode::Strict);
        assert_eq!(Mode::from_status("Name:\tx\n"), Mode::Unknown);
        // Seccomp_filters must not be read as Seccomp.
        assert_eq!(Mode::from_status("Seccomp_filters:\t2\n"), Mode::Unknown);
    }

    #[test]
    fn eperm_under_a_filter_blames_the_filter_and_names_the_profile() {
        let hint = refusal_hint(Mode::Filter, Some(libc::EPERM), LOAD_HINT);
        assert_eq!(hint, FILTER_HINT);
        for want in [
            "seccomp filter",
            "bpf(2)",
            "perf_event_open(2)",
            "deploy/seccomp/flowtrace.json",
            "Container runtimes and seccomp",
            "CAP_BPF",
        ] {
            assert!(hint.contains(want), "{want:?} missing from {hint:?}");
        }
        // No filter, or another error: the capability and kernel hint.
        for (mode, errno) in [
            (Mode::Disabled, Some(libc::EPERM)),
            (Mode::Unknown, Some(libc::EPERM)),
            (Mode::Strict, Some(libc::EPERM)),
            (Mode::Filter, Some(libc::EINVAL)),
            (Mode::Filter, Some(libc::ENOSYS)),
            (Mode::Filter, None),
        ] {
            assert_eq!(
                refusal_hint(mode, errno, LOAD_HINT),
                LOAD_HINT,
                "{mode:?} {errno:?}"
            );
        }
    }

    #[test]
    fn the_errno_is_found_through_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("failed to create map `LATENCY_1`")]
        struct Wrapper(#[source] io::Error);
        let e = Wrapper(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(errno_of(&e), Some(libc::EPERM));
        let plain = io::Error::other("no errno");
        assert_eq!(errno_of(&plain), None);
    }
}
