"""Reading manifest files: bounded, strict YAML or JSON, each document through the schema and the core.

Part of `kubectl-runs` (`jobtree.cli.runs`): see the package docstring for the contract.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobtree.cli.runs.options import Json, RunsError

# ================================================================================================
# Manifests
# ================================================================================================


@dataclass(frozen=True)
class Manifest:
    where: str
    """`FILE` or `FILE[i]` (the i-th document, 0-based, when the file holds several)."""
    doc: Json
    kind: str
    key: str
    """`namespace/name` of a Run, the name of a Budget."""


MAX_FILE_BYTES = 4 * 1024 * 1024
"""The largest manifest file (or standard input) read; the gateway takes no larger request."""


def _read_text(name: str) -> str:
    too_big = f"{name}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; manifest files may be at most that"
    if name == "-":
        text = sys.stdin.read(MAX_FILE_BYTES + 1)
        if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
            raise RunsError(too_big)
        return text
    path = Path(name)
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise RunsError(too_big)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunsError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RunsError(f"{name}: is a directory, not a manifest file") from None
    except UnicodeDecodeError:
        raise RunsError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise RunsError(f"{name}: cannot read: {e.strerror or e}") from None


def _load_documents(text: str, name: str) -> list[object]:
    from jobtree.sim.scenario import ScenarioError, load_yaml_all

    try:
        docs = load_yaml_all(text)
    except ScenarioError as e:
        raise RunsError(f"{name}: {e}") from None
    out: list[object] = []
    for doc in docs:
        if isinstance(doc, list):
            out.extend(doc)
        elif isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


def read_manifests(files: Sequence[str], namespace: str, kinds: Sequence[str] = ("Run", "Budget")) -> list[Manifest]:
    """Every document of `files`, checked through the schema and the core (RunsError naming it)."""
    from jobtree.api import convert
    from jobtree.core.errors import ValidationError

    out: list[Manifest] = []
    for name in files:
        docs = _load_documents(_read_text(name), name)
        if not docs:
            raise RunsError(f"{name}: no manifest in the file")
        for i, doc in enumerate(docs):
            where = f"{name}[{i}]" if len(docs) > 1 else name
            if isinstance(doc, dict) and doc.get("kind") == "Run":
                meta = doc.get("metadata")
                if isinstance(meta, dict) and meta.get("namespace") is None:
                    doc = {**doc, "metadata": {**meta, "namespace": namespace}}
            try:
                parsed = convert.parse_manifest(doc)
            except ValidationError as err:
                raise RunsError(f"{where}: {err}") from None
            assert isinstance(doc, dict)
            kind = str(doc["kind"])
            if kind not in kinds:
                raise RunsError(f"{where}: kind {kind} is not accepted here; expected {' or '.join(kinds)}")
            model = parsed.model
            key = model.key if kind == "Run" else model.name  # type: ignore[union-attr]
            out.append(Manifest(where, doc, kind, key))
    return out
