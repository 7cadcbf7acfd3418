#!/usr/bin/env bash
# What the root-filesystem fallbacks of RUN steps cost, on the same machine in the same run.
#
# 1. The copy snapshotter's pieces on a generated 20,000-file / ~215 MB tree
#    (snapshot/benches/tree.rs): copying the layer, the stat baseline, the stat-walk diff after
#    a small change, and a full content scan (read + sha256 every file, what a content-based
#    differ such as Kaniko's default snapshot mode does) for comparison.
# 2. Whole builds: FROM busybox (local registry) + COPY of that tree + two RUN steps that change
#    a few files, with RBUILD_SNAPSHOTTER=overlay, fuse-overlayfs and copy, and with the store
#    on an overlayfs (the automatic tmpfs-upper fallback). Reports the wall time of each RUN
#    step (from --progress=plain) and of the build; ratios against overlay.
#
# Needs root. Every build runs in its own mount and PID namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q -p rbuild
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/rbuild
tb=$PWD/scripts/testbed
work=$(mktemp -d /var/tmp/rbuild-snapshotters.XXXXXX)
regdir=$work/registry
reg=$("$tb/registry-up" 0 "$regdir")
trap '"$tb/registry-down" "${reg##*:}" "$regdir" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$tb/make-base-images" --busybox-only "$reg" >/dev/null 2>&1

echo "== the copy snapshotter's pieces (snapshot/benches/tree.rs)"
cargo bench --locked -q -p rbuild-snapshot --bench tree -- "$work/tree" 2>/dev/null | grep -v '^$'

ctx=$work/ctx
python3 - "$ctx" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(200):
    os.makedirs(f"{root}/src/d{d}", exist_ok=True)
for i in range(19990):
    with open(f"{root}/src/d{i % 200}/f{i}.txt", "w") as f:
        f.write(f"file {i}\n" * (1 + i % 50))
blob = os.urandom(1 << 20)
for i in range(10):
    with open(f"{root}/src/big{i}.bin", "wb") as f:
        for _ in range(20):
            f.write(blob)
PY
cat > "$ctx/Dockerfile" <<DF
FROM $reg/busybox:latest
COPY src /app
RUN for i in 0 1 2 3 4 5 6 7 8 9; do echo changed > /app/d\$i/f\$i.txt; done && rm /app/d20/f20.txt && echo new > /app/new
RUN echo again >> /app/new && rm -r /app/d30
DF
echo
echo "== whole builds: $(find "$ctx/src" -type f | wc -l) files, $(du -sm "$ctx/src" | cut -f1) MB copied into the image, then two RUN steps"

# build NAME PRE SNAPSHOTTER STORE: a fresh store; PRE runs first in the build's namespaces.
# Prints "wall run1 run2" in seconds.
build() {
  local mode=$1 pre=$2 snap=$3 store=$4
  local t0 t1
  t0=$(date +%s.%N)
  unshare --mount --propagation=private --pid --fork --mount-proc sh -c "set -e; $pre; exec env RBUILD_SNAPSHOTTER=$snap '$bin' build --progress=plain --root '$store' '$ctx'" \
    >"$work/$mode.log" 2>&1 < /dev/null || { cat "$work/$mode.log"; exit 1; }
  t1=$(date +%s.%N)
  python3 - "$work/$mode.log" "$t0" "$t1" <<'PY'
import re, sys
log = open(sys.argv[1]).read()
# "#N [stage-0 3/4] RUN ..." then "#N DONE 1.2s"
runs = [n for n, what in re.findall(r"^#(\d+) \[[^\]]*\] (RUN)", log, re.M)]
done = dict(re.findall(r"^#(\d+) DONE ([0-9.]+)s", log, re.M))
print(f"{float(sys.argv[3]) - float(sys.argv[2]):.2f}", *[done.get(n, "?") for n in runs])
PY
}

ovl=$work/ovl
mkdir -p "$ovl/backing" "$ovl/root"
declare -A res
# Each mode R times (default 3), fresh stores; medians.
R=${R:-3}
med() { python3 -c 'import statistics,sys; rows=[[float(x) for x in r.split()] for r in sys.argv[1:]]; print(*[f"{statistics.median(c):.2f}" for c in zip(*rows)])' "$@"; }
ovlpre="mount -t tmpfs tmpfs $ovl/backing; mkdir $ovl/backing/l $ovl/backing/u $ovl/backing/w; mount -t overlay overlay -o lowerdir=$ovl/backing/l,upperdir=$ovl/backing/u,workdir=$ovl/backing/w $ovl/root"
declare -a o f c s
for i in $(seq "$R"); do
  o+=("$(build overlay true auto "$work/store-overlay-$i")")
  f+=("$(build fuse true fuse-overlayfs "$work/store-fuse-$i")")
  c+=("$(build copy true copy "$work/store-copy-$i")")
  s+=("$(build ovlstore "$ovlpre" auto "$ovl/root/store")")
  rm -rf "$work"/store-*
done
res[overlay]=$(med "${o[@]}"); res[fuse]=$(med "${f[@]}"); res[copy]=$(med "${c[@]}"); res[ovlstore]=$(med "${s[@]}")
grep -h "is on overlayfs" "$work/ovlstore.log" | head -1 | sed 's/^/   notice: /'

python3 - "${res[overlay]}" "${res[fuse]}" "${res[copy]}" "${res[ovlstore]}" <<'PY'
import sys
rows = [("overlay (kernel)", sys.argv[1]), ("fuse-overlayfs", sys.argv[2]), ("copy snapshotter", sys.argv[3]), ("store on overlayfs (tmpfs upper)", sys.argv[4])]
base = [float(x) for x in sys.argv[1].split()]
print(f"{'mode':34} {'build':>8} {'RUN 1':>8} {'RUN 2':>8}   ratios vs overlay (build, RUN 1, RUN 2)")
for name, r in rows:
    v = [float(x) for x in r.split()]
    ratios = ", ".join(f"{a / b:.2f}" if b > 0 else "-" for a, b in zip(v, base))
    print(f"{name:34} {v[0]:8.2f} {v[1]:8.2f} {v[2]:8.2f}   {ratios}")
PY
