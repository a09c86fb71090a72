"""Write the generated deployment files — the CRDs and the kustomize base and overlays
(`jobtree.cli.kustomize.files()`) — into deploy/kustomize/, or check them.

`make crds` runs this; `make crds-check` (part of `make test`) runs it with `--check`, which
writes nothing and exits 1 naming every file that is missing, stale or not generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "kustomize"
GENERATED = ("*.yaml", "*.conf")


def _present() -> set[str]:
    if not OUT.is_dir():
        return set()
    return {str(p.relative_to(OUT)) for pattern in GENERATED for p in OUT.rglob(pattern)}


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "libs"))
    from jobtree.cli.kustomize import files

    wanted = files()
    where = OUT.relative_to(ROOT)
    if "--check" in argv:
        stale = sorted(n for n, text in wanted.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text)
        extra = sorted(_present() - set(wanted))
        if stale or extra:
            print(f"generated files in {where} are stale: {', '.join(stale + extra)}; run `make crds`")
            return 1
        print(f"generated files in {where} are fresh ({len(wanted)} files)")
        return 0
    for old in _present() - set(wanted):
        (OUT / old).unlink()
    for name, text in wanted.items():
        (OUT / name).parent.mkdir(parents=True, exist_ok=True)
        (OUT / name).write_text(text)
    print(f"wrote {len(wanted)} files into {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
