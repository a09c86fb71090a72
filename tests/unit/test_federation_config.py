"""The federation's config file: every bad field named in one line; `jobtree serve federation`
exits 2 on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jobtree.services.federation.config import Cap, ConfigError, load, parse

GOOD: dict[str, Any] = {"kind": "Federation", "clusters": ["a", "b"], "caps": [{"cap": "v/all", "maxConcurrency": 8}]}


def test_a_good_config() -> None:
    got = parse({**GOOD, "every": "2s", "caps": [{"cap": "v/all", "maxConcurrency": 8, "maxGPUHours": 100}]})
    assert (got.clusters, got.caps, got.every) == (("a", "b"), (Cap("v/all", 8, 100.0),), 2.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"clusters": ["a"]}, "clusters: must list at least two cluster names"),
    ({"clusters": ["a", "a"]}, "clusters: names a cluster twice"),
    ({"clusters": ["a", "B"]}, "clusters[1]: cluster must be a DNS label"),
    ({"kind": "Budget"}, "kind: must be Federation, got 'Budget'"),
    ({"colour": 1}, "colour: unknown field; fields: apiVersion, kind, clusters, every, caps"),
    ({"every": "0s"}, "every: must be between 1s and 1h, got '0s'"),
    ({"caps": [{"cap": "all", "maxConcurrency": 8}]}, "caps[0].cap: must be budget/capName, got 'all'"),
    ({"caps": [{"cap": "v/all", "maxConcurrency": -1}]}, "caps[0].maxConcurrency: must be a non-negative integer, got -1"),
    ({"caps": [{"cap": "v/all", "maxConcurrency": 8, "maxGPUHours": "lots"}]},
     "caps[0].maxGPUHours: must be a non-negative number, got 'lots'"),
    ({"caps": [{"cap": "v/all", "maxConcurrency": 8}, {"cap": "v/all", "maxConcurrency": 4}]},
     "caps[1].cap: v/all is listed twice"),
])
def test_bad_fields_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, **change})
    assert str(err.value).startswith(message), str(err.value)


def test_serve_federation_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text("kind: Federation\nclusters: [a]\n")
    proc = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "serve", "federation", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"jobtree: --config {path}: clusters: must list at least two cluster names\n"
    missing = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "serve", "federation"],
                             capture_output=True, text=True, timeout=60)
    assert (missing.returncode, missing.stderr) == (2, "jobtree: federation: --config FILE (member clusters and caps) "
                                                       "is required\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nosuch.yaml")
