"""The federation's configuration: the member clusters and the aggregate caps that span them.

Part of the federation service (see its package docstring). `load(path)` / `parse(doc)` give a
`Config` or raise `ConfigError` naming the field (`caps[0].maxConcurrency: must be ...`), so
`jobtree serve federation --config FILE` exits 2 with one line. The file:

    apiVersion: rq.davidlangworthy.io/v1
    kind: Federation
    clusters: [gpu-a, gpu-b]          # DNS labels, at least two
    every: 1s                         # a round: ask every cluster, rebalance (default 1s)
    caps:
      - cap: vision/all               # `budget/capName`: the Budget and its aggregateCaps entry,
        maxConcurrency: 32            # applied in every member cluster
        maxGPUHours: 5000             # optional: the GPU-hours the clusters may spend together

The cap here is the one in force across clusters (each cluster's Budget may say more: its own
bound only matters when the cluster is not federated). Editing the file changes a cap within a
round (a lower is in force once the held allowances fit under it, §9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobtree.bus.subjects import check_cluster
from jobtree.core.errors import ValidationError
from jobtree.core.timefmt import parse_duration

KIND = "Federation"
API_VERSION = "rq.davidlangworthy.io/v1"


class ConfigError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class Cap:
    name: str
    """`budget/capName`."""
    max_concurrency: int
    max_gpu_hours: float | None = None


@dataclass(frozen=True)
class Config:
    clusters: tuple[str, ...]
    caps: tuple[Cap, ...]
    every: float = 1.0


def _keys(doc: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{path}{key}", f"unknown field; fields: {', '.join(allowed)}")


def parse(doc: Any) -> Config:
    if not isinstance(doc, dict):
        raise ConfigError("", f"must be a mapping (kind: {KIND}), got {type(doc).__name__}")
    _keys(doc, "", ("apiVersion", "kind", "clusters", "every", "caps"))
    if doc.get("kind", KIND) != KIND:
        raise ConfigError("kind", f"must be {KIND}, got {doc.get('kind')!r}")
    clusters = doc.get("clusters")
    if not isinstance(clusters, list) or len(clusters) < 2:
        raise ConfigError("clusters", "must list at least two cluster names")
    for i, c in enumerate(clusters):
        try:
            check_cluster(c if isinstance(c, str) else "")
        except ValueError as e:
            raise ConfigError(f"clusters[{i}]", str(e)) from None
    if len(set(clusters)) != len(clusters):
        raise ConfigError("clusters", "names a cluster twice")
    every = 1.0
    if "every" in doc:
        try:
            every = float(parse_duration(str(doc["every"]), "every"))
        except ValidationError as e:
            raise ConfigError("every", e.problem) from None
        if not 0 < every <= 3600:
            raise ConfigError("every", f"must be between 1s and 1h, got {doc['every']!r}")
    caps_doc = doc.get("caps", [])
    if not isinstance(caps_doc, list):
        raise ConfigError("caps", "must be a list of caps")
    caps: list[Cap] = []
    for i, item in enumerate(caps_doc):
        path = f"caps[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, "must be a mapping with cap and maxConcurrency")
        _keys(item, f"{path}.", ("cap", "maxConcurrency", "maxGPUHours"))
        name = item.get("cap")
        if not isinstance(name, str) or name.count("/") != 1 or not all(name.split("/")):
            raise ConfigError(f"{path}.cap", f"must be budget/capName, got {name!r}")
        if any(c.name == name for c in caps):
            raise ConfigError(f"{path}.cap", f"{name} is listed twice")
        conc = item.get("maxConcurrency")
        if isinstance(conc, bool) or not isinstance(conc, int) or conc < 0:
            raise ConfigError(f"{path}.maxConcurrency", f"must be a non-negative integer, got {conc!r}")
        hours = item.get("maxGPUHours")
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, int | float)
                                  or not math.isfinite(hours) or hours < 0):
            raise ConfigError(f"{path}.maxGPUHours", f"must be a non-negative number, got {hours!r}")
        caps.append(Cap(name, conc, None if hours is None else float(hours)))
    return Config(tuple(clusters), tuple(caps), every)


def load(path: str | Path) -> Config:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"not YAML: {' '.join(str(e).split())}") from None
    return parse(doc)
