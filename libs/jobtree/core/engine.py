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

The class is layered, one concept a module, each layer over the one before: `state`
(the view and its mutators), `placement`, `cutting`, `reserving`, `failures`, `elasticity`,
`admission`; this module adds time, commands and `_settle`, the cycle that runs them.
"""

from __future__ import annotations

import heapq

from jobtree.core.admission import Admission
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
    NodeStatePut,
    ReportEta,
    RunStatusPut,
    SetAllowance,
    ShrinkRun,
    SpecDeleted,
    SpecPut,
    Tick,
)
from jobtree.core.funding_rules import FundingRules
from jobtree.core.model import (
    Budget,
    FailurePolicy,
    NodeState,
    Phase,
    Run,
    RunStatus,
)
from jobtree.core.state import (
    R_CHECKPOINT,
    R_CHECKPOINT_EXPIRED,
    R_COMPLETED,
    R_CYCLE,
    R_NODE_FAILURE,
    R_PREEMPTED,
    R_QUEUED,
    R_RESERVED,
    R_RUNNING,
    R_UNSCHEDULABLE,
    R_UPSTREAM_FAILED,
    R_UPSTREAM_MISSING,
    R_WAITING,
    R_WINDOW,
    R_WORKLOAD_FAILED,
)

SETTLE_LIMIT = 10_000

__all__ = [
    "R_CHECKPOINT",
    "R_CHECKPOINT_EXPIRED",
    "R_COMPLETED",
    "R_CYCLE",
    "R_NODE_FAILURE",
    "R_PREEMPTED",
    "R_QUEUED",
    "R_RESERVED",
    "R_RUNNING",
    "R_UNSCHEDULABLE",
    "R_UPSTREAM_FAILED",
    "R_UPSTREAM_MISSING",
    "R_WAITING",
    "R_WINDOW",
    "R_WORKLOAD_FAILED",
    "SETTLE_LIMIT",
    "Cluster",
]


class Cluster(Admission):
    """One cluster's calculus state and its decision procedures."""

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
        edge = self._next_window_edge()
        if edge is not None:
            times.append(edge)
        self.funding.refresh()
        ex = self.meter.next_exhaustion(now, self.funding.used, self.rules.hour_caps)
        if ex is not None:
            times.append(ex)
        later = [x for x in times if x > now]
        return min(later) if later else None

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
        elif isinstance(cmd, SetAllowance):
            self._allowance(cmd)
        elif isinstance(cmd, CordonNode):
            name = self._node(cmd.node, "cordon")
            if self.topo.nodes[name].state is NodeState.READY:  # a fenced node stays failed
                self._node_state(name, NodeState.CORDONED)
        else:
            name = self._node(cmd.node, "uncordon")
            if self.topo.nodes[name].state is NodeState.CORDONED:
                self._node_state(name, NodeState.READY)

    def _allowance(self, cmd: SetAllowance) -> None:
        """A grant of the federation (§9). One not newer than the grant in force changes nothing
        (grants arrive late, twice or out of order); the allowance applies as the cap from now:
        funded work above it turns unfunded at the next settle, nothing is stopped."""
        budget, _, name = cmd.cap.partition("/")
        caps = {c.name for c in self.budgets[budget].aggregate_caps} if budget in self.budgets else set()
        if name not in caps:
            known = sorted(f"{b.name}/{c.name}" for b in self.budgets.values() for c in b.aggregate_caps)
            raise NotFound("allowance.cap", f"no aggregate cap {cmd.cap!r}; caps: {', '.join(known) or 'none'}")
        if cmd.concurrency is not None and cmd.concurrency < 0:
            raise ValidationError("allowance.concurrency", f"must be a non-negative integer, got {cmd.concurrency}")
        if cmd.gpu_hours is not None and not 0 <= cmd.gpu_hours < float("inf"):
            raise ValidationError("allowance.gpuHours", f"must be a non-negative number, got {cmd.gpu_hours}")
        if cmd.version <= self.allowance_versions.get(cmd.cap, 0):
            return
        self.change_spec(cmd)

    def _apply_budget(self, budget: Budget) -> None:
        budgets = {**self.budgets, budget.name: budget}
        rules = FundingRules(budgets.values(), dict(self.allowances), dict(self.hour_allowances))
        cycle = rules.family.find_cycle()
        if cycle:
            raise ValidationError("spec.parents", "the family graph must be acyclic; cycle: " + " -> ".join(cycle))
        self.change_spec(ApplyBudget(budget))

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
