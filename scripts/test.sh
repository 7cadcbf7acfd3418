#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the end-to-end tests against a real
# registry (started per test on a free loopback port). Needs root (sudo is used if not).
# It runs inside scripts/bounded: its own PID namespace, a pids and a memory cgroup and a time
# limit, stated in the first line it prints, so that a test that escapes rbuild's own limits
# cannot take the machine down. The suite's steps are in scripts/test-inner.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# 8192 processes, half the machine's memory, 3600 s (below CI's 90 minutes).
bounds=(--pids 8192 --mem 50% --time 3600 --name rbuild-tests)
if [ "$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1; then
  exec scripts/bounded "${bounds[@]}" -- bash scripts/test-inner.sh "$@"
fi
# The bounds need root; the setup step still runs as this user (test-inner.sh).
exec sudo -E env PATH="$PATH" RBUILD_TEST_USER="$(id -u):$(id -g)" \
  scripts/bounded "${bounds[@]}" -- bash scripts/test-inner.sh "$@"
