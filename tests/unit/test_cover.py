"""cover: eligible envelopes in proximity order, and a payer for every GPU of a request (§3)."""

from __future__ import annotations

import pytest
from builders import HOUR, START, World, budget, claim, cluster, envelope, node, run, terms_of

from jobtree.core.cover import Candidate, GroupNeed, Payment, candidates, cover
from jobtree.core.funding_rules import env_bound
from jobtree.core.model import Budget, Role, Run, labels_of

DAY = 24 * HOUR


def refs(cands: list[Candidate]) -> list[tuple[str, str]]:
    return [c.ref for c in cands]


def pieces(w: World, r: Run, needs: list[GroupNeed], *, t: int = START, period: int = DAY,
           headroom_only: bool = False, reserve: bool = False) -> list[tuple[int, Role, int, tuple | None, bool]]:
    """(group, role, count, payer, funded) of every piece cover returns, in order."""
    terms = w.terms(r.key)
    cands = candidates(w.rules, w.topo, r, terms, t, reserve)
    got = cover(w.rules, w.view, w.meter, r, terms, needs, t, w.period_of(period), cands,
                headroom_only=headroom_only)
    out = []
    for g in got.groups:
        for p in g.pieces:
            assert isinstance(p.tag, Payment)
            out.append((g.index, p.role, p.count, p.tag.payer, p.tag.funded))
    assert got.total_gpus == sum(n.active + n.spares for n in needs)
    assert got.funded_gpus == sum(x[2] for x in out if x[4])
    return out


# --- proximity order ---------------------------------------------------------------------------------

# Budget names run against proximity so the order cannot come from names alone.
PROXIMITY: list[Budget] = [
    budget("z-own", "org:a:x", envelope("e", 4), parents=["org:a"]),
    budget("y-parent", "org:a", envelope("e", 4), parents=["org:root"]),
    budget("x-grand", "org:root", envelope("e", 4)),
    budget("w-sib", "org:a:y", envelope("e", 4), parents=["org:a"]),
    budget("v-cousin", "org:b:z", envelope("e", 4), parents=["org:b"]),
    budget("u-aunt", "org:b", envelope("e", 4), parents=["org:root"]),  # not family of org:a:x
    budget("t-sponsor1", "org:s1", envelope("e", 4, lend_to=["org:a:x"])),
    budget("s-sponsor2", "org:s2", envelope("e", 4, lend_to=["org:a:*"])),
    budget("r-stranger", "org:s3", envelope("e", 4)),  # lends to nobody
    budget("q-own-a100", "org:a:x", envelope("e", 4, flavor="A100-40GB")),  # another flavor
    budget("p-own-nowhere", "org:a:x", envelope("e", 4, selector={"rack": "r9"})),  # matches no node
]
FAMILY_ORDER = [("z-own", "e"), ("y-parent", "e"), ("x-grand", "e"), ("w-sib", "e"), ("v-cousin", "e")]


@pytest.mark.parametrize(
    ("allow_borrow", "sponsors", "expected"),
    [
        (False, (), FAMILY_ORDER),  # no sponsors without allowBorrow
        (False, ("org:s1",), FAMILY_ORDER),
        (True, (), [*FAMILY_ORDER, ("s-sponsor2", "e"), ("t-sponsor1", "e")]),  # any lender, by budget name
        (True, ("org:s1", "org:s2"), [*FAMILY_ORDER, ("t-sponsor1", "e"), ("s-sponsor2", "e")]),
        (True, ("org:s2", "org:s1"), [*FAMILY_ORDER, ("s-sponsor2", "e"), ("t-sponsor1", "e")]),
        (True, ("org:s1",), [*FAMILY_ORDER, ("t-sponsor1", "e")]),  # the list restricts
        (True, ("org:s3", "org:s1"), [*FAMILY_ORDER, ("t-sponsor1", "e")]),  # a non-lender stays out
    ],
)
def test_proximity_order(allow_borrow: bool, sponsors: tuple[str, ...], expected: list) -> None:
    w = cluster([node("n1", rack="r1")], PROXIMITY)
    r = w.add_run(run("r", "org:a:x", 8, allow_borrow=allow_borrow, sponsors=sponsors))
    assert refs(candidates(w.rules, w.topo, r, w.terms(r.key), START)) == expected


