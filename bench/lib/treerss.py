"""Peak RSS of a cgroup's process tree: every 50 ms, the sum of VmRSS over the processes of
the v1 memory cgroup CGROUP and every cgroup below it, until the file STOP exists. OUT gets
the largest sum and the peak RSS of the tool's own process alone (the one whose parent is
outside the cgroup: for rbuild, the builder without its step helpers and RUN processes; its
VmHWM, which the kernel keeps, so no peak falls between two samples), in bytes, separated by
a space.

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


def status(pid):
    """(VmRSS, VmHWM in bytes, parent pid) of pid."""
    rss, hwm, ppid = 0, 0, 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith("PPid:"):
                    ppid = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm, ppid


peak = own = 0
while True:
    st = {p: status(p) for p in pids()}
    peak = max(peak, sum(r for r, _, _ in st.values()))
    own = max([own] + [h for _, h, pp in st.values() if pp not in st])
    if os.path.exists(stop):
        break
    time.sleep(0.05)
with open(out, "w") as f:
    f.write(f"{peak} {own}")
