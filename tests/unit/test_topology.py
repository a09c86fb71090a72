"""topology: exclusive slot occupancy and the free indexes pack reads (§1 nodes and slots, §4)."""

from __future__ import annotations

import pytest
from builders import FLAVOR, dom, labels, node, slots

from jobtree.core.model import NodeState
from jobtree.core.topology import SlotConflict, Topology

OTHER = "A100-40GB"


def topo() -> Topology:
    return Topology([
        node("a1", 8, "A"), node("a2", 8, "A"), node("b1", 8, "B"), node("b2", 4, "B"),
        node("c1", 8, "C"), node("x1", 8, "A", flavor=OTHER),
    ])


def snapshot(t: Topology) -> tuple:
    return (
        {n: [t.holder((n, i)) for i in range(t.nodes[n].gpus)] for n in t.nodes},
        {n: t.free(n) for n in t.nodes},
        {f: list(t.domains_by_free(f)) for f in t.flavors()},
        {(f, d): (t.domain_free(f, d), list(t.nodes_by_free(f, d))) for f in t.flavors() for d in t.domains(f)},
        {f: t.flavor_free(f) for f in t.flavors()},
    )


def test_initial_indexes() -> None:
    t = topo()
    assert t.flavors() == [OTHER, FLAVOR]
    assert t.domains(FLAVOR) == [dom("A"), dom("B"), dom("C")]
    assert list(t.domains_by_free(FLAVOR)) == [dom("A"), dom("B"), dom("C")]  # 16, 12, 8
    assert list(t.domains_by_free(OTHER)) == [dom("A")]
    assert t.flavor_free(FLAVOR) == 36 and t.flavor_free(OTHER) == 8
    assert t.max_domain_free(FLAVOR) == 16
    assert list(t.nodes_by_free(FLAVOR, dom("B"))) == ["b1", "b2"]
    assert t.domain_of("b2") == dom("B")
    assert t.nodes_of(FLAVOR, dom("A")) == ["a1", "a2"]


def test_take_release_holder() -> None:
    t = topo()
    t.take(slots("a1", 0, 1, 2) + slots("a2", 7), "lease-1")
    assert t.holder(("a1", 1)) == "lease-1" and t.holder(("a2", 7)) == "lease-1"
    assert t.holder(("a1", 3)) is None
    assert (t.free("a1"), t.free("a2")) == (5, 7)
    assert t.free_ordinals("a1") == [3, 4, 5, 6, 7]
    assert list(t.held_slots("a1")) == [(0, "lease-1"), (1, "lease-1"), (2, "lease-1")]
    assert t.domain_free(FLAVOR, dom("A")) == 12
    assert t.flavor_free(FLAVOR) == 32
    t.release(slots("a1", 1), "lease-1")
    assert t.holder(("a1", 1)) is None and t.free("a1") == 6
    assert t.domain_free(FLAVOR, dom("A")) == 13
    t.release(slots("a1", 0, 2) + slots("a2", 7), "lease-1")
    assert snapshot(t) == snapshot(topo())


def test_double_take_raises_and_changes_nothing() -> None:
    t = topo()
    t.take(slots("a1", 0, 1), "first")
    before = snapshot(t)
    with pytest.raises(SlotConflict, match=r"a1#1 is held by first, wanted by second"):
        t.take(slots("a2", 0) + slots("a1", 2, 1), "second")
    assert snapshot(t) == before
    assert t.holder(("a2", 0)) is None and t.holder(("a1", 2)) is None
    with pytest.raises(SlotConflict):
        t.take(slots("a1", 0), "first")  # even the same holder may not take a slot twice


def test_release_by_another_holder_raises() -> None:
    t = topo()
    t.take(slots("b1", 3), "mine")
    before = snapshot(t)
    with pytest.raises(SlotConflict, match=r"b1#3 is held by mine, not theirs"):
        t.release(slots("b1", 3), "theirs")
    with pytest.raises(SlotConflict, match=r"b1#4 is held by None"):
        t.release(slots("b1", 4), "mine")
    assert snapshot(t) == before


@pytest.mark.parametrize("state", [NodeState.CORDONED, NodeState.FENCED])
def test_cordon_and_fence_remove_a_node_from_the_free_index(state: NodeState) -> None:
    t = topo()
    t.take(slots("a1", 0, 1), "running")
    t.set_state("a1", state)
    assert t.nodes["a1"].state is state
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == ["a2"]
    assert t.domain_free(FLAVOR, dom("A")) == 8
    assert t.flavor_free(FLAVOR) == 36 - 8
    assert list(t.domains_by_free(FLAVOR)) == [dom("B"), dom("A"), dom("C")]  # 12, 8 (A < C by name), 8
    assert t.holder(("a1", 0)) == "running"  # running work untouched
    assert t.free("a1") == 6  # the node's own count still tracks its slots
    # work on the node ends while it is out of the index; back to Ready, the index sees the truth
    t.release(slots("a1", 0, 1), "running")
    assert t.domain_free(FLAVOR, dom("A")) == 8
    t.set_state("a1", NodeState.READY)
    assert t.domain_free(FLAVOR, dom("A")) == 16
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == ["a1", "a2"]
    assert snapshot(t) == snapshot(topo())


