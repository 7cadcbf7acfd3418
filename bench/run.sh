#!/usr/bin/env bash
# rbuild benchmarks, each against a peer measured in the same run on the same machine:
#   1. turning a RUN step into a layer: 100,000 small files, and one 512 MiB file
#      (rbuild's one-pass upperdir → tar → gzip+digests, against GNU tar | gzip -6 | sha256sum
#      over the very same directory), with rbuild's peak memory;
#   2. the fixed cost of one `RUN true` (rbuild against buildah, both as root, same base image),
#      and what the default process limit (a pids cgroup per step) adds to it.
# Needs root and buildah (installed if missing). Prints a table.
set -euo pipefail
. "$(dirname "$0")/lib/setup.sh"
for p in buildah runc time; do dpkg -s $p >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $p >/dev/null; done
work=$(mktemp -d /var/tmp/rbuild-bench.XXXXXX)
regdir=$work/registry
reg=$("$tb/registry-up" 0 "$regdir")
trap '"$tb/registry-down" "${reg##*:}" "$regdir" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$tb/make-base-images" --busybox-only "$reg" >/dev/null 2>&1
base=$reg/busybox:latest
mkdir -p "$work/ctx-files" "$work/ctx-big" "$work/ctx-true"
cat > "$work/ctx-files/Dockerfile" <<DF
FROM $base
RUN mkdir /d && awk 'BEGIN { for (i = 0; i < 100000; i++) { f = "/d/f" i; print i > f; close(f) } }'
DF
cat > "$work/ctx-big/Dockerfile" <<DF
FROM $base
RUN dd if=/dev/urandom of=/big bs=1M count=512 2>/dev/null
DF
{ echo "FROM $base"; for i in $(seq 1 20); do echo "RUN true # $i"; done; } > "$work/ctx-true/Dockerfile"

secs() { python3 -c 'import sys,time; print(f"{time.time():.3f}")'; }

layer_case() { # name
  local ctx=$work/ctx-$1 root=$work/root-$1
  /usr/bin/time -f '%M' -o "$work/$1.rss" "$bin" build --progress=plain --root "$root" "$ctx" 2> "$work/$1.log" ||
    { cat "$work/$1.log"; exit 1; }
  local t; t=$(grep -oE 'layer sha256:[0-9a-f]+ [0-9]+ bytes in [0-9.]+s' "$work/$1.log" | tail -1)
  local diff=${t#layer }; diff=${diff%% *}
  local rb=${t##* in }; rb=${rb%s}
  local dir=$root/layers/sha256/${diff#sha256:}
  sync
  local t0 t1; t0=$(secs)
  tar --sort=name --numeric-owner --xattrs -C "$dir" -cf - . | gzip -6 | sha256sum >/dev/null
  t1=$(secs)
  local peer; peer=$(python3 -c "print(f'{$t1-$t0:.3f}')")
  printf '%-34s rbuild %7ss  GNU tar|gzip -6|sha256sum %7ss  ratio %5s  rbuild peak RSS %s MiB\n' \
    "layer from RUN ($1)" "$rb" "$peer" "$(python3 -c "print(f'{$rb/$peer:.2f}')")" "$(( $(cat "$work/$1.rss") / 1024 ))"
}

echo "machine: $(nproc) cores, $(uname -r)"
layer_case files
layer_case big

# Fixed cost of RUN true: 20 uncached steps; cost per step = (build time - build time of the
# same Dockerfile without RUN lines) / 20, for both builders.
{ echo "FROM $base"; } > "$work/ctx-true/Dockerfile.base"
run_rbuild() { "$bin" build --progress=plain --no-cache --root "$work/root-true" -f "$1" "$work/ctx-true" 2>/dev/null; }
# The same without the default process limit: what each step's pids cgroup costs.
run_rbuild_nolimit() { "$bin" build --progress=plain --no-cache --pids-limit 0 --root "$work/root-true" -f "$1" "$work/ctx-true" 2>/dev/null; }
run_buildah() { buildah --storage-driver=overlay bud --runtime=/usr/sbin/runc --isolation=oci --network=host -q --layers=false --pull-never --tls-verify=false -f "$1" "$work/ctx-true" >/dev/null 2>&1; }
buildah pull --tls-verify=false -q "docker://$base" >/dev/null
run_rbuild "$work/ctx-true/Dockerfile"   # warm the store
per_step() { # runner
  local a b t0 t1 t2
  t0=$(secs); $1 "$work/ctx-true/Dockerfile.base"; t1=$(secs); $1 "$work/ctx-true/Dockerfile"; t2=$(secs)
  python3 -c "print(f'{(($t2-$t1)-($t1-$t0))/20*1000:.1f}')"
}
r=$(per_step run_rbuild); r0=$(per_step run_rbuild_nolimit); b=$(per_step run_buildah)
printf '%-34s rbuild %7sms  buildah (runc) %7sms  ratio %5s\n' "fixed cost of one RUN true" "$r" "$b" "$(python3 -c "print(f'{$r/$b:.2f}')")"
printf '%-34s rbuild %7sms  rbuild --pids-limit 0 %7sms  ratio %5s\n' "the default process limit" "$r" "$r0" "$(python3 -c "print(f'{$r/$r0:.2f}')")"
