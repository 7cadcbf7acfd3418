# Sourced first by the benchmarks: from the repository root, a release build of rbuild in
# $bin, and the testbed's helpers in $tb.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/rbuild
tb=$PWD/../shared/testbed
