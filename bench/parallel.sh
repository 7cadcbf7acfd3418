#!/usr/bin/env bash
# Four independent ~5 s stages and a final stage copying from all four (testdata/parallel):
# wall time of the whole build against the time of one stage alone, for rbuild with no flags,
# for BuildKit (Debian's docker.io 20.10, a private daemon: bench/lib/buildkit.sh) and for
# buildah (--jobs 4), in the same run. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/rbuild
dpkg -s buildah >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah runc >/dev/null
cp /bin/busybox testdata/parallel/busybox
work=$(mktemp -d /var/tmp/rbuild-par.XXXXXX)
. bench/lib/buildkit.sh
buildkit_up "$work/dockerd"
trap 'buildkit_down; rm -rf "$work"' EXIT
secs() { python3 -c 'import time; print(f"{time.time():.3f}")'; }
timed() { local t0 t1; t0=$(secs); "$@" >/dev/null 2>&1; t1=$(secs); python3 -c "print(f'{$t1-$t0:.2f}')"; }
rb() { "$bin" build --progress=plain --no-cache --root "$work/root" "$@" testdata/parallel; }
bh() { buildah --storage-driver=overlay bud --runtime=/usr/sbin/runc --isolation=oci --network=host -q --layers=false "$@" testdata/parallel; }
bk() { bk_build --no-cache -q "$@" testdata/parallel; }
echo "$(date -u +%F) load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
rb --target tools >/dev/null 2>&1   # warm
bk --target tools >/dev/null 2>&1
one=$(timed rb --target a)
alld=$(timed rb)
kone=$(timed bk --target a)
kall=$(timed bk)
bone=$(timed bh --target a)
ball=$(timed bh --jobs 4)
r() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '%-44s %6ss\n' "rbuild, one stage alone (--target a)" "$one"
printf '%-44s %6ss   wall/longest stage %s\n' "rbuild, whole build, no flags" "$alld" "$(r "$alld" "$one")"
printf '%-44s %6ss\n' "BuildKit (docker.io $(bk_version)), one stage" "$kone"
printf '%-44s %6ss   wall/longest stage %s\n' "BuildKit, whole build" "$kall" "$(r "$kall" "$kone")"
printf '%-44s %6ss\n' "buildah 1.28, one stage alone" "$bone"
printf '%-44s %6ss   wall/longest stage %s\n' "buildah 1.28, whole build --jobs 4" "$ball" "$(r "$ball" "$bone")"
printf '%-44s %s\n' "rbuild wall / BuildKit wall" "$(r "$alld" "$kall")"
printf '%-44s %s\n' "rbuild wall / buildah --jobs 4 wall" "$(r "$alld" "$ball")"
