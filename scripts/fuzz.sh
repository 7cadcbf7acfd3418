#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (opt-in, never in CI): each for SECONDS (default
# 600), starting from the seeds in fuzz/corpus/TARGET; what the fuzzer finds new goes to
# $FUZZ_WORK/TARGET (default /var/tmp/rbuild-fuzz), crashes to fuzz/artifacts/TARGET.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The layer
# target writes files as root: run it through a jail with a disk limit.
#   scripts/fuzz.sh                 # all four, 10 minutes each
#   scripts/fuzz.sh layer 60        # one, one minute
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${2:-600}
work=${FUZZ_WORK:-/var/tmp/rbuild-fuzz}
targets=${1:-"dockerfile expand dockerignore layer"}
for t in $targets; do
    mkdir -p "$work/$t"
    echo "== $t: $secs s"
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: 2 GiB is a leak or a bomb.
    cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
