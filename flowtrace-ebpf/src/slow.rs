//! The slow path, `flowtrace_slow`: tail-called by the hooks for the packets that go further
//! than their flow's counters (`flows::record` decides): sightings across hooks (NAT
//! rewrites, hop latency, the tracers) and TCP round trips. Its input is the hook's
//! `SlowInput` in `SLOW_SCRATCH`, written just before the tail call on this CPU.

use crate::{latency::rtt, maps::SLOW_SCRATCH, nat::sight};
use flowtrace_common::{SLOW_RTT, SLOW_SIGHT};

/// Runs what the hook asked for.
#[inline(always)]
pub(crate) fn run() {
    let Some(input) = SLOW_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, written by the hook that tail-called us; nothing else
    // writes it before this program run ends.
    let input = unsafe { &*input };
    if input.ctl & SLOW_SIGHT != 0 {
        sight(
            &input.id,
            &input.key,
            input.ctl,
            input.tcp_flags,
            input.bytes,
        );
    }
    if input.ctl & SLOW_RTT != 0 {
        rtt(
            input.tcp_flags,
            input.payload,
            &input.id,
            &input.key,
            input.ctl,
        );
    }
}
