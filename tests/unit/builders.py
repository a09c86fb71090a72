"""Small builders for table-driven unit tests of the pure core (CALCULUS §1 objects).

Every helper returns the frozen model values the core takes, with defaults a test can ignore:
one region (`us-west`), one cluster (`gpu-a`), one flavor (`H100-80GB`), and the instant
`START` (2026-01-05T00:00:00Z). Runs are named `default/<name>` unless the key has a slash.
`cluster(nodes, budgets)` gives a `World`: the topology, the funding rules and view, a meter,
and the runs whose terms the view asks for — enough to drive funding, cover, pack and cuts by
hand, without the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import Claim, FundingRules, RunTerms
from jobtree.core.meter import Meter
from jobtree.core.model import (
    AggregateCap,
    Budget,
    Envelope,
    EnvelopeRef,
    Funding,
    FundingClass,
    Labels,
    Lease,
    Lending,
    Locality,
    Malleable,
    MintReason,
    Node,
    NodeState,
    Phase,
    PreActivation,
    Role,
    Run,
    RunSpec,
    RunStatus,
    Sharing,
    Slot,
    labels_of,
)
from jobtree.core.topology import Topology

START = 1_767_571_200
"""2026-01-05T00:00:00Z."""
HOUR = 3600
FLAVOR = "H100-80GB"
REGION = "us-west"
CLUSTER = "gpu-a"


def dom(name: str) -> str:
    """The full domain id of fabric domain `name` in the default region and cluster."""
    return f"{REGION}/{CLUSTER}/{name}"


def labels(**kw: str) -> Labels:
    """A label map; keys may use `_` for `.` (e.g. `fabric_domain`)."""
    return labels_of({k.replace("_", "."): v for k, v in kw.items()})


def node(name: str, gpus: int = 8, domain: str = "A", flavor: str = FLAVOR,
         state: NodeState = NodeState.READY, **extra: str) -> Node:
    """A node with the required labels plus `extra` labels (e.g. `rack="r1"`)."""
    base = {"region": REGION, "cluster": CLUSTER, "fabric.domain": domain, "gpu.flavor": flavor}
    base.update(extra)
    return Node(name, gpus, labels_of(base), state)


def envelope(name: str, concurrency: int, *, flavor: str = FLAVOR, selector: Mapping[str, str] | None = None,
             hours: float | None = None, start: int | None = None, end: int | None = None,
             sharing: str = "family", lend_to: Iterable[str] = (), lend_concurrency: int | None = None,
             lend_hours: float | None = None, lend: bool | None = None,
             pre_admission: bool = False, pre_reservations: bool = False) -> Envelope:
    lend_to = tuple(lend_to)
    return Envelope(
        name=name,
        flavor=flavor,
        selector=labels_of(dict(selector or {})),
        concurrency=concurrency,
        max_gpu_hours=hours,
        start=start,
        end=end,
        sharing=Sharing(sharing),
        pre_activation=PreActivation(pre_reservations, pre_admission),
        lending=Lending(bool(lend_to) if lend is None else lend, lend_to, lend_concurrency, lend_hours),
    )


def budget(name: str, owner: str, *envelopes: Envelope, parents: Iterable[str] = (),
           period: int | None = None, caps: Iterable[AggregateCap] = ()) -> Budget:
    return Budget(name, owner, tuple(parents), period, tuple(envelopes), tuple(caps))


def agg_cap(name: str, *envelopes: str, concurrency: int | None = None, hours: float | None = None,
            flavor: str = FLAVOR) -> AggregateCap:
    return AggregateCap(name, flavor, tuple(envelopes), concurrency, hours)


def run_key(key: str) -> str:
    return key if "/" in key else f"default/{key}"


def run(key: str, owner: str, total: int, group: int | None = None, *, spares: int = 0,
        flavor: str = FLAVOR, selector: Mapping[str, str] | None = None, spread: bool = True,
        malleable: tuple[int, int, int] | tuple[int, int, int, int] | None = None,
        allow_borrow: bool = False, max_borrow: int | None = None, sponsors: Iterable[str] = ()) -> Run:
    """A run; `malleable` is (min, max, step[, desired])."""
    ns, name = run_key(key).split("/", 1)
    mall = None
    if malleable is not None:
        lo, hi, step = malleable[:3]
        desired = malleable[3] if len(malleable) == 4 else hi
        mall = Malleable(lo, hi, step, desired)
    spec = RunSpec(
        owner=owner,
        gpu_type=flavor,
        total_gpus=total,
        locality=Locality(group, spread, labels_of(dict(selector or {}))),
        spares_per_group=spares,
        malleable=mall,
        funding=Funding(allow_borrow, max_borrow, tuple(sponsors)),
    )
    return Run(ns, name, spec)


def terms_of(r: Run, admitted: int = START) -> RunTerms:
    f = r.spec.funding
    return RunTerms(admitted, f.allow_borrow, f.max_borrow_gpus, f.sponsors)


def status(admitted: int = START, bound_at: int | None = None) -> RunStatus:
    return RunStatus(Phase.RUNNING, "Started", "", created=admitted, admitted=admitted, bound_at=bound_at)


def lease(name: str, r: Run | str, slots: Iterable[Slot], *, group: int = 0, role: Role = Role.ACTIVE,
          paid_by: EnvelopeRef | None = None, owner: str | None = None, start: int = START) -> Lease:
    key = r.key if isinstance(r, Run) else run_key(r)
    own = owner if owner is not None else (r.spec.owner if isinstance(r, Run) else "org:unknown")
    return Lease(name, key, own, group, role, tuple(slots), paid_by, start, MintReason.START)


def slots(node_name: str, *ordinals: int) -> tuple[Slot, ...]:
    return tuple((node_name, i) for i in ordinals)


def claim(name: str, r: Run | str, gpus: int, payer: EnvelopeRef | None, *, group: int = 0,
          role: Role = Role.ACTIVE, owner: str | None = None, node_labels: Labels | None = None) -> Claim:
    key = r.key if isinstance(r, Run) else run_key(r)
    own = owner if owner is not None else (r.spec.owner if isinstance(r, Run) else "org:unknown")
    return Claim(name, key, own, group, role, gpus, payer, node_labels)


@dataclass
class World:
    """A cluster's pure state assembled by hand: topology, budgets, funding view, meter, runs."""

    topo: Topology
    rules: FundingRules
    view: FundingView
    meter: Meter
    runs: dict[str, Run] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)

    def terms(self, key: str) -> RunTerms:
        r = self.runs.get(key)
        t = self.admitted.get(key, START)
        return RunTerms(t) if r is None else terms_of(r, t)

    def add_run(self, r: Run, admitted: int = START) -> Run:
        self.runs[r.key] = r
        self.admitted[r.key] = admitted
        return r

    def period_of(self, default: int = 24 * HOUR) -> Callable[[EnvelopeRef], int]:
        """The admission look-ahead P of an envelope: its budget's period, else `default` (§1)."""

        def period(ref: EnvelopeRef) -> int:
            p = self.rules.budgets[ref[0]].period
            return default if p is None else p

        return period

    def classes(self) -> dict[str, FundingClass]:
        self.view.refresh()
        return {c.name: self.view.class_of(c.name) for c in self.view.claims()}


def cluster(nodes: Iterable[Node] = (), budgets: Iterable[Budget] = (), *, now: int = START,
            runs: Iterable[Run] = (), allowances: dict[str, int] | None = None) -> World:
    topo = Topology(nodes)
    rules = FundingRules(budgets, allowances)
    holder: list[World] = []
    view = FundingView(rules, lambda key: holder[0].terms(key))
    world = World(topo, rules, view, Meter())
    holder.append(world)
    view.set_clock(now, frozenset())
    for r in runs:
        world.add_run(r)
    return world
