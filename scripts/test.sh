#!/usr/bin/env bash
# Installs what is missing, then runs every test: first those that need no root (host unit
# tests, doc tests, the deploy/ manifest checks), in parallel; then the integration tests that
# load flowtrace into the real kernel inside network namespaces they create, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The integration and deploy tests run the flowtrace and ftgen binaries: build them first.
cargo build --release
cargo test --release --lib --bins --test deploy
cargo test --release --doc
# One binary (tests/tests/cluster); its tests share kernel state (loaded programs, bpf_stats).
cargo test --release -p flowtrace-tests --test cluster -- --test-threads=1
