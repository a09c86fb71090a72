"""Playing a `World` against the engine, the property checker, and the regression helper.

`play(world, observe=...)` builds a `Cluster`, applies the budgets (one batch), the initial runs
(one batch), then the timeline: each command is submitted on its own; each time advance steps
through every timer on the way (`next_timer`) so the observer sees the state after every
decision instant, not only at event instants. A final 4h drain lets pending timers fire.

`Checker` is an observer that checks, after every command and every timer, the §10 oracle
(`check_all`) plus properties
it derives independently from the ledger and the budgets as applied (never from the engine's
funding caches): lease immutability and naming, placement, funded widths and GPU-hours under
every bound, classes against an independent reading of §2, gang width, and that the meter
agrees with an integration of the classified leases over time.

`prop_settings(n)` is the suite's hypothesis settings: derandomized (reproducible in CI) unless
JOBTREE_PROPERTY_RANDOM=1; JOBTREE_PROPERTY_SCALE multiplies the example counts. `noting`
attaches `report(world)` — the world and a replayable scenario file — to a failing example.

`scenario_yaml(world, played)` renders a played example as a scenario file for
`jobtree sim run`, so a failing example can be replayed and turned into a regression scenario.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import yaml
from hypothesis import HealthCheck, note, settings
from strategies import World

from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.facts import (
    ApplyBudget,
    ApplyRun,
    Command,
    CompleteRun,
    CordonNode,
    DeleteRun,
    FailNode,
    FailRun,
    LeaseClosed,
    LeaseMinted,
    ReportEta,
    ShrinkRun,
    UncordonNode,
)
from jobtree.core.invariants import check_all
from jobtree.core.meter import cap_seconds
from jobtree.core.model import (
    Budget,
    FundingClass,
    Lease,
    NodeState,
    Phase,
    ReservationState,
    Role,
    Run,
    labels_match,
)
from jobtree.core.timefmt import format_time
from jobtree.core.views import state_json

DRAIN = 4 * 3600
Observer = Callable[[Cluster, str], None]


def prop_settings(max_examples: int) -> settings:
    """Reproducible by default (`derandomize`: CI runs the same examples every time). Set
    JOBTREE_PROPERTY_RANDOM=1 to explore new examples (hypothesis' database then remembers
    failures) and JOBTREE_PROPERTY_SCALE=10 to run ten times as many."""
    scale = float(os.environ.get("JOBTREE_PROPERTY_SCALE", "1"))
    explore = os.environ.get("JOBTREE_PROPERTY_RANDOM") == "1"
    return settings(
        max_examples=max(1, int(max_examples * scale)),
        deadline=None,
        derandomize=not explore,
        database=settings.default.database if explore else None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def noting(world: World, fn: Callable[[], T]) -> T:
    """Run `fn`; if it fails, attach the world and a replayable scenario to hypothesis' report."""
    try:
        return fn()
    except Exception:
        note(report(world))
        raise


T = TypeVar("T")


class PropertyViolation(AssertionError):
    pass


def _fail(what: str, cl: Cluster, label: str) -> None:
    raise PropertyViolation(f"{what} [at {format_time(cl.now)}, after {label}]")


# --- playing -----------------------------------------------------------------------------


def command_for(cl: Cluster, world: World, ev: tuple) -> Command | None:
    """The command an event stands for now, or None when the current state makes it invalid."""
    kind = ev[0]
    if kind == "budget":
        return ApplyBudget(world.budget_updates[ev[1]])
    if kind in ("failNode", "cordon", "uncordon"):
        node = world.nodes[ev[1]].name
        return {"failNode": FailNode, "cordon": CordonNode, "uncordon": UncordonNode}[kind](node)
    run = world.runs[ev[1]]
    key = run.key
    if kind == "submit":
        return ApplyRun(run)
    if key not in cl.runs:
        return None
    if kind == "delete":
        return DeleteRun(key)
    if kind == "eta":
        return ReportEta(key, cl.now + ev[2])
    if kind == "shrink":
        return ShrinkRun(key, ev[2])
    st = cl.status[key]
    if st.phase.terminal or st.bound_at is None:  # only a workload that started reports
        return None
    return CompleteRun(key) if kind == "complete" else FailRun(key)


@dataclass
class Played:
    cluster: Cluster
    steps: list[tuple[int, list[Command]]] = field(default_factory=list)
    """Every batch submitted, with its instant (for `scenario_yaml`)."""
    rejected: list[tuple[int, Command]] = field(default_factory=list)
    """Commands the engine refused (with ValidationError) without changing anything."""


