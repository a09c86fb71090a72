"""Generate the Python code for proto/jobtree/v1/*.proto into libs/jobtree/api/jobtree/v1/.

`make proto` runs this; `tools/check_proto_fresh.py` runs `generate` into a temporary directory
and compares. Output: `*_pb2.py` (messages), `*_pb2.pyi` (mypy-protobuf stubs) for every proto
file, and `*_pb2_grpc.py` / `*_pb2_grpc.pyi` for files that declare a service.

protoc writes imports rooted at the proto tree (`from jobtree.v1 import objects_pb2`), which would
clash with our own `jobtree` package; `fix_imports` re-roots them at `jobtree.api.jobtree.v1`,
the package the generated files live in. The generator versions are pinned in pyproject's `dev`
extra (grpcio-tools, mypy-protobuf) so that the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "libs" / "jobtree" / "api"
GENERATED = "jobtree"
"""The generated tree under OUT_ROOT (package `jobtree.api.jobtree`), replaced whole."""
PACKAGE_PREFIX = "jobtree.api"

_PROTO_IMPORT = re.compile(r"(?<![\w.])jobtree\.v1(?= import |\.\w+_pb2\b)")
_INIT = '"""Generated from proto/ by tools/gen_proto.py (`make proto`). Do not edit."""\n'


def _plugin(name: str) -> str:
    """The path of a protoc plugin script installed beside this interpreter (or on PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency, only when generating

    include = str(resources.files("grpc_tools") / "_proto")
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed: {' '.join(argv)}")


def fix_imports(text: str) -> str:
    """Re-root `jobtree.v1` imports and module names at `jobtree.api.jobtree.v1`."""
    return _PROTO_IMPORT.sub(f"{PACKAGE_PREFIX}.jobtree.v1", text)


def proto_files() -> list[str]:
    """The proto files, relative to proto/ (their import paths), sorted."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> Path:
    """Generate into `out_root/jobtree/` (replacing it); return that directory."""
    target = out_root / GENERATED
    if target.exists():
        shutil.rmtree(target)
    out_root.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    mypy = f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}"
    _protoc([mypy, f"--python_out={out_root}", f"--mypy_out=quiet:{out_root}", *files])
    services = [f for f in files if re.search(r"^service\s+\w+", (PROTO_ROOT / f).read_text(), re.M)]
    if services:
        mypy_grpc = f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}"
        _protoc([mypy_grpc, f"--grpc_python_out={out_root}", f"--mypy_grpc_out=quiet:{out_root}", *services])
    for path in sorted(target.rglob("*")):
        if path.suffix in (".py", ".pyi"):
            path.write_text(fix_imports(path.read_text()))
    for folder in [target, *sorted(p for p in target.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").write_text(_INIT)
    return target


def main() -> int:
    target = generate(OUT_ROOT)
    count = sum(1 for p in target.rglob("*") if p.is_file())
    print(f"generated {count} files into {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