def test_ancestors_at_the_same_distance_order_by_budget_then_envelope_name() -> None:
    w = cluster([node("n1")], [
        budget("o", "org:o", parents=["org:p2", "org:p1"]),
        budget("p2", "org:p2", envelope("b", 4), envelope("a", 4)),
        budget("p1", "org:p1", envelope("z", 4)),
    ])
    r = w.add_run(run("r", "org:o", 4))
    assert refs(candidates(w.rules, w.topo, r, w.terms(r.key), START)) == [("p1", "z"), ("p2", "a"), ("p2", "b")]


def test_locality_selector_preference_within_a_tier() -> None:
    w = cluster([node("n1", rack="r1", zone="z1"), node("n2", rack="r2", zone="z1")], [
        budget("a-zone", "org:o", envelope("e", 4, selector={"zone": "z1"})),  # compatible, not a subset
        budget("b-rack", "org:o", envelope("e", 4, selector={"rack": "r1"})),  # subset of the run's selector
        budget("c-any", "org:o", envelope("e", 4)),  # the empty selector is a subset of anything
        budget("d-other-rack", "org:o", envelope("e", 4, selector={"rack": "r2"})),  # cannot match the run
        budget("p-parent", "org:p", envelope("e", 4, selector={"rack": "r1"})),
    ])
    r = w.add_run(run("r", "org:o", 8, selector={"rack": "r1"}))
    got = refs(candidates(w.rules, w.topo, r, w.terms(r.key), START))
    assert got == [("b-rack", "e"), ("c-any", "e"), ("a-zone", "e")]
    # without a locality selector only selector-less envelopes are "local" (the empty set is a subset)
    r2 = w.add_run(run("r2", "org:o", 8))
    assert refs(candidates(w.rules, w.topo, r2, w.terms(r2.key), START)) == [
        ("c-any", "e"), ("a-zone", "e"), ("b-rack", "e"), ("d-other-rack", "e")]


@pytest.mark.parametrize(
    ("start", "end", "pre_admission", "pre_reservations", "bind", "reserve"),
    [
        (None, None, False, False, True, True),
        (START + HOUR, None, False, False, False, False),  # opens later, no preActivation
        (START + HOUR, None, True, False, True, False),  # allowAdmission: eligible to bind now
        (START + HOUR, None, False, True, False, True),  # allowReservations: eligible to reserve
        (START + HOUR, None, True, True, True, True),
        (START - HOUR, START, False, False, False, False),  # ended
    ],
)
def test_window_and_pre_activation_eligibility(start: int | None, end: int | None, pre_admission: bool,
                                               pre_reservations: bool, bind: bool, reserve: bool) -> None:
    w = cluster([node("n1")], [budget("b", "org:o", envelope("e", 8, start=start, end=end, pre_admission=pre_admission,
                                                         pre_reservations=pre_reservations))])
    r = w.add_run(run("r", "org:o", 4))
    assert bool(candidates(w.rules, w.topo, r, w.terms(r.key), START)) is bind
    assert bool(candidates(w.rules, w.topo, r, w.terms(r.key), START, reserve=True)) is reserve


@pytest.mark.parametrize("reserve", [False, True])
def test_an_ended_window_is_not_pre_activated(reserve: bool) -> None:
    # §1: preActivation lets work be reserved/admitted *before the window opens*; an envelope whose
    # window has ended is not eligible (§3), so it must not be the fallback payer ahead of an
    # eligible parent envelope that can fund the GPUs once it has room.
    w = cluster([node("n1")], [
        budget("own", "org:o", envelope("e", 8, start=START - 2 * HOUR, end=START - HOUR,
                                        pre_admission=True, pre_reservations=True), parents=["org:p"]),
        budget("par", "org:p", envelope("e", 8)),
    ])
    full = w.add_run(run("full", "org:p", 8), admitted=START - HOUR)
    w.view.add(claim("full.0", full, 8, ("par", "e")))
    r = w.add_run(run("r", "org:o", 4))
    assert refs(candidates(w.rules, w.topo, r, w.terms(r.key), START, reserve)) == [("par", "e")]
    # the unfundable GPUs name the parent, which can re-fund them; never the dead window
    assert pieces(w, r, [GroupNeed(0, 4)], reserve=reserve) == [(0, Role.ACTIVE, 4, ("par", "e"), False)]


