"""funding: tiers with sharing/lending/allowBorrow, and the ranking that derives every class (§2)."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
from builders import HOUR, START, World, agg_cap, budget, claim, cluster, envelope, node, run, terms_of

from jobtree.core.family import ANCESTOR, COUSIN, OWNER, SIBLING, SPONSOR
from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import Bound, Claim, FundingRules, env_bound, lend_bound
from jobtree.core.model import FundingClass, Role

OWNED, SHARED, BORROWED, UNFUNDED = (FundingClass.OWNED, FundingClass.SHARED, FundingClass.BORROWED,
                                     FundingClass.UNFUNDED)

FAMILY = [
    budget("root", "org:root", envelope("pool", 16)),
    budget("a", "org:a", envelope("west", 8), parents=["org:root"]),
    budget("b", "org:b", envelope("east", 8), parents=["org:root"]),
    budget("ax", "org:a:x", envelope("main", 8), envelope("private", 8, sharing="none"), parents=["org:a"]),
    budget("ay", "org:a:y", envelope("main", 8), parents=["org:a"]),
    budget("bz", "org:b:z", envelope("main", 8, sharing="none"), parents=["org:b"]),
    budget("lender", "org:lender",
           envelope("exact", 8, lend_to=["org:guest"]),
           envelope("prefix", 8, lend_to=["org:x:*"]),
           envelope("closed", 8, lend_to=["org:guest"], lend=False),
           envelope("family-only", 8)),
]


# --- FundingRules.tier -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("owner", "ref", "allow_borrow", "tier"),
    [
        ("org:a:x", ("ax", "main"), False, OWNER),
        ("org:a:x", ("ax", "private"), False, OWNER),  # sharing none never closes the owner out
        ("org:a:x", ("a", "west"), False, ANCESTOR + 1),
        ("org:a:x", ("root", "pool"), False, ANCESTOR + 2),
        ("org:a:y", ("ax", "main"), False, SIBLING),
        ("org:a:y", ("ax", "private"), False, None),  # sharing none: sibling closed out
        ("org:b:z", ("ax", "main"), False, COUSIN),
        ("org:a:x", ("bz", "main"), False, None),  # sharing none: cousin closed out
        ("org:a:x", ("bz", "main"), True, None),  # ... and borrowing does not reopen it to family
        ("org:a:x", ("b", "east"), False, None),  # unrelated
        # lending ACL, exact id
        ("org:guest", ("lender", "exact"), True, SPONSOR),
        ("org:guest", ("lender", "exact"), False, None),  # allowBorrow off
        ("org:guest2", ("lender", "exact"), True, None),
        ("org:gues", ("lender", "exact"), True, None),
        # lending ACL, prefix `org:x:*`
        ("org:x:team", ("lender", "prefix"), True, SPONSOR),
        ("org:x:team:sub", ("lender", "prefix"), True, SPONSOR),
        ("org:x:team", ("lender", "prefix"), False, None),
        ("org:xy", ("lender", "prefix"), True, None),
        ("org:x", ("lender", "prefix"), True, None),
        ("org:guest", ("lender", "prefix"), True, None),
        # lending.allow false, and an envelope that lends to nobody
        ("org:guest", ("lender", "closed"), True, None),
        ("org:guest", ("lender", "family-only"), True, None),
        # an envelope that does not exist
        ("org:a:x", ("ax", "nope"), False, None),
    ],
)
def test_rules_tier(owner: str, ref: tuple[str, str], allow_borrow: bool, tier: int | None) -> None:
    rules = FundingRules(FAMILY)
    assert rules.tier(owner, ref, allow_borrow) == tier
    assert rules.tier(owner, ref, allow_borrow) == tier  # cached answer agrees


def test_rules_bounds_per_tier() -> None:
    rules = FundingRules([
        budget("l", "org:l", envelope("e", 16, lend_to=["org:g"], lend_concurrency=4), envelope("f", 8),
               caps=[agg_cap("both", "e", "f", concurrency=20)]),
    ])
    terms = terms_of(run("r", "org:g", 4, allow_borrow=True, max_borrow=3))
    owner_bounds = dict(rules.bounds(("l", "e"), OWNER, "default/r", terms))
    sponsor_bounds = dict(rules.bounds(("l", "e"), SPONSOR, "default/r", terms))
    assert owner_bounds == {env_bound(("l", "e")): 16, ("cap", "l", "both"): 20}
    assert sponsor_bounds == {env_bound(("l", "e")): 16, lend_bound(("l", "e")): 4,
                              ("borrow", "default/r"): 3, ("cap", "l", "both"): 20}


# --- FundingView ranking ---------------------------------------------------------------------

def world(*budgets, now: int = START) -> World:
    return cluster([node("n1")], budgets, now=now)


def test_owner_claim_recalls_an_earlier_shared_claim() -> None:
    w = world(budget("a", "org:a", envelope("west", 8), parents=["org:root"]),
              budget("b", "org:b", parents=["org:root"]))
    sib = w.add_run(run("sib", "org:b", 8), admitted=START)
    own = w.add_run(run("own", "org:a", 8), admitted=START + HOUR)
    w.view.add(claim("sib.0", sib, 8, ("a", "west")))
    assert w.view.class_of("sib.0") is SHARED
    w.view.add(claim("own.0", own, 8, ("a", "west")))
    assert w.view.class_of("own.0") is OWNED
    assert w.view.class_of("sib.0") is UNFUNDED  # recalled, with no event of its own
    # the owner leaves: the borrower is funded again by the same arithmetic
    w.view.remove("own.0")
    assert w.view.class_of("sib.0") is SHARED


def test_nearer_ancestor_outranks_farther_and_admission_breaks_ties() -> None:
    w = world(budget("root", "org:root", envelope("pool", 4)),
              budget("a", "org:a", parents=["org:root"]),
              budget("ax", "org:a:x", parents=["org:a"]))
    far = w.add_run(run("far", "org:a:x", 4), admitted=START)  # grandchild: ancestor(2)
    near = w.add_run(run("near", "org:a", 4), admitted=START + 60)  # child: ancestor(1)
    w.view.add(claim("far.0", far, 4, ("root", "pool")))
    w.view.add(claim("near.0", near, 4, ("root", "pool")))
    assert (w.view.class_of("near.0"), w.view.class_of("far.0")) == (SHARED, UNFUNDED)
    assert w.view.tier_of("near.0") == ANCESTOR + 1


def test_concurrency_fill_is_greedy_per_lease() -> None:
    w = world(budget("a", "org:a", envelope("west", 8)))
    r1 = w.add_run(run("r1", "org:a", 4), admitted=START)
    r2 = w.add_run(run("r2", "org:a", 6), admitted=START + 1)
    r3 = w.add_run(run("r3", "org:a", 4), admitted=START + 2)
    r4 = w.add_run(run("r4", "org:a", 1), admitted=START + 3)
    for c in (claim("r3.0", r3, 4, ("a", "west")), claim("r1.0", r1, 4, ("a", "west")),
              claim("r2.0", r2, 6, ("a", "west")), claim("r4.0", r4, 1, ("a", "west"))):
        w.view.add(c)
    assert w.classes() == {"r1.0": OWNED, "r2.0": UNFUNDED, "r3.0": OWNED, "r4.0": UNFUNDED}
    assert w.view.used_now(env_bound(("a", "west"))) == 8
    assert w.view.class_gpus[OWNED] == 8 and w.view.class_gpus[UNFUNDED] == 7


def test_rank_within_a_run_is_group_then_lease_name() -> None:
    w = world(budget("a", "org:a", envelope("west", 4)))
    r = w.add_run(run("r", "org:a", 8, 2))
    for name, group in (("r.3", 1), ("r.2", 0), ("r.1", 1), ("r.0", 2)):
        w.view.add(claim(name, r, 2, ("a", "west"), group=group))
    assert w.classes() == {"r.2": OWNED, "r.1": OWNED, "r.3": UNFUNDED, "r.0": UNFUNDED}


def test_spare_claims_rank_like_active_ones() -> None:
    w = world(budget("a", "org:a", envelope("west", 6)))
    r = w.add_run(run("r", "org:a", 4, 4, spares=2))
    w.view.add(claim("r.1", r, 2, ("a", "west"), group=0, role=Role.SPARE))
    w.view.add(claim("r.0", r, 4, ("a", "west"), group=0))
    w.view.add(claim("r.2", r, 4, ("a", "west"), group=1))
    assert w.classes() == {"r.0": OWNED, "r.1": OWNED, "r.2": UNFUNDED}


@pytest.mark.parametrize(
    ("start", "end", "now", "cls"),
    [
        (START + HOUR, None, START, UNFUNDED),  # not yet open
        (START + HOUR, None, START + HOUR, OWNED),  # opens on the instant
        (None, START + HOUR, START + HOUR - 1, OWNED),
        (None, START + HOUR, START + HOUR, UNFUNDED),  # closed at its end instant
        (START - HOUR, START + HOUR, START, OWNED),
    ],
)
def test_window_closed_is_unfunded(start: int | None, end: int | None, now: int, cls: FundingClass) -> None:
    w = world(budget("a", "org:a", envelope("west", 8, start=start, end=end)), now=now)
    r = w.add_run(run("r", "org:a", 4))
    w.view.add(claim("r.0", r, 4, ("a", "west")))
    assert w.view.class_of("r.0") is cls


def test_window_opening_refunds_and_closing_demotes() -> None:
    w = world(budget("a", "org:a", envelope("west", 8, start=START + HOUR, end=START + 2 * HOUR)))
    r = w.add_run(run("r", "org:a", 4))
    w.view.add(claim("r.0", r, 4, ("a", "west")))
    seen = []
    for t in (START, START + HOUR, START + 2 * HOUR):
        w.view.set_clock(t, frozenset())
        seen.append(w.view.class_of("r.0"))
    assert seen == [UNFUNDED, OWNED, UNFUNDED]


def test_spent_bound_is_unfunded_until_unspent() -> None:
    w = world(budget("a", "org:a", envelope("west", 8, hours=10)),
              budget("c", "org:c", envelope("other", 8, hours=10)))
    r = w.add_run(run("r", "org:a", 4))
    o = w.add_run(run("o", "org:c", 4))
    w.view.add(claim("r.0", r, 4, ("a", "west")))
    w.view.add(claim("o.0", o, 4, ("c", "other")))
    assert w.classes() == {"r.0": OWNED, "o.0": OWNED}
    w.view.set_clock(START + 1, frozenset({env_bound(("a", "west"))}))
    assert w.classes() == {"r.0": UNFUNDED, "o.0": OWNED}
    assert w.view.used_now(env_bound(("a", "west"))) == 0
    w.view.set_clock(START + 2, frozenset())
    assert w.classes() == {"r.0": OWNED, "o.0": OWNED}


@pytest.mark.parametrize(
    ("spent", "expected"),
    [
        # lending maxGPUHours spent: the lender's own work stays funded, borrowers do not
        ({lend_bound(("l", "e"))}, {"own.0": OWNED, "guest.0": UNFUNDED, "other.0": OWNED}),
        # an aggregate cap's maxGPUHours spent: every envelope under it funds nothing
        ({("cap", "l", "c")}, {"own.0": UNFUNDED, "guest.0": UNFUNDED, "other.0": UNFUNDED}),
        (set(), {"own.0": OWNED, "guest.0": BORROWED, "other.0": OWNED}),
    ],
)
def test_lending_and_cap_hour_bounds_spent(spent: set, expected: dict[str, FundingClass]) -> None:
    w = world(budget("l", "org:l", envelope("e", 8, lend_to=["org:g"], lend_hours=5), envelope("f", 8),
                     caps=[agg_cap("c", "e", "f", hours=100)]))
    own = w.add_run(run("own", "org:l", 4))
    guest = w.add_run(run("guest", "org:g", 2, allow_borrow=True), admitted=START + 1)
    other = w.add_run(run("other", "org:l", 2), admitted=START + 2)
    w.view.add(claim("own.0", own, 4, ("l", "e")))
    w.view.add(claim("guest.0", guest, 2, ("l", "e")))
    w.view.add(claim("other.0", other, 2, ("l", "f")))
    w.view.refresh()
    w.view.set_clock(START + 1, frozenset(spent))
    assert w.classes() == expected
    assert w.rules.hour_caps == {lend_bound(("l", "e")): 5, ("cap", "l", "c"): 100}


def test_aggregate_cap_over_two_envelopes() -> None:
    w = world(budget("a", "org:a", envelope("e1", 8), envelope("e2", 8), envelope("e3", 8),
                     caps=[agg_cap("both", "e1", "e2", concurrency=10)]))
    r1 = w.add_run(run("r1", "org:a", 8), admitted=START)
    r2 = w.add_run(run("r2", "org:a", 4), admitted=START + 1)
    r3 = w.add_run(run("r3", "org:a", 2), admitted=START + 2)
    r4 = w.add_run(run("r4", "org:a", 8), admitted=START + 3)
    w.view.add(claim("r4.0", r4, 8, ("a", "e3")))  # outside the cap
    w.view.add(claim("r3.0", r3, 2, ("a", "e2")))
    w.view.add(claim("r2.0", r2, 4, ("a", "e2")))
    w.view.add(claim("r1.0", r1, 8, ("a", "e1")))
    assert w.classes() == {"r1.0": OWNED, "r2.0": UNFUNDED, "r3.0": OWNED, "r4.0": OWNED}
    assert w.view.used_now(("cap", "a", "both")) == 10
    assert w.view.used_now(env_bound(("a", "e2"))) == 2


def test_aggregate_cap_allowance_replaces_the_cap() -> None:
    budgets = [budget("a", "org:a", envelope("e1", 8), envelope("e2", 8),
                      caps=[agg_cap("both", "e1", "e2", concurrency=16)])]
    w = cluster([node("n1")], budgets, allowances={"a/both": 4})
    r1 = w.add_run(run("r1", "org:a", 4), admitted=START)
    r2 = w.add_run(run("r2", "org:a", 2), admitted=START + 1)
    w.view.add(claim("r1.0", r1, 4, ("a", "e1")))
    w.view.add(claim("r2.0", r2, 2, ("a", "e2")))
    assert w.classes() == {"r1.0": OWNED, "r2.0": UNFUNDED}


def test_lending_max_concurrency() -> None:
    w = world(budget("l", "org:lender", envelope("big", 16, lend_to=["org:guest*"], lend_concurrency=4)))
    g1 = w.add_run(run("g1", "org:guest", 4, allow_borrow=True), admitted=START)
    g2 = w.add_run(run("g2", "org:guest2", 2, allow_borrow=True), admitted=START + 1)
    own = w.add_run(run("own", "org:lender", 8), admitted=START + 2)
    nob = w.add_run(run("nob", "org:guest", 2), admitted=START + 3)  # allowBorrow off
    w.view.add(claim("g1.0", g1, 4, ("l", "big")))
    w.view.add(claim("g2.0", g2, 2, ("l", "big")))
    w.view.add(claim("own.0", own, 8, ("l", "big")))
    w.view.add(claim("nob.0", nob, 2, ("l", "big")))
    assert w.classes() == {"g1.0": BORROWED, "g2.0": UNFUNDED, "own.0": OWNED, "nob.0": UNFUNDED}
    assert w.view.used_now(lend_bound(("l", "big"))) == 4
    assert w.view.used_now(env_bound(("l", "big"))) == 12


def test_max_borrow_gpus_across_two_lenders() -> None:
    w = world(budget("l1", "org:l1", envelope("e", 8, lend_to=["org:g"])),
              budget("l2", "org:l2", envelope("e", 8, lend_to=["org:g"])))
    g = w.add_run(run("g", "org:g", 10, 2, allow_borrow=True, max_borrow=6))
    other = w.add_run(run("other", "org:g", 4, allow_borrow=True), admitted=START + 1)
    w.view.add(claim("g.0", g, 4, ("l1", "e"), group=0))
    w.view.add(claim("g.1", g, 4, ("l2", "e"), group=1))  # 4 + 4 > 6
    w.view.add(claim("g.2", g, 2, ("l2", "e"), group=2))  # 4 + 2 <= 6
    w.view.add(claim("other.0", other, 4, ("l2", "e")))  # another run: its own borrow limit
    assert w.classes() == {"g.0": BORROWED, "g.1": UNFUNDED, "g.2": BORROWED, "other.0": BORROWED}
    assert w.view.used_now(("borrow", "default/g")) == 6


@pytest.mark.parametrize(("removed", "expected"), [
    ("g.0", {"g.1": BORROWED, "g.2": BORROWED}),  # l1's last claim of g ends: g.1 and g.2 fit under 6
    ("g.1", {"g.0": BORROWED, "g.2": BORROWED}),
    ("g.2", {"g.0": BORROWED, "g.1": UNFUNDED}),
])
def test_max_borrow_gpus_refunds_when_a_borrowed_lease_on_another_lender_ends(
        removed: str, expected: dict[str, FundingClass]) -> None:
    # §2 automatic re-funding and §10.3 derivation: when g's borrowed lease on one lender closes,
    # its claims on the other lender, unfunded only by maxBorrowGPUs, are funded again by the same
    # arithmetic a full recomputation gives.
    w = world(budget("l1", "org:l1", envelope("e", 8, lend_to=["org:g"])),
              budget("l2", "org:l2", envelope("e", 8, lend_to=["org:g"])))
    g = w.add_run(run("g", "org:g", 12, 4, allow_borrow=True, max_borrow=6))
    w.view.add(claim("g.0", g, 4, ("l1", "e"), group=0))
    w.view.add(claim("g.1", g, 4, ("l2", "e"), group=1))
    w.view.add(claim("g.2", g, 2, ("l2", "e"), group=2))
    assert w.classes() == {"g.0": BORROWED, "g.1": UNFUNDED, "g.2": BORROWED}
    w.view.remove(removed)
    incremental = w.classes()
    w.view.invalidate()
    recomputed = w.classes()
    assert recomputed == expected
    assert incremental == recomputed


def test_claim_on_a_node_outside_the_payer_selector_is_unfunded() -> None:
    w = world(budget("a", "org:a", envelope("r1", 8, selector={"rack": "r1"})))
    r = w.add_run(run("r", "org:a", 8))
    w.view.add(claim("in", r, 4, ("a", "r1"), node_labels=node("n1", rack="r1").labels))
    w.view.add(claim("out", r, 4, ("a", "r1"), group=1, node_labels=node("n2", rack="r2").labels))
    w.view.add(claim("flavor", r, 4, ("a", "r1"), group=2,
                     node_labels=node("n3", rack="r1", flavor="A100-40GB").labels))
    w.view.add(claim("nopayer", r, 4, None, group=3))
    assert w.classes() == {"in": OWNED, "out": UNFUNDED, "flavor": UNFUNDED, "nopayer": UNFUNDED}


# --- used_before ---------------------------------------------------------------------------

def test_used_before_counts_funded_claims_ranked_strictly_before() -> None:
    w = world(budget("a", "org:a", envelope("west", 10)))
    runs = [w.add_run(run(f"r{i}", "org:a", 4), admitted=START + i * 10) for i in range(4)]
    # r0: 4 funded, r1: 4 funded, r2: 4 unfunded (8 + 4 > 10), r3: 2 funded
    for r, gpus in zip(runs, (4, 4, 4, 2), strict=True):
        w.view.add(claim(f"{r.name}.0", r, gpus, ("a", "west")))
    assert w.classes() == {"r0.0": OWNED, "r1.0": OWNED, "r2.0": UNFUNDED, "r3.0": OWNED}
    b = env_bound(("a", "west"))

    def rank(admitted: int, key: str = "default/zz", group: int = 0, name: str = "") -> tuple:
        return (OWNER, admitted, key, group, name)

    cases = [
        (rank(START - 1), 0),  # before everything
        (rank(START, "default/r0", 0, "r0.0"), 0),  # a claim's own rank excludes itself
        (rank(START, "default/r0", 0, "r0.0~"), 4),  # just after r0's lease
        (rank(START + 5), 4),  # between r0 and r1
        (rank(START + 15), 8),  # between r1 and r2
        (rank(START + 25), 8),  # after the unfunded r2: it adds nothing
        (rank(START + 30, "default/r3", 0, "r3.0"), 8),
        (rank(START + 31), 10),  # after everything
        ((ANCESTOR + 1, START - 100, "default/a", 0, ""), 10),  # a worse tier ranks after all owners
    ]
    for r, expected in cases:
        assert w.view.used_before(b, r) == expected, r
    assert w.view.used_before(env_bound(("a", "nope")), rank(START + 31)) == 0


# --- derivation: the same classes in any order ---------------------------------------------------

def _derivation_world() -> tuple[World, list[Claim]]:
    w = world(
        budget("a", "org:a", envelope("e1", 6), envelope("e2", 6),
               caps=[agg_cap("c", "e1", "e2", concurrency=8)], parents=["org:root"]),
        budget("b", "org:b", envelope("solo", 4), parents=["org:root"]),
        budget("l", "org:l", envelope("lend", 8, lend_to=["org:g"], lend_concurrency=4)),
    )
    own = w.add_run(run("own", "org:a", 8, 4), admitted=START + 30)
    sib = w.add_run(run("sib", "org:b", 6), admitted=START)
    bor = w.add_run(run("bor", "org:g", 6, allow_borrow=True), admitted=START + 10)
    w.add_run(run("orphan", "org:b", 4), admitted=START + 20)
    claims = [
        claim("own.0", own, 4, ("a", "e1"), group=0),
        claim("own.1", own, 4, ("a", "e2"), group=1),
        claim("sib.0", sib, 4, ("a", "e1")),
        claim("sib.1", sib, 2, ("b", "solo")),
        claim("bor.0", bor, 3, ("l", "lend")),
        claim("bor.1", bor, 3, ("l", "lend"), group=1),
        claim("orphan.0", "default/orphan", 2, ("b", "solo"), owner="org:b"),
    ]
    return w, claims


def _reference_classes() -> dict[str, FundingClass]:
    w, claims = _derivation_world()
    for c in claims:
        w.view.add(c)
    w.view.invalidate()
    return w.classes()


REFERENCE = {
    "own.0": OWNED, "own.1": OWNED,  # owner first: 8 under the cap
    "sib.0": UNFUNDED,  # recalled: the cap is full
    "sib.1": OWNED, "orphan.0": OWNED,  # 2 + 2 <= 4 on solo
    "bor.0": BORROWED, "bor.1": UNFUNDED,  # lending cap 4
}


def test_reference_classes() -> None:
    assert _reference_classes() == REFERENCE


@pytest.mark.parametrize("order", list(itertools.permutations(range(7)))[::73])
@pytest.mark.parametrize("refresh_every", [1, 3])
def test_classes_do_not_depend_on_insertion_order(order: tuple[int, ...], refresh_every: int) -> None:
    w, claims = _derivation_world()
    for i, k in enumerate(order):
        w.view.add(claims[k])
        if i % refresh_every == 0:
            w.view.refresh()  # exercise the incremental append path
    w.view.refresh()
    assert w.classes() == REFERENCE
    assert sum(w.view.class_gpus.values()) == sum(c.gpus for c in claims)
    assert w.view.class_gpus[UNFUNDED] == 4 + 3


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_small_set_any_order_matches_one_recomputation(order: tuple[int, ...]) -> None:
    w = world(budget("a", "org:a", envelope("e", 8), parents=["org:p"]),
              budget("s", "org:s", parents=["org:p"]))
    specs = [("o1", "org:a", 0, 4), ("o2", "org:a", 20, 3), ("s1", "org:s", 10, 2),
             ("s2", "org:s", 30, 1), ("o3", "org:a", 40, 2)]
    claims = []
    for name, owner, at, gpus in specs:
        r = w.add_run(run(name, owner, gpus), admitted=START + at)
        claims.append(claim(f"{name}.0", r, gpus, ("a", "e")))
    for k in order:
        w.view.add(claims[k])
        w.view.refresh()
    got = w.classes()
    w.view.invalidate()
    assert w.classes() == got
    # owners by admission: o1 4, o2 3 (7), o3 2 does not fit; then siblings: s1 2 no, s2 1 fits (8)
    assert got == {"o1.0": OWNED, "o2.0": OWNED, "o3.0": UNFUNDED, "s1.0": UNFUNDED, "s2.0": SHARED}


@pytest.mark.parametrize("victim", range(7))
def test_removal_matches_recomputation(victim: int) -> None:
    w, claims = _derivation_world()
    for c in claims:
        w.view.add(c)
        w.view.refresh()
    w.view.remove(claims[victim].name)
    got = w.classes()
    fresh, _ = _derivation_world()
    for i, c in enumerate(claims):
        if i != victim:
            fresh.view.add(c)
    assert got == fresh.classes()
    assert claims[victim].name not in got


def test_removing_the_last_ranked_funded_claim_is_local_even_with_starved_claims() -> None:
    """A hypothetical claim ranked after everyone (how a cut world ranks a queued run in) is
    added by the append path and removed without re-ranking the component, though a claim
    ranked before it is starved: classes, usage and `used_before` are as before, nothing was
    disturbed, and a full re-ranking agrees. A funded claim that is not last is re-ranked."""
    w = world(budget("a", "org:a", envelope("e", 9)))
    old = [w.add_run(run(f"r{i}", "org:a", 4), admitted=START + i) for i in range(3)]
    for r in old:  # 4 + 4 funded, the third starved (12 > 9)
        w.view.add(claim(f"{r.name}.0", r, 4, ("a", "e")))
    b = env_bound(("a", "e"))
    probe = (OWNER, START + 200, "z", 0, "")

    def state() -> tuple[dict[str, FundingClass], dict[Bound, int], int]:
        return w.classes(), dict(w.view.used), w.view.used_before(b, probe)

    before = state()
    assert before[0]["r2.0"] is UNFUNDED and before[1][b] == 8
    late = w.add_run(run("late", "org:a", 1), admitted=START + 100)
    disturbed = w.view.disturbances
    w.view.add(claim("late.0", late, 1, ("a", "e")))
    assert w.classes()["late.0"] is OWNED and w.view.used_before(b, probe) == 9
    w.view.remove("late.0")
    assert w.view.disturbances == disturbed and not w.view._dirty  # nothing re-ranked
    assert state() == before
    w.view.invalidate()
    assert state() == before
    w.view.remove("r1.0")  # funded, not last, a starved claim after it: re-ranked
    assert w.view._dirty and w.view.disturbances == disturbed + 1
    assert w.classes() == {"r0.0": OWNED, "r2.0": OWNED}


def test_a_claim_ranked_mid_component_with_no_room_before_it_is_unfunded_in_place() -> None:
    """A claim ranked between funded claims, whose bound the claims ranked before it already
    fill, is unfunded without re-ranking (nothing after it changes: it takes nothing); it then
    counts as starved, so removing a funded claim before it re-ranks and funds it."""
    w = world(budget("a", "org:a", envelope("e", 8)))
    first, last = (w.add_run(run(n, "org:a", 4), admitted=START + t) for n, t in (("first", 0), ("last", 20)))
    w.view.add(claim("first.0", first, 4, ("a", "e")))
    w.view.add(claim("first.1", first, 4, ("a", "e")))
    w.view.add(claim("last.0", last, 4, ("a", "e")))  # ranked after a full bound: unfunded
    w.view.refresh()
    mid = w.add_run(run("mid", "org:a", 4), admitted=START + 10)
    disturbed = w.view.disturbances
    w.view.add(claim("mid.0", mid, 4, ("a", "e")))
    assert not w.view._dirty and w.view.disturbances == disturbed  # nothing re-ranked
    assert w.classes() == {"first.0": OWNED, "first.1": OWNED, "mid.0": UNFUNDED, "last.0": UNFUNDED}
    fresh = copy.deepcopy(w.view)
    fresh.invalidate()
    assert {n: fresh.class_of(n) for n in w.classes()} == w.classes()  # as a full re-ranking
    w.view.remove("first.1")
    assert w.classes() == {"first.0": OWNED, "mid.0": OWNED, "last.0": UNFUNDED}


@pytest.mark.parametrize("extra", [(0,), (2,), (4, 5), (0, 1, 6), (3,)])
def test_classes_with_extra_claims_equal_adding_them_and_leave_the_view_alone(extra: tuple[int, ...]) -> None:
    """`classes_with` ranks hypothetical claims in on the side: the classes and unfunded counts
    are those of a view holding them too, and the view itself (classes, usage, disturbances)
    does not move."""
    w, claims = _derivation_world()
    for i, c in enumerate(claims):
        if i not in extra:
            w.view.add(c)
    w.view.refresh()
    before = (w.classes(), dict(w.view.used), dict(w.view.unfunded_claims), w.view.disturbances)
    got, unfunded = w.view.classes_with([claims[i] for i in extra])
    assert (w.classes(), dict(w.view.used), dict(w.view.unfunded_claims), w.view.disturbances) == before
    assert not w.view._dirty
    fresh, _ = _derivation_world()
    for c in claims:
        fresh.view.add(c)
    assert got == REFERENCE == fresh.classes()
    assert unfunded == fresh.view.unfunded_claims


@pytest.mark.parametrize("seed", range(12))
def test_re_ranking_from_a_point_equals_re_ranking_everything(seed: int) -> None:
    """Claims come and go mid-ranking in contended components (two envelopes under one cap,
    a sibling sharing, a starved tail): the view re-ranks only from the first claim that moved
    (`since`). After every step its classes and usage equal a full re-ranking of the same
    claims, and the partial path is taken."""
    rnd = random.Random(seed)
    w = world(
        budget("a", "org:a", envelope("e1", 10), envelope("e2", 10),
               caps=[agg_cap("c", "e1", "e2", concurrency=14)], parents=["org:root"]),
        budget("b", "org:b", envelope("solo", 6), parents=["org:root"]),
    )
    runs = [w.add_run(run(f"r{i}", rnd.choice(["org:a", "org:b"]), 4), admitted=START + rnd.randrange(100))
            for i in range(12)]
    payers = [("a", "e1"), ("a", "e2"), ("b", "solo")]
    live: dict[str, Claim] = {}
    partial = 0
    for step in range(80):
        if live and rnd.random() < 0.4:
            name = rnd.choice(sorted(live))
            del live[name]
            w.view.remove(name)
        else:
            r = rnd.choice(runs)
            c = claim(f"{r.name}.{step}", r, rnd.randint(1, 4), rnd.choice(payers), group=step)
            live[c.name] = c
            w.view.add(c)
        partial += any(comp.since is not None for comp in w.view._dirty)
        if rnd.random() < 0.5:
            continue  # let changes pile up before the next read
        fresh = FundingView(w.rules, w.view._terms)
        for c in live.values():
            fresh.add(c)
        fresh.refresh()
        w.view.refresh()
        assert w.view._cls == fresh._cls, step
        assert {b: n for b, n in w.view.used.items() if n} == {b: n for b, n in fresh.used.items() if n}, step
        assert w.view.unfunded_claims == fresh.unfunded_claims, step
        # Hypothetical claims ranked in on the side (`classes_with` re-fills only from the
        # first of them) equal a fresh view holding them too.
        r = rnd.choice(runs)
        extra = [claim(f"{r.name}.x{step}.{i}", r, rnd.randint(1, 4), rnd.choice(payers), group=100 + i)
                 for i in range(rnd.randint(1, 2))]
        got, unfunded = w.view.classes_with(extra)
        for c in extra:
            fresh.add(c)
        fresh.refresh()
        assert got == fresh._cls, step
        assert unfunded == fresh.unfunded_claims, step
    assert partial > 0
