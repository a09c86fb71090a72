"""Property tests: determinism (§10.5) and order independence (§10.3, §5 queue order).

- The same world and timeline played twice gives byte-identical STATE after every decision
  instant, and the same facts in the same order.
- (a) Derivation: the class of every open lease equals what a fresh `FundingView` derives from
  the same claims fed in any order (all at once, or one by one with refreshes in between, with
  decoy claims added and removed on the way).
- (b) Runs submitted in one batch share an admission instant and are considered in (admission
  time, key) order, so any permutation of the batch gives the same leases and placements.
- (c) Budgets applied in one batch in any order give the same result.
- (d) One `apply` mixing budgets and runs in any order equals applying budgets, then runs.
- The regression helper's scenario export, played by the simulator, ends in the same STATE.
"""

from __future__ import annotations

import json
from dataclasses import replace

from harness import noting, play, prop_settings, scenario_doc
from hypothesis import given
from hypothesis import strategies as st
from strategies import World, worlds

from jobtree.core.engine import Cluster
from jobtree.core.funding import FundingView
from jobtree.core.views import state_json
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import scenario_from_doc


def _trace(world: World, **kw: object) -> list[str]:
    """STATE as JSON text after every decision instant of a play."""
    out: list[str] = []

    def observe(cl: Cluster, label: str) -> None:
        out.append(json.dumps(state_json(cl), sort_keys=True))

    play(world, observe, **kw)  # type: ignore[arg-type]
    return out


def _final(world: World, **kw: object) -> str:
    return json.dumps(state_json(play(world, **kw).cluster), sort_keys=True)  # type: ignore[arg-type]


@prop_settings(60)
@given(worlds())
def test_same_world_twice_is_byte_identical(world: World) -> None:
    def run() -> None:
        a, b = play(world), play(world)
        assert [repr(f) for f in a.cluster.facts] == [repr(f) for f in b.cluster.facts]
        assert _trace(world) == _trace(world)

    noting(world, run)


@prop_settings(120)
@given(st.data())
def test_funding_classes_do_not_depend_on_claim_order(data: st.DataObject) -> None:
    world = data.draw(worlds(), label="world")
    stop = data.draw(st.integers(0, len(world.timeline)), label="events played")
    cl = play(world, stop_after=stop).cluster
    claims = list(cl.funding.claims())
    order = data.draw(st.permutations(claims), label="claim order")
    refresh = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)), label="refresh after add")
    decoys = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)), label="decoy before add")

    def run() -> None:
        fresh = FundingView(cl.rules, cl.terms)
        fresh.set_clock(cl.now, cl.funding.spent)
        for i, (c, r, d) in enumerate(zip(order, refresh, decoys, strict=True)):
            if d:  # a claim that comes and goes must leave no trace
                decoy = replace(c, name=f"{c.name}.decoy{i}", run=c.run)
                fresh.add(decoy)
                fresh.refresh()
                fresh.add(c)
                fresh.remove(decoy.name)
            else:
                fresh.add(c)
            if r:
                fresh.refresh()
        for c in claims:
            got, want = fresh.class_of(c.name), cl.funding.class_of(c.name)
            assert got is want, f"{c.name}: {want.value} in the cluster, {got.value} from claims in another order"
        fresh.refresh()
        cl.funding.refresh()
        assert {b: n for b, n in fresh.used.items() if n} == {b: n for b, n in cl.funding.used.items() if n}

    noting(world, run)


@prop_settings(60)
@given(st.data())
def test_runs_in_one_batch_in_any_order_give_the_same_result(data: st.DataObject) -> None:
    world = data.draw(worlds().filter(lambda w: len(w.initial_runs) >= 2), label="world")
    order = data.draw(st.permutations(world.initial_runs), label="batch order")

    def run() -> None:
        assert _trace(world, initial_order=order) == _trace(world)

    noting(world, run)


@prop_settings(50)
@given(st.data())
def test_budgets_in_one_batch_in_any_order_give_the_same_result(data: st.DataObject) -> None:
    world = data.draw(worlds().filter(lambda w: len(w.budgets) >= 2), label="world")
    order = data.draw(st.permutations(range(len(world.budgets))), label="budget order")

    def run() -> None:
        assert _trace(world, budget_order=order) == _trace(world)

    noting(world, run)


@prop_settings(40)
@given(st.data())
def test_one_apply_mixing_budgets_and_runs_in_any_order(data: st.DataObject) -> None:
    world = data.draw(worlds(), label="world")
    items = [("b", i) for i in range(len(world.budgets))] + [("r", i) for i in world.initial_runs]
    order = data.draw(st.permutations(items), label="apply order")

    def run() -> None:
        assert _final(world, opening=order) == _final(world)

    noting(world, run)


@prop_settings(40)
@given(worlds())
def test_scenario_export_replays_to_the_same_state(world: World) -> None:
    """The regression helper is faithful: the exported scenario, parsed and played by the
    simulator, ends in the STATE the direct play ended in."""

    def run() -> None:
        played = play(world)
        out = run_scenario(scenario_from_doc(scenario_doc(world, played)))
        assert json.dumps(out["snapshots"]["final"], sort_keys=True) == json.dumps(
            state_json(played.cluster), sort_keys=True)

    noting(world, run)


@prop_settings(80)
@given(worlds())
def test_admission_shortcuts_change_no_decision(world: World) -> None:
    """The engine skips work when a cheap necessary condition fails (`_could_fit` before a plain
    pack: for runs in hold-down, runs nothing can fund, unfunded covers, reservations' plain
    binds). With the condition forced true every pack is tried: every decision must be the same."""
    def run() -> None:
        fast = _trace(world)
        original = Cluster._could_fit
        Cluster._could_fit = lambda self, key: True  # type: ignore[method-assign]
        try:
            slow = _trace(world)
        finally:
            Cluster._could_fit = original  # type: ignore[method-assign]
        assert fast == slow

    noting(world, run)
