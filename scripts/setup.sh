#!/usr/bin/env bash
# Installs what rbuild and its tests need on Debian 12, then builds rbuild (release).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
pkgs=(ca-certificates curl gcc pkg-config uidmap busybox-static skopeo umoci docker-registry)
# For the test suite: podman (docker archive loading, the matrix's container cases, with runc:
# crun fails on this kind of machine's hybrid cgroups), zstd.
# fuse-overlayfs and attr (setfattr): the snapshotter fallback tests.
# qemu-system-x86, cpio, binutils (strip): the cgroup v2 tests in a virtual machine.
# tmux: the live progress view in a real terminal; openssl: the token server's signatures.
[ "${RBUILD_SETUP_TESTS:-0}" = 1 ] && pkgs+=(podman runc fuse-overlayfs attr libcap2-bin procps zstd git python3 qemu-system-x86 cpio binutils tmux openssl)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  # Debian 12's own rustc is too old for rbuild's dependencies.
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -fsSL https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi
# The test suite checks formatting and lints first (scripts/test-inner.sh).
if [ "${RBUILD_SETUP_TESTS:-0}" = 1 ] && command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null
  done
fi
# The test suite builds its own (debug) binaries.
if [ "${RBUILD_SETUP_TESTS:-0}" != 1 ]; then
  cargo build --release --locked -q
  echo "setup: built $(pwd)/target/release/rbuild" >&2
fi
