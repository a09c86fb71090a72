"""Domain events: what people want to hear about, derived from the ledger (issue 10).

Contract: `Deriver(cluster)` folds the ledger: `derive(cl, sequence, entries)` is called with the
view *after* it applied one ledger message (its `entries`, core journal entries) and answers the
events that message caused, as `bus.Event` (a CloudEvent: `id` "<sequence>-<index>", `source`
"/jobtree/<cluster>", `type` "io.davidlangworthy.rq.<kind>", `subject`, `time`). Its only memory
is what it derived before (phases, node states, GPU-hours thresholds crossed, open windows,
borrowed runs), so a replay of the same ledger yields the same events with the same ids.
Kinds (`KINDS`): a run's RunRunning, RunReserved (with the ETA), RunPreempted / RunReclaimed
(the cut's reason with its seed), RunShrunk, RunGrown, RunSwapped, RunRequeued, RunCompleted,
RunFailed, LendingRecalled (borrowed or shared GPUs turned unfunded by the lender's own claim);
a budget's BudgetGPUHoursThreshold (50, 80, 100 % of a GPU-hours cap — an envelope's
`maxGPUHours`, its lending's, or an aggregate cap's — with the projected exhaustion instant);
an envelope's WindowOpened, WindowClosed; NodeFenced. `cloudevent(e)` is the JSON
structured mode (for webhooks and people); `bus_subject(cluster, e)` the NATS subject.
A run that asks for its own notifications (annotations `rq.davidlangworthy.io/notify` and
`...notify-kinds`) has its receivers in the `notify` data of its events of those kinds.
Not: publishing (the budget service), delivery (the notifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.core import views
from jobtree.core.engine import Cluster
from jobtree.core.facts import (
    JournalEntry,
    LeaseClosed,
    LeaseMinted,
    NodeStatePut,
    ReservationPut,
    RunStatusPut,
)
from jobtree.core.model import FundingClass, MintReason, NodeState, Phase, Role
from jobtree.core.timefmt import format_time

TYPE_PREFIX = "io.davidlangworthy.rq."
THRESHOLDS = (50, 80, 100)
"""Percentages of an envelope's maxGPUHours whose crossing is an event."""

KINDS: dict[str, str] = {
    "RunRunning": "a run holds its GPUs (admitted, or running again)",
    "RunReserved": "capacity is reserved for a run from an instant (its ETA)",
    "RunPreempted": "a run lost GPUs to the lottery of a cut (the seed says which draw)",
    "RunReclaimed": "a run's unfunded GPUs were reclaimed for funded work (with the seed)",
    "RunShrunk": "an elastic run gave GPUs back",
    "RunGrown": "an elastic run took more GPUs",
    "RunSwapped": "a spare replaced GPUs lost on a failed node",
    "RunRequeued": "a run went back to the queue after a node failure (its checkpoint deadline)",
    "RunCompleted": "a run ended well",
    "RunFailed": "a run failed (the workload, a node, or its upstream)",
    "LendingRecalled": "GPUs a run borrowed or shared turned unfunded: the lender claimed its own",
    "BudgetGPUHoursThreshold": "an envelope spent 50, 80 or 100 % of its GPU-hours",
    "WindowOpened": "an envelope's window opened",
    "WindowClosed": "an envelope's window closed",
    "NodeFenced": "a node failed or was taken out of service",
}

RUN_KINDS = tuple(k for k in KINDS if k.startswith("Run") or k == "LendingRecalled")
"""The kinds about one run (what a Run's `rq.davidlangworthy.io/notify-kinds` may name)."""

_CUT = {"RandomPreempt": "RunPreempted", "ReclaimUnfunded": "RunReclaimed"}


