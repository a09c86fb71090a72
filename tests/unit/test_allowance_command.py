"""`SetAllowance`: the federation's grant applied by the engine and journaled (CALCULUS §9).

A cluster whose allowance of an aggregate cap is lowered classifies with it as the cap: funded
work above it turns unfunded (nothing stops); raised again, it is funded again. A grant not
newer than the one in force changes nothing; an unknown cap is NotFound. The journal entry
replays to the same view and crosses the wire unchanged.
"""

from __future__ import annotations

import pytest
from builders import START, agg_cap, budget, envelope, node, run
from test_snapshot import same

from jobtree.api import convert
from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.errors import NotFound, ValidationError
from jobtree.core.invariants import check_all
from jobtree.core.model import ClusterConfig, FundingClass

CAP = "org/west-total"


def world() -> Cluster:
    cl = Cluster(ClusterConfig(cluster="gpu-a"), [node("a-00"), node("a-01")], START)
    org = budget("org", "org:x", envelope("a", 8), envelope("b", 8), caps=[agg_cap("west-total", "a", "b", concurrency=16)])
    cl.submit(facts.ApplyBudget(org))
    cl.submit(facts.ApplyRun(run("r1", "org:x", 6)), facts.ApplyRun(run("r2", "org:x", 6)))
    check_all(cl)
    return cl


def funded(cl: Cluster) -> int:
    return sum(le.gpus for le in cl.leases.values() if le.open and cl.funding.class_of(le.name) is not FundingClass.UNFUNDED)


def gpus_held(cl: Cluster) -> int:
    return sum(le.gpus for le in cl.leases.values() if le.open)


def test_a_lower_allowance_unfunds_the_excess_and_a_raise_funds_it_again() -> None:
    cl = world()
    assert (funded(cl), gpus_held(cl)) == (12, 12)
    cl.submit(facts.SetAllowance(CAP, 8, 1))
    check_all(cl)
    assert (funded(cl), gpus_held(cl)) == (8, 12), "the excess turns unfunded, nothing stops"
    assert cl.allowances[CAP] == 8 and cl.allowance_versions[CAP] == 1
    cl.submit(facts.SetAllowance(CAP, 16, 2))
    check_all(cl)
    assert (funded(cl), gpus_held(cl)) == (12, 12)
    cl.submit(facts.SetAllowance(CAP, None, 3))  # no allowance: the cap itself
    assert CAP not in cl.allowances and funded(cl) == 12


def test_a_grant_not_newer_than_the_one_in_force_changes_nothing() -> None:
    cl = world()
    cl.submit(facts.SetAllowance(CAP, 4, 5))
    before = len(cl.journal)
    for stale in (facts.SetAllowance(CAP, 16, 5), facts.SetAllowance(CAP, 16, 2)):
        cl.submit(stale)
        assert cl.allowances[CAP] == 4 and cl.allowance_versions[CAP] == 5
    assert not any(isinstance(item, facts.SetAllowance) for _, item in cl.journal[before:])


@pytest.mark.parametrize(("cmd", "error", "path", "problem"), [
    (facts.SetAllowance("org/nosuch", 4, 1), NotFound, "allowance.cap", "no aggregate cap 'org/nosuch'; caps: org/west-total"),
    (facts.SetAllowance("nobody/west-total", 4, 1), NotFound, "allowance.cap", "no aggregate cap"),
    (facts.SetAllowance(CAP, -1, 1), ValidationError, "allowance.concurrency", "must be a non-negative integer, got -1"),
])
def test_a_bad_grant_is_refused_and_changes_nothing(cmd: facts.SetAllowance, error: type, path: str,
                                                     problem: str) -> None:
    cl = world()
    before = len(cl.journal)
    with pytest.raises(error) as info:
        cl.submit(cmd)
    assert info.value.path == path and problem in info.value.problem
    assert len(cl.journal) == before and CAP not in cl.allowances


def test_the_journal_replays_to_the_same_view_and_crosses_the_wire() -> None:
    cl = world()
    cl.submit(facts.SetAllowance(CAP, 8, 1))
    cl.advance(START + 600)  # GPU-hours metered under the allowance
    wire = [convert.entry_from_proto(convert.entry_to_proto(e, command_id="c", epoch=1)) for e in cl.journal]
    assert wire == list(cl.journal)
    again = Cluster.replay(ClusterConfig(cluster="gpu-a"), [node("a-00"), node("a-01")], START, wire)
    assert again.allowances == cl.allowances and again.allowance_versions == cl.allowance_versions
    assert funded(again) == funded(cl) == 8
    same(again.funding.used, cl.funding.used)
    msg = convert.command_to_proto(facts.SetAllowance(CAP, None, 7), command_id="g")
    assert convert.command_from_proto(msg) == facts.SetAllowance(CAP, None, 7)
    with pytest.raises(ValidationError, match=r"set_allowance\.cap: must name an aggregate cap"):
        convert.command_from_proto(convert.command_to_proto(facts.SetAllowance("west", 1, 1), command_id="g"))


def test_a_gpu_hour_allowance_bounds_what_this_cluster_debits_under_the_cap() -> None:
    cl = Cluster(ClusterConfig(cluster="gpu-a"), [node("a-00"), node("a-01")], START)
    org = budget("org", "org:x", envelope("a", 8), envelope("b", 8),
                 caps=[agg_cap("west-total", "a", "b", concurrency=16, hours=1000.0)])
    cl.submit(facts.ApplyBudget(org))
    cl.submit(facts.ApplyRun(run("r1", "org:x", 6)))
    cl.submit(facts.SetAllowance(CAP, None, 1, gpu_hours=1.0))  # 1 GPU-hour here: 10 min of 6 GPUs
    assert cl.hour_allowances == {CAP: 1.0} and funded(cl) == 6
    cl.advance(START + 5 * 60)
    check_all(cl)
    assert funded(cl) == 6
    cl.advance(START + 11 * 60)
    check_all(cl)
    assert (funded(cl), gpus_held(cl)) == (0, 6), "spent: the work turns unfunded, nothing stops"
    cl.submit(facts.SetAllowance(CAP, None, 2, gpu_hours=10.0))
    assert funded(cl) == 6
    wire = convert.command_from_proto(convert.command_to_proto(facts.SetAllowance(CAP, 3, 4, 2.5), command_id="g"))
    assert wire == facts.SetAllowance(CAP, 3, 4, 2.5)
    with pytest.raises(ValidationError, match=r"allowance\.gpuHours"):
        cl.submit(facts.SetAllowance(CAP, None, 9, gpu_hours=-1.0))
