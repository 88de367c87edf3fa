#!/usr/bin/env bash
# Installs everything flowtrace needs to build, test and demo on a fresh Debian machine.
# Idempotent: each step checks first and only installs what is missing.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages and loads eBPF programs)" >&2
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

# podman, runc, buildah, containerd (ctr), uidmap and binutils (objcopy): `cargo xtask image`
# and the real-runtime test (tests/tests/cluster/runtime.rs; runc, as crun refuses this
# machine's cgroup layout).
# chromium and fonts-dejavu-core: the map page's test (tests/tests/page.rs) drives a headless
# Chromium over the DevTools protocol and screenshots the page; the font so its text renders.
DEB_PKGS=(util-linux iproute2 iptables conntrack iperf3 tcpdump iputils-ping bpftool ethtool libcap2-bin
          llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev prometheus openssl
          podman runc buildah containerd uidmap binutils python3-venv chromium fonts-dejavu-core)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl builds the kustomizations the deploy tests check (`kubectl kustomize`); this
# machine image ships it, and Debian's package of it is kubernetes-client.
if ! command -v kubectl >/dev/null 2>&1; then
  log "installing kubectl (kubernetes-client)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain (eBPF side)"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly (needed by -Z build-std for bpfel-unknown-none)"
  rustup component add rust-src --toolchain nightly
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0.13.0'; then
  log "building bpf-linker 0.13.0 against LLVM 22 (about 3 minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22 || \
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
fi

# Locust (PyPI) drives the SockShop scenario's shoppers (tests/src/sockshop.rs, the demo), in
# its own virtual environment so nothing else on the machine changes.
LOCUST_VENV=/opt/flowtrace-locust
if ! "$LOCUST_VENV/bin/locust" --version >/dev/null 2>&1; then
  log "installing Locust 2.47.0 into $LOCUST_VENV"
  python3 -m venv "$LOCUST_VENV" || /usr/bin/python3 -m venv "$LOCUST_VENV"
  "$LOCUST_VENV/bin/pip" install -q --disable-pip-version-check locust==2.47.0
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || true
log "ready"