def _split(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


@dataclass
class Deriver:
    cluster: str
    phases: dict[str, str] = field(default_factory=dict)
    fenced: set[str] = field(default_factory=set)
    crossed: dict[tuple[str, str], int] = field(default_factory=dict)
    """(budget, envelope) -> the highest threshold its spending had reached after the last
    message (it falls when a new window starts or the cap grows: crossing again is told again)."""
    windows: dict[tuple[str, str], bool] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    """Reservation name -> the earliest start last told."""
    borrowing: dict[str, int] = field(default_factory=dict)
    """Run key -> its GPUs funded by another's envelope (shared or borrowed) after the last message."""

    @classmethod
    def from_view(cls, cluster: str, cl: Cluster) -> Deriver:
        """The memory a deriver that had seen the whole ledger up to `cl` would hold, read
        from the view itself: a follower that starts from a snapshot derives the same events
        after it (tests/unit/test_snapshot.py plays every scenario cut at every message)."""
        d = cls(cluster)
        d.phases = {key: st.phase.value for key, st in cl.status.items()}
        d.fenced = {name for name, node in cl.topo.nodes.items() if node.state is NodeState.FENCED}
        d.reserved = {r.name: r.earliest_start for r in cl.reservations.values()
                      if r.state.value == "Pending"}
        d._envelopes(cl, lambda *_a, **_k: None)
        d._recall(cl, lambda *_a, **_k: None)
        return d

    def derive(self, cl: Cluster, sequence: int, entries: Sequence[JournalEntry]) -> list[bus.Event]:
        out: list[bus.Event] = []
        t = max((when for when, _ in entries), default=cl.now)

        def emit(kind: str, message: str, *, run: str = "", owner: str = "", budget: str = "",
                 envelope: str = "", node: str = "", **data: Any) -> None:
            e = bus.Event(id=f"{sequence}-{len(out)}", source=f"/jobtree/{self.cluster}", type=TYPE_PREFIX + kind,
                          kind=kind, ledger_sequence=sequence, owner=owner, budget=budget, envelope=envelope,
                          node=node, message=message)
            e.time.seconds = t
            if run:
                e.namespace, e.run = _split(run)
                e.subject = f"runs/{run}"
                spec = cl.runs.get(run)
                if not owner and spec is not None:
                    e.owner = spec.spec.owner
                if spec is not None and spec.notify and (not spec.notify_kinds or kind in spec.notify_kinds):
                    e.data["notify"] = ",".join(spec.notify)  # the run asks for these receivers
            elif budget:
                e.subject = f"budgets/{budget}/{envelope}" if envelope else f"budgets/{budget}"
            elif node:
                e.subject = f"nodes/{node}"
            for k, v in data.items():
                if v is not None:
                    e.data[k] = str(v)
            out.append(e)

        cut: dict[tuple[str, str], list[str]] = {}
        closed: dict[tuple[str, str], list[str]] = {}
        minted: dict[tuple[str, str], list[str]] = {}
        for _, item in entries:
            if isinstance(item, LeaseClosed):
                lease = cl.leases.get(item.name)
                if lease is None:
                    continue
                reason = item.reason.split("(", 1)[0]
                if reason in _CUT:
                    cut.setdefault((lease.run, item.reason), []).append(item.name)
                elif reason == "Shrink":
                    closed.setdefault((lease.run, "Shrink"), []).append(item.name)
            elif (isinstance(item, LeaseMinted) and item.lease.role is Role.ACTIVE
                  and item.lease.mint_reason in (MintReason.GROW, MintReason.SWAP)):
                minted.setdefault((item.lease.run, item.lease.mint_reason.value), []).append(item.lease.name)
        for (run, reason), names in sorted(cut.items()):
            kind = _CUT[reason.split("(", 1)[0]]
            seed = reason.split("(", 1)[1].rstrip(")") if "(" in reason else ""
            gpus = sum(cl.leases[n].gpus for n in names)
            verb = "preempted by the lottery" if kind == "RunPreempted" else "reclaimed (it ran unfunded)"
            emit(kind, f"{run}: {gpus} GPUs {verb} to make room for funded work; seed {seed}",
                 run=run, reason=reason, seed=seed, gpus=gpus, leases=",".join(names))
        for (run, reason), names in sorted(minted.items()):
            gpus = sum(cl.leases[n].gpus for n in names)
            if reason == MintReason.GROW.value:
                emit("RunGrown", f"{run} grew by {gpus} GPUs", run=run, gpus=gpus)
            else:
                emit("RunSwapped", f"{run}: a spare took over {gpus} GPUs lost on a failed node", run=run, gpus=gpus)
        for (run, _), names in sorted(closed.items()):
            gpus = sum(cl.leases[n].gpus for n in names)
            emit("RunShrunk", f"{run} shrank by {gpus} GPUs", run=run, gpus=gpus)
        for _, item in entries:
            if isinstance(item, ReservationPut):
                r = item.reservation
                if r.state.value != "Pending":
                    self.reserved.pop(r.name, None)
                elif self.reserved.get(r.name) != r.earliest_start:  # new, or its ETA moved
                    self.reserved[r.name] = r.earliest_start
                    eta = format_time(r.earliest_start)
                    emit("RunReserved", f"{r.run}: {r.deficit_gpus} GPUs reserved from {eta}", run=r.run,
                         eta=eta, reservation=r.name, deficit=r.deficit_gpus, seed=r.seed)
            elif isinstance(item, RunStatusPut):
                self._status(cl, item, emit)
            elif isinstance(item, NodeStatePut):
                name = item.node.name
                if item.node.state is NodeState.FENCED and name not in self.fenced:
                    self.fenced.add(name)
                    emit("NodeFenced", f"node {name} is fenced: its leases closed (failure)", node=name)
                elif item.node.state is not NodeState.FENCED:
                    self.fenced.discard(name)
        self._envelopes(cl, emit)
        self._recall(cl, emit)
        return out

    def _status(self, cl: Cluster, item: RunStatusPut, emit: Any) -> None:
        st, run = item.status, item.run
        before = self.phases.get(run)
        phase = st.phase.value
        self.phases[run] = phase
        if phase == before and phase != Phase.PENDING.value:
            return
        if phase == "Running" and before != "Running":
            view = views.run_json(cl, run) if run in cl.runs and run in cl.status else None
            held = f" on {view['width']['allocated']} GPUs ({funding_words(view['funding'])})" if view else ""
            again = " again" if before is not None and before != "Waiting" and st.reason != "Running" else ""
            emit("RunRunning", f"{run} is running{again}{held}", run=run, reason=st.reason,
                 funding=funding_words(view["funding"]) if view else None)
        elif phase == "Completed":
            emit("RunCompleted", f"{run} completed", run=run, reason=st.reason)
        elif phase == "Failed":
            emit("RunFailed", f"{run} failed ({st.reason}): {st.message}", run=run, reason=st.reason)
        elif phase == "Pending" and before == "Running" and st.reason == "CheckpointRequeue":
            deadline = format_time(st.checkpoint_deadline) if st.checkpoint_deadline is not None else None
            emit("RunRequeued", f"{run} is back in the queue after a node failure; it must run again by "
                 f"{deadline}", run=run, reason=st.reason, checkpointDeadline=deadline)

    def _envelopes(self, cl: Cluster, emit: Any) -> None:
        for (budget, name), env in sorted(cl.rules.envelopes.items()):
            ref = (budget, name)
            if env.start is not None or env.end is not None:
                open_ = env.window_open(cl.now)
                was = self.windows.get(ref)
                self.windows[ref] = open_
                if was is not None and was != open_:
                    kind = "WindowOpened" if open_ else "WindowClosed"
                    emit(kind, f"envelope {budget}/{name}: window {'opened' if open_ else 'closed'}",
                         budget=budget, envelope=name, owner=cl.budgets[budget].owner if budget in cl.budgets else "")
        for bound, cap in sorted(cl.rules.hour_caps.items()):
            what, budget, name = bound  # env | lend | cap, budget, envelope or aggregate cap
            ref = (f"{what}:{budget}", name)
            used = cl.meter.hours(bound)
            percent = 100.0 * used / cap if cap else 100.0
            reached = max((p for p in THRESHOLDS if percent >= p), default=0)
            before = self.crossed.get(ref, 0)
            self.crossed[ref] = reached  # lower too: a new window, or a larger cap, starts counting again
            if reached > before:
                rate = cl.funding.used_now(bound)
                left = max(0.0, cap - used)
                exhausts = format_time(cl.now + int(left * 3600 / rate)) if rate and left > 0 else None
                owner = cl.budgets[budget].owner if budget in cl.budgets else ""
                label = {"env": "envelope", "lend": "lending of envelope", "cap": "aggregate cap"}[what]
                tail = (f"; at {rate} GPUs it runs out at {exhausts}" if exhausts else
                        "; it funds nothing more this window" if reached >= 100 else "")
                emit("BudgetGPUHoursThreshold",
                     f"{label} {budget}/{name} has spent {int(percent)} % of its {cap:g} GPU-hours{tail}",
                     budget=budget, envelope=name, owner=owner, cap=what, threshold=reached,
                     percent=f"{percent:.1f}", usedGPUHours=f"{used:.2f}", maxGPUHours=f"{cap:g}",
                     exhaustsAt=exhausts)

    def _recall(self, cl: Cluster, emit: Any) -> None:
        now: dict[str, int] = {}
        unfunded: dict[str, int] = {}
        candidates = set(self.borrowing)
        fv = cl.funding
        fv.refresh()
        if not candidates and not (fv.class_gpus[FundingClass.SHARED] or fv.class_gpus[FundingClass.BORROWED]):
            self.borrowing = now  # nothing borrowed before or now: no open claim to look at
            return
        # the open claims are the open leases (same names, runs and GPUs): no walk of every run
        classes = fv.classes_of(c.name for c in fv.claims())
        for c in fv.claims():
            cls = classes[c.name]
            if cls in (FundingClass.SHARED, FundingClass.BORROWED):
                now[c.run] = now.get(c.run, 0) + c.gpus
            elif cls is FundingClass.UNFUNDED and c.run in candidates:
                unfunded[c.run] = unfunded.get(c.run, 0) + c.gpus
        for key in sorted(candidates):
            lost = self.borrowing[key] - now.get(key, 0)
            if lost > 0 and unfunded.get(key, 0) > 0:
                emit("LendingRecalled", f"{key}: {min(lost, unfunded[key])} GPUs it borrowed now run unfunded: "
                     "the lender claimed its own", run=key, gpus=min(lost, unfunded[key]))
        self.borrowing = now


def funding_words(funding: dict[str, int]) -> str:
    """A funding split in words, e.g. "16 owned, 8 unfunded" (Run.status.funding)."""
    return ", ".join(f"{funding[k]} {k}" for k in ("owned", "shared", "borrowed", "unfunded") if funding.get(k))


def bus_subject(cluster: str, e: bus.Event) -> str:
    """`jobtree.C.evt.<run|budget|node>.<names>` of an event (jobtree.bus.subjects builds it)."""
    if e.run:
        return subjects.event(cluster, "run", e.namespace, e.run)
    if e.budget:
        return subjects.event(cluster, "budget", e.budget)
    return subjects.event(cluster, "node", e.node or "-")


def cloudevent(e: bus.Event) -> dict[str, Any]:
    """The CloudEvents 1.0 JSON structured mode of an event."""
    data: dict[str, Any] = {"kind": e.kind, "message": e.message, "ledgerSequence": e.ledger_sequence}
    for name in ("owner", "namespace", "run", "budget", "envelope", "node"):
        value = getattr(e, name)
        if value:
            data[name] = value
    data.update(dict(sorted(e.data.items())))
    return {"specversion": "1.0", "id": e.id, "source": e.source, "type": e.type, "subject": e.subject,
            "time": format_time(e.time.seconds), "datacontenttype": "application/json", "data": data}
