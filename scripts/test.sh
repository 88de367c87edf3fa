#!/usr/bin/env bash
# Installs what is missing, then runs every test: first those that need no root (host unit
# tests, doc tests, the deploy/ manifest checks, the map page in a headless Chromium), in
# parallel; then the integration tests that load flowtrace into the real kernel inside network
# namespaces they create, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/as-root.sh
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The integration and deploy tests run the flowtrace and ftgen binaries: build them first.
cargo build --release
# The layer order of flowtrace/src (docs/design.md, "Architecture"): no import upwards, no cycle.
cargo run --release -q -p xtask -- layers
cargo test --release --lib --bins --test deploy --test kernel_object --test page
cargo test --release --doc
# One binary (tests/tests/cluster); its tests share kernel state (loaded programs, bpf_stats).
cargo test --release -p flowtrace-tests --test cluster -- --test-threads=1
