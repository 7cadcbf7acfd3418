"""The table of bench/peers.sh: per case and variant, the median wall time, CPU time and peak
RSS of each tool, and the median of the per-run ratios rbuild / best peer (the faster of
BuildKit and buildah in that run). In a push variant (build+push...), rbuild-oci is rbuild's
build alone with the same blobs made (an OCI layout output), and the last column is rbuild's
build+push over that build.

    python3 peers_table.py RESULTS   # lines: CASE VARIANT RUN TOOL WALL CPU RSS_MIB [OWN_RSS_MIB]

rbuild's cells also give its own process's peak RSS (the builder without its step helpers and
RUN processes), where the results have it.
"""
import statistics
import sys
from collections import defaultdict

rows = defaultdict(lambda: defaultdict(dict))  # (case, variant) -> run -> tool -> (w, c, r)
order = []
for line in open(sys.argv[1]):
    case, variant, run, tool, w, c, r, *own = line.split()
    key = (case, variant)
    if key not in order:
        order.append(key)
    num = lambda x: None if x in ("fail", "n/a") else float(x)
    rows[key][run][tool] = (num(w), num(c), num(r), num(own[0]) if own else None)

tools = ["rbuild", "buildkit", "buildah", "rbuild-oci"]
print("| case | " + " | ".join(f"{t} wall / CPU / RSS" for t in tools)
      + " | rbuild / best peer (wall) | rbuild-oci / BuildKit, or build+push / build (wall) |")
print("|---|" + "---|" * (len(tools) + 2))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


for key in order:
    runs = rows[key]
    cells = []
    for t in tools:
        w = med([runs[r].get(t, (None,) * 3)[0] for r in runs])
        c = med([runs[r].get(t, (None,) * 3)[1] for r in runs])
        m = med([runs[r].get(t, (None,) * 3)[2] for r in runs])
        o = med([(runs[r].get(t, (None,) * 4) + (None,))[3] for r in runs])
        own = f" (own {o:.0f})" if o is not None and t.startswith("rbuild") else ""
        cells.append("n/a" if w is None else f"{w:.2f} s / {c:.2f} s / {m:.0f} MiB{own}")
    ratios = []
    for r in runs.values():
        mine = r.get("rbuild", (None,))[0]
        peers = [r.get(t, (None,))[0] for t in ("buildkit", "buildah")]
        peers = [p for p in peers if p]
        if mine and peers:
            ratios.append(mine / min(peers))
    ratio = med(ratios)
    # In a push variant: rbuild's build+push over its build alone.
    base = "rbuild-oci" if key[1].startswith("build+push") else "buildkit"
    top = "rbuild" if base == "rbuild-oci" else "rbuild-oci"
    oci = med([r[top][0] / r[base][0] for r in runs.values()
               if r.get(top, (None,))[0] and r.get(base, (None,))[0]])
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
    print(f"| {key[0]} {key[1]} | " + " | ".join(cells) + f" | {fmt(ratio)} | {fmt(oci)} |")
