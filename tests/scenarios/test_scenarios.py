"""Every scenario file is played, not re-typed: expectations, invariants, determinism, audit.

Scenarios: `tests/scenarios/*.yaml` (the project's own) and `../shared/scenarios/*.yaml` (the
reference set), each with a `.expect.yaml`. Each is played through the real runner with the
§10 oracle after every step, checked against its expectations, played a second time to
compare the JSON text (determinism), and its journal replayed to reproduce the meter (audit).
Malformed scenarios live in `tests/scenarios/invalid/`, each opening with `# error: FRAGMENT`;
the CLI must exit 2 with one line containing the fragment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobtree.core.engine import Cluster
from jobtree.core.invariants import check_audit
from jobtree.sim.expect import check_expectations
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import parse_scenario

HERE = Path(__file__).parent
SHARED = HERE.parents[1].parent / "shared" / "scenarios"


def _scenarios() -> list[Path]:
    own = sorted(p for p in HERE.glob("*.yaml") if not p.name.endswith(".expect.yaml"))
    if not SHARED.is_dir():
        raise RuntimeError(f"the reference scenarios are missing: {SHARED} (CI puts ../shared beside the repo)")
    ref = sorted(p for p in SHARED.glob("*.yaml") if not p.name.endswith(".expect.yaml"))
    return [*ref, *own]


def _id(p: Path) -> str:
    return ("shared/" if p.parent == SHARED else "") + p.stem


@pytest.mark.parametrize("path", _scenarios(), ids=_id)
def test_scenario(path: Path) -> None:
    expect_path = path.with_name(path.stem + ".expect.yaml")
    assert expect_path.exists(), f"{path.name} has no {expect_path.name}: a scenario must check something"
    scenario = parse_scenario(path.read_text())
    out = run_scenario(scenario, check_invariants=True)
    expect = yaml.safe_load(expect_path.read_text())
    assert expect.get("snapshots"), f"{expect_path.name} lists no expectations"
    problems = check_expectations(out, expect)
    assert not problems, "\n".join(problems)
    again = run_scenario(parse_scenario(path.read_text()))
    assert json.dumps(again, sort_keys=True) == json.dumps(out, sort_keys=True), "not deterministic"


@pytest.mark.parametrize("path", _scenarios(), ids=_id)
def test_scenario_audit(path: Path) -> None:
    """Replaying the journal (ledger + spec changes) alone reproduces every usage figure."""
    from jobtree.sim import runner

    scenario = parse_scenario(path.read_text())
    cl = Cluster(scenario.config, scenario.nodes, scenario.start)
    for step in scenario.steps:
        cl.advance(step.at)
        cmds = runner.commands_of(step.action)
        if cmds:
            cl.submit(*cmds)
    cl.advance(cl.now + 6 * 3600)
    check_audit(cl, scenario.start)


def _invalid() -> list[Path]:
    return sorted((HERE / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("path", _invalid(), ids=lambda p: p.stem)
def test_invalid_scenario(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must open with '# error: FRAGMENT'"
    fragment = first[len("# error: "):].strip()
    proc = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "sim", "run", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert proc.stdout == ""


def test_every_stable_reason_is_produced_by_some_scenario() -> None:
    """Each documented `reason` word (docs/design/decisions.md) occurs in some scenario's output."""
    from jobtree.core import engine

    transient = {engine.R_QUEUED}  # a new run's reason, replaced within the same decision
    stable = {v for k, v in vars(engine).items() if k.startswith("R_") and isinstance(v, str)} - transient
    seen: set[str] = set()
    for path in _scenarios():
        out = run_scenario(parse_scenario(path.read_text()))
        for state in out["snapshots"].values():
            seen.update(r["reason"] for r in state["runs"])
    assert stable - seen == set(), f"reasons no scenario produces: {sorted(stable - seen)}"
    assert seen - stable == set(), f"reasons not in the engine's stable list: {sorted(seen - stable)}"
