"""The clock stops at every envelope window edge (CALCULUS §3 windows): the edges are kept in
order between budget changes, and a budget applied later is seen at once."""

from __future__ import annotations

from builders import HOUR, START, budget, envelope, node

from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig


def test_next_timer_finds_every_window_edge_and_sees_budgets_applied_later() -> None:
    cl = Cluster(ClusterConfig(), [node("n0")], START)
    assert cl.next_timer() is None  # nothing timed yet: the empty edge list is remembered
    cl.submit(facts.ApplyBudget(budget("a", "org:a", envelope("e", 8, start=START + 2 * HOUR, end=START + 5 * HOUR))))
    assert cl.next_timer() == START + 2 * HOUR
    cl.submit(facts.ApplyBudget(budget("b", "org:b", envelope("e", 8, start=START + HOUR, end=START + 3 * HOUR))))
    assert cl.next_timer() == START + HOUR  # a later budget with an earlier edge
    stops = []
    while (t := cl.next_timer()) is not None:
        stops.append(t)
        cl.advance(t)
    assert stops == [START + HOUR, START + 2 * HOUR, START + 3 * HOUR, START + 5 * HOUR]
    cl.submit(facts.ApplyBudget(budget("a", "org:a", envelope("e", 8, start=START + 6 * HOUR))))  # replaced
    assert cl.next_timer() == START + 6 * HOUR