def play(world: World, observe: Observer | None = None, *, budget_order: Sequence[int] | None = None,
         initial_order: Sequence[int] | None = None, drain: bool = True, stop_after: int | None = None,
         sink: list[Played] | None = None, opening: Sequence[tuple[str, int]] | None = None) -> Played:
    """Play the world. `budget_order`/`initial_order` permute the two opening batches (or
    `opening`, a list of ("b", budget) and ("r", run) indices, makes them one batch);
    `stop_after` plays only that many timeline events (and no drain); `sink` receives the
    `Played` record before anything runs (so a caller keeps it when playing raises)."""
    cl = Cluster(world.config, world.nodes, world.start)
    out = Played(cl)
    if sink is not None:
        sink.append(out)
    seen = observe or (lambda _cl, _label: None)

    def submit(cmds: list[Command], label: str) -> None:
        if not cmds:
            return
        out.steps.append((cl.now, cmds))
        mark = len(cl.journal)
        try:
            cl.submit(*cmds)
        except ValidationError:
            # The engine may reject a command our filter let through; a rejection must change nothing.
            if len(cmds) > 1 or len(cl.journal) != mark:
                raise
            out.steps.pop()
            out.rejected.append((cl.now, cmds[0]))
            return
        seen(cl, label)

    def advance(t: int) -> None:
        while True:
            due = cl.next_timer()
            if due is None or due > t:
                break
            cl.advance(due)
            seen(cl, "timer")
        if t > cl.now:
            cl.advance(t)
            seen(cl, "advance")

    if opening is not None:
        submit([ApplyBudget(world.budgets[i]) if kind == "b" else ApplyRun(world.runs[i]) for kind, i in opening],
               "opening batch")
    else:
        border = budget_order if budget_order is not None else range(len(world.budgets))
        submit([ApplyBudget(world.budgets[i]) for i in border], "budgets")
        iorder = initial_order if initial_order is not None else world.initial_runs
        submit([ApplyRun(world.runs[i]) for i in iorder], "initial runs")
    events = world.timeline if stop_after is None else world.timeline[:stop_after]
    for n, ev in enumerate(events):
        if ev[0] == "advance":
            advance(cl.now + ev[1])
            continue
        cmd = command_for(cl, world, ev)
        if cmd is not None:
            submit([cmd], f"timeline[{n}] {ev!r}")
    if drain and stop_after is None:
        advance(cl.now + DRAIN)
    return out


# --- the checker -------------------------------------------------------------------------

_LEASE_NAME = re.compile(r"^(.+)\.(\d{5})$")
_RES_NAME = re.compile(r"^(.+)\.r(\d{3})$")
_CLOSURES = re.compile(
    r"^(Completed|RunFailed|NodeFailure|Swap|Shrink|DropSpare|Requeued|Cancelled"
    r"|ReclaimUnfunded\([0-9a-f]{64}\)|RandomPreempt\([0-9a-f]{64}\))$"
)

Bound = tuple[str, ...]