# --- payers --------------------------------------------------------------------------------------

def test_a_group_split_across_two_payers() -> None:
    w = cluster([node("n1"), node("n2")], [
        budget("own", "org:o", envelope("e", 4), parents=["org:p"]),
        budget("par", "org:p", envelope("e", 8)),
    ])
    r = w.add_run(run("r", "org:o", 10, 8))
    got = pieces(w, r, [GroupNeed(0, 8), GroupNeed(1, 2)])
    assert got == [
        (0, Role.ACTIVE, 4, ("own", "e"), True),
        (0, Role.ACTIVE, 4, ("par", "e"), True),
        (1, Role.ACTIVE, 2, ("par", "e"), True),
    ]


def test_active_before_spares_and_groups_in_index_order() -> None:
    w = cluster([node("n1"), node("n2")], [budget("own", "org:o", envelope("e", 7))])
    r = w.add_run(run("r", "org:o", 8, 4, spares=2))
    got = pieces(w, r, [GroupNeed(0, 4, 2), GroupNeed(1, 4, 2)])
    assert got == [
        (0, Role.ACTIVE, 4, ("own", "e"), True),
        (0, Role.SPARE, 2, ("own", "e"), True),
        (1, Role.ACTIVE, 1, ("own", "e"), True),
        (1, Role.ACTIVE, 3, ("own", "e"), False),  # the funded part first, then the unfunded part
        (1, Role.SPARE, 2, ("own", "e"), False),
    ]


def test_payer_selector_travels_with_the_piece() -> None:
    w = cluster([node("n1", rack="r1"), node("n2", rack="r2")], [
        budget("own", "org:o", envelope("e", 2, selector={"rack": "r1"}), envelope("f", 8)),
    ])
    r = w.add_run(run("r", "org:o", 4, selector={"rack": "r1"}))
    terms = w.terms(r.key)
    got = cover(w.rules, w.view, w.meter, r, terms, [GroupNeed(0, 4)], START, w.period_of(DAY),
                candidates(w.rules, w.topo, r, terms, START))
    assert [(p.count, p.selector) for p in got.groups[0].pieces] == [(2, labels_of({"rack": "r1"})), (2, ())]
    assert got.first_funded_payer == ("own", "e")


def test_fallback_payer_for_unfundable_gpus() -> None:
    # Every eligible envelope is full: the first eligible one in cover order pays, unfunded.
    w = cluster([node("n1"), node("n2")], [
        budget("own", "org:o", envelope("e", 4), parents=["org:p"]),
        budget("par", "org:p", envelope("e", 4)),
    ])
    early = w.add_run(run("early", "org:o", 4), admitted=START - HOUR)
    w.view.add(claim("early.0", early, 4, ("own", "e")))
    r = w.add_run(run("r", "org:o", 6))
    assert pieces(w, r, [GroupNeed(0, 6)]) == [
        (0, Role.ACTIVE, 4, ("par", "e"), True),
        (0, Role.ACTIVE, 2, ("own", "e"), False),
    ]


def test_paid_by_none_only_when_nothing_is_eligible() -> None:
    w = cluster([node("n1"), node("x1", flavor="A100-40GB")], [
        budget("own", "org:o", envelope("e", 8)),
        budget("other", "org:other", envelope("e", 8, flavor="A100-40GB")),  # unrelated owner
    ])
    r = w.add_run(run("r", "org:o", 4, flavor="A100-40GB"))
    got = pieces(w, r, [GroupNeed(0, 4)])
    assert got == [(0, Role.ACTIVE, 4, None, False)]
    terms = w.terms(r.key)
    cov = cover(w.rules, w.view, w.meter, r, terms, [GroupNeed(0, 4)], START, w.period_of(DAY), [])
    assert cov.groups[0].pieces[0].selector == ()
    assert cov.first_funded_payer is None


