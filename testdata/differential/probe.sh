# What a RUN step sees (issue 18; tests/differential.rs): one section per aspect, `== NAME` first.
s() { echo "== $1"; }
s id; id
s umask; umask
s hostname; hostname
s env-keys; env | cut -d= -f1 | sort
s home; echo "$HOME"
s status; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|Seccomp|NoNewPrivs):' /proc/self/status | tr -s ' \t' ' '
s dev; ls -A /dev | sort
s mounts; awk '{ split($6, o, ","); print $5, o[1] }' /proc/self/mountinfo | sort
s sys; ls /sys | sort; touch /sys/x 2>/dev/null && echo sys-writable || echo sys-read-only
s cgroup; cut -d: -f3 /proc/self/cgroup | sort -u
s hosts; grep -c localhost /etc/hosts; grep -c "$(hostname)" /etc/hosts; (echo >> /etc/hosts) 2>/dev/null && echo hosts-writable || echo hosts-read-only
s resolv; (echo >> /etc/resolv.conf) 2>/dev/null && echo resolv-writable || echo resolv-read-only
s ulimits; ulimit -a | sort
