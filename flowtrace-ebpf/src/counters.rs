//! The per-CPU counters (`COUNTERS`): packets seen and every way an update was lost.

use flowtrace_common::Counter;

use crate::maps::COUNTERS;

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    count_n(counter, 1);
}

#[inline(always)]
pub(crate) fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += n };
    }
}
