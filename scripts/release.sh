#!/usr/bin/env bash
# Makes a release of rbuild in dist/:
#   rbuild-VERSION-x86_64-linux              the binary: statically linked, stripped
#   rbuild-VERSION-x86_64-linux.sha256       its checksum (sha256sum -c reads it)
#   rbuild-VERSION-x86_64-linux.cdx.json     an SBOM of the crates in it (CycloneDX 1.5)
#   rbuild-VERSION-completions/              bash, zsh and fish completions
#   rbuild-VERSION-man/                      man pages (rbuild.1, rbuild-build.1, ...)
#
#   scripts/release.sh                 glibc, linked statically (-C target-feature=+crt-static)
#   scripts/release.sh --binary-only   the binary and its checksum alone (the test suite's);
#                                      prints the binary's path
#   RBUILD_TARGET=x86_64-unknown-linux-musl scripts/release.sh
#                                      musl, where that target is installed
#                                      (rustup target add x86_64-unknown-linux-musl)
#
# Static glibc is what these machines can make (only the gnu target is installed, and no
# other can be fetched). rbuild resolves registry names through getaddrinfo, which a static
# glibc still answers from /etc/hosts and DNS (nss "files" and "dns" are built in) but not
# through other NSS modules (LDAP, mDNS); musl has the same limit.
#
# The binary is the `dist` profile of Cargo.toml: no debug information, stripped. The test
# suite runs against it (scripts/test-inner.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
binary_only=false
case ${1:-} in
  --binary-only) binary_only=true ;;
  "") ;;
  *) echo "usage: scripts/release.sh [--binary-only]" >&2; exit 2 ;;
esac
export PATH="$HOME/.cargo/bin:$PATH"
target=${RBUILD_TARGET:-x86_64-unknown-linux-gnu}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
name=rbuild-$version-x86_64-linux
# With --target given, RUSTFLAGS reach only what runs on the target: build scripts and proc
# macros stay dynamic, as they must.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile dist --locked -q --target "$target" -p rbuild
bin=${CARGO_TARGET_DIR:-target}/$target/dist/rbuild
# ldd (Debian's libc-bin, always there) names a static binary, PIE or not.
if ! ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
  echo "release: $bin is not statically linked: $(ldd "$bin" 2>&1 | head -3)" >&2
  exit 1
fi
mkdir -p dist
tmp=$(mktemp -d dist/.release.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cp "$bin" "$tmp/$name"
(cd "$tmp" && sha256sum "$name" >"$name.sha256")
if $binary_only; then
  mv "$tmp/$name" "$tmp/$name.sha256" dist/
  echo "$PWD/dist/$name"
  exit 0
fi
mkdir -p "$tmp/$name-completions"
for sh in bash zsh fish; do "$tmp/$name" completion $sh >"$tmp/$name-completions/rbuild.$sh"; done
"$tmp/$name" man --dir "$tmp/$name-man"
mv "$tmp/$name-completions" "$tmp/rbuild-$version-completions"
mv "$tmp/$name-man" "$tmp/rbuild-$version-man"

# The SBOM: cargo-cyclonedx (the CycloneDX project's own tool) over the lock file, for the
# target's dependencies only. Installed once, at a pinned version, into target/tools.
tools=${CARGO_TARGET_DIR:-target}/tools
if [ ! -x "$tools/bin/cargo-cyclonedx" ]; then
  echo "release: installing cargo-cyclonedx 0.5.9 into $tools (once)" >&2
  cargo install -q --locked --root "$tools" cargo-cyclonedx --version 0.5.9
fi
# It writes one per workspace crate; the root's covers the binary, the others included.
PATH="$tools/bin:$PATH" cargo cyclonedx -q --format json --spec-version 1.5 \
  --target "$target" --override-filename "$name.cdx" --manifest-path Cargo.toml
mv "$name.cdx.json" "$tmp/"
rm -f ./*/"$name.cdx.json"

for f in "$tmp"/*; do rm -rf "dist/$(basename "$f")"; mv "$f" dist/; done
size=$(stat -c %s "dist/$name")
echo "release: dist/$name ($((size / 1024 / 1024)) MiB, $(cut -d' ' -f1 "dist/$name.sha256"))" >&2
