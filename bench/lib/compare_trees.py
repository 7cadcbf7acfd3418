"""Compares two root filesystems entry by entry (bench/corpus.sh): every path in either, its
type, permission bits, owner, size, content hash and link target. Paths matching a line of the
allowed-differences file (a regular expression, then `# reason`) are reported as allowed."""
import hashlib, os, stat, sys

from allowed import load_allowed

def walk(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = "/" + os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            rec = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "owner": f"{st.st_uid}:{st.st_gid}"}
            if stat.S_ISLNK(st.st_mode):
                rec["link"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                rec["sha"] = h.hexdigest()[:16]
            out[rel] = rec
    return out

def main():
    a_root, b_root, allowed_file, name = sys.argv[1:5]
    allowed = load_allowed(allowed_file)
    a, b = walk(a_root), walk(b_root)
    problems, explained = [], {}
    for p in sorted(set(a) | set(b)):
        ra, rb = a.get(p), b.get(p)
        if ra == rb:
            continue
        if ra is None:
            what = "only in BuildKit's"
        elif rb is None:
            what = "only in rbuild's"
        else:
            what = ", ".join(f"{k} {ra.get(k)} vs {rb.get(k)}" for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k))
        why = next((w for r, w in allowed if r.search(p)), None)
        if why is None:
            problems.append(f"  {p}: {what}")
        else:
            explained.setdefault(why, []).append(p)
    print(f"{name}: {len(a)} entries (rbuild), {len(b)} (BuildKit); {sum(map(len, explained.values()))} allowed differences, {len(problems)} others")
    for why, ps in explained.items():
        print(f"  allowed ({why}): {len(ps)}, e.g. {ps[0]}")
    for p in problems[:40]:
        print(p)
    sys.exit(1 if problems else 0)

main()
