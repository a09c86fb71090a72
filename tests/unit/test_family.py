"""family: the family DAG and the proximity tier of a claim (CALCULUS §2 "Tier")."""

from __future__ import annotations

import itertools

import pytest
from builders import budget

from jobtree.core.family import (
    ANCESTOR,
    COUSIN,
    OWNER,
    SIBLING,
    SPONSOR,
    Family,
    is_family_tier,
    tier_name,
)

#            org:root
#           /        \
#       org:a        org:b
#       /    \          \
#  org:a:x  org:a:y    org:b:z
#     |
#  org:a:x:1
TREE = Family([
    budget("root", "org:root"),
    budget("a", "org:a", parents=["org:root"]),
    budget("b", "org:b", parents=["org:root"]),
    budget("ax", "org:a:x", parents=["org:a"]),
    budget("ay", "org:a:y", parents=["org:a"]),
    budget("bz", "org:b:z", parents=["org:b"]),
    budget("ax1", "org:a:x:1", parents=["org:a:x"]),
    budget("guest", "org:guest"),
])


@pytest.mark.parametrize(
    ("claimant", "envelope_owner", "tier"),
    [
        ("org:a:x", "org:a:x", OWNER),
        ("org:guest", "org:guest", OWNER),  # a parentless owner still owns its envelopes
        ("org:a:x", "org:a", ANCESTOR + 1),
        ("org:a:x", "org:root", ANCESTOR + 2),
        ("org:a:x:1", "org:root", ANCESTOR + 3),
        ("org:a:x", "org:a:y", SIBLING),
        ("org:a", "org:b", SIBLING),
        ("org:a:x", "org:b:z", COUSIN),
        ("org:b:z", "org:a:y", COUSIN),
        # unrelated: no edge of the calculus's relations
        ("org:a:x", "org:guest", None),
        ("org:guest", "org:a", None),
        ("org:a:x", "org:b", None),  # an aunt is not a sibling, ancestor or cousin
        ("org:a:x:1", "org:a:y", None),  # a niece of a sibling's child is not a cousin
        ("org:nobody", "org:a", None),  # an owner no budget names
        # a parent has no family tier on a child's envelope (sharing flows upward only)
        ("org:a", "org:a:x", None),
        ("org:root", "org:a:x:1", None),
        ("org:root", "org:a", None),
    ],
)
def test_family_tier(claimant: str, envelope_owner: str, tier: int | None) -> None:
    assert TREE.family_tier(claimant, envelope_owner) == tier
    # memoised answers agree with fresh ones
    assert TREE.family_tier(claimant, envelope_owner) == tier


def test_tiers_sort_in_proximity_order() -> None:
    order = [
        TREE.family_tier("org:a:x", "org:a:x"),
        TREE.family_tier("org:a:x", "org:a"),
        TREE.family_tier("org:a:x", "org:root"),
        TREE.family_tier("org:a:x", "org:a:y"),
        TREE.family_tier("org:a:x", "org:b:z"),
        SPONSOR,
    ]
    assert all(t is not None for t in order)
    assert order == sorted(order)  # type: ignore[type-var]
    assert len(set(order)) == len(order)


@pytest.mark.parametrize(
    ("tier", "name", "family"),
    [(OWNER, "owner", False), (ANCESTOR + 1, "ancestor", True), (ANCESTOR + 7, "ancestor", True),
     (SIBLING, "sibling", True), (COUSIN, "cousin", True), (SPONSOR, "sponsor", False)],
)
def test_tier_names(tier: int, name: str, family: bool) -> None:
    assert tier_name(tier) == name
    assert is_family_tier(tier) is family


def test_ancestors_take_the_shortest_distance() -> None:
    # o has parents p and q; p's parent is q: q is both a parent (1) and a grandparent (2).
    fam = Family([
        budget("q", "org:q"),
        budget("p", "org:p", parents=["org:q"]),
        budget("o", "org:o", parents=["org:p", "org:q"]),
    ])
    assert fam.ancestors("org:o") == {"org:p": 1, "org:q": 1}
    assert fam.family_tier("org:o", "org:q") == ANCESTOR + 1
    # an ancestor outranks the sibling relation the shared parent q would also give
    assert fam.family_tier("org:o", "org:p") == ANCESTOR + 1


def test_parent_edges_are_the_union_over_budgets() -> None:
    # two budgets of one owner name different parents: both edges count
    fam = Family([
        budget("x1", "org:x", parents=["org:p1"]),
        budget("x2", "org:x", parents=["org:p2"]),
        budget("y", "org:y", parents=["org:p2"]),
    ])
    assert fam.parents("org:x") == frozenset({"org:p1", "org:p2"})
    assert fam.family_tier("org:x", "org:p1") == ANCESTOR + 1
    assert fam.family_tier("org:x", "org:y") == SIBLING


def _is_cycle(fam: Family, cycle: list[str]) -> bool:
    return (len(cycle) >= 2 and cycle[0] == cycle[-1]
            and all(b in fam.parents(a) for a, b in itertools.pairwise(cycle)))


@pytest.mark.parametrize(
    ("edges", "members"),
    [
        ({"org:x": ["org:y"], "org:y": ["org:z"], "org:z": ["org:x"]}, {"org:x", "org:y", "org:z"}),
        ({"org:s": ["org:s"]}, {"org:s"}),
        ({"org:a": ["org:root"], "org:b": ["org:a"], "org:root": ["org:b"], "org:c": ["org:a"]},
         {"org:a", "org:b", "org:root"}),
        ({"org:d": ["org:e"], "org:e": ["org:f", "org:d"], "org:f": []}, {"org:d", "org:e"}),
    ],
)
def test_find_cycle_finds_a_cycle(edges: dict[str, list[str]], members: set[str]) -> None:
    fam = Family([budget(o.replace(":", "-"), o, parents=ps) for o, ps in edges.items()])
    cycle = fam.find_cycle()
    assert cycle is not None
    assert _is_cycle(fam, cycle)
    assert set(cycle) == members


def test_find_cycle_is_none_on_a_dag() -> None:
    assert TREE.find_cycle() is None
    # a diamond is a DAG, not a cycle
    diamond = Family([
        budget("top", "org:top"),
        budget("l", "org:l", parents=["org:top"]),
        budget("r", "org:r", parents=["org:top"]),
        budget("bottom", "org:bottom", parents=["org:l", "org:r"]),
    ])
    assert diamond.find_cycle() is None
    assert Family([]).find_cycle() is None


def test_ancestors_terminate_on_a_cycle() -> None:
    fam = Family([budget("x", "org:x", parents=["org:y"]), budget("y", "org:y", parents=["org:x"])])
    assert fam.ancestors("org:x") == {"org:y": 1}
