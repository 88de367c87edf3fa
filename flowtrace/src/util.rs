//! Small helpers every layer may use: clocks, lock recovery and the tables' hasher.

use std::sync::Mutex;

/// The hasher of the tables keyed by what packets carry (tuples, flow keys): foldhash,
/// seeded at random per table. It is several times cheaper than the standard SipHash on a
/// 40-byte key, which counts at hundreds of thousands of records a second; the random seed
/// keeps senders from choosing tuples that pile into one bucket.
pub type FastHash = foldhash::fast::RandomState;

/// Locks a std mutex, recovering from poisoning (a panicked holder leaves data that is
/// still consistent for our counters and maps).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock `bpf_ktime_get_ns` reads).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Offset to add to a CLOCK_MONOTONIC timestamp to get Unix time, in nanoseconds.
pub fn mono_to_unix_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128
}

/// Unix time now, in nanoseconds.
pub fn unix_now_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Shell-style match supporting `*` only.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}