class Checker:
    """An observer checking the properties after every decision instant."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.budgets: dict[str, Budget] = {}
        """The budgets as the cluster has them (updated when an ApplyBudget is observed)."""
        self.hour_caps: dict[Bound, float] = {}
        self.windows: dict[Bound, int | None] = {}
        self.leases: dict[str, Lease] = {}
        self.reservations: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        self.facts_seen = 0
        self.minted: set[str] = set()
        self.closed: set[str] = set()
        self.next_seq: dict[str, int] = {}
        self.last_t = world.start
        self.widths: dict[Bound, int] = {}
        self.unfunded_by_owner: dict[str, int] = {}
        self.consumed: dict[Bound, int] = {}
        """GPU-seconds funded per bound, integrated here from the classified leases."""
        self.charged: dict[Bound, int] = {}
        """The same, clamped at the cap as CALCULUS §2 charges it (what the meter must show)."""
        self.unfunded: dict[str, int] = {}
        self.quantum: dict[Bound, int] = {}
        """Per capped bound, the GPU-seconds it may overshoot at the second it runs dry."""
        self.observations = 0
        self.minted_before: set[str] = set()
        self.grow_seen: set[str] = set()

    def __call__(self, cl: Cluster, label: str) -> None:
        self.observations += 1
        self._integrate(cl, label)
        self._sync_budgets(cl)
        check_all(cl)
        self._meter(cl, label)
        self._facts(cl, label)
        self._leases(cl, label)
        self._placement(cl, label)
        self._reservations_and_status(cl, label)
        self._funding(cl, label)
        self._reference(cl, label)
        self._gang(cl, label)

    # --- the ledger ---------------------------------------------------------------------

    def _facts(self, cl: Cluster, label: str) -> None:
        """Every lease name is minted once, closed at most once, numbered 0, 1, 2... per run name."""
        for fact in cl.facts[self.facts_seen:]:
            if isinstance(fact, LeaseMinted):
                name = fact.lease.name
                if name in self.minted:
                    _fail(f"lease name {name} minted twice", cl, label)
                self.minted.add(name)
                m = _LEASE_NAME.match(name)
                if not m or m.group(1) != fact.lease.run.replace("/", ".", 1):
                    _fail(f"lease name {name} is not <namespace>.<run>.<NNNNN> of {fact.lease.run}", cl, label)
                    return
                want = self.next_seq.get(m.group(1), 0)
                if int(m.group(2)) != want:
                    _fail(f"lease {name} minted out of sequence (expected number {want})", cl, label)
                self.next_seq[m.group(1)] = want + 1
            elif isinstance(fact, LeaseClosed):
                if fact.name not in self.minted:
                    _fail(f"lease {fact.name} closed but never minted", cl, label)
                if fact.name in self.closed:
                    _fail(f"lease {fact.name} closed twice", cl, label)
                self.closed.add(fact.name)
        self.facts_seen = len(cl.facts)

    def _leases(self, cl: Cluster, label: str) -> None:
        """A lease is never edited: closing records end and reason once; nothing else changes."""
        now = cl.now
        for name, old in self.leases.items():
            new = cl.leases.get(name)
            if new is None:
                _fail(f"lease {name} disappeared from the ledger", cl, label)
                continue
            if old.end is not None:
                if new != old:
                    _fail(f"closed lease {name} changed: {old} -> {new}", cl, label)
                continue
            if replace(new, end=None, closure_reason=None) != old:
                _fail(f"open lease {name} edited: {old} -> {new}", cl, label)
            if new.end is not None and new.end != now:
                _fail(f"lease {name} closed with end {new.end} != the decision instant {now}", cl, label)
        for name, lease in cl.leases.items():
            if name not in self.leases:
                if lease.start != now:
                    _fail(f"new lease {name} starts at {lease.start}, not now ({now})", cl, label)
                if lease.end is not None and lease.end != now:
                    _fail(f"new lease {name} closed at {lease.end}, not now", cl, label)
            if lease.end is not None:
                if lease.closure_reason is None or not _CLOSURES.match(lease.closure_reason):
                    _fail(f"lease {name} has closure reason {lease.closure_reason!r}", cl, label)
                cut = lease.closure_reason or ""
                if (lease.mint_reason.value == "Start" and lease.end == lease.start
                        and cut.startswith(("ReclaimUnfunded(", "RandomPreempt(", "DropSpare"))):
                    _fail(f"lease {name} was cut ({cut[:15]}) at the instant its run was bound (§5)", cl, label)
                if lease.end < lease.start:
                    _fail(f"lease {name} ends before it starts", cl, label)
            elif lease.closure_reason is not None:
                _fail(f"open lease {name} has a closure reason", cl, label)
        open_names = {n for ls in cl.open_by_run.values() for n in ls}
        really_open = {n for n, x in cl.leases.items() if x.open}
        if open_names != really_open:
            _fail(f"open index disagrees with the ledger: {sorted(open_names ^ really_open)}", cl, label)
        self.leases = dict(cl.leases)

    def _placement(self, cl: Cluster, label: str) -> None:
        """Leases sit on one node each, on real slots of the right flavor, matching selectors; groups
        stay in one domain; nothing open on a fenced node; nothing new on a node that is not Ready."""
        new_names = {n for n in cl.leases if n not in self.minted_before}
        group_domains: dict[tuple[str, int], set[str]] = {}
        run_domains: dict[str, set[str]] = {}
        for key, leases in cl.open_by_run.items():
            run = cl.runs.get(key)
            for lease in leases.values():
                if not lease.slots:
                    _fail(f"lease {lease.name} holds no slots", cl, label)
                nodes = {s[0] for s in lease.slots}
                if len(nodes) != 1:
                    _fail(f"lease {lease.name} spans nodes {sorted(nodes)}", cl, label)
                node = cl.topo.nodes[lease.node]
                if len(set(lease.slots)) != len(lease.slots) or any(not 0 <= i < node.gpus for _, i in lease.slots):
                    _fail(f"lease {lease.name} has bad slots {lease.slots}", cl, label)
                if node.state is NodeState.FENCED:
                    _fail(f"open lease {lease.name} on fenced node {node.name}", cl, label)
                if run is None:
                    _fail(f"open lease {lease.name} of a run that no longer exists ({key})", cl, label)
                    continue
                spec = run.spec
                if node.flavor != spec.gpu_type:
                    _fail(f"lease {lease.name} on {node.flavor} node for a {spec.gpu_type} run", cl, label)
                if not labels_match(spec.locality.selector, node.labels):
                    _fail(f"lease {lease.name} on {node.name} outside the run's selector", cl, label)
                if lease.paid_by is not None and lease.name in new_names and lease.mint_reason.value != "Swap":
                    b = self.budgets.get(lease.paid_by[0])
                    e = b.envelope(lease.paid_by[1]) if b else None
                    if e is None or e.flavor != node.flavor or not labels_match(e.selector, node.labels):
                        _fail(f"lease {lease.name} minted on {node.name} outside its payer {lease.paid_by}", cl, label)
                if lease.role is Role.SPARE and not spec.spares_per_group:
                    _fail(f"run {key} holds spare lease {lease.name} but asks for no spares", cl, label)
                if lease.name in new_names and lease.mint_reason.value != "Swap" and node.state is not NodeState.READY:
                    _fail(f"lease {lease.name} minted on {node.state.value} node {node.name}", cl, label)
                d = node.domain
                group_domains.setdefault((key, lease.group), set()).add(d)
                run_domains.setdefault(key, set()).add(d)
        for (key, g), doms in group_domains.items():
            if cl.runs[key].spec.locality.group_gpus is not None and len(doms) > 1:
                _fail(f"group {g} of {key} spans domains {sorted(doms)}", cl, label)
        for key, doms in run_domains.items():
            if not cl.runs[key].spec.locality.allow_cross_group_spread and len(doms) > 1:
                _fail(f"{key} forbids cross-group spread but spans {sorted(doms)}", cl, label)
        self.minted_before = set(cl.leases)

    def _reservations_and_status(self, cl: Cluster, label: str) -> None:
        for name, r in cl.reservations.items():
            if not _RES_NAME.match(name):
                _fail(f"reservation name {name} is not <namespace>.<run>.r<NNN>", cl, label)
            old = self.reservations.get(name)
            if old is not None and old.state is not ReservationState.PENDING and old != r:
                _fail(f"resolved reservation {name} changed: {old} -> {r}", cl, label)
        self.reservations = dict(cl.reservations)
        for key, st in cl.status.items():
            if key not in cl.runs:
                continue  # a deleted run keeps its last status internally; nothing reads it
            if st.phase is Phase.RESERVED:
                res = cl.reservations.get(st.reservation or "")
                if res is None or res.state is not ReservationState.PENDING:
                    _fail(f"{key} is Reserved without a pending reservation ({st.reservation})", cl, label)
                if st.hold_down_until is not None and cl.now < st.hold_down_until:
                    _fail(f"{key} reserved during its preemption hold-down (until "
                          f"{format_time(st.hold_down_until)}); §5 no thrash: it may bind, not reserve", cl, label)
            old = self.status.get(key)
            if old is None or old.generation != st.generation:
                continue
            if old.phase is Phase.WAITING and st.phase in (Phase.PENDING, Phase.RESERVED, Phase.RUNNING):
                run = cl.runs[key]
                ups = run.spec.follow.after if run.spec.follow else ()
                for up in ups:
                    ust = cl.status.get(f"{run.namespace}/{up}")
                    if ust is None or ust.phase is not Phase.COMPLETED:
                        _fail(f"{key} left Waiting but upstream {up} is "
                              f"{ust.phase.value if ust else 'missing'}", cl, label)
            if old.phase.terminal and (st.phase, st.reason, st.ended_at) != (old.phase, old.reason, old.ended_at):
                _fail(f"terminal run {key} changed status: {old} -> {st}", cl, label)
            if old.admitted is not None and st.admitted != old.admitted:
                _fail(f"run {key} admission time changed {old.admitted} -> {st.admitted}", cl, label)
        self.status = dict(cl.status)

    # --- funding, independently of the engine's funding caches ---------------------------

    def _integrate(self, cl: Cluster, label: str) -> None:
        """Charge the widths seen at the previous observation for the time since (budgets only
        change at command instants, where no time passes, so the caps are those of the interval)."""
        dt = cl.now - self.last_t
        if dt < 0:
            _fail("the clock moved backwards", cl, label)
        for b, w in self.widths.items():
            if not w:
                continue
            before = self.consumed.get(b, 0)
            self.consumed[b] = before + w * dt
            cap = self.hour_caps.get(b)
            charged = self.charged.get(b, 0) + w * dt
            self.charged[b] = charged if cap is None else min(charged, cap_seconds(cap))
            if cap is not None and before < cap_seconds(cap) <= self.consumed[b]:
                # Time is whole seconds: the exhaustion timer fires on the first second at which
                # the cap is reached, so that second may overshoot by less than one second of the
                # funded width. More than that is an overdraft.
                self.quantum[b] = max(self.quantum.get(b, 0), w - 1)
        for o, w in self.unfunded_by_owner.items():
            self.unfunded[o] = self.unfunded.get(o, 0) + w * dt
        self.last_t = cl.now

    def _sync_budgets(self, cl: Cluster) -> None:
        """Follow budget changes: an envelope's consumption restarts when a new window starts; a cap
        lowered below what was already consumed excuses that much (only new funding is checked)."""
        if cl.budgets == self.budgets:
            return
        self.budgets = dict(cl.budgets)
        caps: dict[Bound, float] = {}
        for b in self.budgets.values():
            for e in b.envelopes:
                ref: Bound = ("env", b.name, e.name)
                # docs/design/decisions.md: consumption restarts when a new window starts (its
                # `start` changes); moving only `end` keeps what was consumed.
                window = e.start
                if self.windows.get(ref, window) != window:
                    self.consumed.pop(ref, None)
                    self.charged.pop(ref, None)
                    self.quantum.pop(ref, None)
                self.windows[ref] = window
                if e.max_gpu_hours is not None:
                    caps[ref] = e.max_gpu_hours
                if e.lending.max_gpu_hours is not None:
                    caps[("lend", b.name, e.name)] = e.lending.max_gpu_hours
            for cap in b.aggregate_caps:
                if cap.max_gpu_hours is not None:
                    caps[("cap", b.name, cap.name)] = cap.max_gpu_hours
        for bound, hours in caps.items():
            over = self.consumed.get(bound, 0) - cap_seconds(hours)
            if over > 0:
                self.quantum[bound] = max(self.quantum.get(bound, 0), over)
        self.hour_caps = caps

    def _meter(self, cl: Cluster, label: str) -> None:
        """Funded GPU-hours never exceed B; the meter agrees with the ledger's integration."""
        for b, hours in self.hour_caps.items():
            if self.consumed.get(b, 0) > cap_seconds(hours) + self.quantum.get(b, 0):
                _fail(f"{'/'.join(b)} funded {self.consumed[b] / 3600:.6f} GPU-hours > maxGPUHours {hours} "
                      f"(ledger integration; the meter shows {cl.meter.consumed.get(b, 0) / 3600:.6f})", cl, label)
        for b in set(self.charged) | {k for k in cl.meter.consumed if k[0] != "borrow"}:
            if cl.meter.consumed.get(b, 0) != self.charged.get(b, 0):
                _fail(f"meter says {'/'.join(b)} consumed {cl.meter.consumed.get(b, 0)} GPU-s, the ledger "
                      f"integrates to {self.charged.get(b, 0)}", cl, label)
        for o in set(self.unfunded) | set(cl.meter.unfunded):
            if cl.meter.unfunded.get(o, 0) != self.unfunded.get(o, 0):
                _fail(f"meter says {o} ran {cl.meter.unfunded.get(o, 0)} unfunded GPU-s, the ledger "
                      f"integrates to {self.unfunded.get(o, 0)}", cl, label)

    def _funding(self, cl: Cluster, label: str) -> None:
        widths: dict[Bound, int] = {}
        borrowed: dict[str, int] = {}
        unfunded: dict[str, int] = {}
        for key, leases in cl.open_by_run.items():
            for lease in leases.values():
                cls = cl.funding.class_of(lease.name)
                if cls is FundingClass.UNFUNDED:
                    unfunded[lease.owner] = unfunded.get(lease.owner, 0) + lease.gpus
                    continue
                if lease.paid_by is None:
                    _fail(f"lease {lease.name} has no payer but is {cls.value}", cl, label)
                    continue
                b = self.budgets.get(lease.paid_by[0])
                e = b.envelope(lease.paid_by[1]) if b else None
                if b is None or e is None:
                    _fail(f"lease {lease.name} is {cls.value} by {lease.paid_by}, which no longer exists", cl, label)
                    continue
                if not e.window_open(cl.now):
                    _fail(f"lease {lease.name} is {cls.value} by {lease.paid_by} outside its window", cl, label)
                if (cls is FundingClass.OWNED) != (lease.owner == b.owner):
                    _fail(f"lease {lease.name} of {lease.owner} is {cls.value} on {b.owner}'s envelope", cl, label)
                if cls is FundingClass.SHARED and e.sharing.value == "none":
                    _fail(f"lease {lease.name} is shared on a sharing: none envelope", cl, label)
                run = cl.runs[key]
                if cls is FundingClass.BORROWED and not (run.spec.funding.allow_borrow and e.lending.lends_to(lease.owner)):
                    _fail(f"lease {lease.name} is borrowed without allowBorrow and a lending ACL", cl, label)
                gpus = lease.gpus
                ref = lease.paid_by
                widths[("env", *ref)] = widths.get(("env", *ref), 0) + gpus
                if cls is FundingClass.BORROWED:
                    widths[("lend", *ref)] = widths.get(("lend", *ref), 0) + gpus
                    borrowed[key] = borrowed.get(key, 0) + gpus
                for cap in b.aggregate_caps:
                    if ref[1] in cap.envelopes:
                        widths[("cap", b.name, cap.name)] = widths.get(("cap", b.name, cap.name), 0) + gpus
        for bound, w in widths.items():
            limit = self._concurrency(bound)
            if limit is not None and w > limit:
                _fail(f"no overdraft: {'/'.join(bound)} funds {w} GPUs over its cap {limit}", cl, label)
            if bound in self.hour_caps and w and self.charged.get(bound, 0) >= cap_seconds(self.hour_caps[bound]):
                _fail(f"{'/'.join(bound)} spent its {self.hour_caps[bound]} GPU-hours but still funds {w}", cl, label)
        for key, n in borrowed.items():
            mb = cl.runs[key].spec.funding.max_borrow_gpus
            if mb is not None and n > mb:
                _fail(f"{key} borrows {n} GPUs > maxBorrowGPUs {mb}", cl, label)
        self.widths = widths
        self.unfunded_by_owner = unfunded

    def _reference(self, cl: Cluster, label: str) -> None:
        """Derivation against an independent reading of §2, and growth is never unfunded (§6)."""
        want = reference_classes(cl)
        for name, cls in sorted(want.items()):
            got = cl.funding.class_of(name)
            if got is not cls:
                _fail(f"derivation: {name} is {got.value} but §2 ranks it {cls.value}", cl, label)
        for name in sorted(cl.leases):
            lease = cl.leases[name]
            if (name not in self.grow_seen and lease.open and lease.mint_reason.value == "Grow"
                    and lease.start == cl.now and want[name] is FundingClass.UNFUNDED):
                _fail(f"growth lease {name} is unfunded at its mint instant", cl, label)
        self.grow_seen = set(cl.leases)

    def _concurrency(self, bound: Bound) -> int | None:
        kind, bname, name = bound
        b = self.budgets[bname]  # a funded bound belongs to a budget that exists (checked above)
        if kind == "env":
            e = b.envelope(name)
            return e.concurrency if e else None
        if kind == "lend":
            e = b.envelope(name)
            return e.lending.max_concurrency if e else None
        for cap in b.aggregate_caps:
            if cap.name == name:
                return cap.max_concurrency
        return None

    # --- gang ----------------------------------------------------------------------------

    def _gang(self, cl: Cluster, label: str) -> None:
        """Running implies allocated >= min width (and <= max); nothing held when not Running."""
        for row in state_json(cl)["runs"]:
            w, phase = row["width"], row["phase"]
            if phase == Phase.RUNNING.value:
                if w["allocated"] < w["min"]:
                    _fail(f"gang: {row['key']} Running with {w['allocated']} < min {w['min']} GPUs", cl, label)
                if w["allocated"] > w["max"]:
                    _fail(f"{row['key']} Running with {w['allocated']} > max {w['max']} GPUs", cl, label)
            elif w["allocated"] or any(row["funding"].values()):
                _fail(f"{row['key']} is {phase} but holds GPUs: {row['funding']}", cl, label)


