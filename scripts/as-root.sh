# Sourced first by demo.sh and test.sh. Both load eBPF programs and create network
# namespaces, so they run as root: from a root shell directly; from a user with sudo, the
# script runs itself again under sudo with the user's HOME (so rustup and cargo are the
# user's toolchains, found in ~/.cargo and ~/.rustup), and hands what it created under the
# repository and HOME back to the user when it ends.
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "$0 needs root (it loads eBPF programs and creates network namespaces) and sudo is not installed: run it from a root shell" >&2
    exit 1
  fi
  echo "[flowtrace] not root: running $0 again with sudo" >&2
  exec sudo --preserve-env=HOME,RUSTUP_HOME,CARGO_HOME,RUSTUP_TOOLCHAIN,FLOWTRACE_TEST_LOG \
    bash "$PWD/scripts/$(basename "$0")" "$@"
fi
if [ -n "${SUDO_UID:-}" ] && [ "${SUDO_UID}" != 0 ]; then
  flowtrace_give_back() {
    find "$PWD" "$HOME/.cargo" "$HOME/.rustup" -xdev -user 0 \
      -exec chown -h "$SUDO_UID:$SUDO_GID" {} + 2>/dev/null || true
  }
  trap flowtrace_give_back EXIT
fi
