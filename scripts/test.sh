#!/usr/bin/env bash
# Installs what is missing, then runs every test: host unit tests and the integration
# tests that load flowtrace into the real kernel inside network namespaces they create.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# Integration tests share kernel state (bpf_stats, loaded programs): run them one at a time.
# The integration tests run the flowtrace and ftgen binaries: build them first.
cargo build --release
cargo test --release -- --test-threads=1
