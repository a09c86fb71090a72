"""Hypothesis strategies for random but valid jobtree worlds (CALCULUS §1, SCENARIOS.md).

A `World` is everything one property example needs: cluster settings, nodes, budgets, runs and
a timeline of events. Every object is built directly as the frozen model values the core takes,
and only with values `manifest` would accept (names, counts, windows, malleable arithmetic,
spares only with groups, caps naming envelopes of their flavor, ...), so a failing example is a
bug in the engine, not in the input. The family DAG stays acyclic by construction: an owner's
parents are always owners earlier in `OWNERS`.

Timeline events name runs and nodes by index; `harness.command_for` turns an event into a
command at play time and drops the ones the current state makes invalid (completing a run that
already ended, deleting a run that does not exist, ...), so every command the engine receives
is one a user could legitimately send.

Worlds are kept small (<= 12 nodes, <= 12 runs, <= 25 events) so that one example plays in a
few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import strategies as st

from jobtree.core.model import (
    AggregateCap,
    Budget,
    ClusterConfig,
    Envelope,
    FailurePolicy,
    Follow,
    Funding,
    Labels,
    Lending,
    Locality,
    Malleable,
    Node,
    PreActivation,
    Run,
    RunSpec,
    Sharing,
    labels_of,
)

START = 1_767_571_200  # 2026-01-05T00:00:00Z
HOUR = 3600
MINUTE = 60

REGION = "us-west"
CLUSTER = "gpu-a"
DOMAINS = ("A", "B", "C")
FLAVORS = ("H100", "A100")
NAMESPACE = "default"

# A small family: an owner's possible parents are the owners before it in this tuple.
OWNERS = ("org:root", "org:a", "org:b", "org:a:x", "org:a:y", "org:b:z")
# An owner no budget belongs to (its claims have no family, only sponsors).
STRANGER = "org:guest"


# --- the world ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    config: ClusterConfig
    nodes: tuple[Node, ...]
    budgets: tuple[Budget, ...]
    runs: tuple[Run, ...]
    initial_runs: tuple[int, ...]
    """Indices of runs submitted together, in one batch, at the start (same admission instant)."""
    timeline: tuple[tuple, ...] = field(default=())
    """Events: ("advance", seconds) | ("submit", i) | ("complete", i) | ("fail", i) | ("delete", i)
    | ("shrink", i, desired) | ("eta", i, seconds_from_now) | ("failNode", n) | ("cordon", n)
    | ("uncordon", n) | ("budget", u); i indexes `runs`, n `nodes`, u `budget_updates`."""
    budget_updates: tuple[Budget, ...] = field(default=())
    """New versions of budgets (or new budgets) applied by ("budget", u) events."""
    start: int = START

    def describe(self) -> str:
        """A readable multi-line rendering (hypothesis prints it with a failing example)."""
        lines = [f"World(start={self.start}, config={self.config!r})", "nodes:"]
        lines += [f"  {n.name}: {n.gpus} GPUs {dict(n.labels)}" for n in self.nodes]
        lines.append("budgets:")
        lines += [f"  {b!r}" for b in self.budgets]
        lines.append("runs:")
        lines += [f"  [{i}] {r.key}: {r.spec!r}" for i, r in enumerate(self.runs)]
        lines.append(f"initial batch: {list(self.initial_runs)}")
        lines.append("budget updates:")
        lines += [f"  [{u}] {b!r}" for u, b in enumerate(self.budget_updates)]
        lines.append("timeline:")
        lines += [f"  {ev!r}" for ev in self.timeline]
        return "\n".join(lines)


# --- nodes -------------------------------------------------------------------------------


@st.composite
def flavors_st(draw: st.DrawFn) -> tuple[str, ...]:
    return FLAVORS[: draw(st.integers(1, 2))]


@st.composite
def nodes_st(draw: st.DrawFn, flavors: tuple[str, ...]) -> tuple[Node, ...]:
    """1-3 fabric domains of 1-4 nodes with 2, 4 or 8 GPUs."""
    n_domains = draw(st.integers(1, 3))
    nodes: list[Node] = []
    for d in DOMAINS[:n_domains]:
        for i in range(draw(st.integers(1, 4))):
            flavor = draw(st.sampled_from(flavors))
            labels = labels_of({"region": REGION, "cluster": CLUSTER, "fabric.domain": d, "gpu.flavor": flavor})
            nodes.append(Node(f"{d.lower()}-{i:02d}", draw(st.sampled_from((2, 4, 8))), labels))
    return tuple(nodes)


def _domains_of(nodes: tuple[Node, ...]) -> list[str]:
    return sorted({n.label("fabric.domain") for n in nodes})


def selector_st(nodes: tuple[Node, ...]) -> st.SearchStrategy[Labels]:
    """No selector (most often), a domain, or the region."""
    choices: list[Labels] = [labels_of({"fabric.domain": d}) for d in _domains_of(nodes)]
    choices.append(labels_of({"region": REGION}))
    return st.one_of(st.just(()), st.just(()), st.sampled_from(choices))


# --- budgets -----------------------------------------------------------------------------

HOURS = st.sampled_from((0.0, 0.25, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 40.0))


@st.composite
def window_st(draw: st.DrawFn) -> tuple[int | None, int | None]:
    if not draw(st.booleans()):
        return None, None
    start = draw(st.one_of(st.none(), st.sampled_from((-HOUR, 0, 30 * MINUTE, HOUR, 2 * HOUR, 3 * HOUR))))
    end = draw(st.one_of(st.none(), st.sampled_from((30 * MINUTE, HOUR, 2 * HOUR, 4 * HOUR))))
    s = None if start is None else START + start
    e = None if end is None else (s if s is not None else START) + end
    return s, e


@st.composite
def lending_st(draw: st.DrawFn) -> Lending:
    if not draw(st.booleans()):
        return Lending()
    targets = (*OWNERS, STRANGER, "org:a:*", "org:b*", "org:*", "org:*")
    to = draw(st.lists(st.sampled_from(targets), min_size=0, max_size=3, unique=True))
    return Lending(
        allow=draw(st.sampled_from((True, True, False))),
        to=tuple(to),
        max_concurrency=draw(st.one_of(st.none(), st.integers(0, 8))),
        max_gpu_hours=draw(st.one_of(st.none(), HOURS)),
    )


@st.composite
def envelope_st(draw: st.DrawFn, name: str, flavors: tuple[str, ...], nodes: tuple[Node, ...]) -> Envelope:
    start, end = draw(window_st())
    return Envelope(
        name=name,
        flavor=draw(st.sampled_from(flavors)),
        selector=draw(selector_st(nodes)),
        concurrency=draw(st.one_of(st.integers(0, 16), st.sampled_from((8, 16, 32)))),
        max_gpu_hours=draw(st.one_of(st.none(), st.none(), HOURS)),
        start=start,
        end=end,
        sharing=draw(st.sampled_from((Sharing.FAMILY, Sharing.FAMILY, Sharing.NONE))),
        pre_activation=PreActivation(draw(st.booleans()), draw(st.booleans())),
        lending=draw(lending_st()),
    )


@st.composite
def aggregate_caps_st(draw: st.DrawFn, envelopes: tuple[Envelope, ...]) -> tuple[AggregateCap, ...]:
    if not envelopes or draw(st.integers(0, 2)) != 0:
        return ()
    flavor = draw(st.sampled_from(sorted({e.flavor for e in envelopes})))
    names = [e.name for e in envelopes if e.flavor == flavor]
    members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    max_conc = draw(st.one_of(st.none(), st.integers(0, 12)))
    max_hours = draw(st.one_of(st.none(), HOURS))
    if max_conc is None and max_hours is None:
        max_conc = draw(st.integers(0, 12))
    return (AggregateCap("cap0", flavor, tuple(members), max_conc, max_hours),)


@st.composite
def budget_st(draw: st.DrawFn, flavors: tuple[str, ...], nodes: tuple[Node, ...], index: int = 0) -> Budget:
    k = draw(st.integers(0, len(OWNERS) - 1))
    owner = OWNERS[k]
    parents = draw(st.lists(st.sampled_from(OWNERS[:k]), max_size=2, unique=True)) if k else []
    n_env = draw(st.integers(1, 2))
    envelopes = tuple(draw(envelope_st(f"e{i}", flavors, nodes)) for i in range(n_env))
    return Budget(
        name=f"b{index}",
        owner=owner,
        parents=tuple(parents),
        period=draw(st.one_of(st.none(), st.none(), st.sampled_from((HOUR, 6 * HOUR, 24 * HOUR)))),
        envelopes=envelopes,
        aggregate_caps=draw(aggregate_caps_st(envelopes)),
    )


# --- runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDraft:
    """A run before it knows its index: follow edges are back-offsets to earlier runs (so a
    shrinking list of runs keeps every edge pointing backwards, and the DAG acyclic)."""

    spec: RunSpec
    back: tuple[int, ...]
    ghost: bool
    initial: bool

    def run(self, index: int) -> Run:
        follow = self.spec.follow
        if follow is not None:
            names = [f"j{index - k}" for k in self.back if index - k >= 0]
            if self.ghost:
                names.append("ghost")  # an upstream that never exists
            follow = replace(follow, after=tuple(names)) if names else None
        return Run(NAMESPACE, f"j{index}", replace(self.spec, follow=follow))


@st.composite
def run_st(draw: st.DrawFn, flavors: tuple[str, ...], nodes: tuple[Node, ...],
           budget_owners: tuple[str, ...] = ()) -> RunDraft:
    """Owners are mostly owners of some budget (so that funding happens), sometimes anyone."""
    anyone = st.sampled_from((*OWNERS, STRANGER))
    owner = draw(st.one_of(st.sampled_from(budget_owners), st.sampled_from(budget_owners), anyone)
                 if budget_owners else anyone)
    grouped = draw(st.booleans())
    group = draw(st.sampled_from((1, 2, 4, 8))) if grouped else None
    spares = draw(st.integers(1, 2)) if grouped and draw(st.booleans()) else 0
    locality = Locality(
        group_gpus=group,
        allow_cross_group_spread=draw(st.booleans()) or draw(st.booleans()),
        selector=draw(selector_st(nodes)),
    )
    malleable: Malleable | None = None
    if draw(st.booleans()):
        low = draw(st.integers(1, 8))
        step = (group or 1) * draw(st.integers(1, 2)) if group else draw(st.integers(1, 4))
        high = low + step * draw(st.integers(0, 3))
        desired = low + step * draw(st.integers(0, (high - low) // step))
        malleable = Malleable(low, high, step, desired)
        total = draw(st.integers(low, high))
    else:
        total = draw(st.integers(1, 12))
    sponsors = draw(st.lists(st.sampled_from(OWNERS), max_size=2, unique=True))
    funding = Funding(
        allow_borrow=draw(st.booleans()),
        max_borrow_gpus=draw(st.one_of(st.none(), st.none(), st.integers(0, 8))),
        sponsors=tuple(sponsors) if draw(st.booleans()) else (),
    )
    follow: Follow | None = None
    back: tuple[int, ...] = ()
    ghost = False
    if draw(st.integers(0, 3)) == 0:
        back = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2, unique=True)))
        ghost = draw(st.integers(0, 9)) == 0
        follow = Follow(
            after=("?",),  # resolved by RunDraft.run
            on_upstream_failure=draw(st.sampled_from(FailurePolicy)),
            upstream_failure_grace=draw(st.sampled_from((0, 30 * MINUTE, HOUR, 2 * HOUR))),
        )
    spec = RunSpec(
        owner=owner,
        gpu_type=draw(st.sampled_from(flavors)),
        total_gpus=total,
        locality=locality,
        spares_per_group=spares,
        malleable=malleable,
        funding=funding,
        follow=follow,
        checkpoint=draw(st.one_of(st.none(), st.sampled_from((10 * MINUTE, HOUR)))),
        runtime=draw(st.one_of(st.none(), st.none(), st.sampled_from((20 * MINUTE, HOUR, 3 * HOUR)))),
    )
    return RunDraft(spec, back, ghost, initial=draw(st.integers(0, 2)) > 0)


# --- timeline ----------------------------------------------------------------------------


def advance_st() -> st.SearchStrategy[tuple]:
    """Time advances of 0-2h, biased to round numbers (which line up with windows)."""
    return st.tuples(
        st.just("advance"),
        st.one_of(st.sampled_from((0, 60, 15 * MINUTE, 30 * MINUTE, HOUR, 2 * HOUR)), st.integers(0, 2 * HOUR)),
    )


@st.composite
def event_st(draw: st.DrawFn, runs: tuple[Run, ...], n_nodes: int, n_updates: int) -> tuple:
    run = st.integers(0, len(runs) - 1)
    node = st.integers(0, n_nodes - 1)
    kind = draw(st.sampled_from((
        "advance", "advance", "advance", "submit", "submit", "complete", "fail", "delete", "shrink",
        "eta", "failNode", "cordon", "uncordon", "budget",
    )))
    if kind == "advance":
        return draw(advance_st())
    if kind == "budget":
        return ("budget", draw(st.integers(0, n_updates - 1))) if n_updates else draw(advance_st())
    if kind in ("submit", "complete", "fail", "delete"):
        return (kind, draw(run))
    if kind == "shrink":
        i = draw(run)
        m = runs[i].spec.malleable
        if m is None:
            return ("complete", i)
        return ("shrink", i, m.min_total + m.step * draw(st.integers(0, (m.max_total - m.min_total) // m.step)))
    if kind == "eta":
        return ("eta", draw(run), draw(st.sampled_from((0, 10 * MINUTE, HOUR, 3 * HOUR))))
    return (kind, draw(node))


@st.composite
def worlds(draw: st.DrawFn, max_runs: int = 12, max_events: int = 25) -> World:
    flavors = draw(flavors_st())
    nodes = draw(nodes_st(flavors))
    drafts = draw(st.lists(budget_st(flavors, nodes), min_size=1, max_size=5))
    budgets = tuple(replace(b, name=f"b{i}") for i, b in enumerate(drafts))
    owners = tuple(sorted({b.owner for b in budgets}))
    run_drafts = draw(st.lists(run_st(flavors, nodes, owners), min_size=1, max_size=max_runs))
    runs = tuple(d.run(i) for i, d in enumerate(run_drafts))
    initial = [i for i, d in enumerate(run_drafts) if d.initial]
    updates = tuple(draw(st.lists(
        st.tuples(st.integers(0, len(budgets)), budget_st(flavors, nodes)).map(lambda ib: replace(ib[1], name=f"b{ib[0]}")),
        max_size=2)))
    n_updates = len(updates)
    timeline = draw(st.lists(event_st(runs, len(nodes), n_updates), max_size=max_events))
    config = ClusterConfig(
        cluster=CLUSTER,
        period=draw(st.sampled_from((HOUR, 6 * HOUR, 24 * HOUR))),
        reservation_lead=draw(st.sampled_from((5 * MINUTE, 15 * MINUTE))),
        preemption_hold_down=draw(st.sampled_from((30 * MINUTE, HOUR))),
    )
    return World(config, nodes, budgets, runs, tuple(sorted(initial)), tuple(timeline), updates)
