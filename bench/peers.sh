#!/usr/bin/env bash
# rbuild against its peers, side by side in one run: BuildKit (Debian's docker.io 20.10, a
# private daemon of its own: bench/lib/buildkit.sh) and buildah 1.28. Runs are interleaved
# (run 1 of each tool, then run 2, ...); each cold run starts from an empty cache (rbuild: a
# new store; BuildKit: `docker builder prune -af` and no images; buildah: no images), with
# the base images in the local registry.
#
# Per run and tool: wall time, CPU time and peak RSS of the whole process tree. Each tool runs
# in a cgroup of its own (dockerd and its build containers for BuildKit, buildah's RUN
# containers for buildah); CPU is the cgroup's cpuacct.usage, peak RSS the largest sum of
# VmRSS over the cgroup's processes, sampled every 50 ms (bench/lib/treerss.py).
# Prints, per case, the medians and the per-run ratio rbuild / best peer, as a Markdown table.
# Cold cases also run rbuild with `--output type=oci` (rbuild-oci: every image layer
# compressed), reported against BuildKit's cold build.
#
#   bench/peers.sh                  every case but the network-bound ones (apt, gcc)
#   bench/peers.sh --runs 5 gcc     one case, 5 runs
#   bench/peers.sh --list           the cases
#   bench/peers.sh --dir /var/tmp   contexts and every tool's storage there instead
#
# Contexts and the three tools' storage (rbuild's store, dockerd's data root, buildah's
# --root) sit on a tmpfs (/dev/shm) by default: on an ext4 without a journal, as this
# project's machines have, creating inodes within a minute of deleting many (what every
# cold run does after its predecessor's clean-up) costs seconds of kernel time in
# `recently_deleted`, more than the builds themselves, and changes from run to run.
# Needs root. Slow (each case is built 3 × 3 times): opt-in, never in CI.
set -euo pipefail
. "$(dirname "$0")/lib/setup.sh"
. bench/lib/buildkit.sh

all_cases="stages4 files100k entries200k big512 ctx20k copy50k steps60 run50 pushearly layer1200-gzip layer1200-zstd"
net_cases="apt gcc"
runs=3
base_dir=/dev/shm
cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --list) echo "$all_cases $net_cases (network-bound: name them)"; exit 0 ;;
    --dir) base_dir=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) cases+=("$1"); shift ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || read -r -a cases <<<"$all_cases"

for p in buildah runc docker.io pigz zstd; do
  dpkg -s $p >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $p >/dev/null
done
work=$(mktemp -d "$base_dir/rbuild-peers.XXXXXX")
# buildah's images and containers, beside the others.
bh() { buildah --root "$work/buildah/root" --runroot "$work/buildah/run" "$@"; }
cgname=rbuild-peers-$$
cpu_root=/sys/fs/cgroup/cpuacct
[ -d $cpu_root ] || cpu_root=/sys/fs/cgroup/cpu,cpuacct
mem_root=/sys/fs/cgroup/memory
for t in rbuild rbuild-oci buildkit buildah; do mkdir -p "$cpu_root/$cgname/$t" "$mem_root/$cgname/$t"; done
reg=$("$tb/registry-up" 0 "$work/registry")
cleanup() {
  buildkit_down || true
  bh rm -a >/dev/null 2>&1 || true
  bh rmi -af >/dev/null 2>&1 || true
  "$tb/registry-down" "${reg##*:}" "$work/registry" >/dev/null 2>&1 || true
  umount -R "$work/buildah/root/overlay" 2>/dev/null || true
  rm -rf "$work"
  # Sub-cgroups the runtimes made first, then ours.
  for r in "$cpu_root" "$mem_root"; do
    find "$r/$cgname" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}
trap cleanup EXIT
need_debian=false
for c in "${cases[@]}"; do case $c in apt | gcc) need_debian=true ;; esac; done
if $need_debian; then
  "$tb/make-base-images" "$reg" >"$work/base.log" 2>&1 || { tail "$work/base.log"; exit 1; }
