#!/usr/bin/env bash
# Installs what is missing, then runs the demo: an emulated two-node cluster (network
# namespaces, cni0 bridges, VXLAN overlay, kube-proxy iptables rules), a flowtrace agent
# per node, traffic pod to pod and to a Service, and what flowtrace saw.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/as-root.sh
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo xtask demo "$@"
