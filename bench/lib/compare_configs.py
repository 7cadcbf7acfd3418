"""Compares two image configs (bench/corpus.sh): rbuild's, from an OCI layout, and BuildKit's,
from `docker save`. Every key of `config` (Env, Cmd, Entrypoint, User, WorkingDir, Labels,
ExposedPorts, Volumes, StopSignal, Healthcheck, ...), the platform and the layer count are
compared; empty values count as absent. Keys matching a line of the allowed-differences file
(as `config.KEY`, a regular expression, then `# reason`) are reported as allowed."""
import json, os, sys, tarfile

from allowed import load_allowed

def oci_config(layout):
    def blob(digest):
        algo, hexd = digest.split(":", 1)
        with open(os.path.join(layout, "blobs", algo, hexd)) as f:
            return json.load(f)
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    manifest = blob(index["manifests"][0]["digest"])
    if "manifests" in manifest:  # an index: the first image
        manifest = blob(manifest["manifests"][0]["digest"])
    return blob(manifest["config"]["digest"])

def saved_config(archive):
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        return json.load(t.extractfile(manifest[0]["Config"]))

def flatten(cfg):
    out = {f"config.{k}": v for k, v in (cfg.get("config") or {}).items() if v not in (None, "", [], {})}
    for k in ("architecture", "os", "variant"):
        if cfg.get(k):
            out[k] = cfg[k]
    out["layers"] = len((cfg.get("rootfs") or {}).get("diff_ids") or [])
    return out

def main():
    rb_layout, bk_archive, allowed_file, name = sys.argv[1:5]
    allowed = load_allowed(allowed_file)
    a, b = flatten(oci_config(rb_layout)), flatten(saved_config(bk_archive))
    problems, explained = [], []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        line = f"  {k}: rbuild {json.dumps(a.get(k))} vs BuildKit {json.dumps(b.get(k))}"
        why = next((w for r, w in allowed if r.search(k)), None)
        (problems if why is None else explained).append(line + ("" if why is None else f"  (allowed: {why})"))
    print(f"{name}: config, {len(a)} keys (rbuild), {len(b)} (BuildKit); {len(explained)} allowed differences, {len(problems)} others")
    for line in explained + problems:
        print(line)
    sys.exit(1 if problems else 0)

main()
