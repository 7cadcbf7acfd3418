"""The allowed-differences file of a corpus case (bench/corpus.sh): one regular expression per
line, then `# reason`; blank lines and lines starting with `#` are skipped."""
import os, re

def load_allowed(path):
    """[(compiled pattern, reason)] from `path`; none where it does not exist."""
    allowed = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                pat, _, why = line.partition("#")
                allowed.append((re.compile(pat.strip()), why.strip()))
    return allowed
