"""The cluster state machine: commands in, facts out, decisions to quiescence (CALCULUS §5-§8).

Contract: `Cluster` holds one cluster's view (topology, budgets, runs, leases, reservations,
meter) at an instant supplied by the caller. `submit(command)` applies a command at `now` and
settles; `advance(t)` moves the clock to `t`, firing every timer due on the way at its own
instant (reservation activations, follow grace, checkpoint and hold-down deadlines, window
edges, GPU-hour exhaustion, simulated workload completions) and settling after each. Every
decision is emitted as a fact and applied through `apply`, the only mutator of leases,
reservations and run status, so replaying the facts rebuilds the view.
Admission decisions are serialised: one decision at a time against the current view.
Not: a clock, a store or a transport — callers own time and persistence.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from sortedcontainers import SortedDict

from jobtree.core import cuts as cutorder
from jobtree.core.cover import Candidate, Cover, GroupNeed, Payment, candidates, cover, eligible_at
from jobtree.core.errors import NotFound, Precondition, ValidationError
from jobtree.core.facts import (
    AddNode,
    ApplyBudget,
    ApplyRun,
    ClockAdvanced,
    Command,
    CompleteRun,
    CordonNode,
    DeleteRun,
    Fact,
    FailNode,
    FailRun,
    JournalEntry,
    LeaseClosed,
    LeaseMinted,
    NodeStatePut,
    ReportEta,
    ReservationPut,
    RunStatusPut,
    ShrinkRun,
    SpecChange,
    SpecDeleted,
    SpecPut,
    Tick,
)
from jobtree.core.funding import Claim, FundingRules, FundingView, RunTerms, env_bound
from jobtree.core.meter import Meter
from jobtree.core.model import (
    Budget,
    ClusterConfig,
    FailurePolicy,
    FundingClass,
    Lease,
    MintReason,
    Node,
    NodeState,
    Phase,
    Reservation,
    ReservationState,
    Role,
    Run,
    RunStatus,
    Slot,
)
from jobtree.core.pack import GroupRequest, PackRequest, PlacedGroup, pack, view_for
from jobtree.core.queue import AdmissionQueue, Position
from jobtree.core.topology import Topology

SETTLE_LIMIT = 10_000

# Stable machine-readable reasons (SCENARIOS.md `reason`).
R_WAITING = "WaitingForUpstream"
R_QUEUED = "Queued"
R_UNSCHEDULABLE = "Unschedulable"
R_PREEMPTED = "Preempted"
R_CHECKPOINT = "CheckpointRequeue"
R_RESERVED = "Reserved"
R_WINDOW = "AwaitingWindow"
R_RUNNING = "Running"
R_COMPLETED = "Completed"
R_WORKLOAD_FAILED = "WorkloadFailed"
R_UPSTREAM_FAILED = "UpstreamFailed"
R_UPSTREAM_MISSING = "UpstreamMissing"
R_CYCLE = "FollowCycle"
R_NODE_FAILURE = "NodeFailure"
R_CHECKPOINT_EXPIRED = "CheckpointExpired"


class Cluster:
    """One cluster's calculus state and its decision procedures."""

    def __init__(self, config: ClusterConfig, nodes: Iterable[Node] = (), now: int = 0) -> None:
        self.config = config
        self.now = now
        self.started = now
        self.initial_nodes: tuple[Node, ...] = tuple(nodes)
        self.topo = Topology(self.initial_nodes)
        self.budgets: dict[str, Budget] = {}
        self.rules = FundingRules([], dict(config.cap_allowances))
        self.funding = FundingView(self.rules, self.terms)
        self.meter = Meter()
        self.runs: dict[str, Run] = {}
        self.status: dict[str, RunStatus] = {}
        self.deleted: dict[str, int] = {}
        self.leases: dict[str, Lease] = {}
        self.open_by_run: dict[str, dict[str, Lease]] = {}
        self.reservations: dict[str, Reservation] = {}
        self._lease_seq: dict[str, int] = {}
        self._res_seq: dict[str, int] = {}
        self.facts: list[Fact] = []
        self.journal: list[JournalEntry] = []
        self.observer: Callable[[Cluster], None] | None = None
        """Called after every settling (every decision instant); tests run the §10 oracle here."""
        # Indexes (derived from the state above; speed only).
        self._phase: dict[Phase, set[str]] = {p: set() for p in Phase}
        self._gpus_by_admitted: SortedDict = SortedDict()  # open lease GPUs by run admission time
        self._timed: set[str] = set()
        self._pending_res: set[str] = set()
        self._epoch = 0
        """Counts events that can turn a failed attempt into a success (capacity freed, budgets,
        node states, specs, the clock); with funding disturbances it keys the retry memos."""
        self._tried: dict[str, tuple[int, int]] = {}
        self._terms_cache: dict[str, RunTerms] = {}
        self._runtime_running: set[str] = set()
        self._runtime_heap: list[tuple[int, str]] = []
        """(bound_at + runtime, run) of runtime runs when they started running; an entry is
        current while `_runtime_due(run)` still equals it (stale ones are dropped lazily)."""
        self._runtime_pushed: dict[str, int] = {}
        """The due instant last pushed per running runtime run (no duplicate pushes)."""
        self._malleable_running: set[str] = set()
        self._spec_epoch = 0
        self._cand_epoch = -1
        self._cand_cache: dict[object, list[Candidate]] = {}
        self._grow_tried: dict[str, tuple[int, int]] = {}
        self._queue_index = AdmissionQueue()
        """The queued runs in admission order; those waiting for capacity asleep (core.queue)."""
        self._queue_epoch = self._spec_epoch
        self._act_tried: dict[str, tuple[int, int]] = {}
        self.funding.set_clock(now, frozenset())

    def __getstate__(self) -> dict[str, object]:
        """A copy (pickle, deepcopy) is the view without its history: the journal and fact
        lists start empty (callers slice them from a mark taken after the copy) and no observer
        is attached. What snapshots store and what a what-if plan copies."""
        state = dict(self.__dict__)
        state.update(journal=[], facts=[], observer=None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    def forget_history(self) -> None:
        """Empty the journal and fact lists (a follower or the decision loop, once the ledger
        holds them: nothing in the core reads them back, so memory stays flat)."""
        self.journal.clear()
        self.facts.clear()

    @classmethod
    def replay(cls, config: ClusterConfig, nodes: Iterable[Node], start: int,
               journal: Iterable[JournalEntry]) -> Cluster:
        """Rebuild a view from its journal alone, deciding nothing (the audit property of §10)."""
        cl = cls(config, nodes, start)
        for t, item in journal:
            cl.replay_entry(t, item)
        return cl

    def replay_entry(self, t: int, item: Fact | SpecChange) -> None:
        """Apply one journal entry at its instant, deciding nothing (followers and replay)."""
        self._move_clock(t)
        if isinstance(item, (LeaseMinted, LeaseClosed, ReservationPut, RunStatusPut)):
            self.apply(item)
        else:
            self.change_spec(item)

    def change_spec(self, item: SpecChange) -> None:
        """Apply a spec change (budget, run spec, node state) and journal it."""
        if isinstance(item, ApplyBudget):
            self._set_budget(item.budget)
        elif isinstance(item, SpecPut):
            self.runs[item.run.key] = item.run
            self.deleted.pop(item.run.key, None)
            self._terms_cache.pop(item.run.key, None)
            st = self.status.get(item.run.key)
            self._index_running(item.run.key, st.phase if st is not None else Phase.PENDING,
                                st.bound_at if st is not None else None)
            self.funding.invalidate_run(item.run.key)  # its funding terms feed its leases' ranks
            self._index_queue(item.run.key, st)
        elif isinstance(item, SpecDeleted):
            self.runs.pop(item.run, None)
            self._terms_cache.pop(item.run, None)
            self._index_running(item.run, Phase.PENDING, None)
            self._index_queue(item.run, None)
            self.deleted[item.run] = self.now
        elif isinstance(item, ClockAdvanced):
            pass  # the instant is the entry's: replay has already moved the clock there
        elif item.node.name in self.topo.nodes:
            self.topo.set_state(item.node.name, item.node.state)
        else:
            self.topo.add_node(item.node)
        self._epoch += 1
        if isinstance(item, (ApplyBudget, NodeStatePut)):
            self._spec_epoch += 1  # what cover candidates depend on: budgets and nodes
        self.journal.append((self.now, item))

    # ======================================================================================
    # Facts: the only way leases, reservations and run status change
    # ======================================================================================

    def apply(self, fact: Fact) -> None:
        if isinstance(fact, LeaseMinted):
            lease = fact.lease
            self.topo.take(lease.slots, lease.name)
            self.leases[lease.name] = lease
            self.open_by_run.setdefault(lease.run, {})[lease.name] = lease
            self.funding.add(self._claim(lease))
            self._count_admitted(lease, +1)
            prefix, seq = lease.name.rsplit(".", 1)
            self._lease_seq[prefix] = max(self._lease_seq.get(prefix, 0), int(seq) + 1)
        elif isinstance(fact, LeaseClosed):
            old = self.leases[fact.name]
            self.topo.release(old.slots, old.name)
            self.leases[fact.name] = replace(old, end=fact.end, closure_reason=fact.reason)
            del self.open_by_run[old.run][old.name]
            self.funding.remove(old.name)
            self._count_admitted(old, -1)
            self._epoch += 1
        elif isinstance(fact, ReservationPut):
            r = fact.reservation
            self.reservations[r.name] = r
            if r.state is ReservationState.PENDING:
                self._pending_res.add(r.name)
            else:
                self._pending_res.discard(r.name)
            prefix, seq = r.name.rsplit(".r", 1)
            self._res_seq[prefix] = max(self._res_seq.get(prefix, 0), int(seq) + 1)
        else:
            self._index_status(fact.run, fact.status)
            self.status[fact.run] = fact.status
        self.facts.append(fact)
        self.journal.append((self.now, fact))

    def _count_admitted(self, lease: Lease, sign: int) -> None:
        t = self.terms(lease.run).admitted
        left = self._gpus_by_admitted.get(t, 0) + sign * lease.gpus
        if left:
            self._gpus_by_admitted[t] = left
        else:
            self._gpus_by_admitted.pop(t, None)

    def _index_status(self, key: str, new: RunStatus) -> None:
        old = self.status.get(key)
        if old is not None:
            self._phase[old.phase].discard(key)
        self._phase[new.phase].add(key)
        if new.hold_down_until is not None or new.checkpoint_deadline is not None:
            self._timed.add(key)
        else:
            self._timed.discard(key)
        self._tried.pop(key, None)
        self._grow_tried.pop(key, None)
        self._terms_cache.pop(key, None)
        self._index_running(key, new.phase, new.bound_at)
        self._index_queue(key, new)

    def _index_queue(self, key: str, st: RunStatus | None) -> None:
        """Keep the run's place in the admission queue (Pending or Reserved, in admission
        order `(admitted, key)` as `terms` has it) — and wake it: something of its own changed."""
        queued = st is not None and key in self.runs and st.phase in (Phase.PENDING, Phase.RESERVED)
        pos = ((st.admitted if st.admitted is not None else st.created), key) if queued and st is not None else None
        self._queue_index.place(key, pos)

    def _index_running(self, key: str, phase: Phase, bound_at: int | None) -> None:
        """Keep the running runs that have a simulated runtime (and when it is up), and the
        malleable ones, indexed."""
        run = self.runs.get(key)
        running = phase is Phase.RUNNING and run is not None
        for index, wanted in ((self._runtime_running, running and run is not None and run.spec.runtime is not None),
                              (self._malleable_running, running and run is not None and run.spec.malleable is not None)):
            if wanted:
                index.add(key)
            else:
                index.discard(key)
        due = (bound_at + run.spec.runtime if key in self._runtime_running and run is not None
               and run.spec.runtime is not None and bound_at is not None else None)
        if due is None:
            self._runtime_pushed.pop(key, None)
        elif self._runtime_pushed.get(key) != due:
            self._runtime_pushed[key] = due
            heapq.heappush(self._runtime_heap, (due, key))

    def _runtime_due(self, key: str) -> int | None:
        """When a running run's simulated runtime is up (None unless it has one and runs)."""
        if key not in self._runtime_running:
            return None
        rt, bound_at = self.runs[key].spec.runtime, self.status[key].bound_at
        return bound_at + rt if rt is not None and bound_at is not None else None

    def _next_runtime_due(self) -> int | None:
        """The earliest instant after now at which a running run's runtime is up."""
        heap = self._runtime_heap
        while heap and self._runtime_due(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            return None
        if heap[0][0] > self.now:
            return heap[0][0]
        return min((t for t, k in heap if t > self.now and self._runtime_due(k) == t), default=None)

    def _world(self) -> tuple[int, int]:
        return (self._epoch, self.funding.disturbances)

    def _live_in(self, phase: Phase) -> list[str]:
        return sorted(k for k in self._phase[phase] if k in self.runs)

    def _claim(self, lease: Lease) -> Claim:
        return Claim(lease.name, lease.run, lease.owner, lease.group, lease.role, lease.gpus,
                     lease.paid_by, self.topo.nodes[lease.node].labels)

    def terms(self, run_key: str) -> RunTerms:
        got = self._terms_cache.get(run_key)
        if got is None:
            got = self._terms_cache[run_key] = self._make_terms(run_key)
        return got

    def _make_terms(self, run_key: str) -> RunTerms:
        run = self.runs.get(run_key)
        st = self.status.get(run_key)
        admitted = (st.admitted if st.admitted is not None else st.created) if st else 0
        if run is None:
            return RunTerms(admitted)
        f = run.spec.funding
        return RunTerms(admitted, f.allow_borrow, f.max_borrow_gpus, f.sponsors)

    # ======================================================================================
    # Time
    # ======================================================================================

    def advance(self, t: int) -> list[Fact]:
        """Move the clock to `t`, firing every timer due on the way at its own instant. The
        journal records each instant the clock stopped at (`ClockAdvanced`)."""
        if t < self.now:
            raise ValidationError("at", f"time moves forward only: {t} is before {self.now}")
        mark = len(self.facts)
        while True:
            due = self.next_timer()
            if due is None or due > t:
                break
            self._move_clock(due)
            self.journal.append((due, ClockAdvanced()))
            self._settle()
        if t > self.now:
            self._move_clock(t)
            self.journal.append((t, ClockAdvanced()))
        return self.facts[mark:]

    def _move_clock(self, t: int) -> None:
        """Integrate the meter up to `t`, splitting at every instant where classes change without a
        fact (window edges, GPU-hour exhaustion), so the meter is a function of the journal alone."""
        while self.now < t:
            step_to = min(t, self._next_breakpoint(t))
            self.funding.refresh()
            unfunded: dict[str, int] = {}
            for c in self.funding.claims():
                if self.funding.class_of(c.name) is FundingClass.UNFUNDED:
                    unfunded[c.owner] = unfunded.get(c.owner, 0) + c.gpus
            self.meter.charge(step_to - self.now, self.funding.used, self.rules.hour_caps, unfunded.items())
            self.now = step_to
            self._epoch += 1
            self.funding.set_clock(step_to, self.meter.spent(self.rules.hour_caps))

    def _next_breakpoint(self, limit: int) -> int:
        best = limit
        for e in self.rules.envelopes.values():
            for x in (e.start, e.end):
                if x is not None and self.now < x < best:
                    best = x
        self.funding.refresh()
        ex = self.meter.next_exhaustion(self.now, self.funding.used, self.rules.hour_caps)
        return min(best, ex) if ex is not None else best

    def next_timer(self) -> int | None:
        """The earliest instant after now at which the calculus has something to do."""
        now = self.now
        times: list[int] = [self.reservations[n].earliest_start for n in self._pending_res]
        for key in self._live_in(Phase.WAITING):
            st, follow = self.status[key], self.runs[key].spec.follow
            if follow is not None:
                times.append((st.upstream_failed_at if st.upstream_failed_at is not None else st.created)
                             + follow.upstream_failure_grace)
        for key in self._timed:
            st = self.status[key]
            times.extend(x for x in (st.hold_down_until, st.checkpoint_deadline) if x is not None)
        runtime_due = self._next_runtime_due()
        if runtime_due is not None:
            times.append(runtime_due)
        for e in self.rules.envelopes.values():
            times.extend(x for x in (e.start, e.end) if x is not None and x > now)
        self.funding.refresh()
        ex = self.meter.next_exhaustion(now, self.funding.used, self.rules.hour_caps)
        if ex is not None:
            times.append(ex)
        later = [x for x in times if x > now]
        return min(later) if later else None

    # ======================================================================================
    # Commands
    # ======================================================================================

    def submit(self, *cmds: Command) -> list[Fact]:
        """Apply commands at `now` (in order, as one batch), then decide everything the calculus
        would decide now. Returns the facts decided. A command refused with ValidationError
        (`command_index` says which) has changed nothing itself; the commands of the batch
        before it stay applied, undecided (so a lone refused command leaves the cluster as it
        was: admission relies on it, `tests/unit/test_engine_refusals.py` pins it)."""
        mark = len(self.facts)
        for i, cmd in enumerate(cmds):
            try:
                self._command(cmd)
            except ValidationError as err:
                err.command_index = i
                raise
        self._settle()
        return self.facts[mark:]

    def _command(self, cmd: Command) -> None:
        if isinstance(cmd, ApplyBudget):
            self._apply_budget(cmd.budget)
        elif isinstance(cmd, ApplyRun):
            self._apply_run(cmd.run)
        elif isinstance(cmd, AddNode):
            self.change_spec(NodeStatePut(cmd.node))
        elif isinstance(cmd, Tick):
            pass
        elif isinstance(cmd, ReportEta):
            self._set_status(self._live(cmd.run, "eta.run"), eta=cmd.at)
        elif isinstance(cmd, ShrinkRun):
            self._shrink(cmd.run, cmd.desired)
        elif isinstance(cmd, (CompleteRun, FailRun)):
            self._finish(cmd.run, isinstance(cmd, CompleteRun))
        elif isinstance(cmd, DeleteRun):
            self._delete(cmd.run)
        elif isinstance(cmd, FailNode):
            self._fence(self._node(cmd.node, "failNode"))
        elif isinstance(cmd, CordonNode):
            name = self._node(cmd.node, "cordon")
            if self.topo.nodes[name].state is NodeState.READY:  # a fenced node stays failed
                self._node_state(name, NodeState.CORDONED)
        else:
            name = self._node(cmd.node, "uncordon")
            if self.topo.nodes[name].state is NodeState.CORDONED:
                self._node_state(name, NodeState.READY)

    def _node_state(self, name: str, state: NodeState) -> None:
        self.change_spec(NodeStatePut(replace(self.topo.nodes[name], state=state)))

    def _node(self, name: str, field: str) -> str:
        if name not in self.topo.nodes:
            raise NotFound(field, f"unknown node {name!r}")
        return name

    def _live(self, key: str, field: str) -> str:
        if key not in self.runs:
            raise NotFound(field, f"unknown run {key!r} (expected namespace/name of a submitted run)")
        return key

    def _apply_budget(self, budget: Budget) -> None:
        budgets = {**self.budgets, budget.name: budget}
        rules = FundingRules(budgets.values(), dict(self.config.cap_allowances))
        cycle = rules.family.find_cycle()
        if cycle:
            raise ValidationError("spec.parents", "the family graph must be acyclic; cycle: " + " -> ".join(cycle))
        self.change_spec(ApplyBudget(budget))

    def _set_budget(self, budget: Budget) -> None:
        self.budgets = {**self.budgets, budget.name: budget}
        rules = FundingRules(self.budgets.values(), dict(self.config.cap_allowances))
        self.rules = rules
        for (b, e), env in rules.envelopes.items():
            self.meter.reset_window(env_bound((b, e)), env.start)
        self.meter.note_caps(rules.hour_caps)
        self.funding.set_rules(rules)
        self.funding.set_clock(self.now, self.meter.spent(rules.hour_caps))

    def _apply_run(self, run: Run) -> None:
        key = run.key
        st = self.status.get(key)
        if key in self.runs and st is not None and not st.phase.terminal:
            old = self.runs[key]
            self.change_spec(SpecPut(run))
            if run.spec.malleable and old.spec.malleable and run.spec.malleable.desired < old.spec.malleable.desired:
                self._shrink_to(key, run.spec.malleable.desired)
            return
        generation = st.generation + 1 if st else 0
        self.change_spec(SpecPut(run))
        waiting = run.spec.follow is not None and bool(run.spec.follow.after)
        status = RunStatus(
            phase=Phase.WAITING if waiting else Phase.PENDING,
            reason=R_WAITING if waiting else R_QUEUED,
            message="waiting for upstream runs to complete" if waiting else "queued for admission",
            created=self.now,
            admitted=None if waiting else self.now,
            generation=generation,
        )
        self.apply(RunStatusPut(key, status))

    def _finish(self, key: str, ok: bool) -> None:
        self._live(key, "complete" if ok else "fail")
        st = self.status[key]
        verb = "complete" if ok else "fail"
        if st.phase.terminal:
            raise Precondition(verb, f"run {key} already ended ({st.phase.value})")
        if st.bound_at is None:
            raise Precondition(verb, f"run {key} has not started ({st.phase.value}); only a started workload reports")
        self._close_run(key, R_COMPLETED if ok else "RunFailed")
        self._fail_reservation(key)
        ended = {"ended_at": self.now, "reservation": None, "hold_down_until": None, "checkpoint_deadline": None}
        if ok:
            self._set_status(key, phase=Phase.COMPLETED, reason=R_COMPLETED, message="the workload reported success",
                             **ended)
        else:
            self._set_status(key, phase=Phase.FAILED, reason=R_WORKLOAD_FAILED,
                             message="the workload reported failure", **ended)

    def _delete(self, key: str) -> None:
        self._live(key, "delete")
        self._close_run(key, "Cancelled")
        self._fail_reservation(key)
        self.change_spec(SpecDeleted(key))

    def _shrink(self, key: str, desired: int) -> None:
        self._live(key, "shrink.run")
        run = self.runs[key]
        m = run.spec.malleable
        st = self.status[key]
        if st.phase.terminal:
            raise Precondition("shrink.run", f"run {key} already ended ({st.phase.value}); cannot shrink it")
        if m is None:
            raise Precondition("shrink.run", f"run {key} is not malleable; only malleable runs shrink")
        if not (m.min_total <= desired <= m.max_total) or (desired - m.min_total) % m.step:
            raise ValidationError(
                "shrink.desiredTotalGPUs",
                f"must be in [{m.min_total}, {m.max_total}] and reachable from {m.min_total} in steps of {m.step}, got {desired}",
            )
        self.change_spec(SpecPut(replace(run, spec=replace(run.spec, malleable=replace(m, desired=desired)))))
        self._shrink_to(key, desired)

    def _shrink_to(self, key: str, desired: int) -> None:
        """Voluntary shrink: end the highest groups down to `desired`, never below min."""
        spec = self.runs[key].spec
        while True:
            groups = self._groups(key)
            width = sum(self._active(ls) for ls in groups.values())
            if not groups:
                return
            top = max(groups)
            gw = self._active(groups[top])
            if width <= desired or width - gw < max(desired, spec.min_width):
                return
            for lease in groups[top]:
                self._close(lease.name, "Shrink")

    # ======================================================================================
    # Settling: every decision due now
    # ======================================================================================

    def _settle(self) -> None:
        for _ in range(SETTLE_LIMIT):
            changed = self._workload_timers()
            changed = self._follow_gate() or changed
            changed = self._deadlines() or changed
            changed = self._activate_reservations() or changed
            changed = self._admit_pending() or changed
            changed = self._grow() or changed
            if not changed:
                if self.observer is not None:
                    self.observer(self)
                return
        raise RuntimeError("the scheduler did not reach quiescence")

    def _workload_timers(self) -> bool:
        """Complete every running run whose simulated runtime is up, in key order."""
        heap, due = self._runtime_heap, set()
        while heap and heap[0][0] <= self.now:
            t, key = heapq.heappop(heap)
            if self._runtime_due(key) == t:
                due.add(key)
        for key in sorted(due):
            self._finish(key, True)
        return bool(due)

    def _deadlines(self) -> bool:
        changed = False
        for key in sorted(k for k in self._timed if k in self.runs):
            st = self.status[key]
            if st.hold_down_until is not None and st.hold_down_until <= self.now:
                self._set_status(key, hold_down_until=None)
                changed = True
            if (st.checkpoint_deadline is not None and st.checkpoint_deadline <= self.now
                    and st.phase in (Phase.PENDING, Phase.RESERVED)):
                self._fail_reservation(key)
                self._set_status(key, phase=Phase.FAILED, reason=R_CHECKPOINT_EXPIRED,
                                 message="not running again before its checkpoint deadline",
                                 ended_at=self.now, checkpoint_deadline=None, reservation=None)
                changed = True
        return changed

    # --- follow gate (§5.1) ----------------------------------------------------------------

    def _follow_gate(self) -> bool:
        waiting = self._live_in(Phase.WAITING)
        if not waiting:
            return False
        changed = False
        for key in self._follow_cycles(waiting):
            self._set_status(key, phase=Phase.FAILED, reason=R_CYCLE,
                             message="its follow.after edges form a cycle", ended_at=self.now)
            changed = True
        for key in waiting:
            if self.status[key].phase is Phase.WAITING:
                changed = self._gate_one(key) or changed
        return changed

    def _upstreams(self, key: str) -> list[str]:
        run = self.runs[key]
        after = run.spec.follow.after if run.spec.follow else ()
        return [f"{run.namespace}/{name}" for name in after]

    def _follow_cycles(self, waiting: list[str]) -> set[str]:
        graph = {k: [u for u in self._upstreams(k) if u in self.runs and self.status[u].phase is Phase.WAITING]
                 for k in waiting}
        on_cycle: set[str] = set()
        for start in waiting:
            stack, seen = [(start, [start])], set()
            while stack:
                node, path = stack.pop()
                for nxt in graph.get(node, []):
                    if nxt == start:
                        on_cycle.update(path)
                    elif nxt not in seen:
                        seen.add(nxt)
                        stack.append((nxt, [*path, nxt]))
        return on_cycle

    def _gate_one(self, key: str) -> bool:
        run, st = self.runs[key], self.status[key]
        follow = run.spec.follow
        assert follow is not None
        failed_at: list[int] = []
        missing = done = 0
        for up in self._upstreams(key):
            ust = self.status.get(up)
            if ust is not None and ust.phase is Phase.COMPLETED:
                done += 1  # deleting a run after it completed does not undo its completion
            elif up in self.deleted:
                failed_at.append(self.deleted[up])
            elif ust is not None and ust.phase is Phase.FAILED:
                failed_at.append(ust.ended_at if ust.ended_at is not None else self.now)
            elif ust is None:
                missing += 1
        ups = len(self._upstreams(key))
        if done == ups:
            self._set_status(key, phase=Phase.PENDING, reason=R_QUEUED, admitted=self.now,
                             message="every upstream completed", upstream_failed_at=None)
            return True
        grace = follow.upstream_failure_grace
        if failed_at:
            since = min(failed_at)
            if follow.on_upstream_failure is FailurePolicy.FAIL or self.now >= since + grace:
                self._set_status(key, phase=Phase.FAILED, reason=R_UPSTREAM_FAILED, ended_at=self.now,
                                 message="an upstream run failed or was deleted", upstream_failed_at=None)
                return True
            if st.upstream_failed_at != since:
                self._set_status(key, upstream_failed_at=since)
                return True
            return False
        if st.upstream_failed_at is not None:
            self._set_status(key, upstream_failed_at=None)
            return True
        if missing and self.now >= st.created + grace:
            self._set_status(key, phase=Phase.FAILED, reason=R_UPSTREAM_MISSING, ended_at=self.now,
                             message="an upstream run does not exist")
            return True
        return False

    # --- admission (§5.2-5.5) -------------------------------------------------------------

    def queue_order(self) -> list[str]:
        """The queued runs (Pending, Reserved) in the order admission considers them."""
        return self._queue_index.order()

    def _queue_pass(self) -> Iterator[str]:
        """The queued runs one admission pass considers, in order: those awake when it starts,
        and each sleeper whose condition stops holding before its turn (capacity freed by a cut
        earlier in the pass), at its turn — what a pass over the whole queue would retry. A run
        that joins the queue during the pass waits for the next one, as before."""
        index = self._queue_index
        if self._queue_epoch != self._spec_epoch:  # budgets or nodes changed: any run may now be payable
            index.wake_all()
            self._queue_epoch = self._spec_epoch
        free, domain_free = self.topo.flavor_free, self.topo.max_domain_free
        index.wake_due(self.now, free, domain_free)
        order = [index.position(k) for k in index.awake()]
        woken: list[Position] = []
        i = 0
        cur: Position | None = None
        while True:
            for pos in index.wake_due(self.now, free, domain_free):
                if cur is None or pos > cur:
                    heapq.heappush(woken, pos)
            if i < len(order) and (not woken or order[i] < woken[0]):  # type: ignore[operator]
                cur, i = order[i], i + 1
            elif woken:
                cur = heapq.heappop(woken)
            else:
                return
            assert cur is not None
            yield cur[1]

    def _admit_pending(self) -> bool:
        changed = False
        for key in self._queue_pass():
            if self._tried.get(key) == self._world():
                continue  # nothing that could change its outcome happened since it last failed
            st = self.status[key]
            if st.phase is Phase.PENDING:
                changed = self._try_admit(key) or changed
            elif st.reservation is not None:
                res = self.reservations[st.reservation]
                if not res.window_only and self.now < res.earliest_start:
                    changed = self._bind_plain(key, res) or changed
            if self.status[key].phase is not Phase.RUNNING:
                self._tried[key] = self._world()
        return changed

    def _needs(self, key: str, lo: int, hi: int) -> list[GroupNeed]:
        """Groups covering widths [lo, hi) of the run, numbered after its existing groups."""
        spec = self.runs[key].spec
        existing = self._groups(key)
        index = max(existing) + 1 if existing else 0
        out: list[GroupNeed] = []
        g = spec.locality.group_gpus
        if g is None:
            return [GroupNeed(index, hi - lo)] if hi > lo else []
        left = hi - lo
        while left > 0:
            n = min(g, left)
            out.append(GroupNeed(index, n, spec.spares_per_group))
            index += 1
            left -= n
        return out

    def _cover(self, key: str, needs: list[GroupNeed], t: int | None = None, *, headroom_only: bool = False,
               reserve: bool = False) -> Cover:
        run = self.runs[key]
        at = self.now if t is None else t
        terms = self.terms(key)
        cands = [c for c in self._static_candidates(key) if eligible_at(c.envelope, at, reserve)]
        return cover(self.rules, self.funding, self.meter, run, terms, needs, at, self._period_of,
                     cands, headroom_only=headroom_only)

    def _static_candidates(self, key: str) -> list[Candidate]:
        """The envelopes that may ever pay for the run under today's budgets and nodes (cached
        per owner, flavor, selector and funding terms until a budget or node changes)."""
        run = self.runs[key]
        terms = self.terms(key)
        spec = run.spec
        ck = (spec.owner, spec.gpu_type, spec.locality.selector, terms.allow_borrow, spec.funding.sponsors)
        if self._cand_epoch != self._spec_epoch:
            self._cand_cache.clear()
            self._cand_epoch = self._spec_epoch
        static = self._cand_cache.get(ck)
        if static is None:
            static = self._cand_cache[ck] = candidates(self.rules, self.topo, run, terms)
        return static

    def admission_cover(self, key: str) -> Cover:
        """Who would pay for the run's runnable width if it were admitted now (a read: what
        `explain` and the dashboard say a queued run can be funded by; decides nothing)."""
        spec = self.runs[key].spec
        return self._cover(key, self._needs(key, 0, spec.min_width))

    def _period_of(self, ref: tuple[str, str]) -> int:
        """The admission look-ahead P of an envelope: its budget's `spec.period`, else the cluster's."""
        period = self.budgets[ref[0]].period
        return period if period is not None else self.config.period

    def _pack_request(self, key: str, groups: tuple[GroupRequest, ...],
                      fixed: tuple[tuple[int, tuple[str, ...]], ...] = ()) -> PackRequest:
        spec = self.runs[key].spec
        return PackRequest(
            flavor=spec.gpu_type,
            groups=groups,
            selector=spec.locality.selector,
            spanning=spec.locality.group_gpus is None,
            one_domain=not spec.locality.allow_cross_group_spread,
            used_domains=tuple(self._used_domains(key)),
            fixed_domains=fixed,
        )

    def _pack(self, key: str, groups: tuple[GroupRequest, ...], extra: dict[str, set[int]] | None = None,
              fixed: tuple[tuple[int, tuple[str, ...]], ...] = ()) -> list[PlacedGroup] | None:
        spec = self.runs[key].spec
        view = view_for(self.topo, spec.gpu_type, spec.locality.selector, extra)
        return pack(view, self._pack_request(key, groups, fixed))

    def _in_hold_down(self, key: str) -> bool:
        until = self.status[key].hold_down_until
        return until is not None and self.now < until

    def _try_admit(self, key: str) -> bool:
        if (self._in_hold_down(key) or not self._static_candidates(key)) and not self._could_fit(key):
            # In hold-down, or with no envelope that could ever pay for it (nothing funds it
            # now or when a window opens), only a plain fit on idle GPUs can admit it — no
            # reserving, no reclaiming — and `_could_fit` is necessary for one: park it
            # without computing its cover, and let it sleep until that may change.
            parked = self._park(key)
            self._doze(key)
            return parked
        spec = self.runs[key].spec
        needs = self._needs(key, 0, spec.min_width)
        cov = self._cover(key, needs)
        if cov.funded_gpus == 0 and not self._in_hold_down(key):  # no thrash: no reserving in hold-down
            opens = self._window_opening(key, needs)
            if opens is not None:
                return self._reserve(key, needs, opens, window_only=True)
        # Nothing funded: only a plain fit admits it, and `_could_fit` is necessary for one.
        placed = self._pack(key, cov.groups) if cov.funded_gpus > 0 or self._could_fit(key) else None
        if placed is not None:
            self._bind(key, placed, MintReason.START)
            return True
        if cov.funded_gpus > 0 and not self._in_hold_down(key):
            if self._reclaim_then_bind(key, cov):
                return True
            return self._reserve(key, needs, None)
        return self._park(key)

    def _window_opening(self, key: str, needs: list[GroupNeed]) -> int | None:
        """The earliest future window start of an envelope that may reserve for the run and would
        fund it then, when nothing funds it now and no envelope admits it early."""
        run = self.runs[key]
        terms = self.terms(key)
        if any(c.envelope.pre_activation.allow_admission and not c.envelope.window_open(self.now)
               for c in candidates(self.rules, self.topo, run, terms, self.now)):
            return None
        starts = sorted({e.start for e in self.rules.envelopes.values()
                         if e.start is not None and e.start > self.now and e.pre_activation.allow_reservations})
        for t in starts:
            if self._cover(key, needs, t, reserve=True).funded_gpus > 0:
                return t
        return None

    def _park(self, key: str) -> bool:
        """§5.5: no fit and nothing fundable (or in hold-down): stay Pending, cut nobody."""
        st = self.status[key]
        if st.reason == R_CHECKPOINT and st.checkpoint_deadline is not None:
            return False
        if self._in_hold_down(key):
            return self._set_status(key, reason=R_PREEMPTED, message=(
                "lost its GPUs to a cut; may bind on idle capacity, reserves again after the hold-down"))
        return self._set_status(key, reason=R_UNSCHEDULABLE, message="no fit and nothing fundable: waits for idle capacity")

    def _doze(self, key: str) -> None:
        """Set a run parked by the shortcut asleep in the queue: trying it again parks it again,
        changing nothing, until its flavor has what `_could_fit` needs free, its hold-down
        ends, or budgets or nodes change (docs/design/requeue.md)."""
        spec = self.runs[key].spec
        g = spec.locality.group_gpus
        need = spec.min_width + self._spares_for(spec.min_width, key)
        group_need = 0 if g is None else min(g, spec.min_width) + spec.spares_per_group
        until = self.status[key].hold_down_until
        self._queue_index.sleep(key, spec.gpu_type, need, group_need,
                                until if until is not None and self.now < until else None)

    def _could_fit(self, key: str) -> bool:
        """A cheap necessary condition for a plain bind: enough free GPUs, and a domain that can
        hold the largest group."""
        spec = self.runs[key].spec
        if self.topo.flavor_free(spec.gpu_type) < spec.min_width + self._spares_for(spec.min_width, key):
            return False
        g = spec.locality.group_gpus
        return g is None or self.topo.max_domain_free(spec.gpu_type) >= min(g, spec.min_width) + spec.spares_per_group

    def _spares_for(self, width: int, key: str) -> int:
        spec = self.runs[key].spec
        g = spec.locality.group_gpus
        return 0 if g is None else -(-width // g) * spec.spares_per_group

    def _bind_plain(self, key: str, res: Reservation) -> bool:
        if not self._could_fit(key):
            return False
        spec = self.runs[key].spec
        cov = self._cover(key, self._needs(key, 0, spec.min_width))
        placed = self._pack(key, cov.groups)
        if placed is None:
            return False
        self._bind(key, placed, MintReason.START)
        return True

    def _bind(self, key: str, placed: list[PlacedGroup], reason: MintReason) -> None:
        self._mint(key, placed, reason)
        st = self.status[key]
        if st.reservation is not None:
            res = self.reservations[st.reservation]
            if res.state is ReservationState.PENDING:
                self.apply(ReservationPut(replace(res, state=ReservationState.RELEASED)))
        if reason is MintReason.START:
            self._set_status(key, phase=Phase.RUNNING, reason=R_RUNNING, message="running",
                             bound_at=self.now, reservation=None, checkpoint_deadline=None)

    def _mint(self, key: str, placed: list[PlacedGroup], reason: MintReason) -> None:
        run = self.runs[key]
        for pg in placed:
            for role in (Role.ACTIVE, Role.SPARE):
                for pp in pg.pieces:
                    if pp.piece.role is not role:
                        continue
                    pay = pp.piece.tag
                    payer = pay.payer if isinstance(pay, Payment) else None
                    by_node: dict[str, list[Slot]] = {}
                    for s in pp.slots:
                        by_node.setdefault(s[0], []).append(s)
                    for slots in by_node.values():
                        self.apply(LeaseMinted(Lease(
                            name=self._next_lease_name(run), run=key, owner=run.spec.owner, group=pg.index,
                            role=role, slots=tuple(sorted(slots, key=lambda s: s[1])), paid_by=payer,
                            start=self.now, mint_reason=reason)))

    def _next_lease_name(self, run: Run) -> str:
        prefix = f"{run.namespace}.{run.name}"
        return f"{prefix}.{self._lease_seq.get(prefix, 0):05d}"

    # --- reservations (§5.4) and activation (§7) --------------------------------------------

    def _reserve(self, key: str, needs: list[GroupNeed], opens: int | None, window_only: bool = False) -> bool:
        st = self.status[key]
        if st.reservation is not None and self.reservations[st.reservation].state is ReservationState.PENDING:
            return False
        cov = self._cover(key, needs, opens, reserve=opens is not None)
        placed = self._intended_slice(key, cov)
        if placed is None:
            return self._park(key)
        slice_, deficit = self._slice_of(key, placed)
        if window_only and opens is not None:
            earliest = opens
        else:
            earliest = self.now + self.config.reservation_lead
            eta = self._eta_forecast(key, deficit)
            if eta is not None:
                earliest = min(earliest, eta)
        run = self.runs[key]
        prefix = f"{run.namespace}.{run.name}"
        name = f"{prefix}.r{self._res_seq.get(prefix, 0):03d}"
        res = Reservation(name=name, run=key, intended_slice=tuple(slice_), paying_envelope=cov.first_funded_payer,
                          earliest_start=earliest, deficit_gpus=sum(deficit.values()), window_only=window_only)
        self.apply(ReservationPut(res))
        self._set_status(key, phase=Phase.RESERVED, reason=R_WINDOW if window_only else R_RESERVED,
                         message=("reserved for an envelope window that opens later" if window_only
                                  else "reserved: will cut in the calculus's order if still short at its earliest start"),
                         reservation=name)
        return True

    def _cut_world(self, key: str, cov: Cover, max_step: int = cutorder.LOTTERY,
                   planning: bool = False) -> cutorder.CutWorld:
        """Open leases and their classes with the new claim's funded part ranked in, for the
        runs the allowed cut steps could touch."""
        hypothetical: list[str] = []
        run = self.runs[key]
        for g in cov.groups:
            for i, p in enumerate(g.pieces):
                pay = p.tag
                if isinstance(pay, Payment) and pay.funded and pay.payer is not None:
                    name = f"\x00claim.{g.index}.{i}"
                    self.funding.add(Claim(name, key, run.spec.owner, g.index, p.role, p.count, pay.payer))
                    hypothetical.append(name)
        try:
            self.funding.refresh()
            opened: dict[str, Lease] = {}
            classes: dict[str, FundingClass] = {}
            # Step 1 touches only runs with an unfunded lease: the view indexes them, so a
            # reclaim world is built from those alone rather than by classifying every lease.
            holders = list(self.funding.unfunded_claims if max_step == cutorder.RECLAIM else self.open_by_run)
            for k in holders:
                ls = self.open_by_run.get(k)
                if not ls:
                    continue
                cls = self.funding.classes_of(ls)
                if max_step >= cutorder.LOTTERY or self._cuttable_by(k, ls, cls, max_step):
                    opened.update(ls)
                    classes.update(cls)
        finally:
            for name in hypothetical:
                self.funding.remove(name)
        flavor = run.spec.gpu_type
        topo = self.topo

        def usable(s: Slot) -> bool:
            node = topo.nodes[s[0]]
            return node.state is NodeState.READY and node.flavor == flavor

        runs = {k: (self.runs[k].spec, self.status[k]) for k in {x.run for x in opened.values()} if k in self.runs}
        return cutorder.CutWorld(opened, classes, runs, topo.domain_of, usable, key, self.now,
                                 protect_bound_now=not planning)

    def _cuttable_by(self, key: str, leases: dict[str, Lease], cls: dict[str, FundingClass], max_step: int) -> bool:
        if any(c is FundingClass.UNFUNDED for c in cls.values()):
            return True
        if max_step >= cutorder.DROP_SPARE and any(x.role is Role.SPARE for x in leases.values()):
            return True
        run = self.runs.get(key)
        return max_step >= cutorder.SHRINK and run is not None and run.spec.malleable is not None

    def _intended_slice(self, key: str, cov: Cover, max_level: int = 4,
                        world: cutorder.CutWorld | None = None) -> list[PlacedGroup] | None:
        """The placement needing the gentlest cuts (§7): free slots, then what each cut step could
        free, then every slot; None when even that does not fit."""
        placed = self._pack(key, cov.groups)
        if placed is not None:
            return placed
        world = world or self._cut_world(key, cov, max_level, planning=True)
        for level in cutorder.capacity_levels(world, max_level):
            extra: dict[str, set[int]] = {}
            for node, i in level:
                extra.setdefault(node, set()).add(i)
            placed = self._pack(key, cov.groups, extra)
            if placed is not None:
                return placed
        return None

    def _slice_of(self, key: str, placed: list[PlacedGroup]) -> tuple[list[tuple[str, int]], dict[str, int]]:
        """(domain, GPUs) of a placement in order, and per domain the GPUs it needs there that are
        not free (§7: counted per domain, not per slot the placement happened to pick)."""
        slice_: dict[str, int] = {}
        for pg in placed:
            for pp in pg.pieces:
                for s in pp.slots:
                    d = self.topo.domain_of(s[0])
                    slice_[d] = slice_.get(d, 0) + 1
        spec = self.runs[key].spec
        free = view_for(self.topo, spec.gpu_type, spec.locality.selector)
        deficit = {d: n - free.domain_free(d) for d, n in slice_.items() if n > free.domain_free(d)}
        return list(slice_.items()), deficit

    def _group_domains(self, placed: list[PlacedGroup]) -> tuple[tuple[int, tuple[str, ...]], ...]:
        return tuple((pg.index, tuple(dict.fromkeys(self.topo.domain_of(s[0]) for pp in pg.pieces for s in pp.slots)))
                     for pg in placed)

    def _eta_forecast(self, key: str, deficit: dict[str, int]) -> int | None:
        """When reported ETAs of running work free the deficit in every domain of the slice."""
        if not deficit:
            return self.now
        freeing: list[tuple[int, str]] = sorted(
            (st.eta, k) for k, st in self.status.items()
            if st.eta is not None and st.phase is Phase.RUNNING and k != key and st.eta >= self.now
        )
        short = dict(deficit)
        for eta, k in freeing:
            for lease in self.open_by_run.get(k, {}).values():
                d = self.topo.domain_of(lease.node)
                if d in short:
                    short[d] -= lease.gpus
            if all(v <= 0 for v in short.values()):
                return eta
        return None

    def _activate_reservations(self) -> bool:
        changed = False
        due = sorted((self.reservations[n] for n in self._pending_res
                      if self.reservations[n].earliest_start <= self.now),
                     key=lambda r: (r.earliest_start, r.name))
        for res in due:
            if self._act_tried.get(res.name) == self._world():
                continue
            if self._activate(res):
                changed = True
            else:
                self._act_tried[res.name] = self._world()
        return changed

    def _activate(self, res: Reservation) -> bool:
        key = res.run
        st = self.status.get(key)
        if key not in self.runs or st is None or st.phase is not Phase.RESERVED or st.reservation != res.name:
            self.apply(ReservationPut(replace(res, state=ReservationState.FAILED)))
            return True
        spec = self.runs[key].spec
        needs = self._needs(key, 0, spec.min_width)
        cov = self._cover(key, needs)
        placed = self._pack(key, cov.groups)
        if placed is not None:  # no deficit, or a budget shortfall only: bind anyway
            self._bind(key, placed, MintReason.START)
            return True
        if cov.funded_gpus == 0:
            return self._fail_reservation_and_park(
                key, res, "its reservation failed: GPUs are short and the demand is no longer fundable")
        if not self._fits_empty(key, cov):
            return self._fail_reservation_and_park(
                key, res, "its reservation failed: the run can never fit the Ready nodes of its flavor")
        return self._cut_and_bind(key, cov, res.name, cutorder.LOTTERY, res)

    def _fits_empty(self, key: str, cov: Cover) -> bool:
        """Whether the request fits the Ready nodes of its flavor if every slot were free."""
        everything = {n: set(range(self.topo.nodes[n].gpus)) for n in self.topo.nodes}
        return self._pack(key, cov.groups, everything) is not None

    def _fail_reservation_and_park(self, key: str, res: Reservation, message: str) -> bool:
        self.apply(ReservationPut(replace(res, state=ReservationState.FAILED)))
        self._set_status(key, phase=Phase.PENDING, reason=R_UNSCHEDULABLE, reservation=None, message=message)
        return True

    def _reclaim_then_bind(self, key: str, cov: Cover) -> bool:
        """§5.3: end unfunded work in the way (cut step 1 only) if that alone restores a fit."""
        if not self._reclaim_could_fit(key):
            return False
        return self._cut_and_bind(key, cov, key, cutorder.RECLAIM, None)

    def _reclaim_could_fit(self, key: str) -> bool:
        """A necessary condition for reclaim to restore a fit, in O(log n): step 1 frees only
        unfunded GPUs, and with the new claim ranked in those are at most today's unfunded,
        shared and borrowed GPUs plus owned GPUs of runs admitted no earlier than this one."""
        spec = self.runs[key].spec
        self.funding.refresh()
        by_class = self.funding.class_gpus
        could = (by_class[FundingClass.UNFUNDED] + by_class[FundingClass.SHARED]
                 + by_class[FundingClass.BORROWED])
        admitted = self.terms(key).admitted
        could += sum(self._gpus_by_admitted[t] for t in self._gpus_by_admitted.irange(minimum=admitted))
        need = spec.min_width + self._spares_for(spec.min_width, key)
        return bool(self.topo.flavor_free(spec.gpu_type) + could >= need)

    def _cut_and_bind(self, key: str, cov: Cover, source: str, max_step: int, res: Reservation | None) -> bool:
        """Choose the slice, plan the cuts that clear its deficit, apply them and bind into it."""
        world = self._cut_world(key, cov, max_step)
        intended = self._intended_slice(key, cov, max_step, world)
        if intended is None:
            return False
        _, deficit = self._slice_of(key, intended)
        planned = cutorder.plan(world, deficit, source, max_step)
        if res is not None and (res.seed, res.conflict_set) != (planned.seed, planned.conflict_set):
            # §7: whenever the cut order runs, its seed and conflict set are published.
            res = replace(res, seed=planned.seed, conflict_set=planned.conflict_set)
            self.apply(ReservationPut(res))
        if not planned.cleared:
            return False
        self._apply_cuts(planned)
        cov = self._cover(key, self._needs(key, 0, self.runs[key].spec.min_width))
        placed = self._pack(key, cov.groups, fixed=self._group_domains(intended)) or self._pack(key, cov.groups)
        if placed is None:  # only when payer selectors split a domain; the run keeps waiting
            return True
        self._bind(key, placed, MintReason.START)
        return True

    def _apply_cuts(self, planned: cutorder.CutPlan) -> None:
        closure = {cutorder.RECLAIM: f"ReclaimUnfunded({planned.seed})", cutorder.DROP_SPARE: "DropSpare",
                   cutorder.SHRINK: "Shrink"}
        touched: list[str] = []
        for cut in planned.cuts:
            if cut.step == cutorder.LOTTERY:
                continue
            for name in cut.leases:
                if self.leases[name].open:
                    self._close(name, closure[cut.step])
            touched.append(cut.run)
        for cut in planned.cuts:
            if cut.step == cutorder.LOTTERY:
                self._close_run(cut.run, f"RandomPreempt({planned.seed})")
                self._preempted(cut.run)
        for key in dict.fromkeys(touched):
            self._after_loss(key, "Requeued", f"ReclaimUnfunded({planned.seed})", preempted=True)

    # --- losses, requeues, failures (§7 tail, §8) ------------------------------------------

    def _after_loss(self, key: str, requeue_closure: str, group_closure: str, preempted: bool) -> None:
        """Re-establish the gang after some leases closed: drop broken groups of a malleable run,
        or requeue a run below its runnable width."""
        spec = self.runs[key].spec
        groups = self._groups(key)
        if not groups:
            if preempted:
                self._preempted(key)
            return
        broken = [g for g, ls in groups.items() if self._group_broken(key, g, ls)]
        width = sum(self._active(ls) for g, ls in groups.items() if g not in broken)
        if width >= spec.min_width and (broken == [] or spec.malleable is not None):
            for g in broken:
                for lease in groups[g]:
                    self._close(lease.name, group_closure)
            return
        self._close_run(key, requeue_closure)
        if preempted:
            self._preempted(key)

    def _group_broken(self, key: str, g: int, leases: list[Lease]) -> bool:
        return self._active(leases) < self._group_size(key, g)

    def _group_size(self, key: str, g: int) -> int:
        """The active width group `g` was laid out with: the groups of the runnable width first
        (the last may be smaller), then one group per growth step."""
        spec = self.runs[key].spec
        gg = spec.locality.group_gpus
        step = spec.malleable.step if spec.malleable else 0
        if gg is None:
            return spec.min_width if g == 0 else step
        first = -(-spec.min_width // gg)
        if g == first - 1:
            return spec.min_width - gg * (first - 1)
        return gg

    def _preempted(self, key: str) -> None:
        self._fail_reservation(key)
        self._set_status(key, phase=Phase.PENDING, reason=R_PREEMPTED, reservation=None,
                         hold_down_until=self.now + self.config.preemption_hold_down,
                         message="lost its GPUs to a cut; may bind on idle capacity, reserves after the hold-down")

    def _fence(self, node: str) -> None:
        self._node_state(node, NodeState.FENCED)
        hit: dict[str, list[Lease]] = {}
        for _, holder in list(self.topo.held_slots(node)):
            lease = self.leases[holder]
            hit.setdefault(lease.run, [])
            if lease not in hit[lease.run]:
                hit[lease.run].append(lease)
        for key in sorted(hit):
            self._node_failure(key, node, hit[key])

    def _node_failure(self, key: str, node: str, lost: list[Lease]) -> None:
        lost_active: dict[int, list[Slot]] = {}
        for lease in lost:
            if lease.role is Role.ACTIVE:
                lost_active.setdefault(lease.group, []).extend(lease.slots)
            self._close(lease.name, "NodeFailure")
        broken: list[int] = []
        for g in sorted(lost_active):
            if not self._swap(key, g, len(lost_active[g]), self.topo.domain_of(node)):
                broken.append(g)
        if not broken:
            return
        spec = self.runs[key].spec
        groups = self._groups(key)
        intact = sum(self._active(ls) for g, ls in groups.items() if g not in broken)
        if spec.malleable is not None and intact >= spec.min_width:
            for g in broken:
                for lease in groups.get(g, []):
                    self._close(lease.name, "NodeFailure")
            return
        if spec.checkpoint is not None:
            self._close_run(key, "Requeued")
            self._set_status(key, phase=Phase.PENDING, reason=R_CHECKPOINT, reservation=None,
                             checkpoint_deadline=self.now + spec.checkpoint,
                             message="requeued after a node failure; fails unless running again by its checkpoint deadline")
            return
        self._close_run(key, "RunFailed")
        self._fail_reservation(key)
        self._set_status(key, phase=Phase.FAILED, reason=R_NODE_FAILURE, ended_at=self.now,
                         message=f"node {node} failed and no spare could cover the loss")

    def _swap(self, key: str, g: int, need: int, domain: str) -> bool:
        """Cover `need` lost active GPUs of group `g` with spares of the run in `domain`."""
        spares = [x for x in self.open_by_run.get(key, {}).values()
                  if x.role is Role.SPARE and self.topo.domain_of(x.node) == domain]
        spares.sort(key=lambda x: (x.group != g, x.name))
        if sum(x.gpus for x in spares) < need:
            return False
        run = self.runs[key]
        for spare in spares:
            if need == 0:
                break
            use = spare.slots[:need]
            rest = spare.slots[need:]
            need -= len(use)
            self._close(spare.name, "Swap")
            self.apply(LeaseMinted(Lease(self._next_lease_name(run), key, spare.owner, g, Role.ACTIVE, use,
                                         spare.paid_by, self.now, MintReason.SWAP)))
            if rest:
                self.apply(LeaseMinted(Lease(self._next_lease_name(run), key, spare.owner, spare.group, Role.SPARE,
                                             rest, spare.paid_by, self.now, MintReason.SWAP)))
        return True

    # --- elasticity (§6) ---------------------------------------------------------------------

    def _grow(self) -> bool:
        changed = False
        running = sorted(self._malleable_running, key=lambda k: (self.terms(k).admitted, k))
        for key in running:
            if self._grow_tried.get(key) == self._world():
                continue
            spec = self.runs[key].spec
            m = spec.malleable
            assert m is not None
            width = sum(self._active(ls) for ls in self._groups(key).values())
            if width + m.step > m.desired:
                continue
            self._grow_tried[key] = self._world()
            needs = self._needs(key, width, width + m.step)
            cov = self._cover(key, needs, headroom_only=True)
            if cov.funded_gpus < cov.total_gpus:
                continue
            placed = self._pack(key, cov.groups)
            if placed is None:
                continue
            self._mint(key, placed, MintReason.GROW)
            self._grow_tried.pop(key, None)
            changed = True
        return changed

    # ======================================================================================
    # Helpers
    # ======================================================================================

    def _groups(self, key: str) -> dict[int, list[Lease]]:
        out: dict[int, list[Lease]] = {}
        for lease in self.open_by_run.get(key, {}).values():
            out.setdefault(lease.group, []).append(lease)
        return out

    @staticmethod
    def _active(leases: Iterable[Lease]) -> int:
        return sum(x.gpus for x in leases if x.role is Role.ACTIVE)

    def _used_domains(self, key: str) -> list[str]:
        groups = self._groups(key)
        out: list[str] = []
        for g in sorted(groups):
            for lease in sorted(groups[g], key=lambda x: x.name):
                d = self.topo.domain_of(lease.node)
                if d not in out:
                    out.append(d)
        return out

    def _close(self, name: str, reason: str) -> None:
        self.apply(LeaseClosed(name, self.now, reason))

    def _close_run(self, key: str, reason: str) -> None:
        for name in sorted(self.open_by_run.get(key, {})):
            self._close(name, reason)

    def _fail_reservation(self, key: str) -> None:
        st = self.status.get(key)
        if st is not None and st.reservation is not None:
            res = self.reservations[st.reservation]
            if res.state is ReservationState.PENDING:
                self.apply(ReservationPut(replace(res, state=ReservationState.FAILED)))

    def _set_status(self, key: str, **changes: object) -> bool:
        old = self.status[key]
        new = replace(old, **changes)  # type: ignore[arg-type]
        if new == old:
            return False
        self.apply(RunStatusPut(key, new))
        return True
