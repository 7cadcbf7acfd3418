#!/usr/bin/env bash
# Four independent ~5 s stages and a final stage copying from all four (testdata/parallel):
# wall time of the whole build against the time of one stage alone, for rbuild (--jobs 4 and
# --jobs 1, the sequential way) and for buildah (--jobs 4) in the same run. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/rbuild
dpkg -s buildah >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah runc >/dev/null
cp /bin/busybox testdata/parallel/busybox
work=$(mktemp -d /var/tmp/rbuild-par.XXXXXX)
trap 'rm -rf "$work"' EXIT
secs() { python3 -c 'import time; print(f"{time.time():.3f}")'; }
timed() { local t0 t1; t0=$(secs); "$@" >/dev/null 2>&1; t1=$(secs); python3 -c "print(f'{$t1-$t0:.2f}')"; }
rb() { "$bin" build --progress=plain --no-cache --root "$work/root" "$@" testdata/parallel; }
bh() { buildah --storage-driver=overlay bud --runtime=/usr/sbin/runc --isolation=oci --network=host -q --layers=false "$@" testdata/parallel; }
rb --target tools >/dev/null 2>&1   # warm
one=$(timed rb --target a)
alld=$(timed rb)
all4=$(timed rb --jobs 4)
all1=$(timed rb --jobs 1)
bone=$(timed bh --target a)
ball=$(timed bh --jobs 4)
r() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '%-44s %6ss\n' "rbuild, one stage alone (--target a)" "$one"
printf '%-44s %6ss   wall/longest stage %s\n' "rbuild, whole build, default --jobs ($(nproc))" "$alld" "$(r "$alld" "$one")"
printf '%-44s %6ss   wall/longest stage %s\n' "rbuild, whole build --jobs 4" "$all4" "$(r "$all4" "$one")"
printf '%-44s %6ss   wall/longest stage %s\n' "rbuild, whole build --jobs 1 (sequential)" "$all1" "$(r "$all1" "$one")"
printf '%-44s %6ss\n' "buildah 1.28, one stage alone" "$bone"
printf '%-44s %6ss   wall/longest stage %s\n' "buildah 1.28, whole build --jobs 4" "$ball" "$(r "$ball" "$bone")"
printf '%-44s %s\n' "rbuild --jobs 4 wall / buildah --jobs 4 wall" "$(r "$all4" "$ball")"