# --- an independent reference for CALCULUS §2 ------------------------------------------------


def _parents_of(budgets: dict[str, Budget]) -> dict[str, set[str]]:
    parents: dict[str, set[str]] = {}
    for b in budgets.values():
        parents.setdefault(b.owner, set()).update(b.parents)
    return parents


def reference_tier(parents: dict[str, set[str]], claimant: str, holder: str) -> tuple[str, int] | None:
    """(tier, distance) of `claimant` on an envelope of `holder` by family, or None if unrelated."""
    if claimant == holder:
        return ("owner", 0)
    dist: dict[str, int] = {}
    frontier, d = set(parents.get(claimant, ())), 1
    while frontier:
        nxt: set[str] = set()
        for o in frontier:
            if o not in dist and o != claimant:
                dist[o] = d
                nxt |= parents.get(o, set())
        frontier, d = nxt, d + 1
    if holder in dist:
        return ("ancestor", dist[holder])
    mine, theirs = parents.get(claimant, set()), parents.get(holder, set())
    if mine & theirs:
        return ("sibling", 0)
    if any(p != q and parents.get(p, set()) & parents.get(q, set()) for p in mine for q in theirs):
        return ("cousin", 0)
    return None


_TIER_ORDER = {"owner": 0, "ancestor": 1, "sibling": 2, "cousin": 3, "sponsor": 4}


