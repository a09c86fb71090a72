"""Write the CRDs (`jobtree.api.crds.files()`) into deploy/kustomize/base/crds/, or check them.

`make crds` runs this; `make crds-check` (part of `make test`) runs it with `--check`, which
writes nothing and exits 1 naming every file that is missing, stale or not generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "kustomize" / "base" / "crds"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "libs"))
    from jobtree.api.crds import files

    wanted = files()
    if "--check" in argv:
        present = {p.name for p in OUT.glob("*.yaml")} if OUT.is_dir() else set()
        stale = sorted(n for n, text in wanted.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text)
        extra = sorted(present - set(wanted))
        if stale or extra:
            print(f"CRDs in {OUT.relative_to(ROOT)} are stale: {', '.join(stale + extra)}; run `make crds`")
            return 1
        print(f"CRDs in {OUT.relative_to(ROOT)} are fresh ({len(wanted)} files)")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.yaml"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(wanted)} files into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
