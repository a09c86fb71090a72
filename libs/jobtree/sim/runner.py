"""The simulator: plays a scenario against the calculus on a virtual clock (SCENARIOS.md).

Contract: `run_scenario(scenario)` creates one `Cluster`, and for each step moves the virtual
clock to the step's instant (timers due on the way fire at their own instants, those due
exactly then fire before the step), applies the step's action as one batch, lets the calculus
settle, and records snapshots; a `final` snapshot is taken after the last step. Returns the
JSON-ready output `{"snapshots": {label: STATE}}`. A command the calculus rejects raises
ScenarioError naming the step. `check_invariants=True` runs the §10 oracle after every
decision instant (each step and each timer between steps).
Not: a parser (see `scenario`), not a renderer (see `table`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.facts import JournalEntry
from jobtree.core.invariants import check_all
from jobtree.core.model import Budget
from jobtree.core.views import state_json
from jobtree.sim import scenario as S


def commands_of(action: S.Action) -> list[F.Command]:
    """The core commands of one scenario action (none for a snapshot)."""
    if isinstance(action, S.ApplyAction):
        return [F.ApplyBudget(o) if isinstance(o, Budget) else F.ApplyRun(o) for o in action.objects]
    simple: dict[type, Any] = {
        S.CompleteAction: lambda a: F.CompleteRun(a.run),
        S.FailAction: lambda a: F.FailRun(a.run),
        S.FailNodeAction: lambda a: F.FailNode(a.node),
        S.CordonAction: lambda a: F.CordonNode(a.node),
        S.UncordonAction: lambda a: F.UncordonNode(a.node),
        S.DeleteAction: lambda a: F.DeleteRun(a.run),
        S.ShrinkAction: lambda a: F.ShrinkRun(a.run, a.desired),
        S.EtaAction: lambda a: F.ReportEta(a.run, a.at),
    }
    make = simple.get(type(action))
    return [make(action)] if make else []


def played(scenario: S.Scenario, cl: Cluster | None = None) -> Iterator[tuple[Cluster, list[JournalEntry]]]:
    """Play a scenario leniently (a refused step commits nothing) into `cl` (a new view by
    default): after each step that wrote to the journal, the view and that step's journal
    entries (one ledger message, as it were)."""
    cl = cl if cl is not None else Cluster(scenario.config, scenario.nodes, scenario.start)
    mark = len(cl.journal)
    for step in scenario.steps:
        cl.advance(step.at)
        cmds = commands_of(step.action)
        if cmds:
            with contextlib.suppress(ValidationError):
                cl.submit(*cmds)
        if len(cl.journal) > mark:
            entries, mark = cl.journal[mark:], len(cl.journal)
            yield cl, entries


def final_cluster(scenario: S.Scenario) -> Cluster:
    """The core's view after every step of a scenario (refused steps commit nothing)."""
    cl = Cluster(scenario.config, scenario.nodes, scenario.start)
    for _ in played(scenario, cl):
        pass
    return cl


def run_scenario(scenario: S.Scenario, check_invariants: bool = False) -> dict[str, Any]:
    cl = Cluster(scenario.config, scenario.nodes, scenario.start)
    if check_invariants:
        cl.observer = check_all  # after every decision instant, timers included
    snapshots: dict[str, Any] = {}
    for step in scenario.steps:
        cl.advance(step.at)
        if check_invariants:
            check_all(cl)
        if isinstance(step.action, S.SnapshotAction):
            snapshots[step.action.label] = state_json(cl)
            continue
        cmds = commands_of(step.action)
        if not cmds:
            continue
        try:
            cl.submit(*cmds)
        except ValidationError as err:
            where = f"steps[{step.index}]"
            if isinstance(step.action, S.ApplyAction):
                where += f".apply[{err.command_index or 0}]"
            raise S.ScenarioError(f"{where}.{err}") from None
        if check_invariants:
            check_all(cl)
    snapshots[S.FINAL_LABEL] = state_json(cl)
    return {"snapshots": snapshots}
