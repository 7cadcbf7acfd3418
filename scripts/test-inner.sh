#!/usr/bin/env bash
# The steps of the test suite, which scripts/test.sh runs inside scripts/bounded: run that.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ -n "${RBUILD_TEST_USER:-}" ] && [ "$(id -u)" = 0 ]; then
  # test.sh took root through sudo for the bounds: set up as the user who ran it, as before
  # (Rust, if it is missing, goes to that user's home; packages through sudo).
  uid=${RBUILD_TEST_USER%:*}
  home=$(getent passwd "$uid" | cut -d: -f6)
  setpriv --reuid="$uid" --regid="${RBUILD_TEST_USER#*:}" --init-groups \
    env HOME="${home:-$HOME}" RBUILD_SETUP_TESTS=1 bash scripts/setup.sh
else
  RBUILD_SETUP_TESTS=1 bash scripts/setup.sh
fi
unset RBUILD_TEST_USER
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -E env PATH=$PATH"
# Base images once, before the tests (scripts/testbed/make-base-images; its cache is locked, so
# test binaries can also ask for them at once). RBUILD_SLOW_TESTS=1 adds the Debian image
# (tests/matrix.rs).
if [ "${RBUILD_SLOW_TESTS:-0}" = 1 ]; then
  $sudo scripts/testbed/make-base-images --no-push >/dev/null
else
  $sudo scripts/testbed/make-base-images --busybox-only --no-push >/dev/null
fi
# The end-to-end tests run the binary users get: the static release binary (issue 14), made
# as scripts/release.sh makes it. RBUILD_TEST_BIN=debug runs them with the test build's own.
case ${RBUILD_TEST_BIN:-} in
  debug) unset RBUILD_TEST_BIN ;;
  "") RBUILD_TEST_BIN=$($sudo bash scripts/release.sh --binary-only); export RBUILD_TEST_BIN
      echo "test: the end-to-end tests run $RBUILD_TEST_BIN" >&2 ;;
esac
# Habits first: formatting and lints are part of the suite (issue 12, item 7), and the lock
# file's licenses, duplicate crates and sources (cargo deny, offline: scripts/deny.sh).
cargo fmt --all --check
$sudo bash scripts/deny.sh
$sudo cargo clippy --workspace --all-targets --locked -q -- -D warnings
$sudo cargo test --workspace --locked "$@"
