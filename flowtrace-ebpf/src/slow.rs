//! The slow path, `flowtrace_slow`: tail-called by the hooks for the packets that go further
//! than their flow's counters (`flows::record` decides): sightings across hooks (NAT
//! rewrites, hop latency, the tracers) and TCP round trips. Its input is the hook's
//! `SlowInput` in `SLOW_SCRATCH`, written just before the tail call on this CPU.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use flowtrace_common::{SLOW_FRESH, SLOW_RTT, SLOW_SAMPLED, SLOW_SIGHT};

use crate::{
    latency::{rtt, rtt_wanted},
    maps::SLOW_SCRATCH,
    nat::sight,
};

/// Runs what the hook asked for.
#[inline(always)]
pub(crate) fn run() {
    let Some(input) = SLOW_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, written by the hook that tail-called us; nothing else
    // writes it before this program run ends.
    let input = unsafe { &*input };
    // SAFETY: bpf_ktime_get_ns has no preconditions. One reading for both: the fine clock is
    // the dearest helper here.
    let now = unsafe { bpf_ktime_get_ns() };
    if input.ctl & SLOW_SIGHT != 0 {
        sight(input, now);
    }
    if input.ctl & SLOW_RTT != 0 {
        let wanted = rtt_wanted(
            input.tcp_flags,
            input.payload,
            input.ctl & SLOW_SAMPLED != 0,
            input.ctl & SLOW_FRESH != 0,
            &input.key,
            now,
        );
        if wanted != 0 {
            rtt(input, wanted, now);
        }
    }
}
