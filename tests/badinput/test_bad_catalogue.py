"""The catalogue itself: at least 60 cases over every surface the issue names, ids unique.

Surfaces: gRPC requests (`test_bad_grpc`), manifests and arguments of `kubectl-runs` (`test_bad_cli`),
scenario and config files of `jobtree` (`test_bad_files`), garbled bus messages (`test_bad_bus`) and
custom resources through the kube-bridge (`test_bad_crs`).
"""

from __future__ import annotations

import test_bad_bus
import test_bad_cli
import test_bad_crs
import test_bad_files
import test_bad_grpc


def test_the_catalogue_covers_every_surface_with_at_least_60_cases() -> None:
    tables = {"grpc": test_bad_grpc.CASES, "cli": test_bad_cli.CASES, "files": test_bad_files.CASES, "bus": test_bad_bus.CASES,
              "crs": test_bad_crs.CASES}
    assert all(len(cases) >= 5 for cases in tables.values()), {k: len(v) for k, v in tables.items()}
    assert sum(len(cases) for cases in tables.values()) >= 60
    for surface, cases in tables.items():
        names = [c.id for c in cases]
        assert len(names) == len(set(names)), f"{surface}: an id twice"
        assert all(c.message for c in cases), f"{surface}: every case names its exact message"
