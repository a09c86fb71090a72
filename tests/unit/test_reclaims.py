"""The reclaim index (core.reclaims) against the cut world it stands in for: every time an
intended slice's first level is read from the maintained index, in every scenario and in a
backlog with random runtimes, the slots it counts and the lease names it says step 1 counted
equal what `capacity_leases` gathers from a cut world built afresh for that run and instant;
and step 1's units within some domains, looked for among the runs the index names there, are
those found by looking at every run."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_events import SCENARIOS

from jobtree.core import cuts
from jobtree.core.cutting import Cutting
from jobtree.core.model import NodeState
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[2]


class Checked:
    """Wraps `Cutting._reclaim_view`: each view it returns is compared with a fresh world's."""

    def __init__(self) -> None:
        self.views = 0
        self.with_slots = 0
        self.reclassified = 0
        self.scoped_units = 0

    def check(self, cl: Any, key: str, changes: Any, planning: bool, view: Any, reclaimed: Any) -> None:
        world = cl._cut_world(key, None, cuts.RECLAIM if not planning else cuts.LOTTERY, planning, changes)
        step1 = next(cuts.capacity_leases(world, cuts.RECLAIM))
        flavor = cl.runs[key].spec.gpu_type
        topo = cl.topo
        want: set[tuple[str, int]] = {s for x in step1 for s in x.slots
                                      if topo.nodes[x.node].state is NodeState.READY and topo.flavor_of(x.node) == flavor}
        got = {(n, i) for n in topo.nodes if topo.flavor_of(n) == flavor
               for i in set(view.free_ordinals(n)) - set(topo.free_ordinals(n))}
        assert got == want, f"{key} at {cl.now}: step 1 counts {sorted(got ^ want)[:5]} differently"
        assert view.total_free() == topo.flavor_free(flavor) + len(want)
        for d in {topo.domain_of(n) for n in topo.nodes if topo.flavor_of(n) == flavor}:
            assert view.domain_free(d) == topo.domain_free(flavor, d) + sum(1 for n, _ in want if topo.domain_of(n) == d)
        domains = sorted({topo.domain_of(n) for n in topo.nodes})
        hint = world.reclaim_runs_in
        assert hint is not None
        for scope in [{d} for d in domains] + [set(domains[::2])]:  # the runs the index names, as every run would
            hinted = cuts.units(world, cuts.RECLAIM, scope)
            world.reclaim_runs_in = None
            assert hinted == cuts.units(world, cuts.RECLAIM, scope), f"{key} at {cl.now}: step 1 in {scope}"
            world.reclaim_runs_in = hint
            self.scoped_units += len(hinted)
        names = {x.name for x in step1}
        open_names = {n for ls in cl.open_by_run.values() for n in ls}
        assert {n for n in open_names if n in reclaimed} == names, f"{key} at {cl.now}: the counted names differ"
        self.views += 1
        self.with_slots += bool(want)
        self.reclassified += bool(reclaimed.own)


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[Checked]:
    checker = Checked()
    original = Cutting._reclaim_view

    def reclaim_view(self: Any, key: str, changes: Any, planning: bool) -> Any:
        view, reclaimed = original(self, key, changes, planning)
        checker.check(self, key, changes, planning, view, reclaimed)
        return view, reclaimed

    monkeypatch.setattr(Cutting, "_reclaim_view", reclaim_view)
    yield checker


def test_every_scenario_reads_step_one_from_the_index_as_a_world_would(checked: Checked) -> None:
    for path in SCENARIOS:
        run_scenario(parse_scenario(path.read_text()), check_invariants=True)
    # the scenarios reach the index, with something to reclaim and with ranked-in runs re-derived
    assert checked.views > 15 and checked.with_slots > 10 and checked.reclassified > 0, vars(checked)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_backlog_reads_step_one_from_the_index_as_a_world_would(checked: Checked, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_backlog import scenario
    finally:
        sys.path.remove(str(ROOT / "bench"))
    doc = scenario(64, 160, seed=seed)
    run_scenario(parse_scenario(yaml.safe_dump(doc)), check_invariants=True)
    assert checked.views > 1000 and checked.with_slots > 500 and checked.reclassified > 100, vars(checked)
    assert checked.scoped_units > 1000, vars(checked)