def test_set_state_to_the_same_state_is_a_no_op() -> None:
    t = topo()
    t.set_state("a1", NodeState.CORDONED)
    before = snapshot(t)
    t.set_state("a1", NodeState.CORDONED)
    assert snapshot(t) == before
    t.set_state("a1", NodeState.FENCED)  # cordoned -> fenced: still out of the index
    assert snapshot(t) == before


@pytest.mark.parametrize(
    ("takes", "order", "node_order_a"),
    [
        ({}, "ABC", ["a1", "a2"]),
        ({"a1": 5}, "BAC", ["a2", "a1"]),  # B 12, A 11, C 8
        ({"a1": 8, "a2": 1}, "BCA", ["a2"]),  # A 7, B 12, C 8
        ({"b1": 4}, "ABC", ["a1", "a2"]),  # A 16, B 8, C 8: tie B/C by name
        ({"a1": 8, "a2": 8, "b2": 4, "b1": 8, "c1": 8}, "ABC", []),  # all full: name order
        ({"c1": 1, "a1": 8, "a2": 2}, "BCA", ["a2"]),  # B 12, C 7, A 6
    ],
)
def test_domains_by_free_order_updates(takes: dict[str, int], order: str, node_order_a: list[str]) -> None:
    t = topo()
    for n, k in takes.items():
        t.take(slots(n, *range(k)), "x")
    free = {d: t.domain_free(FLAVOR, d) for d in t.domains(FLAVOR)}
    assert list(t.domains_by_free(FLAVOR)) == [dom(c) for c in order]
    assert list(t.domains_by_free(FLAVOR)) == sorted(free, key=lambda d: (-free[d], d))
    assert [t.domain_at(FLAVOR, i) for i in range(4)] == [*t.domains_by_free(FLAVOR), None]
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == node_order_a
    assert t.max_domain_free(FLAVOR) == max(free.values())


def test_nodes_by_free_ties_break_by_name_and_skip_full_nodes() -> None:
    t = Topology([node("n3", 4), node("n1", 4), node("n2", 8), node("n0", 2)])
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == ["n2", "n1", "n3", "n0"]
    t.take(slots("n2", *range(6)), "x")
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == ["n1", "n3", "n0", "n2"]  # n2 has 2 = n0's 2
    t.take(slots("n0", 0, 1), "y")
    assert list(t.nodes_by_free(FLAVOR, dom("A"))) == ["n1", "n3", "n2"]


def test_add_node_twice_is_rejected() -> None:
    t = topo()
    with pytest.raises(ValueError, match="a1 already exists"):
        t.add_node(node("a1"))


def test_selector_matches_are_recomputed_when_nodes_are_added() -> None:
    t = Topology([node("n1", rack="r1")])
    sel = labels(rack="r1")
    assert t.selector_matches_all(FLAVOR, sel) and t.selector_matches_any(FLAVOR, sel)
    assert not t.selector_matches_any(FLAVOR, labels(rack="r2"))
    t.add_node(node("n2", rack="r2"))
    assert not t.selector_matches_all(FLAVOR, sel)
    assert t.selector_matches_any(FLAVOR, labels(rack="r2"))
    assert t.selector_matches_all(FLAVOR, ())


def test_a_slot_named_twice_is_refused_and_changes_nothing() -> None:
    topo = Topology([node("n1", 8)])
    with pytest.raises(SlotConflict):
        topo.take([("n1", 0), ("n1", 0)], "l1")
    assert topo.free("n1") == 8 and topo.holder(("n1", 0)) is None
    topo.take([("n1", 0)], "l1")
    with pytest.raises(SlotConflict):
        topo.release([("n1", 0), ("n1", 0)], "l1")
    assert topo.free("n1") == 7 and topo.holder(("n1", 0)) == "l1"


def test_release_is_all_or_nothing() -> None:
    topo = Topology([node("n1", 8)])
    topo.take([("n1", 0)], "l1")
    topo.take([("n1", 1)], "l2")
    with pytest.raises(SlotConflict):
        topo.release([("n1", 0), ("n1", 1)], "l1")
    assert topo.holder(("n1", 0)) == "l1" and topo.free("n1") == 6
