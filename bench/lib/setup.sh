# Sourced first by the benchmarks: from the repository root, a release build of rbuild in
# $bin, and the testbed's helpers (scripts/testbed) in $tb.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
# RBUILD_BENCH_BIN measures another build of rbuild (e.g. the commit before a change, for a
# before/after comparison in one sitting); else this checkout's, built now.
if [ -n "${RBUILD_BENCH_BIN:-}" ]; then
  bin=$RBUILD_BENCH_BIN
else
  cargo build --release --locked -q
  bin=${CARGO_TARGET_DIR:-$PWD/target}/release/rbuild
fi
tb=$PWD/scripts/testbed
