"""cuts: the seeded lottery and the cut order of §7, on hand-built CutWorlds."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

import pytest
from builders import START, dom, lease, run, slots, status

from jobtree.core.cuts import (
    DROP_SPARE,
    LOTTERY,
    RECLAIM,
    SHRINK,
    Cut,
    CutWorld,
    capacity_leases,
    capacity_levels,
    draw,
    freed_slots,
    lottery_seed,
    plan,
    units,
)
from jobtree.core.model import FundingClass, Lease, Role, Run, Slot

OWNED, UNFUNDED = FundingClass.OWNED, FundingClass.UNFUNDED
SOURCE = "default.new.r000"


def domain_of(node_name: str) -> str:
    """Nodes are named after their domain: `a1`, `a2` in A, `b1` in B, ..."""
    return dom(node_name[0].upper())


def world(runs: Iterable[tuple[Run, int]], leases: Iterable[tuple[Lease, FundingClass]], *,
          bound_now: Iterable[str] = (), unusable: Iterable[str] = (), now: int = START + 600,
          placing: str = "default/new") -> CutWorld:
    """`runs` as (run, admission time); `leases` with their classes."""
    bound = set(bound_now)
    bad = set(unusable)
    ls = list(leases)
    return CutWorld(
        leases={x.name: x for x, _ in ls},
        classes={x.name: c for x, c in ls},
        runs={r.key: (r.spec, status(t, bound_at=now if r.name in bound else START)) for r, t in runs},
        domain_of=domain_of,
        usable=lambda s: s[0] not in bad,
        placing=placing,
        now=now,
    )


def cut_view(cuts: Iterable[Cut]) -> list[tuple[int, str, tuple[str, ...]]]:
    return [(c.step, c.run.removeprefix("default/"), c.leases) for c in cuts]


def all_slots(*ls: Lease) -> set[Slot]:
    return {s for x in ls for s in x.slots}


# --- the seed ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("source", "t", "text"),
    [
        ("default.big.r000", START + 20 * 60, "2026-01-05T00:20:00Z"),
        ("default/big", START, "2026-01-05T00:00:00Z"),
        ("team-a.train.r012", 951_782_400 + 3661, "2000-02-29T01:01:01Z"),
        ("", 0, "1970-01-01T00:00:00Z"),
    ],
)
def test_lottery_seed_is_sha256_of_source_at_time(source: str, t: int, text: str) -> None:
    expected = hashlib.sha256(f"{source}@{text}".encode()).hexdigest()
    got = lottery_seed(source, t)
    assert got == expected
    assert len(got) == 64 and got == got.lower()


# --- the draw ------------------------------------------------------------------------------------

def reference_draw(rho: str, conflict: set[str], owner: dict[str, str], gpus: dict[str, int],
                   deficit: int) -> list[str]:
    """§7 step 4, written from the spec text: with rng = random.Random(int(rho, 16)), repeat while
    the deficit is positive: owners = sorted({owner of each run in the set}),
    o = owners[rng.randrange(len(owners))], keys = sorted(runs of o in the set),
    victim = keys[rng.randrange(len(keys))]; count its GPUs as freed; remove it from the set."""
    rng = random.Random(int(rho, 16))
    remaining = set(conflict)
    victims: list[str] = []
    while deficit > 0 and remaining:
        owners = sorted({owner[k] for k in remaining})
        o = owners[rng.randrange(len(owners))]
        keys = sorted(k for k in remaining if owner[k] == o)
        victim = keys[rng.randrange(len(keys))]
        victims.append(victim)
        deficit -= gpus[victim]
        remaining.remove(victim)
    return victims


CONFLICTS = [
    # (owner of each run, GPUs of each run)
    ({"default/a": "org:x", "default/b": "org:y", "default/c": "org:z"}, {"default/a": 4, "default/b": 4,
                                                                           "default/c": 4}),
    ({f"default/r{i}": "org:solo" for i in range(6)}, {f"default/r{i}": 2 for i in range(6)}),
    ({**{f"ns1/j{i}": "org:big" for i in range(5)}, "ns2/k": "org:small", "ns2/l": "org:mid", "ns2/m": "org:mid"},
     {**{f"ns1/j{i}": 8 for i in range(5)}, "ns2/k": 1, "ns2/l": 3, "ns2/m": 16}),
]


@pytest.mark.parametrize("conflict_index", range(len(CONFLICTS)))
@pytest.mark.parametrize("source", ["default.a.r000", "default/b", "team.x.r017", "z"])
@pytest.mark.parametrize("deficit", [1, 5, 12, 1000])
def test_draw_replays_the_spec_procedure(conflict_index: int, source: str, deficit: int) -> None:
    owner, gpus = CONFLICTS[conflict_index]
    rho = lottery_seed(source, START + 1234)
    expected = reference_draw(rho, set(owner), owner, gpus, deficit)
    got = draw(rho, list(owner)[::-1], owner.__getitem__,
               lambda vs: sum(gpus[v] for v in vs) < deficit)
    assert got == expected
    if deficit == 1000:
        assert sorted(got) == sorted(owner)  # never short-circuits: everyone, each once


def test_draw_with_no_deficit_or_no_conflict_draws_nobody() -> None:
    rho = lottery_seed("x", START)
    assert draw(rho, ["default/a"], lambda k: "org:a", lambda vs: False) == []
    assert draw(rho, [], lambda k: "org:a", lambda vs: True) == []


def test_draw_picks_the_owner_first_not_the_run() -> None:
    # One owner with 50 runs and one with a single run: each owner is drawn with probability 1/2
    # at the first draw, whatever its number of runs. Count over many seeds.
    owner = {**{f"default/many{i:02d}": "org:many" for i in range(50)}, "default/single": "org:one"}
    firsts = [draw(lottery_seed(f"s{i}", START), owner, owner.__getitem__, lambda vs: not vs)[0]
              for i in range(400)]
    singles = firsts.count("default/single")
    assert 140 < singles < 260  # ~200 expected; a per-run draw would give ~8


# --- freed_slots: side effects of a cut ----------------------------------------------------------------

FIXED = run("fixed", "org:f", 8)
MALL = run("mall", "org:m", 12, 4, malleable=(8, 16, 4))
SPARED = run("spared", "org:s", 4, 4, spares=2)

F0 = lease("fixed.0", FIXED, slots("a1", 0, 1, 2, 3))
F1 = lease("fixed.1", FIXED, slots("a2", 0, 1, 2, 3))
M0 = lease("mall.0", MALL, slots("a1", 4, 5, 6, 7), group=0)
M1 = lease("mall.1", MALL, slots("a2", 4, 5, 6, 7), group=1)
M2a = lease("mall.2", MALL, slots("a3", 0, 1), group=2)
M2b = lease("mall.3", MALL, slots("a4", 0, 1), group=2)
S0 = lease("spared.0", SPARED, slots("a3", 2, 3, 4, 5), group=0)
S1 = lease("spared.1", SPARED, slots("a3", 6, 7), group=0, role=Role.SPARE)
SIDE_WORLD = world([(FIXED, START), (MALL, START), (SPARED, START)],
                   [(x, OWNED) for x in (F0, F1, M0, M1, M2a, M2b, S0, S1)])


@pytest.mark.parametrize(
    ("cuts", "freed"),
    [
        # a fixed run that loses one active GPU frees everything
        ([Cut(RECLAIM, FIXED.key, ("fixed.0",))], all_slots(F0, F1)),
        # a malleable run frees a broken group whole (both its leases), and keeps the rest
        ([Cut(SHRINK, MALL.key, ("mall.2",))], all_slots(M2a, M2b)),
        ([Cut(SHRINK, MALL.key, ("mall.2", "mall.3"))], all_slots(M2a, M2b)),
        # ... and everything once the intact groups fall below min (8)
        ([Cut(SHRINK, MALL.key, ("mall.1",)), Cut(SHRINK, MALL.key, ("mall.3",))], all_slots(M0, M1, M2a, M2b)),
        # dropping a spare breaks no gang
        ([Cut(DROP_SPARE, SPARED.key, ("spared.1",))], all_slots(S1)),
        # losing an active lease of a fixed run with spares frees its spares too
        ([Cut(RECLAIM, SPARED.key, ("spared.0",))], all_slots(S0, S1)),
        # cuts of several runs: the union
        ([Cut(DROP_SPARE, SPARED.key, ("spared.1",)), Cut(SHRINK, MALL.key, ("mall.3",))],
         all_slots(S1, M2a, M2b)),
        ([], set()),
    ],
)
def test_freed_slots_side_effects(cuts: list[Cut], freed: set[Slot]) -> None:
    assert freed_slots(SIDE_WORLD, cuts) == freed


# --- plan --------------------------------------------------------------------------------------------

U = run("u", "org:u", 4)
S = run("s", "org:s", 4, 4, spares=2)
M = run("m", "org:m", 8, 4, malleable=(4, 8, 4))
F = run("f", "org:f", 4)
U_L = lease("u.0", U, slots("a1", 0, 1, 2, 3))
S_A = lease("s.0", S, slots("a1", 4, 5, 6, 7))
S_SP = lease("s.1", S, slots("a2", 0, 1), role=Role.SPARE)
M_0 = lease("m.0", M, slots("a2", 2, 3, 4, 5), group=0)
M_1 = lease("m.1", M, slots("a3", 0, 1, 2, 3), group=1)
F_L = lease("f.0", F, slots("a3", 4, 5, 6, 7))


def ladder(**kw: object) -> CutWorld:
    """One domain A: an unfunded fixed run u (4), a run s with 2 spares, a malleable m above min by
    one group, and a funded fixed run f."""
    return world([(U, START), (S, START + 10), (M, START + 20), (F, START + 30)],
                 [(U_L, UNFUNDED), (S_A, OWNED), (S_SP, OWNED), (M_0, OWNED), (M_1, OWNED), (F_L, OWNED)],
                 **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("deficit", "expected"),
    [
        (1, [(RECLAIM, "u", ("u.0",))]),
        (4, [(RECLAIM, "u", ("u.0",))]),  # step 1 alone: no spares dropped, nobody shrunk
        (5, [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",))]),
        (6, [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",))]),
        # step 3 was needed, and then the spare-needless pass finds the dropped spare redundant
        (7, [(RECLAIM, "u", ("u.0",)), (SHRINK, "m", ("m.1",))]),
        (8, [(RECLAIM, "u", ("u.0",)), (SHRINK, "m", ("m.1",))]),
        (9, [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",)), (SHRINK, "m", ("m.1",))]),
        (10, [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",)), (SHRINK, "m", ("m.1",))]),
    ],
)
def test_plan_stops_at_the_gentlest_step(deficit: int, expected: list) -> None:
    w = ladder()
    got = plan(w, {dom("A"): deficit}, SOURCE)
    assert got is not None
    assert cut_view(got.cuts) == expected
    assert got.seed == lottery_seed(SOURCE, w.now)
    assert got.conflict_set == ()  # the lottery was not reached
    assert got.freed == freed_slots(w, got.cuts)
    assert len(got.freed) >= deficit


def test_plan_reaches_the_lottery_and_spares_needless_cuts() -> None:
    w = ladder()
    got = plan(w, {dom("A"): 14}, SOURCE)
    assert got is not None
    # after steps 1-3 (10 GPUs), s, m and f still hold leases in scope
    assert got.conflict_set == ("default/f", "default/m", "default/s")
    owners = {"default/f": "org:f", "default/m": "org:m", "default/s": "org:s"}
    victim = reference_draw(got.seed, set(owners), owners, {k: 4 for k in owners}, 4)
    assert len(victim) == 1
    expected = {
        # a victim's own earlier cut frees nothing more: it is dropped
        "default/m": [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",)), (LOTTERY, "m", ("m.0", "m.1"))],
        "default/s": [(RECLAIM, "u", ("u.0",)), (SHRINK, "m", ("m.1",)), (LOTTERY, "s", ("s.0", "s.1"))],
        "default/f": [(RECLAIM, "u", ("u.0",)), (DROP_SPARE, "s", ("s.1",)), (SHRINK, "m", ("m.1",)),
                      (LOTTERY, "f", ("f.0",))],
    }[victim[0]]
    assert cut_view(got.cuts) == expected


def test_spare_needless_pass_drops_a_redundant_step_one_cut() -> None:
    small = run("small", "org:u", 2)
    big = run("big", "org:b", 8)
    small_l = lease("small.0", small, slots("a1", 0, 1))
    big_l = lease("big.0", big, slots("a2", *range(8)))
    w = world([(small, START), (big, START)], [(small_l, UNFUNDED), (big_l, OWNED)])
    got = plan(w, {dom("A"): 8}, SOURCE)
    assert got is not None
    # step 1 took `small` (2), the lottery had to take `big` (8), which alone clears the deficit
    assert got.conflict_set == ("default/big",)
    assert cut_view(got.cuts) == [(LOTTERY, "big", ("big.0",))]
    assert got.freed == all_slots(big_l)


def test_a_kept_victim_makes_its_own_step_one_and_three_cuts_needless() -> None:
    m = run("m", "org:m", 12, 4, malleable=(4, 12, 4))
    g0 = lease("m.0", m, slots("a1", 0, 1, 2, 3), group=0)
    g1 = lease("m.1", m, slots("a1", 4, 5, 6, 7), group=1)
    g2 = lease("m.2", m, slots("a2", 0, 1, 2, 3), group=2)
    w = world([(m, START)], [(g0, OWNED), (g1, OWNED), (g2, UNFUNDED)])
    got = plan(w, {dom("A"): 12}, SOURCE)
    assert got is not None
    assert got.conflict_set == ("default/m",)
    assert cut_view(got.cuts) == [(LOTTERY, "m", ("m.0", "m.1", "m.2"))]


def test_nothing_is_cut_when_every_cut_cannot_clear_the_deficit() -> None:
    """§7: nothing is cut, but the seed (and the conflict set drawn from) is still published."""
    w = ladder()
    short = plan(w, {dom("A"): 25}, SOURCE)
    assert not short.cleared and short.cuts == () and short.freed == frozenset()
    assert short.seed == lottery_seed(SOURCE, w.now) and short.conflict_set
    none_in_b = plan(ladder(), {dom("B"): 1}, SOURCE)  # nothing in B
    assert not none_in_b.cleared and none_in_b.cuts == () and none_in_b.conflict_set == ()


def test_plan_with_max_step_reclaim_only() -> None:
    assert not plan(ladder(), {dom("A"): 5}, SOURCE, max_step=RECLAIM).cleared
    got = plan(ladder(), {dom("A"): 4}, SOURCE, max_step=RECLAIM)
    assert got is not None and cut_view(got.cuts) == [(RECLAIM, "u", ("u.0",))]


def test_runs_bound_now_and_the_run_being_placed_are_not_cut() -> None:
    got = plan(ladder(bound_now=["u"]), {dom("A"): 4}, SOURCE)
    assert got is not None
    assert "default/u" not in {c.run for c in got.cuts}
    assert "default/u" not in got.conflict_set
    # the spare (2) alone is short of 4; the shrink (4) alone is not: the spare is spared
    assert cut_view(got.cuts) == [(SHRINK, "m", ("m.1",))]
    placing = plan(ladder(placing="default/u"), {dom("A"): 4}, SOURCE)
    assert placing is not None and "default/u" not in {c.run for c in placing.cuts}


def test_step_one_takes_the_youngest_admission_first_then_key_descending() -> None:
    old, young, twin_a, twin_b = (run(n, "org:u", 4) for n in ("old", "young", "twin-a", "twin-b"))
    w = world([(old, START), (young, START + 60), (twin_a, START + 30), (twin_b, START + 30)],
              [(lease("old.0", old, slots("a1", 0, 1, 2, 3)), UNFUNDED),
               (lease("young.0", young, slots("a1", 4, 5, 6, 7)), UNFUNDED),
               (lease("twin-a.0", twin_a, slots("a2", 0, 1, 2, 3)), UNFUNDED),
               (lease("twin-b.0", twin_b, slots("a2", 4, 5, 6, 7)), UNFUNDED)])
    order = [c.run for c in units(w, RECLAIM, {dom("A")})]
    assert order == ["default/young", "default/twin-b", "default/twin-a", "default/old"]
    got = plan(w, {dom("A"): 8}, SOURCE)
    assert got is not None and [c.run for c in got.cuts] == ["default/young", "default/twin-b"]


def test_steps_judge_the_deficit_domain_by_domain() -> None:
    ua = run("ua", "org:u", 4)
    ub = run("ub", "org:u", 4)
    split = run("split", "org:u", 8)  # unfunded in A, funded in B
    w = world([(ua, START), (ub, START + 60), (split, START + 120)],
              [(lease("ua.0", ua, slots("a1", 0, 1, 2, 3)), UNFUNDED),
               (lease("ub.0", ub, slots("b1", 0, 1, 2, 3)), UNFUNDED),
               (lease("split.0", split, slots("a2", 0, 1, 2, 3)), UNFUNDED),
               (lease("split.1", split, slots("b2", 0, 1, 2, 3)), OWNED)])
    got = plan(w, {dom("A"): 4}, SOURCE)
    assert got is not None
    # ub is out of scope; split is the youngest in A and its A leases are all unfunded; breaking
    # its gang frees its B leases too (they count where they lie, B is not short)
    assert cut_view(got.cuts) == [(RECLAIM, "split", ("split.0",))]
    assert got.freed == set(slots("a2", 0, 1, 2, 3)) | set(slots("b2", 0, 1, 2, 3))


def test_unusable_freed_slots_do_not_count() -> None:
    u = run("u", "org:u", 4)
    v = run("v", "org:u", 4)
    w = world([(u, START + 60), (v, START)],
              [(lease("u.0", u, slots("a9", 0, 1, 2, 3)), UNFUNDED),
               (lease("v.0", v, slots("a1", 0, 1, 2, 3)), UNFUNDED)], unusable=["a9"])
    got = plan(w, {dom("A"): 4}, SOURCE)
    assert got is not None and [c.run for c in got.cuts] == ["default/v"]


def test_shrink_takes_the_most_surplus_first_then_key() -> None:
    big = run("big", "org:m", 12, 4, malleable=(4, 12, 4))
    alpha = run("alpha", "org:m", 8, 4, malleable=(4, 8, 4))
    beta = run("beta", "org:m", 8, 4, malleable=(4, 8, 4))
    ls = [lease(f"big.{g}", big, slots("a1", *range(4 * g, 4 * g + 4)), group=g) for g in range(2)]
    ls += [lease("big.2", big, slots("a2", 0, 1, 2, 3), group=2)]
    ls += [lease(f"{r.name}.{g}", r, slots(n, *range(4 * g, 4 * g + 4)), group=g)
           for r, n in ((alpha, "a3"), (beta, "a4")) for g in range(2)]
    w = world([(big, START), (alpha, START), (beta, START)], [(x, OWNED) for x in ls])
    assert cut_view(units(w, SHRINK, {dom("A")})) == [
        (SHRINK, "big", ("big.2",)), (SHRINK, "big", ("big.1",)),
        (SHRINK, "alpha", ("alpha.1",)), (SHRINK, "beta", ("beta.1",))]
    got = plan(w, {dom("A"): 12}, SOURCE)
    assert got is not None
    assert cut_view(got.cuts) == [(SHRINK, "big", ("big.2",)), (SHRINK, "big", ("big.1",)),
                                  (SHRINK, "alpha", ("alpha.1",))]


def test_a_run_whose_top_group_is_outside_the_short_domains_is_not_shrunk() -> None:
    m = run("m", "org:m", 8, 4, malleable=(4, 8, 4))
    f = run("f", "org:f", 4)
    w = world([(m, START), (f, START)],
              [(lease("m.0", m, slots("a1", 0, 1, 2, 3), group=0), OWNED),
               (lease("m.1", m, slots("b1", 0, 1, 2, 3), group=1), OWNED),
               (lease("f.0", f, slots("a1", 4, 5, 6, 7)), OWNED)])
    assert units(w, SHRINK, {dom("A")}) == []
    got = plan(w, {dom("A"): 4}, SOURCE)
    assert got is not None and all(c.step == LOTTERY for c in got.cuts)


def _hole_world(top_unfunded: bool) -> CutWorld:
    u = run("u", "org:u", 4)
    m = run("m", "org:m", 12, 4, malleable=(4, 12, 4))
    x = run("x", "org:x", 4)
    m_cls = UNFUNDED if top_unfunded else OWNED
    return world([(u, START), (m, START), (x, START)],
                 [(lease("u.0", u, slots("b1", 0, 1, 2, 3)), UNFUNDED),
                  (lease("m.0", m, slots("a1", 0, 1, 2, 3), group=0), OWNED),
                  (lease("m.1", m, slots("a1", 4, 5, 6, 7), group=1), m_cls),
                  (lease("m.2", m, slots("b2", 0, 1, 2, 3), group=2), m_cls),
                  (lease("x.0", x, slots("a2", 0, 1, 2, 3)), OWNED)])


@pytest.mark.parametrize(
    ("top_unfunded", "deficit"),
    [
        # step 3: step 1 clears B with u; m's top group lies in B, no longer short
        (False, {dom("A"): 4, dom("B"): 4}),
        # step 1 "unfunded top groups": m's unfunded top group 2 lies in B, out of scope
        (True, {dom("A"): 4}),
    ],
)
def test_cuts_never_leave_a_hole_below_a_malleable_runs_top_group(top_unfunded: bool,
                                                                   deficit: dict[str, int]) -> None:
    # §6 "a run's groups are numbered from 0 and grow/shrink at the top"; §7 step 1 takes "unfunded
    # top groups", step 3 "only ever removes a run's top group ... a run whose top group lies outside
    # the short domains is not shrunk". m (groups 0, 1 in A; 2 in B) must not lose group 1 and keep 2.
    w = _hole_world(top_unfunded)
    got = plan(w, deficit, SOURCE)
    assert got is not None
    removed = sorted({w.leases[n].group for c in got.cuts if c.run == "default/m" and c.step != LOTTERY
                      for n in c.leases})
    assert removed == [2, 1, 0][:len(removed)][::-1], f"m lost groups {removed}: not its top groups"


def test_step_one_capacity_names_each_lease_once() -> None:
    """A malleable run's unfunded top group that is also all it holds in a domain is both a
    domain unit and a group unit of step 1: its leases still count once (a pack counts each
    lease's slots as free)."""
    first = next(capacity_leases(_hole_world(True), RECLAIM))
    names = [x.name for x in first]
    assert sorted(names) == ["m.1", "m.2", "u.0"]


def test_capacity_levels_accumulate_by_step() -> None:
    w = ladder()
    levels = list(capacity_levels(w))
    assert levels == [
        all_slots(U_L),
        all_slots(U_L, S_SP),
        all_slots(U_L, S_SP, M_1),
        all_slots(U_L, S_A, S_SP, M_0, M_1, F_L),
    ]
    assert list(capacity_levels(w, RECLAIM)) == levels[:1]
    assert list(capacity_levels(ladder(bound_now=["f"])))[-1] == all_slots(U_L, S_A, S_SP, M_0, M_1)
