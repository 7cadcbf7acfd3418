"""Peak RSS of a cgroup's process tree: every 50 ms, the sum of VmRSS over the processes of
the v1 memory cgroup CGROUP and every cgroup below it, until the file STOP exists; the
largest sum, in bytes, goes to OUT.

    python3 treerss.py CGROUP STOP OUT
"""
import os
import sys
import time

cgroup, stop, out = sys.argv[1:4]


def pids():
    for d, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    yield from (int(p) for p in f.read().split())
            except OSError:
                pass


def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


peak = 0
while True:
    peak = max(peak, sum(rss(p) for p in pids()))
    if os.path.exists(stop):
        break
    time.sleep(0.05)
with open(out, "w") as f:
    f.write(str(peak))
