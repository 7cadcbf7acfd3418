#!/usr/bin/env bash
# The realistic corpus (testdata/corpus/*): each Dockerfile built with rbuild and with BuildKit
# (Debian's docker.io, a private daemon: bench/lib/buildkit.sh), and the two root filesystems
# compared entry by entry (type, mode, owner, size, content hash, link target), and the two
# image configs key by key (bench/lib/compare_configs.py). What may
# differ is listed, with its reason, in each case's `differences` (one regular expression of
# paths per line, `# reason` after it). Slow (package downloads): opt-in, not in CI. Needs root.
#   bench/corpus.sh              # every case
#   bench/corpus.sh c-multistage # one
set -euo pipefail
. "$(dirname "$0")/lib/setup.sh"
work=$(mktemp -d /var/tmp/rbuild-corpus.XXXXXX)
. bench/lib/buildkit.sh
reg=$("$tb/registry-up" 0 "$work/registry")
buildkit_up "$work/dockerd"
trap 'buildkit_down; "$tb/registry-down" "${reg##*:}" "$work/registry" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
"$tb/make-base-images" "$reg" >"$work/base.log" 2>&1 || { tail "$work/base.log"; exit 1; }
# The network's CA bundle, for steps that speak TLS (`--mount=type=secret,id=cacert`): a
# TLS-inspecting proxy's CA is in the machine's bundle, never in the images'.
cacert=${CORPUS_CACERT:-/etc/ssl/certs/ca-certificates.crt}
cases=${*:-$(ls -d testdata/corpus/*/ | xargs -n1 basename)}
echo "$(date -u +%F) load $(cut -d' ' -f1-3 /proc/loadavg); BuildKit: docker.io $(bk_version)"
status=0
for c in $cases; do
  src=testdata/corpus/$c
  ctx=$work/ctx-$c
  mkdir -p "$ctx"
  [ -d "$src/context" ] && cp -a "$src/context/." "$ctx/"
  sed -e "s#{{BUSYBOX}}#$reg/busybox:latest#g" -e "s#{{DEBIAN}}#$reg/debian:bookworm#g" \
    "$src/Dockerfile" >"$ctx/Dockerfile"
  t0=$(date +%s.%N)
  "$bin" build --progress=plain --root "$work/root" --secret "id=cacert,src=$cacert" --output "type=local,dest=$work/rb-$c" \
    --output "type=oci,dest=$work/rb-$c.oci" "$ctx" \
    >"$work/rb-$c.log" 2>&1 || { echo "$c: rbuild failed"; tail -5 "$work/rb-$c.log"; status=1; continue; }
  t1=$(date +%s.%N)
  if [ -f "$src/rbuild-only" ]; then
    echo "$c: built by rbuild only: $(cat "$src/rbuild-only")"
    continue
  fi
  # A tar keeps owners (the local exporter writes everything as the client's user).
  bk_build --no-cache --secret "id=cacert,src=$cacert" -o "type=tar,dest=$work/bk-$c.tar" "$ctx" >"$work/bk-$c.log" 2>&1 ||
    { echo "$c: BuildKit failed"; tail -5 "$work/bk-$c.log"; status=1; continue; }
  mkdir -p "$work/bk-$c"
  tar -xpf "$work/bk-$c.tar" --same-owner --numeric-owner --warning=no-timestamp -C "$work/bk-$c"
  t2=$(date +%s.%N)
  python3 bench/lib/compare_trees.py "$work/rb-$c" "$work/bk-$c" "$src/differences" "$c" || status=1
  # The config: the same build again (cached) into the daemon's image store, then saved.
  bk_build --secret "id=cacert,src=$cacert" -t "rbuild-corpus-$c" "$ctx" >>"$work/bk-$c.log" 2>&1 &&
    DOCKER_HOST=$BK_DOCKER /usr/bin/docker save -o "$work/bk-$c.image.tar" "rbuild-corpus-$c" &&
    python3 bench/lib/compare_configs.py "$work/rb-$c.oci" "$work/bk-$c.image.tar" "$src/differences" "$c" ||
    status=1
  python3 -c "print(f'$c: rbuild {$t1-$t0:.1f} s, BuildKit {$t2-$t1:.1f} s, ratio {($t1-$t0)/($t2-$t1):.2f}')"
done
exit $status
