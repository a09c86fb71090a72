"""pack: all-or-nothing, deterministic placement in the §4 orders, leaving the view as found."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from builders import FLAVOR, dom, labels, node, slots

from jobtree.core.model import Labels, NodeState, Role, Slot
from jobtree.core.pack import (
    FreeView,
    GroupRequest,
    HeldLayer,
    IndexedView,
    OverlayView,
    PackRequest,
    Piece,
    PlacedGroup,
    VirtualView,
    pack,
    view_for,
)
from jobtree.core.topology import Topology

ViewFactory = Callable[[Topology], FreeView]
VIEWS: dict[str, ViewFactory] = {
    "indexed": lambda t: IndexedView(t, FLAVOR),
    "virtual": lambda t: VirtualView(t, FLAVOR),
    "overlay": lambda t: OverlayView(t, FLAVOR),
}
views = pytest.mark.parametrize("make_view", list(VIEWS.values()), ids=list(VIEWS))


def build(spec: dict[str, tuple[str, int, int]], **node_labels: dict[str, str]) -> Topology:
    """Nodes by name: (domain, gpus, taken); the first `taken` ordinals are held by `busy`."""
    t = Topology([node(n, g, d, **node_labels.get(n, {})) for n, (d, g, _) in spec.items()])
    for n, (_, _, taken) in spec.items():
        if taken:
            t.take(slots(n, *range(taken)), "busy")
    return t


def group(index: int, *counts: int | tuple[int, dict[str, str]], spares: int = 0) -> GroupRequest:
    pieces = []
    for c in counts:
        n, sel = (c, {}) if isinstance(c, int) else c
        pieces.append(Piece(Role.ACTIVE, n, labels(**sel), tag=f"g{index}p{len(pieces)}"))
    if spares:
        pieces.append(Piece(Role.SPARE, spares, (), tag=f"g{index}spare"))
    return GroupRequest(index, tuple(pieces))


def request(*groups: GroupRequest, **kw: object) -> PackRequest:
    return PackRequest(FLAVOR, tuple(groups), **kw)  # type: ignore[arg-type]


def nodes_of(placed: list[PlacedGroup]) -> list[list[Slot]]:
    return [[s for pp in g.pieces for s in pp.slots] for g in placed]


def domains_of(t: Topology, placed: list[PlacedGroup]) -> list[dict[str, int]]:
    return [g.domain_gpus(t) for g in placed]


def state(t: Topology) -> tuple:
    return ({n: [t.holder((n, i)) for i in range(t.nodes[n].gpus)] for n in t.nodes},
            list(t.domains_by_free(FLAVOR)),
            {d: (t.domain_free(FLAVOR, d), list(t.nodes_by_free(FLAVOR, d))) for d in t.domains(FLAVOR)})


def run_pack(t: Topology, make_view: ViewFactory, req: PackRequest) -> list[PlacedGroup] | None:
    before = state(t)
    got = pack(make_view(t), req)
    assert state(t) == before, "pack must leave the topology as it found it"
    again = pack(make_view(t), req)
    assert again == got, "same inputs, same placement"
    return got


# --- orders ------------------------------------------------------------------------------------

THREE = {"a1": ("A", 8, 0), "a2": ("A", 8, 0), "b1": ("B", 8, 0), "b2": ("B", 8, 0), "b3": ("B", 8, 0),
         "c1": ("C", 8, 0), "c2": ("C", 8, 0), "c3": ("C", 8, 0)}


@views
@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ((), "B"),  # B and C tie on 24 free: name; A has 16
        ((dom("A"),), "A"),  # a domain the run already uses comes first, even with less free
        ((dom("C"), dom("A")), "C"),  # in order of first use
    ],
)
def test_domain_order(make_view: ViewFactory, used: tuple[str, ...], expected: str) -> None:
    t = build(THREE)
    got = run_pack(t, make_view, request(group(0, 8), used_domains=used))
    assert got is not None
    assert domains_of(t, got) == [{dom(expected): 8}]


@views
def test_used_domain_too_small_falls_through_to_free_order(make_view: ViewFactory) -> None:
    t = build({**THREE, "a1": ("A", 8, 6), "a2": ("A", 8, 8)})
    got = run_pack(t, make_view, request(group(0, 4), used_domains=(dom("A"),)))
    assert got is not None and domains_of(t, got) == [{dom("B"): 4}]


@views
def test_earlier_groups_of_the_same_request_count_as_used(make_view: ViewFactory) -> None:
    # A 10 free, B 12 free: group 0 (8) goes to B; group 1 (4) then prefers B (used) over A (10 free).
    t = build({"a1": ("A", 8, 0), "a2": ("A", 8, 6), "b1": ("B", 8, 0), "b2": ("B", 8, 4)})
    got = run_pack(t, make_view, request(group(0, 8), group(1, 4)))
    assert got is not None
    assert domains_of(t, got) == [{dom("B"): 8}, {dom("B"): 4}]


@views
@pytest.mark.parametrize(
    ("taken", "count", "expected"),
    [
        ({}, 4, slots("n1", 0, 1, 2, 3)),  # all equal: name
        ({"n1": 4}, 4, slots("n2", 0, 1, 2, 3)),  # free desc: n2, n3 (8) before n1 (4)
        ({"n1": 4}, 12, slots("n2", *range(8)) + slots("n3", 0, 1, 2, 3)),
        ({"n1": 4, "n2": 2}, 14, slots("n3", *range(8)) + slots("n2", *range(2, 8))),
        ({"n1": 4, "n2": 2}, 18, slots("n3", *range(8)) + slots("n2", *range(2, 8)) + slots("n1", 4, 5, 6, 7)),
    ],
)
def test_node_order_within_a_domain(make_view: ViewFactory, taken: dict[str, int], count: int,
                                    expected: tuple[Slot, ...]) -> None:
    t = build({n: ("A", 8, taken.get(n, 0)) for n in ("n1", "n2", "n3")})
    got = run_pack(t, make_view, request(group(0, count)))
    assert got is not None
    assert nodes_of(got) == [list(expected)]


@views
def test_slots_by_ordinal(make_view: ViewFactory) -> None:
    t = build({"n1": ("A", 8, 0)})
    t.take([("n1", 1), ("n1", 3), ("n1", 4)], "other")
    got = run_pack(t, make_view, request(group(0, 3)))
    assert got is not None and nodes_of(got) == [[("n1", 0), ("n1", 2), ("n1", 5)]]


# --- groups --------------------------------------------------------------------------------------

@views
@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ((12,), None),  # no domain holds 12 (8 + 8 free in two domains)
        ((8, 8), [{dom("A"): 8}, {dom("B"): 8}]),
        ((8, 8, 1), None),  # all-or-nothing: no partial width
        ((6, 2), [{dom("A"): 6}, {dom("A"): 2}]),  # the last group smaller, in the used domain
        ((6, 3), [{dom("A"): 6}, {dom("B"): 3}]),  # A has 2 left: the next domain
    ],
)
def test_group_whole_in_a_domain_or_no_fit(make_view: ViewFactory, sizes: tuple[int, ...],
                                            expected: list[dict[str, int]] | None) -> None:
    t = build({"a1": ("A", 4, 0), "a2": ("A", 4, 0), "b1": ("B", 8, 0)})
    got = run_pack(t, make_view, request(*(group(i, s) for i, s in enumerate(sizes))))
    assert (None if got is None else domains_of(t, got)) == expected


@views
def test_group_with_spares_stays_in_one_domain(make_view: ViewFactory) -> None:
    t = build({"a1": ("A", 8, 0), "b1": ("B", 8, 0), "b2": ("B", 4, 0)})
    got = run_pack(t, make_view, request(group(0, 8, spares=2)))
    assert got is not None
    assert domains_of(t, got) == [{dom("B"): 10}]
    active, spare = got[0].pieces
    assert (active.piece.role, len(active.slots)) == (Role.ACTIVE, 8)
    assert (spare.piece.role, spare.slots) == (Role.SPARE, slots("b2", 0, 1))


@views
@pytest.mark.parametrize(
    ("used", "sizes", "expected"),
    [
        ((), (6, 5), None),  # 11 fits neither A (10) nor B (9)
        ((), (5, 4), [{dom("A"): 5}, {dom("A"): 4}]),
        ((dom("B"),), (5, 4), [{dom("B"): 5}, {dom("B"): 4}]),  # only the domain in use
        ((dom("B"),), (5, 5), None),  # B cannot hold 10, and no other domain may be tried
    ],
)
def test_one_domain(make_view: ViewFactory, used: tuple[str, ...], sizes: tuple[int, ...],
                    expected: list[dict[str, int]] | None) -> None:
    t = build({"a1": ("A", 8, 0), "a2": ("A", 2, 0), "b1": ("B", 8, 0), "b2": ("B", 1, 0)})
    req = request(*(group(i, s) for i, s in enumerate(sizes)), one_domain=True, used_domains=used)
    got = run_pack(t, make_view, req)
    assert (None if got is None else domains_of(t, got)) == expected


@views
def test_one_domain_against_default_spread(make_view: ViewFactory) -> None:
    t = build({"a1": ("A", 8, 0), "a2": ("A", 2, 0), "b1": ("B", 8, 0), "b2": ("B", 1, 0)})
    spread = run_pack(t, make_view, request(group(0, 6), group(1, 5)))
    assert spread is not None and domains_of(t, spread) == [{dom("A"): 6}, {dom("B"): 5}]


@views
@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (12, [{dom("A"): 12}]),
        (20, [{dom("A"): 16, dom("B"): 4}]),  # fill the domain with most free, then the next
        (30, [{dom("A"): 16, dom("B"): 12, dom("C"): 2}]),
        (33, None),
    ],
)
def test_spanning_fill(make_view: ViewFactory, count: int, expected: list[dict[str, int]] | None) -> None:
    t = build({"a1": ("A", 8, 0), "a2": ("A", 8, 0), "b1": ("B", 8, 0), "b2": ("B", 4, 0), "c1": ("C", 4, 0)})
    got = run_pack(t, make_view, request(group(0, count), spanning=True))
    assert (None if got is None else domains_of(t, got)) == expected
    if got is not None and count == 20:
        assert nodes_of(got)[0][16:] == list(slots("b1", 0, 1, 2, 3))


# --- payers and constraints ----------------------------------------------------------------------------

RACKS = {"n1": {"rack": "r1"}, "n2": {"rack": "r2"}, "n3": {"rack": "r2"}}


@views
@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        # each piece only on nodes matching its payer's selector
        (((2, {"rack": "r1"}), (4, {"rack": "r2"})), [slots("n1", 0, 1), slots("n2", *range(4))]),
        (((4, {"rack": "r2"}), (2, {})), [slots("n2", *range(4)), slots("n1", 0, 1)]),
        # piece 1 takes n2 first (most free), piece 2 (unconstrained) gets what is left by order
        (((10, {"rack": "r2"}), (6, {})), [slots("n2", *range(8)) + slots("n3", 0, 1), slots("n1", *range(6))]),
        (((9, {"rack": "r1"}),), None),  # rack r1 has 8
        (((1, {"rack": "r9"}),), None),
    ],
)
def test_payer_selectors_per_piece(make_view: ViewFactory, pieces: tuple, expected: list | None) -> None:
    t = build({"n1": ("A", 8, 0), "n2": ("A", 8, 0), "n3": ("A", 4, 0)}, **RACKS)
    got = run_pack(t, make_view, request(group(0, *pieces)))
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert [list(pp.slots) for pp in got[0].pieces] == [list(e) for e in expected]
        assert [pp.piece.tag for pp in got[0].pieces] == [f"g0p{i}" for i in range(len(pieces))]


@views
def test_payer_selector_moves_a_group_to_a_domain_that_can_hold_it(make_view: ViewFactory) -> None:
    # A has more free GPUs, but only B has rack r2 for the payer of 4 GPUs.
    t = build({"a1": ("A", 8, 0), "a2": ("A", 8, 0), "b1": ("B", 8, 0)},
              a1={"rack": "r1"}, a2={"rack": "r1"}, b1={"rack": "r2"})
    got = run_pack(t, make_view, request(group(0, (4, {"rack": "r2"}), 2)))
    assert got is not None and domains_of(t, got) == [{dom("B"): 6}]


@views
@pytest.mark.parametrize(
    ("fixed", "expected"),
    [
        (((0, (dom("C"),)),), [{dom("C"): 4}]),  # not the domain with most free
        (((0, (dom("C"), dom("A"))),), [{dom("C"): 4}]),
        (((0, (dom("B"),)),), None),  # B has 2: the group may not go anywhere else
        (((1, (dom("C"),)),), [{dom("A"): 4}]),  # another group's pin does not bind group 0
    ],
)
def test_fixed_domains(make_view: ViewFactory, fixed: tuple, expected: list | None) -> None:
    t = build({"a1": ("A", 8, 0), "a2": ("A", 8, 0), "b1": ("B", 2, 0), "c1": ("C", 8, 0)})
    got = run_pack(t, make_view, request(group(0, 4), fixed_domains=fixed))
    assert (None if got is None else domains_of(t, got)) == expected


# --- views ---------------------------------------------------------------------------------------------

def test_virtual_view_counts_extra_slots() -> None:
    t = build({"n1": ("A", 8, 8), "n2": ("A", 8, 6), "m1": ("B", 8, 4)})
    extra = {"n1": {2, 3, 5}, "n2": {0}}
    v = VirtualView(t, FLAVOR, extra=extra)
    assert v.domain_free(dom("A")) == 3 + 3
    assert v.free_ordinals("n1") == [2, 3, 5]
    assert v.free_ordinals("n2") == [0, 6, 7]
    assert list(v.domains_in_order()) == [dom("A"), dom("B")]  # 6 > 4
    got = pack(v, request(group(0, 5)))
    assert got is not None
    assert nodes_of(got) == [[("n1", 2), ("n1", 3), ("n1", 5), ("n2", 0), ("n2", 6)]]
    assert t.holder(("n1", 2)) == "busy"  # a virtual view never touches the topology
    assert v.domain_free(dom("A")) == 6  # and is itself left as found
    assert pack(VirtualView(t, FLAVOR), request(group(0, 5))) is None  # without extra: no fit


def test_virtual_view_skips_cordoned_other_flavors_and_selector_misses() -> None:
    t = Topology([node("n1", rack="r1"), node("n2", rack="r2"), node("n3", rack="r1", state=NodeState.CORDONED),
                  node("x1", flavor="A100-40GB", rack="r1")])
    v = VirtualView(t, FLAVOR, labels(rack="r1"), extra={"n3": {0}})
    assert v.domain_free(dom("A")) == 8
    got = pack(v, request(group(0, 8)))
    assert got is not None and {n for n, _ in nodes_of(got)[0]} == {"n1"}
    assert pack(v, request(group(0, 9))) is None


@pytest.mark.parametrize("seed", range(40))
def test_overlay_view_packs_as_a_virtual_view_with_the_same_extras(seed: int) -> None:
    """Held slots added to an overlay a lease at a time (cordoned nodes and another flavor's
    among them) count and order as a virtual view built with them as extras: every read and
    every placement agree, level after level, and the topology is left alone."""
    rnd = random.Random(seed)
    names = [f"n{i}" for i in range(14)]
    t = Topology([node(n, rnd.choice([4, 8]), rnd.choice("ABCD"),
                       flavor=FLAVOR if rnd.random() < 0.85 else "A100-40GB",
                       state=NodeState.READY if rnd.random() < 0.85 else NodeState.CORDONED) for n in names])
    leases: list[tuple[Slot, ...]] = []
    for n in names:  # held in runs of one to three slots, as leases hold them
        i, gpus = 0, t.nodes[n].gpus
        while i < gpus:
            k = rnd.randint(1, 3)
            if rnd.random() < 0.7:
                held = slots(n, *range(i, min(i + k, gpus)))
                t.take(held, f"lease{len(leases)}")
                leases.append(held)
            i += k
    rnd.shuffle(leases)
    before = state(t)
    overlay, extra = OverlayView(t, FLAVOR), {}
    for level in range(4):
        batch = leases[level * len(leases) // 4:(level + 1) * len(leases) // 4]
        overlay.add(iter(batch))  # one level's leases at a time, as an intended slice adds them
        for held in batch:
            extra.setdefault(held[0][0], set()).update(i for _, i in held)
        reads_and_packs_alike(overlay, VirtualView(t, FLAVOR, extra=extra), rnd, 6)
    assert state(t) == before


def reads_and_packs_alike(overlay: OverlayView, virtual: VirtualView, rnd: random.Random, packs: int) -> None:
    """Every read of the two views agrees, and so do `packs` random placements."""
    assert list(overlay.domains_in_order()) == list(virtual.domains_in_order())
    assert overlay.total_free() == virtual.total_free()
    for d in "ABCD":
        assert overlay.domain_free(dom(d)) == virtual.domain_free(dom(d))
        assert overlay.nodes_in_order(dom(d), 0) == virtual.nodes_in_order(dom(d), 0)
    for n in virtual._free:  # the nodes a pack can visit (those `nodes_in_order` lists)
        assert overlay.free_ordinals(n) == virtual.free_ordinals(n)
    for _ in range(packs):
        groups = tuple(group(g, rnd.randint(1, 8)) for g in range(rnd.randint(1, 3)))
        req = request(*groups, spanning=rnd.random() < 0.3, one_domain=rnd.random() < 0.3)
        assert pack(overlay, req) == pack(virtual, req)


@pytest.mark.parametrize("seed", range(40))
def test_overlay_view_on_layers_packs_as_a_virtual_view_with_the_same_extras(seed: int) -> None:
    """Held slots kept in two maintained layers (some then hidden) and others added count and
    order as a virtual view with the layers' unhidden slots and the added ones as extras."""
    rnd = random.Random(seed)
    names = [f"n{i}" for i in range(14)]
    t = Topology([node(n, rnd.choice([4, 8]), rnd.choice("ABCD"),
                       flavor=FLAVOR if rnd.random() < 0.85 else "A100-40GB",
                       state=NodeState.READY if rnd.random() < 0.85 else NodeState.CORDONED) for n in names])
    layers, placed = (HeldLayer(), HeldLayer()), []
    added: list[tuple[Slot, ...]] = []
    for n in names:
        i, gpus = 0, t.nodes[n].gpus
        while i < gpus:
            k = rnd.randint(1, 3)
            if rnd.random() < 0.7:
                held = slots(n, *range(i, min(i + k, gpus)))
                name = f"lease{len(placed) + len(added)}"
                t.take(held, name)
                where = rnd.randrange(3)
                if where < 2 and t.flavor_of(n) == FLAVOR and t.nodes[n].state is NodeState.READY:
                    layers[where].put(name, held, t.domain_of(n))  # as the reclaim index puts them
                    placed.append((n, name, held, layers[where]))
                else:
                    added.append(held)
            i += k
    for n, name, _, layer in placed[:len(placed) // 4]:  # put and dropped again
        layer.drop(name, n, t.domain_of(n))
    kept = placed[len(placed) // 4:]
    hidden = {name for _, name, _, _ in kept if rnd.random() < 0.3}
    overlay = OverlayView(t, FLAVOR, layers)
    overlay.hide([(n, name) for n, name, _, _ in kept if name in hidden] + [("n0", "no such lease")])
    overlay.add(iter(added))
    extra: dict[str, set[int]] = {}
    for held in [h for _, name, h, _ in kept if name not in hidden] + added:
        extra.setdefault(held[0][0], set()).update(i for _, i in held)
    reads_and_packs_alike(overlay, VirtualView(t, FLAVOR, extra=extra), rnd, 8)


@pytest.mark.parametrize("seed", range(30))
def test_a_piece_continues_where_the_one_before_it_stopped(seed: int) -> None:
    """Splitting a group's GPUs into neighbouring pieces of one selector (as a cover splits them
    between payers, actives then spares) places the same slots in the same order as one piece:
    what lets the engine remember empty-fleet fits per merged request."""
    rnd = random.Random(seed)
    t = Topology([node(f"n{i}", rnd.choice([4, 8]), rnd.choice("ABC"), rack=rnd.choice(["r1", "r2"]))
                  for i in range(10)])
    for i in range(10):
        held = rnd.randint(0, t.nodes[f"n{i}"].gpus)
        if held:
            t.take(slots(f"n{i}", *range(held)), "busy")
    for _ in range(10):
        sizes = [rnd.randint(1, 10) for _ in range(rnd.randint(1, 3))]
        sel = rnd.choice([{}, {"rack": "r1"}])
        whole = tuple(group(g, (n, sel)) for g, n in enumerate(sizes))
        split = []
        for g, n in enumerate(sizes):
            cut = sorted(rnd.sample(range(1, n), min(n - 1, rnd.randint(0, 2)))) if n > 1 else []
            counts = [b - a for a, b in zip([0, *cut], [*cut, n], strict=True)]
            split.append(group(g, *((c, sel) for c in counts)))
        kw = {"spanning": rnd.random() < 0.3, "one_domain": rnd.random() < 0.3}
        a, b = pack(IndexedView(t, FLAVOR), request(*whole, **kw)), pack(IndexedView(t, FLAVOR), request(*split, **kw))
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert nodes_of(a) == nodes_of(b)


@pytest.mark.parametrize(
    ("selector", "extra", "kind"),
    [((), None, IndexedView), (labels(rack="r1"), None, VirtualView), ((), {"n1": {0}}, VirtualView)],
)
def test_view_for_uses_the_fast_view_only_when_exact(selector: Labels, extra: dict | None, kind: type) -> None:
    t = Topology([node("n1", rack="r1"), node("n2", rack="r2")])
    assert isinstance(view_for(t, FLAVOR, selector, extra), kind)


@views
def test_topology_unchanged_after_success_and_failure(make_view: ViewFactory) -> None:
    t = build({"a1": ("A", 8, 3), "a2": ("A", 8, 0), "b1": ("B", 8, 5), "c1": ("C", 4, 0)},
              a1={"rack": "r1"}, a2={"rack": "r2"})
    before = state(t)
    attempts = [
        request(group(0, 4), group(1, 4), group(2, 3)),  # fits
        request(group(0, 4), group(1, 4), group(2, 4), group(3, 4), group(4, 4)),  # fails on the last group
        request(group(0, 13), spanning=True),  # fits
        request(group(0, 25), spanning=True),  # fails
        request(group(0, (3, {"rack": "r2"}), (6, {"rack": "r1"}))),  # fails on the second piece
        request(group(0, 4), group(1, 4), one_domain=True),  # fits in A
        request(group(0, 8), group(1, 8), one_domain=True),  # fails
    ]
    outcomes = []
    for req in attempts:
        outcomes.append(pack(make_view(t), req) is not None)
        assert state(t) == before
    assert outcomes == [True, False, True, False, False, True, False]
