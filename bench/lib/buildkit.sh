# Sourced by the benchmarks: a private dockerd 20.10 (Debian's docker.io, BuildKit built in) as
# the peer, with its own socket, data root and no bridge, so it changes nothing of the
# machine's network and shares nothing with another daemon. Needs root.
#   buildkit_up DIR     starts it (installs docker.io if missing); sets BK_DOCKER; more
#                       dockerd options in $BK_EXTRA
#   bk_build ARGS...    DOCKER_BUILDKIT=1 docker build with its own 20.10 client
#   buildkit_down       stops it
buildkit_up() {
  local dir=$1
  dpkg -s docker.io >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  mkdir -p "$dir"
  dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$dir/docker.sock" \
    --pidfile "$dir/pid" --bridge=none --iptables=false --ip-masq=false ${BK_EXTRA:-} >"$dir/log" 2>&1 &
  BK_DIR=$dir
  BK_DOCKER="unix://$dir/docker.sock"
  for _ in $(seq 100); do
    DOCKER_HOST=$BK_DOCKER /usr/bin/docker info >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "dockerd did not start: $(tail -3 "$dir/log")" >&2
  return 1
}
# The 20.10 client (a newer one on PATH may want buildx); RUN on the host network, as rbuild's.
bk_build() { DOCKER_BUILDKIT=1 DOCKER_HOST=$BK_DOCKER /usr/bin/docker build --network=host "$@"; }
bk_version() { DOCKER_HOST=$BK_DOCKER /usr/bin/docker version --format '{{.Server.Version}}'; }
buildkit_down() {
  [ -n "${BK_DIR:-}" ] && [ -f "$BK_DIR/pid" ] && kill "$(cat "$BK_DIR/pid")" 2>/dev/null || true
  sleep 1
  umount -R "$BK_DIR/exec" 2>/dev/null || true
  umount -R "$BK_DIR/data" 2>/dev/null || true
  rm -rf "$BK_DIR"
}
