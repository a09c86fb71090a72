"""Fail when the committed generated code differs from what proto/ generates now.

Regenerates into a temporary directory with tools/gen_proto.py and compares it, file by file,
with libs/jobtree/api/jobtree/. Run by `make test`; fix a failure with `make proto` and commit.
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_proto  # a sibling script, not a package


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> list[str]:
    """The problems found (empty when fresh)."""
    committed_root = gen_proto.OUT_ROOT / gen_proto.GENERATED
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _files(gen_proto.generate(Path(tmp)))
    committed = _files(committed_root) if committed_root.exists() else {}
    where = committed_root.relative_to(gen_proto.ROOT).as_posix()
    problems: list[str] = []
    for name in sorted(fresh.keys() - committed.keys()):
        problems.append(f"missing: {where}/{name}")
    for name in sorted(committed.keys() - fresh.keys()):
        problems.append(f"not generated from proto/ any more: {where}/{name}")
    for name in sorted(fresh.keys() & committed.keys()):
        if fresh[name] != committed[name]:
            diff = difflib.unified_diff(
                committed[name].splitlines(), fresh[name].splitlines(),
                f"committed/{name}", f"fresh/{name}", lineterm="", n=1,
            )
            problems.append(f"stale: {where}/{name}\n" + "\n".join(list(diff)[:20]))
    return problems


def main() -> int:
    problems = check()
    where = (gen_proto.OUT_ROOT / gen_proto.GENERATED).relative_to(gen_proto.ROOT)
    if problems:
        print(f"generated code in {where} is not fresh with respect to proto/:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("run `make proto` and commit the result", file=sys.stderr)
        return 1
    print(f"generated code in {where} is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