def test_owner_claim_is_fundable_at_its_rank_despite_running_borrowers() -> None:
    # recall: the sibling's 6 GPUs rank after the owner's new claim
    w = cluster([node("n1"), node("n2")], [
        budget("own", "org:o", envelope("e", 8), parents=["org:p"]),
        budget("sib", "org:s", parents=["org:p"]),
    ])
    sib = w.add_run(run("sib", "org:s", 6), admitted=START - HOUR)
    w.view.add(claim("sib.0", sib, 6, ("own", "e")))
    r = w.add_run(run("r", "org:o", 8))
    assert pieces(w, r, [GroupNeed(0, 8)]) == [(0, Role.ACTIVE, 8, ("own", "e"), True)]
    # growth takes only headroom no open lease uses: 2 funded, the rest unfunded
    assert pieces(w, r, [GroupNeed(0, 8)], headroom_only=True) == [
        (0, Role.ACTIVE, 2, ("own", "e"), True),
        (0, Role.ACTIVE, 6, ("own", "e"), False),
    ]


def test_a_new_claim_does_not_outrank_an_earlier_claim_of_its_own_tier() -> None:
    w = cluster([node("n1"), node("n2")], [budget("own", "org:o", envelope("e", 8))])
    early = w.add_run(run("early", "org:o", 6), admitted=START - HOUR)
    w.view.add(claim("early.0", early, 6, ("own", "e")))
    r = w.add_run(run("r", "org:o", 4))
    assert pieces(w, r, [GroupNeed(0, 4)]) == [
        (0, Role.ACTIVE, 2, ("own", "e"), True),
        (0, Role.ACTIVE, 2, ("own", "e"), False),
    ]


def test_max_borrow_and_lending_caps_limit_cover() -> None:
    w = cluster([node("n1"), node("n2")], [
        budget("l1", "org:l1", envelope("e", 8, lend_to=["org:g"], lend_concurrency=3)),
        budget("l2", "org:l2", envelope("e", 8, lend_to=["org:g"])),
    ])
    r = w.add_run(run("r", "org:g", 8, allow_borrow=True, max_borrow=5))
    assert pieces(w, r, [GroupNeed(0, 8)]) == [
        (0, Role.ACTIVE, 3, ("l1", "e"), True),  # lending maxConcurrency 3
        (0, Role.ACTIVE, 2, ("l2", "e"), True),  # maxBorrowGPUs 5 across both lenders
        (0, Role.ACTIVE, 3, ("l1", "e"), False),
    ]


def test_spent_and_closed_envelopes_fund_nothing() -> None:
    w = cluster([node("n1")], [budget("own", "org:o", envelope("e", 8, hours=1), envelope("f", 8))])
    w.view.set_clock(START, frozenset({env_bound(("own", "e"))}))
    r = w.add_run(run("r", "org:o", 4))
    assert pieces(w, r, [GroupNeed(0, 4)]) == [(0, Role.ACTIVE, 4, ("own", "f"), True)]


# --- GPU-hours look-ahead -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("hours", "end", "consumed", "running", "period", "funded"),
    [
        (48, None, 0, 0, DAY, 2),  # 48 GPU-h over a 24h look-ahead: 2 GPUs
        (48, START + 6 * HOUR, 0, 0, DAY, 8),  # the window ends in 6h: min(P, rest of W) = 6h -> 8
        (48, START + 6 * HOUR, 0, 3, DAY, 5),  # its current funded width counts: 8 - 3
        (48, START + 6 * HOUR, 24 * HOUR, 0, DAY, 4),  # 24 GPU-h left over 6h
        (48, None, 0, 0, 12 * HOUR, 4),  # a shorter cluster period
        (1000, None, 0, 0, DAY, 8),  # plenty: concurrency decides (C = 8)
        (48, None, 0, 2, DAY, 0),  # the running width already uses the look-ahead
    ],
)
def test_gpu_hours_look_ahead_limits_funded_width(hours: float, end: int | None, consumed: int, running: int,
                                                  period: int, funded: int) -> None:
    w = cluster([node("n1"), node("n2")], [budget("own", "org:o", envelope("e", 8, hours=hours, end=end))])
    if consumed:
        w.meter.consumed[env_bound(("own", "e"))] = consumed
    if running:
        early = w.add_run(run("early", "org:o", running), admitted=START - HOUR)
        w.view.add(claim("early.0", early, running, ("own", "e")))
    r = w.add_run(run("r", "org:o", 8))
    got = pieces(w, r, [GroupNeed(0, 8)], period=period)
    assert sum(p[2] for p in got if p[4]) == funded
    assert all(p[3] == ("own", "e") for p in got)  # the unfunded rest falls back to the same payer


