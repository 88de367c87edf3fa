//! Every integration test that needs root, in one binary with a module per area (the layout of
//! aya's integration tests): they load flowtrace into the real kernel inside network namespaces
//! they create (the emulated cluster of the `flowtrace-tests` library, whose helpers they all
//! share) and check it against independent ground truth.
//!
//! They share kernel state (loaded programs, whose IDs some tests compare machine-wide, and
//! `kernel.bpf_stats_enabled`), so they run one at a time, after `cargo build --release` (they
//! run the `flowtrace` and `ftgen` binaries):
//!
//! ```text
//! cargo test --release -p flowtrace-tests --test cluster -- --test-threads=1
//! ```
//!
//! `bash scripts/test.sh` does exactly that after the tests that need no root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod alerts;
mod api_auth;
mod attribution;
mod cli;
mod drops;
mod hops;
mod k8s;
mod latency;
mod least_privilege;
mod lifecycle;
mod malformed;
mod manifest;
mod map;
mod metrics;
mod metrics_flood;
mod nat;
mod relay;
mod runtime;
mod shapes;
mod testbed_smoke;
mod trace;
