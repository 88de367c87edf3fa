//! Trace events: sampled packets and SYNs written to the `TRACE_EVENTS` ring while a tracer
//! is attached.

use flowtrace_common::{Counter, FlowKey, PacketId, TraceEvent};

use crate::{
    counters::count,
    maps::{TRACE_EVENTS, TRACE_SCRATCH},
};

/// Writes one trace event (a tracer is attached; the packet is sampled or a SYN). Inlined
/// into `sight`, which is out of line itself and checks the tracing bit first: without a
/// tracer this never runs.
#[inline(always)]
pub(crate) fn trace(id: &PacketId, key: &FlowKey, now: u64, tcp_flags: u8, bytes: u64) {
    // Built in a per-CPU scratch slot and copied out (bpf_ringbuf_output): a reserved
    // record is a reference the verifier tracks, which made it give up on this program.
    let Some(e) = TRACE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs; every field
    // is written before the slot is copied.
    unsafe {
        (*e).ts_ns = now;
        (*e).id = *id;
        (*e).tuple.set_from_key(key);
        (*e).ifindex = key.ifindex;
        (*e).direction = key.direction;
        (*e).tcp_flags = tcp_flags;
        (*e)._pad = 0;
        (*e).bytes = bytes.min(u64::from(u32::MAX)) as u32;
        (*e).reason = 0;
        if TRACE_EVENTS.output::<TraceEvent>(&*e, 0).is_err() {
            count(Counter::TraceRingFull);
        }
    }
}
