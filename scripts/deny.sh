#!/usr/bin/env bash
# cargo deny's checks of the lock file against deny.toml (issue 14):
#
#   scripts/deny.sh                licenses, bans and sources, offline (the test suite runs this)
#   scripts/deny.sh --advisories   also the RustSec advisories, which needs their database from
#                                  GitHub: these project machines cannot reach it, so it is
#                                  opt-in, for a machine that can
#
# cargo-deny is installed once, at a pinned version, into target/tools.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
tools=${CARGO_TARGET_DIR:-target}/tools
version=0.20.2
if ! "$tools/bin/cargo-deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
  echo "deny: installing cargo-deny $version into $tools (once)" >&2
  cargo install -q --locked --root "$tools" --no-default-features cargo-deny --version "$version"
fi
deny=("$tools/bin/cargo-deny" --locked)
case ${1:-} in
  --advisories) "${deny[@]}" check advisories licenses bans sources ;;
  "") "${deny[@]}" --offline check licenses bans sources ;;
  *) echo "usage: scripts/deny.sh [--advisories]" >&2; exit 2 ;;
esac
