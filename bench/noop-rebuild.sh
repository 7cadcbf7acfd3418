#!/usr/bin/env bash
# The cost of a build that changed nothing, and of one that changed one file: a 20,000-file,
# ~200 MB context, `FROM busybox` (local registry) + `COPY . /app` + `RUN`, built once, then
# rebuilt unchanged N times (median wall time), then rebuilt after changing one file's content.
# Also the rebuild after `touch` of one file (new mtime, same content: nothing to rerun).
# rbuild against buildah (`bud --layers`, its layer cache on) in the same run. No Docker engine
# runs on these machines (the docker CLI is only a client), so `docker build` is not measured.
# Needs root. Prints a table; ratios are rbuild / buildah.
set -euo pipefail
. "$(dirname "$0")/lib/setup.sh"
N=${N:-7}
for p in buildah runc; do dpkg -s $p >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $p >/dev/null; done
work=$(mktemp -d /var/tmp/rbuild-noop.XXXXXX)
regdir=$work/registry
reg=$("$tb/registry-up" 0 "$regdir")
bstore=$work/buildah
trap 'buildah --root "$bstore/root" --runroot "$bstore/run" rm --all >/dev/null 2>&1 || true; "$tb/registry-down" "${reg##*:}" "$regdir" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$tb/make-base-images" --busybox-only "$reg" >/dev/null 2>&1
ctx=$work/ctx
# 20,000 files in 200 directories: 19,990 small ones and 10 of 20 MB (~200 MB in all).
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
COPY . /app
RUN du -s /app > /app-size
DF
echo "context: $(find "$ctx" -type f | wc -l) files, $(du -sm "$ctx" | cut -f1) MB"
sleep 2.1   # files younger than 2 s are re-read by design (racy timestamps)

# rbuild's CPU time (user + sys, its RUN steps included) goes to $work/rb.cpu, one line a build:
# wall times on a shared machine include waiting for a core.
rb() { /usr/bin/time -a -o "$work/rb.cpu" -f "%U %S" "$bin" build --progress=plain --root "$work/rbuild" "$ctx"; }
cpu_median() { python3 -c 'import statistics,sys; print(f"{statistics.median(float(u)+float(s) for u,s in (l.split() for l in open(sys.argv[1]) if l.strip())):.3f}")' "$1"; }
bh() {
  buildah --root "$bstore/root" --runroot "$bstore/run" --storage-driver=overlay bud --runtime=/usr/sbin/runc \
    --isolation=oci --network=host --tls-verify=false -q --layers -t noop:latest "$ctx"
}
# Bash's own clock: a python3 start-up inside the timed span would add tens of milliseconds.
timed() {
  local t0 t1; t0=$EPOCHREALTIME
  "$@" >/dev/null 2>"$work/last.log" || { cat "$work/last.log"; exit 1; }
  t1=$EPOCHREALTIME; python3 -c "print(f'{$t1-$t0:.3f}')"
}
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.3f}")' "$@"; }

load0=$(cut -d' ' -f1-3 /proc/loadavg)
first_rb=$(timed rb)
first_bh=$(timed bh)
ts_rb=(); ts_bh=()
: > "$work/rb.cpu"
for _ in $(seq "$N"); do ts_rb+=("$(timed rb)"); ts_bh+=("$(timed bh)"); done
noop_rb=$(median "${ts_rb[@]}")
noop_bh=$(median "${ts_bh[@]}")
noop_rb_cpu=$(cpu_median "$work/rb.cpu")
# rbuild must have run nothing: the last rebuild's log has no cache miss.
rb 2>&1 | grep -q "cache miss" && { echo "rbuild reran a step on an unchanged context" >&2; exit 1; }
# A new mtime, the same content: each builder sees the touched file once.
tt_rb=(); tt_bh=()
for _ in 1 2 3; do
  touch "$ctx/src/d5/f5.txt"; tt_rb+=("$(timed rb)")
  touch "$ctx/src/d5/f5.txt"; tt_bh+=("$(timed bh)")
done
touch_rb=$(median "${tt_rb[@]}")
touch_bh=$(median "${tt_bh[@]}")
echo "changed" >> "$ctx/src/d7/f7.txt"
one_rb=$(timed rb)
echo "changed" >> "$ctx/src/d8/f8.txt"
one_bh=$(timed bh)
r() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo "load average before: $load0; after: $(cut -d' ' -f1-3 /proc/loadavg) (2 cores: above 2 the builds wait for a core)"
printf '%-46s %9s %9s %7s\n' "" "rbuild" "buildah" "ratio"
printf '%-46s %8ss %8ss %7s\n' "first build" "$first_rb" "$first_bh" "$(r "$first_rb" "$first_bh")"
printf '%-46s %8ss %8ss %7s\n' "unchanged rebuild (median of $N)" "$noop_rb" "$noop_bh" "$(r "$noop_rb" "$noop_bh")"
printf '%-46s %8ss\n' "  rbuild CPU time (user + sys, median)" "$noop_rb_cpu"
printf '%-46s %8ss %8ss %7s\n' "rebuild after touching one file (median of 3)" "$touch_rb" "$touch_bh" "$(r "$touch_rb" "$touch_bh")"
printf '%-46s %8ss %8ss %7s\n' "rebuild after changing one file" "$one_rb" "$one_bh" "$(r "$one_rb" "$one_bh")"
echo "(no Docker engine runs here: the docker CLI is only a client, so docker build is not measured)"