@pytest.mark.parametrize(("budget_period", "funded"), [(None, 2), (12 * HOUR, 4), (6 * HOUR, 8)])
def test_look_ahead_uses_the_payer_budgets_period(budget_period: int | None, funded: int) -> None:
    w = cluster([node("n1")], [budget("own", "org:o", envelope("e", 8, hours=48), period=budget_period)])
    r = w.add_run(run("r", "org:o", 8))
    got = pieces(w, r, [GroupNeed(0, 8)], period=DAY)
    assert sum(p[2] for p in got if p[4]) == funded


def test_terms_of_matches_run_funding() -> None:
    r = run("r", "org:g", 4, allow_borrow=True, max_borrow=2, sponsors=["org:s"])
    t = terms_of(r, START + 5)
    assert (t.admitted, t.allow_borrow, t.max_borrow, t.sponsors) == (START + 5, True, 2, ("org:s",))


# --- a twin: every candidate asked for every piece -------------------------------------------------

def _twin(w: World, r: Run, needs: list[GroupNeed], cands: list[Candidate], headroom_only: bool) -> list[tuple]:
    """The cover as §3 states it, without `cover`'s shortcut of dropping a candidate once it
    has no room: every candidate is asked, in order, for every piece."""
    from jobtree.core.cover import _Room
    room = _Room(w.rules, w.view, w.meter, r, w.terms(r.key), START, w.period_of(DAY), headroom_only)
    out: list[tuple] = []
    for need in needs:
        for role, count in ((Role.ACTIVE, need.active), (Role.SPARE, need.spares)):
            left = count
            for c in cands:
                n = min(left, room.room(c, need.index))
                if n > 0:
                    room.take(c, n)
                    out.append((need.index, role, n, c.ref, True))
                    left -= n
            if left:
                out.append((need.index, role, left, cands[0].ref if cands else None, False))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_cover_equals_asking_every_candidate_for_every_piece(seed: int) -> None:
    """Contended envelopes (shared pools, an aggregate cap, a GPU-hour budget, lenders), runs
    with and without claims of their own (a growing run's groups rank among its own claims):
    the cover equals its twin that never drops a candidate."""
    import random

    from builders import agg_cap

    rnd = random.Random(seed)
    w = cluster([node(f"n{i}") for i in range(8)], [
        budget("own", "org:d:t", envelope("e", rnd.randint(0, 12)), envelope("f", rnd.randint(0, 6), hours=rnd.choice([None, 20.0])),
               parents=["org:d"], caps=[agg_cap("c", "e", "f", concurrency=rnd.randint(4, 14))]),
        budget("sib", "org:d:s", envelope("e", rnd.randint(0, 8)), parents=["org:d"]),
        budget("pool", "org:d", envelope("e", rnd.randint(0, 10))),
        budget("lender", "org:l", envelope("e", rnd.randint(0, 8), lend_to=["org:d:*"], lend_concurrency=rnd.randint(1, 6))),
    ])
    payers = [("own", "e"), ("own", "f"), ("sib", "e"), ("pool", "e"), ("lender", "e")]
    for i in range(rnd.randint(0, 6)):
        other = w.add_run(run(f"o{i}", rnd.choice(["org:d:t", "org:d:s", "org:d"]), 4),
                          admitted=START - rnd.randint(-HOUR, HOUR))
        w.view.add(claim(f"o{i}.0", other, rnd.randint(1, 6), rnd.choice(payers)))
    r = w.add_run(run("r", "org:d:t", 32, 4, spares=rnd.randint(0, 2), allow_borrow=rnd.random() < 0.5),
                  admitted=START)
    first = 0
    if rnd.random() < 0.5:  # a growing run: claims of its own rank among its new groups
        for g in range(rnd.randint(1, 3)):
            w.view.add(claim(f"r.{g}", r, 4, rnd.choice(payers), group=g))
        first = 3
    needs = [GroupNeed(first + g, 4, r.spec.spares_per_group) for g in range(rnd.randint(1, 6))]
    cands = candidates(w.rules, w.topo, r, w.terms(r.key), START)
    for headroom_only in (False, True):
        assert pieces(w, r, needs, headroom_only=headroom_only) == _twin(w, r, needs, cands, headroom_only)
