#!/usr/bin/env bash
# A two-platform build (linux/amd64 + linux/arm64) of the cross-compile idiom for C
# (testdata/bench/c-cross: a BUILDPLATFORM builder with a cross gcc, per-platform finals that
# only copy), cold, against (1) rbuild building each platform alone, one after the other, and
# (2) buildah 1.28 building both (`bud --platform A,B --manifest`). Debian's docker.io 20.10
# has BuildKit's docker driver, which builds one platform at a time: no BuildKit figure.
# Runs are interleaved; wall times, medians. Needs root; network-bound (apt).
#
#   bench/platforms.sh [--runs N]
set -euo pipefail
. "$(dirname "$0")/lib/setup.sh"
runs=3
[ "${1:-}" = --runs ] && runs=$2
for p in buildah runc qemu-user-static; do
  dpkg -s $p >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $p >/dev/null
done
work=$(mktemp -d /dev/shm/rbuild-platforms.XXXXXX)
reg=$("$tb/registry-up" 0 "$work/registry")
bh() { buildah --root "$work/buildah/root" --runroot "$work/buildah/run" "$@"; }
trap 'bh rm -a >/dev/null 2>&1; bh rmi -af >/dev/null 2>&1; "$tb/registry-down" "${reg##*:}" "$work/registry" >/dev/null 2>&1; umount -R "$work/buildah/root/overlay" 2>/dev/null; rm -rf "$work"; true' EXIT
"$tb/make-base-images" --multi-arch "$reg" >"$work/base.log" 2>&1 || { tail "$work/base.log"; exit 1; }
ctx=$work/ctx
mkdir -p "$ctx"
cp testdata/bench/c-cross/hello.c "$ctx/"
sed -e "s#{{DEBIAN}}#$reg/debian:bookworm#g" -e "s#{{BUSYBOX_MULTI}}#$reg/busybox:multi#g" \
  testdata/bench/c-cross/Dockerfile >"$ctx/Dockerfile"
secs() { date +%s.%N; }
timed() { local t0 t1; t0=$(secs); "$@" >"$work/last.log" 2>&1 || { tail -5 "$work/last.log" >&2; return 1; }; t1=$(secs); python3 -c "print(f'{$t1-$t0:.2f}')"; }
rb() { rm -rf "$work/rb-root"; "$bin" build --progress=plain --root "$work/rb-root" --insecure-registry "$reg" "$@" "$ctx"; }
results=$work/results
for r in $(seq 1 "$runs"); do
  both=$(timed rb --platform linux/amd64,linux/arm64 --output "type=oci,dest=$work/oci-both")
  amd=$(timed rb --platform linux/amd64 --output "type=oci,dest=$work/oci-amd")
  arm=$(timed rb --platform linux/arm64 --output "type=oci,dest=$work/oci-arm")
  bh rmi -af >/dev/null 2>&1 || true
  bud=$(timed bh --storage-driver=overlay bud --runtime=/usr/sbin/runc --isolation=oci --network=host -q --layers \
    --tls-verify=false --platform linux/amd64,linux/arm64 --manifest "peers/cross:$r" "$ctx")
  echo "$r $both $amd $arm $bud" | tee -a "$results" >&2
done
echo
echo "$(date -u +%F), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $runs runs, medians; $(buildah --version | cut -d' ' -f1-3)"
python3 - "$results" <<'PY'
import statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]
med = lambda i: statistics.median(r[i] for r in rows)
ratio = lambda f: statistics.median(f(r) for r in rows)
print("| what | wall |")
print("|---|---|")
print(f"| rbuild, both platforms in one build | {med(0):.2f} s |")
print(f"| rbuild, amd64 alone + arm64 alone | {med(1):.2f} s + {med(2):.2f} s |")
print(f"| buildah 1.28, both (`--platform A,B --manifest`) | {med(3):.2f} s |")
print(f"| rbuild both / each alone summed (per-run median) | {ratio(lambda r: r[0] / (r[1] + r[2])):.2f} |")
print(f"| rbuild both / buildah both (per-run median) | {ratio(lambda r: r[0] / r[3]):.2f} |")
PY
