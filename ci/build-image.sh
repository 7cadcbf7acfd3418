#!/usr/bin/env bash
# Builds rbuild's own image (ci/Dockerfile) with rbuild itself.
#
#   ci/build-image.sh [--base REF] [--rbuild BIN] [RBUILD BUILD OPTIONS...]
#
#   --base REF    the Debian 12 base image (default: debian:bookworm; build args of the same
#                 name work too). Offline: scripts/testbed/make-base-images REG pushes one.
#   --rbuild BIN  the rbuild binary to put into the image, also the one that builds it
#                 (default: the static release binary, `scripts/release.sh --binary-only`)
#
# Everything else goes to `rbuild build`, e.g. `-t reg.example/rbuild:1 --push` or
# `--output type=oci,dest=out/rbuild-image`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
base=debian:bookworm
bin=
while [ $# -gt 0 ]; do
  case $1 in
    --base) base=$2; shift 2 ;;
    --rbuild) bin=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$bin" ]; then
  bin=$(bash "$here/../scripts/release.sh" --binary-only)
fi
[ -x "$bin" ] || { echo "build-image: $bin is not an executable rbuild binary" >&2; exit 1; }
# Only the binary goes into the named context, not a whole target directory.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$bin" "$stage/rbuild"
"$bin" build -f "$here/Dockerfile" --build-context "bin=$stage" --build-arg "BASE=$base" "$@" "$here"
