//! What the agent accumulates from the kernel, one table per kind, none of them locked or
//! named here: flows per hop (`flows`), NAT translations checked against conntrack (`nat`),
//! latency histograms (`latency`), and traced packets being joined (`trace`). The agent owns
//! them behind one lock; naming is `enrich`'s.

pub mod drops;
pub mod flows;
pub mod latency;
pub mod nat;
pub mod trace;
