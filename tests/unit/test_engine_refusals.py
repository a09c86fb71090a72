"""A lone command the core refuses changes nothing (the contract admission's grouped decisions rely on).

Admission decides a group of queued commands one after another on one view and commits them as
one ledger message; when one of them is refused it answers that one and goes on with the others
without rebuilding the view. That is only right if a refused lone command leaves the engine
exactly as it was: same state, same journal, same timers, and the same decisions afterwards.
Each case below builds a cluster, sends a refused command, then more commands, and compares
with a twin that never saw the refused one. A refused batch (a `submit` of several commands)
may keep its earlier commands applied: admission rebuilds in that case, and the last test pins
why it has to.
"""

from __future__ import annotations

import pytest
from builders import START, budget, envelope, node, run

from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.model import ClusterConfig
from jobtree.core.views import state_json

OWNER = "team-a"


def _world() -> Cluster:
    cl = Cluster(ClusterConfig(), [node(f"n{i}", domain="A" if i < 2 else "B") for i in range(4)], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 16))))
    cl.submit(facts.ApplyBudget(budget("b", "team-b", envelope("e", 8), parents=[OWNER])))
    cl.submit(facts.ApplyRun(run("running", OWNER, 8)), facts.ApplyRun(run("elastic", OWNER, 8, malleable=(4, 16, 4))))
    cl.advance(START + 60)
    cl.submit(facts.ApplyRun(run("queued", OWNER, 32)))
    cl.submit(facts.ApplyRun(run("done", OWNER, 8)))
    cl.advance(START + 120)
    cl.submit(facts.CompleteRun("default/done"))
    return cl


def _follow_up(cl: Cluster) -> None:
    cl.advance(START + 180)
    cl.submit(facts.ShrinkRun("default/elastic", 4))
    cl.submit(facts.ApplyRun(run("later", OWNER, 4)))
    cl.advance(START + 3600)
    cl.submit(facts.CompleteRun("default/running"))


def _cycle_budget() -> facts.Command:
    return facts.ApplyBudget(budget("a", OWNER, envelope("e", 16), parents=["team-b"]))


REFUSED: dict[str, facts.Command] = {
    "budget cycle": _cycle_budget(),
    "complete unknown run": facts.CompleteRun("default/nope"),
    "complete ended run": facts.CompleteRun("default/done"),
    "complete unstarted run": facts.CompleteRun("default/queued"),
    "fail unstarted run": facts.FailRun("default/queued"),
    "delete unknown run": facts.DeleteRun("default/nope"),
    "shrink rigid run": facts.ShrinkRun("default/running", 4),
    "shrink off the step": facts.ShrinkRun("default/elastic", 6),
    "shrink unknown run": facts.ShrinkRun("default/nope", 4),
    "fail unknown node": facts.FailNode("nope"),
    "cordon unknown node": facts.CordonNode("nope"),
    "uncordon unknown node": facts.UncordonNode("nope"),
    "shrink ended run": facts.ShrinkRun("default/done", 4),
}

KIND: dict[str, str] = {
    "budget cycle": "invalid",
    "complete unknown run": "not_found",
    "complete ended run": "precondition",
    "complete unstarted run": "precondition",
    "fail unstarted run": "precondition",
    "delete unknown run": "not_found",
    "shrink rigid run": "precondition",
    "shrink off the step": "invalid",
    "shrink unknown run": "not_found",
    "fail unknown node": "not_found",
    "cordon unknown node": "not_found",
    "uncordon unknown node": "not_found",
    "shrink ended run": "precondition",
}
"""What kind of refusal each is (`jobtree.core.errors`): the edges map the kind to a status."""


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_lone_command_changes_nothing(name: str) -> None:
    refused, twin = _world(), _world()
    before, journal, timer = state_json(refused), len(refused.journal), refused.next_timer()
    with pytest.raises(ValidationError) as err:
        refused.submit(REFUSED[name])
    assert err.value.command_index == 0
    assert err.value.kind == KIND[name], (err.value.kind, err.value)
    assert err.value.under("batch.commands[0]").kind == KIND[name]
    assert state_json(refused) == before
    assert len(refused.journal) == journal
    assert refused.next_timer() == timer
    _follow_up(refused)
    _follow_up(twin)
    assert refused.journal == twin.journal
    assert state_json(refused) == state_json(twin)


def test_a_refused_batch_keeps_the_commands_before_the_refusal() -> None:
    cl = _world()
    with pytest.raises(ValidationError) as err:
        cl.submit(facts.ApplyRun(run("extra", OWNER, 8)), facts.CompleteRun("default/nope"))
    assert err.value.command_index == 1
    assert "default/extra" in cl.runs  # so admission rebuilds its view after a refused batch
