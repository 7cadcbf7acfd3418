#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the end-to-end tests against a real
# registry (started per test on a free loopback port). Needs root (sudo is used if not).
set -euo pipefail
cd "$(dirname "$0")/.."
RBUILD_SETUP_TESTS=1 bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
[ -x ../shared/testbed/registry-up ] || { echo "test: ../shared/testbed is missing beside the checkout" >&2; exit 1; }
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -E env PATH=$PATH"
# Base images once, before tests run in parallel (the testbed cache is not concurrency-safe).
# RBUILD_SLOW_TESTS=1 adds the cases with the Debian image (tests/matrix.rs).
if [ "${RBUILD_SLOW_TESTS:-0}" = 1 ]; then
  $sudo ../shared/testbed/make-base-images --no-push >/dev/null
else
  $sudo ../shared/testbed/make-base-images --busybox-only --no-push >/dev/null
fi
$sudo cargo test --workspace --locked "$@"