def reference_classes(cl: Cluster) -> dict[str, FundingClass]:
    """Every open lease's class computed from scratch, straight from the text of §2: rank the
    leases that have a payer by (tier, admission time, run key, group, lease name) and fund
    greedily under the window, concurrency, spent GPU-hours, lending caps, maxBorrowGPUs and
    aggregate caps. Spent GPU-hours are read from the meter (itself checked against the ledger)."""
    budgets = cl.budgets
    parents = _parents_of(budgets)
    spent = {b for b, hours in _hour_caps(budgets).items() if cl.meter.consumed.get(b, 0) >= cap_seconds(hours)}
    out: dict[str, FundingClass] = {}
    ranked: list[tuple[tuple, Lease, str]] = []
    for leases in cl.open_by_run.values():
        for lease in leases.values():
            out[lease.name] = FundingClass.UNFUNDED
            if lease.paid_by is None:
                continue
            b = budgets.get(lease.paid_by[0])
            e = b.envelope(lease.paid_by[1]) if b else None
            if b is None or e is None or not e.window_open(cl.now):
                continue
            node = cl.topo.nodes[lease.node]
            if node.flavor != e.flavor or not labels_match(e.selector, node.labels):
                continue
            run = cl.runs[lease.run]
            fam = reference_tier(parents, lease.owner, b.owner)
            if fam is not None:
                if fam[0] != "owner" and e.sharing.value == "none":
                    continue
                tier = fam
            elif run.spec.funding.allow_borrow and e.lending.lends_to(lease.owner):
                tier = ("sponsor", 0)
            else:
                continue
            st = cl.status[lease.run]
            admitted = st.admitted if st.admitted is not None else st.created
            rank = (_TIER_ORDER[tier[0]], tier[1], admitted, lease.run, lease.group, lease.name)
            ranked.append((rank, lease, tier[0]))
    used: dict[Bound, int] = {}
    for _, lease, tier in sorted(ranked, key=lambda r: r[0]):
        assert lease.paid_by is not None
        bname, ename = lease.paid_by
        b = budgets[bname]
        e = b.envelope(ename)
        assert e is not None
        limits: list[tuple[Bound, int | None]] = [(("env", bname, ename), e.concurrency)]
        if tier == "sponsor":
            limits.append((("lend", bname, ename), e.lending.max_concurrency))
            limits.append((("borrow", lease.run), cl.runs[lease.run].spec.funding.max_borrow_gpus))
        for cap in b.aggregate_caps:
            if ename in cap.envelopes:
                limits.append((("cap", bname, cap.name), cap.max_concurrency))
        if all(bound not in spent and (lim is None or used.get(bound, 0) + lease.gpus <= lim) for bound, lim in limits):
            for bound, _ in limits:
                used[bound] = used.get(bound, 0) + lease.gpus
            out[lease.name] = {"owner": FundingClass.OWNED, "sponsor": FundingClass.BORROWED}.get(
                tier, FundingClass.SHARED)
    return out


