//! The agent's live tracers: how many are attached, and the channel joined packets go out on.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::broadcast;

use crate::state::trace::Traced;

/// Joined packets waiting in a tracer's queue; a slower tracer loses the oldest and is told.
const TRACER_QUEUE: usize = 4096;

/// The agent's tracers: how many are attached and the channel joined packets go out on.
pub struct TraceHub {
    tx: broadcast::Sender<Arc<Traced>>,
    tracers: AtomicUsize,
    /// Events the ring buffer held that were too short to be events (never expected).
    bad_events: AtomicU64,
    /// Joined packets, drops and retransmissions handed to the tracers.
    packets: AtomicU64,
}

impl Default for TraceHub {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceHub {
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(TRACER_QUEUE).0,
            tracers: AtomicUsize::new(0),
            bad_events: AtomicU64::new(0),
            packets: AtomicU64::new(0),
        }
    }

    /// Joined packets handed to the tracers since the agent started.
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Counts ring records too short to be events.
    pub fn count_bad_events(&self, n: u64) {
        self.bad_events.fetch_add(n, Ordering::Relaxed);
    }

    /// Attached tracers.
    pub fn tracers(&self) -> usize {
        self.tracers.load(Ordering::SeqCst)
    }

    /// Registers a tracer. The caller then makes the kernel state follow
    /// [`TraceHub::tracers`] (the agent's `apply_tracing`), and again once the
    /// returned guard is dropped.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Traced>> {
        self.tracers.fetch_add(1, Ordering::SeqCst);
        self.tx.subscribe()
    }

    /// Unregisters a tracer (see [`TraceHub::subscribe`]).
    pub fn unsubscribe(&self) {
        let _ = self
            .tracers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    pub fn publish(&self, p: Traced) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        // No receiver: the last tracer left while packets were in flight.
        let _ = self.tx.send(Arc::new(p));
    }
}
