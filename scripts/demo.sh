#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install what is needed, build rbuild, build the
# demo image (FROM scratch + a static busybox, with RUN steps) fully offline, and check the
# result with skopeo and umoci.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cp /bin/busybox testdata/demo/busybox
out=${1:-target/demo}
rm -rf "$out"; mkdir -p "$out"
./target/release/rbuild build -t demo:latest --output "type=oci,dest=$out/oci" testdata/demo
skopeo inspect "oci:$out/oci:latest" | head -20
umoci unpack --rootless --image "$out/oci:latest" "$out/bundle" >/dev/null
echo "demo: $out/bundle/rootfs/srv/built.txt says: $(cat "$out/bundle/rootfs/srv/built.txt")"