def _hour_caps(budgets: dict[str, Budget]) -> dict[Bound, float]:
    caps: dict[Bound, float] = {}
    for b in budgets.values():
        for e in b.envelopes:
            if e.max_gpu_hours is not None:
                caps[("env", b.name, e.name)] = e.max_gpu_hours
            if e.lending.max_gpu_hours is not None:
                caps[("lend", b.name, e.name)] = e.lending.max_gpu_hours
        for cap in b.aggregate_caps:
            if cap.max_gpu_hours is not None:
                caps[("cap", b.name, cap.name)] = cap.max_gpu_hours
    return caps


# --- regression helper: a played example as a scenario file -------------------------------


def _dur(seconds: int) -> str:
    return f"{seconds}s"


def _budget_manifest(b: Budget) -> dict[str, Any]:
    envs = []
    for e in b.envelopes:
        env: dict[str, Any] = {"name": e.name, "flavor": e.flavor, "concurrency": e.concurrency,
                               "sharing": e.sharing.value}
        if e.selector:
            env["selector"] = dict(e.selector)
        if e.max_gpu_hours is not None:
            env["maxGPUHours"] = e.max_gpu_hours
        if e.start is not None:
            env["start"] = format_time(e.start)
        if e.end is not None:
            env["end"] = format_time(e.end)
        env["preActivation"] = {"allowReservations": e.pre_activation.allow_reservations,
                                "allowAdmission": e.pre_activation.allow_admission}
        if e.lending.allow or e.lending.to:
            lend: dict[str, Any] = {"allow": e.lending.allow, "to": list(e.lending.to)}
            if e.lending.max_concurrency is not None:
                lend["maxConcurrency"] = e.lending.max_concurrency
            if e.lending.max_gpu_hours is not None:
                lend["maxGPUHours"] = e.lending.max_gpu_hours
            env["lending"] = lend
        envs.append(env)
    spec: dict[str, Any] = {"owner": b.owner, "parents": list(b.parents), "envelopes": envs}
    if b.period is not None:
        spec["period"] = _dur(b.period)
    if b.aggregate_caps:
        caps = []
        for c in b.aggregate_caps:
            cap: dict[str, Any] = {"name": c.name, "flavor": c.flavor, "envelopes": list(c.envelopes)}
            if c.max_concurrency is not None:
                cap["maxConcurrency"] = c.max_concurrency
            if c.max_gpu_hours is not None:
                cap["maxGPUHours"] = c.max_gpu_hours
            caps.append(cap)
        spec["aggregateCaps"] = caps
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": b.name}, "spec": spec}


