"""Write the generated deployment files — the CRDs and the kustomize base and overlays
(`jobtree.cli.kustomize.files()`) into deploy/kustomize/, the Grafana dashboards
(`jobtree.cli.grafana.files()`) into deploy/grafana/ — or check them.

`make crds` runs this; `make crds-check` (part of `make test`) runs it with `--check`, which
writes nothing and exits 1 naming every file that is missing, stale or not generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = (("deploy/kustomize", "jobtree.cli.kustomize", ("*.yaml", "*.conf")),
         ("deploy/grafana", "jobtree.cli.grafana", ("*.json",)))


def _present(out: Path, patterns: tuple[str, ...]) -> set[str]:
    if not out.is_dir():
        return set()
    return {str(p.relative_to(out)) for pattern in patterns for p in out.rglob(pattern)}


def main(argv: list[str]) -> int:
    import importlib

    sys.path.insert(0, str(ROOT / "libs"))
    status = 0
    for where, module, patterns in TREES:
        out = ROOT / where
        wanted: dict[str, str] = importlib.import_module(module).files()
        if "--check" in argv:
            stale = sorted(n for n, text in wanted.items() if not (out / n).is_file() or (out / n).read_text() != text)
            extra = sorted(_present(out, patterns) - set(wanted))
            if stale or extra:
                print(f"generated files in {where} are stale: {', '.join(stale + extra)}; run `make crds`")
                status = 1
            else:
                print(f"generated files in {where} are fresh ({len(wanted)} files)")
            continue
        for old in _present(out, patterns) - set(wanted):
            (out / old).unlink()
        for name, text in wanted.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
        print(f"wrote {len(wanted)} files into {where}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