else
  "$tb/make-base-images" --busybox-only "$reg" >"$work/base.log" 2>&1 || { tail "$work/base.log"; exit 1; }
fi
busybox=$reg/busybox:latest
debian=$reg/debian:bookworm
# dockerd, its containerd and every build container in BuildKit's cgroup.
(
  echo $BASHPID >"$cpu_root/$cgname/buildkit/cgroup.procs"
  echo $BASHPID >"$mem_root/$cgname/buildkit/cgroup.procs"
  BK_EXTRA="--cgroup-parent=/$cgname/buildkit" buildkit_up "$work/dockerd"
  echo "$BK_DOCKER" >"$work/bk-host"
)
BK_DIR=$work/dockerd
BK_DOCKER=$(cat "$work/bk-host")

# --- contexts -------------------------------------------------------------------------
ctx() { mkdir -p "$work/ctx/$1"; echo "$work/ctx/$1"; }
# Whether a case that needs context $1 was asked for.
want() { [[ " ${cases[*]} " == *" $1"* ]]; }
# payload FILE BYTES: BYTES that compress like real files: /usr of this machine, tarred,
# repeated.
payload() {
  tar -C / -cf "$1.usr.tar" usr/lib usr/share 2>/dev/null || true
  python3 - "$1.usr.tar" "$1" "$2" <<'PY'
import sys
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(src, 'rb').read()
with open(dst, 'wb') as f:
    n = 0
    while n < size:
        chunk = data[: size - n]
        f.write(chunk)
        n += len(chunk)
PY
  rm -f "$1.usr.tar"
}
make_contexts() {
  local c
  c=$(ctx stages4)
  { for s in a b c d; do echo "FROM $busybox AS $s"; echo "RUN sleep 5 && echo $s > /$s"; done
    echo "FROM $busybox"; for s in a b c d; do echo "COPY --from=$s /$s /$s"; done; } >"$c/Dockerfile"
  c=$(ctx files100k)
  printf 'FROM %s\nRUN mkdir /d && awk '\''BEGIN { for (i = 0; i < 100000; i++) { f = "/d/f" i; print i > f; close(f) } }'\''\n' "$busybox" >"$c/Dockerfile"
  # The 200k-entry layer of issue 13's memory cap: 200k files in 1000 directories.
  c=$(ctx entries200k)
  printf 'FROM %s\nRUN mkdir /d && cd /d && seq 0 999 | xargs mkdir && awk '\''BEGIN { for (i = 0; i < 200000; i++) { f = "/d/" (i %% 1000) "/f" i; print i > f; close(f) } }'\''\n' "$busybox" >"$c/Dockerfile"
  c=$(ctx big512)
  printf 'FROM %s\nRUN dd if=/dev/urandom of=/big bs=1M count=512 2>/dev/null\n' "$busybox" >"$c/Dockerfile"
  want layer1200 && {
  c=$(ctx layer1200)
  payload "$c/payload" 1200000000
  printf 'FROM %s\nCOPY payload /payload\n' "$busybox" >"$c/Dockerfile"
  }
  want pushearly && {
  # Layers ready early (issue 13, item 3): a 300 MB COPY, then a 5 s step. Build+push
  # against the same build with an OCI output (the same blobs made), in the same runs.
  c=$(ctx pushearly)
  payload "$c/payload" 300000000
  printf 'FROM %s\nCOPY payload /payload\nRUN sleep 5\n' "$busybox" >"$c/Dockerfile"
  }
  want ctx20k && {
  c=$(ctx ctx20k)
  python3 - "$c" 20000 10000 <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, "src", f"d{i // 200}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(os.urandom(size // 4) * 4)
PY
  printf 'FROM %s\nCOPY src /src\n' "$busybox" >"$c/Dockerfile"
  }
  want copy50k && {
  c=$(ctx copy50k)
  python3 - "$c" 50000 100 <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, "src", f"d{i // 500}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(b"%d\n" % i * (size // 6))
PY
  printf 'FROM %s\nCOPY src /src\n' "$busybox" >"$c/Dockerfile"
  }
  c=$(ctx steps60)
  { echo "FROM $busybox"; for i in $(seq 1 30); do echo "ENV V$i=$i"; echo "RUN echo \$V$i > /f$i"; done; } >"$c/Dockerfile"
  c=$(ctx run50)
  { echo "FROM $busybox"; for i in $(seq 1 50); do echo "RUN true # $i"; done; } >"$c/Dockerfile"
  c=$(ctx apt)
  printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*\n' "$debian" >"$c/Dockerfile"
  c=$(ctx gcc)
  cp testdata/corpus/c-multistage/context/* "$c/" 2>/dev/null || true
  sed -e "s#{{BUSYBOX}}#$busybox#g" -e "s#{{DEBIAN}}#$debian#g" testdata/corpus/c-multistage/Dockerfile >"$c/Dockerfile"
}
make_contexts

# --- the three tools ------------------------------------------------------------------
# in_cg TOOL CMD...: CMD in TOOL's cgroups.
in_cg() {
  local t=$1; shift
  sh -c 'echo $$ >"$1/cgroup.procs"; echo $$ >"$2/cgroup.procs"; shift 2; exec "$@"' _ \
    "$cpu_root/$cgname/$t" "$mem_root/$cgname/$t" "$@"
}
rb_root=$work/rb-root
rb_cold() { rm -rf "$rb_root"; }
bk_cold() {
  DOCKER_HOST=$BK_DOCKER /usr/bin/docker builder prune -af >/dev/null 2>&1 || true
  DOCKER_HOST=$BK_DOCKER /usr/bin/docker image prune -af >/dev/null 2>&1 || true
}
bh_cold() { bh rm -a >/dev/null 2>&1 || true; bh rmi -af >/dev/null 2>&1 || true; }
# build TOOL CASE [push REF] [zstd]
build() {
  local t=$1 c=$2 push=${3:-} comp=${4:-gzip} dir=$work/ctx/$2
  case $t in
    rbuild-oci)
      # A cold build written as an OCI layout: every layer of the image compressed.
      # With a push variant's compression: the build alone that its push is measured against.
      local extra=()
      [ "$comp" = zstd ] && extra+=(--compression zstd)
      rm -rf "$work/oci-out"
      in_cg rbuild-oci "$bin" build --progress=plain --root "$rb_root" --insecure-registry "$reg" \
        -t "peers/$c:1" "${extra[@]}" --output "type=oci,dest=$work/oci-out" "$dir" ;;
    rbuild)
      local extra=()
      [ -n "$push" ] && extra+=(--push -t "$push" --insecure-registry "${push%%/*}") || extra+=(-t "peers/$c:1")
      [ "$comp" = zstd ] && extra+=(--compression zstd)
      in_cg rbuild "$bin" build --progress=plain --root "$rb_root" --insecure-registry "$reg" "${extra[@]}" "$dir" ;;
    buildkit)
      if [ -n "$push" ]; then
        # The 20.10 client has no zstd (that needs buildx): no figure.
        [ "$comp" = zstd ] && return 3
        bk_build -t "$push" "$dir" && DOCKER_HOST=$BK_DOCKER /usr/bin/docker push -q "$push"
      else
        bk_build -t "peers/$c:1" "$dir"
      fi ;;
    buildah)
      local fmt=()
      in_cg buildah buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver=overlay bud --runtime=/usr/sbin/runc --isolation=oci \
        --cgroup-parent="/$cgname/buildah" --network=host -q --layers --tls-verify=false -t "peers/$c:1" "$dir"
      if [ -n "$push" ]; then
        [ "$comp" = zstd ] && fmt=(--compression-format zstd)
        in_cg buildah buildah --root "$work/buildah/root" --runroot "$work/buildah/run" push --tls-verify=false "${fmt[@]}" "peers/$c:1" "docker://$push"
      fi ;;
  esac
}

# measure TOOL CMD...: "wall cpu rss_mib own_rss_mib" of CMD in TOOL's cgroups (own: the
# tool's first process alone, see treerss.py); fails with CMD.
measure() {
  local t=$1; shift
  local cpu=$cpu_root/$cgname/$t mem=$mem_root/$cgname/$t
  local c0 c1 t0 t1 stop=$work/stop-$t peak=$work/peak-$t
  rm -f "$stop" "$peak"
  python3 bench/lib/treerss.py "$mem" "$stop" "$peak" &
  local sampler=$!
  c0=$(cat "$cpu/cpuacct.usage")
  t0=$(date +%s.%N)
  local rc=0
  "$@" >"$work/last-$t.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  c1=$(cat "$cpu/cpuacct.usage")
  touch "$stop"
  wait $sampler || true
  if [ $rc -eq 3 ] && [ "$t" = buildkit ]; then echo "n/a n/a n/a n/a"; return 0; fi
  if [ $rc -ne 0 ]; then
    echo "$t failed:" >&2; tail -5 "$work/last-$t.log" >&2; return $rc
  fi
  python3 -c "t, o = open(\"$peak\").read().split(); print(f'{$t1-$t0:.2f} {($c1-$c0)/1e9:.2f} {int(t)/1048576:.0f} {int(o)/1048576:.0f}')"
}

# A case's variants: what runs before each measured run (not measured), and what runs.
# variant NAME PREP  — PREP: cold | warm | touch | change
results=$work/results
: >"$results"
run_variant() { # CASE VARIANT PREP [push] [comp]
  local c=$1 v=$2 prep=$3 push=${4:-} comp=${5:-gzip} r t
  local tools="rbuild buildkit buildah"
  # Cold builds also with an OCI layout output, against BuildKit's cold build, and pushes
  # against that build alone (issue 13).
  [ "$prep" = cold ] && tools="rbuild rbuild-oci buildkit buildah"
  for r in $(seq 1 "$runs"); do
    for t in $tools; do
      case $prep in
        cold) case $t in rbuild | rbuild-oci) rb_cold ;; buildkit) bk_cold ;; buildah) bh_cold ;; esac ;;
        *) # a first build, not measured, then the change
          build "$t" "$c" >/dev/null 2>&1 || true
          case $prep in
            touch) touch "$work/ctx/$c/src/d0/f0" ;;
            change) echo "changed $r" >>"$work/ctx/$c/src/d0/f0" ;;
          esac ;;
      esac
      # A push goes to a registry of its own, new for each run: one that already holds the
      # blob lets dockerd skip compressing and uploading it (its distribution metadata,
      # which no prune clears, remembers the blob's digest for the layer).
      local p="" preg=""
      if [ -n "$push" ]; then
        preg=$work/push-registry
        p=$("$tb/registry-up" 0 "$preg" | tail -1)/$push:$t-$r
      fi
      local m
      m=$(measure "$t" build "$t" "$c" "$p" "$comp") || m="fail fail fail fail"
      if [ -n "$preg" ]; then "$tb/registry-down" "${p%%/*}" "$preg" --purge >/dev/null 2>&1 || true; fi
      echo "$c $v $r $t $m" | tee -a "$results" >&2
    done
  done
}
for c in "${cases[@]}"; do
  case $c in
    ctx20k) run_variant ctx20k cold cold; run_variant ctx20k unchanged warm
            run_variant ctx20k touched touch; run_variant ctx20k changed change ;;
    copy50k) run_variant copy50k cold cold; run_variant copy50k warm warm; run_variant copy50k touched touch ;;
    layer1200-gzip) run_variant layer1200 build+push-gzip cold peers/big gzip ;;
    layer1200-zstd) run_variant layer1200 build+push-zstd cold peers/big zstd ;;
    pushearly) run_variant pushearly build+push cold peers/early gzip ;;
    *) run_variant "$c" cold cold ;;
  esac
done

echo
echo "$(date -u +%F), $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); BuildKit: docker.io $(bk_version); $(buildah --version | cut -d' ' -f1-3); $runs runs, medians; storage on $(df --output=fstype "$work" | tail -1) ($base_dir)"
python3 bench/lib/peers_table.py "$results"