def _run_manifest(r: Run) -> dict[str, Any]:
    s = r.spec
    spec: dict[str, Any] = {"owner": s.owner, "resources": {"gpuType": s.gpu_type, "totalGPUs": s.total_gpus}}
    loc: dict[str, Any] = {"allowCrossGroupSpread": s.locality.allow_cross_group_spread}
    if s.locality.group_gpus is not None:
        loc["groupGPUs"] = s.locality.group_gpus
    if s.locality.selector:
        loc["selector"] = dict(s.locality.selector)
    spec["locality"] = loc
    if s.spares_per_group:
        spec["sparesPerGroup"] = s.spares_per_group
    if s.malleable is not None:
        m = s.malleable
        spec["malleable"] = {"minTotalGPUs": m.min_total, "maxTotalGPUs": m.max_total, "stepGPUs": m.step,
                             "desiredTotalGPUs": m.desired}
    f: dict[str, Any] = {"allowBorrow": s.funding.allow_borrow, "sponsors": list(s.funding.sponsors)}
    if s.funding.max_borrow_gpus is not None:
        f["maxBorrowGPUs"] = s.funding.max_borrow_gpus
    spec["funding"] = f
    if s.follow is not None:
        spec["follow"] = {"after": list(s.follow.after), "onUpstreamFailure": s.follow.on_upstream_failure.value,
                          "upstreamFailureGrace": _dur(s.follow.upstream_failure_grace)}
    if s.checkpoint is not None:
        spec["runtime"] = {"checkpoint": _dur(s.checkpoint)}
    meta: dict[str, Any] = {"name": r.name, "namespace": r.namespace}
    if s.runtime is not None:
        meta["annotations"] = {"jobtree.sim/runtime": _dur(s.runtime)}
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": meta, "spec": spec}


