//! The trace ring buffer: the events the programs write while a tracer is attached, read
//! as they come. Joining them into packets is the state layer's (`state::trace`).

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use flowtrace_common::TraceEvent;
use tokio::io::unix::AsyncFd;

/// The ring buffer, registered with the runtime for readiness.
pub struct TraceRing {
    fd: AsyncFd<RingBuf<MapData>>,
}

/// What one read of the ring brought.
#[derive(Debug, Default)]
pub struct RingBatch {
    pub events: Vec<TraceEvent>,
    /// Records too short to be an event (never expected).
    pub bad: u64,
}

impl TraceRing {
    /// Registers the ring for polling.
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // Only readable: the ring buffer is written by the programs, never by us.
        // SAFETY: the RingBuf owns its map fd, which stays open and the same until the
        // RingBuf, owned by the AsyncFd, is dropped with it.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        Ok(Self { fd })
    }

    /// Waits until events are there (or `timeout` passes, if given) and takes them all.
    /// With no tracer attached the programs write nothing and this sleeps in `poll`.
    pub async fn read(&mut self, timeout: Option<Duration>) -> std::io::Result<RingBatch> {
        let ready = match timeout {
            None => Some(self.fd.readable_mut().await),
            Some(t) => tokio::time::timeout(t, self.fd.readable_mut()).await.ok(),
        };
        let mut batch = RingBatch::default();
        if let Some(ready) = ready {
            let mut guard = ready?;
            let rb = guard.get_inner_mut();
            while let Some(item) = rb.next() {
                match decode(&item) {
                    Some(e) => batch.events.push(e),
                    None => batch.bad += 1,
                }
            }
            guard.clear_ready();
        }
        Ok(batch)
    }
}

fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    if bytes.len() < std::mem::size_of::<TraceEvent>() {
        return None;
    }
    // SAFETY: the length is checked; TraceEvent is plain old data (any bit pattern is a
    // value) and read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) })
}
