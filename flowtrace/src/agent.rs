//! `flowtrace agent`: the pipeline that turns kernel records into enriched flows, and the
//! tasks that drive it.
//!
//! - `config`: the agent's settings.
//! - `state`: [`Agent`], the one owner of the tables, with private fields; every view (the
//!   HTTP server, metrics, tracing) reads through its methods. The drain pipeline is
//!   `Agent::drain_now`: kernel maps -> tables -> metrics, under one lock.
//! - `drops`: drops and retransmissions joined to the flows and named.
//! - `select`: which flows and traced packets a request's filter selects.
//! - `tracers`: live tracers and the channel joined packets go out on.
//! - `tasks`: start-up, the link watcher, the periodic drain, conntrack events, the trace
//!   ring reader, and shutdown.

pub mod config;
pub mod drops;
pub mod select;
pub mod state;
pub mod tasks;
pub mod tracers;

pub use config::AgentConfig;
pub use state::Agent;
pub use tasks::{start, Running};