def scenario_doc(world: World, played: Played) -> dict[str, Any]:
    """The played example as a scenario document (SCENARIOS.md input)."""
    steps: list[dict[str, Any]] = []
    for t, cmds in played.steps:
        at = format_time(t)
        c = cmds[0]
        if isinstance(c, (ApplyBudget, ApplyRun)):
            objs = [_budget_manifest(x.budget) if isinstance(x, ApplyBudget) else _run_manifest(x.run)
                    for x in cmds if isinstance(x, (ApplyBudget, ApplyRun))]
            steps.append({"at": at, "apply": objs})
        elif isinstance(c, CompleteRun):
            steps.append({"at": at, "complete": c.run})
        elif isinstance(c, FailRun):
            steps.append({"at": at, "fail": c.run})
        elif isinstance(c, DeleteRun):
            steps.append({"at": at, "delete": c.run})
        elif isinstance(c, ShrinkRun):
            steps.append({"at": at, "shrink": {"run": c.run, "desiredTotalGPUs": c.desired}})
        elif isinstance(c, ReportEta):
            steps.append({"at": at, "eta": {"run": c.run, "at": format_time(c.at)}})
        elif isinstance(c, FailNode):
            steps.append({"at": at, "failNode": c.node})
        elif isinstance(c, CordonNode):
            steps.append({"at": at, "cordon": c.node})
        elif isinstance(c, UncordonNode):
            steps.append({"at": at, "uncordon": c.node})
    steps.append({"at": format_time(played.cluster.now)})
    cfg = world.config
    return {
        "start": format_time(world.start),
        "config": {"cluster": cfg.cluster, "period": _dur(cfg.period),
                   "reservationLead": _dur(cfg.reservation_lead),
                   "preemptionHoldDown": _dur(cfg.preemption_hold_down)},
        "nodes": [{"name": n.name, "gpus": n.gpus, "labels": dict(n.labels)} for n in world.nodes],
        "steps": steps,
    }


def scenario_yaml(world: World, played: Played) -> str:
    return yaml.safe_dump(scenario_doc(world, played), sort_keys=False, width=120)


def report(world: World) -> str:
    """What hypothesis prints with a failing example: the world and a replayable scenario."""
    sink: list[Played] = []
    note = ""
    try:
        play(world, sink=sink)
    except Exception as err:  # the engine itself raised: export the steps up to there
        note = f"# the engine raised at the last step: {type(err).__name__}: {err}\n"
    scen = note + scenario_yaml(world, sink[0])
    return (f"{world.describe()}\n--- as a scenario (save as FILE.yaml; `jobtree sim run FILE.yaml`) ---\n"
            f"{scen}")

