"""The view a `Cluster` decides against (CALCULUS §3-§4): topology, budgets, runs, leases,
reservations, the meter and the indexes kept in step with them; `apply` (facts) and `change_spec`
(spec changes) are its only mutators, `replay_entry` rebuilds it from a journal. The first layer
of `engine.Cluster`; it decides nothing.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Self

from sortedcontainers import SortedDict

from jobtree.core.cover import Candidate
from jobtree.core.errors import NotFound
from jobtree.core.facts import (
    ApplyBudget,
    ClockAdvanced,
    Fact,
    JournalEntry,
    LeaseClosed,
    LeaseMinted,
    NodeStatePut,
    ReservationPut,
    RunStatusPut,
    SetAllowance,
    SpecChange,
    SpecDeleted,
    SpecPut,
)
from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import Claim, FundingRules, RunTerms, env_bound
from jobtree.core.meter import Meter
from jobtree.core.model import (
    Budget,
    ClusterConfig,
    Lease,
    Node,
    NodeState,
    Phase,
    Reservation,
    ReservationState,
    Role,
    Run,
    RunSpec,
    RunStatus,
)
from jobtree.core.pack import PackRequest
from jobtree.core.queue import AdmissionQueue
from jobtree.core.reclaims import ReclaimIndex
from jobtree.core.topology import Topology

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


class ClusterState:
    def __init__(self, config: ClusterConfig, nodes: Iterable[Node] = (), now: int = 0) -> None:
        self.config = config
        self.now = now
        self.started = now
        self.initial_nodes: tuple[Node, ...] = tuple(nodes)
        self.topo = Topology(self.initial_nodes)
        self.budgets: dict[str, Budget] = {}
        self.allowances: dict[str, int] = dict(config.cap_allowances)
        """Aggregate cap (`budget/cap`) -> this cluster's allowance of it (config, then SetAllowance)."""
        self.hour_allowances: dict[str, float] = {}
        """Aggregate cap -> the GPU-hours this cluster may debit under it (SetAllowance)."""
        self.allowance_versions: dict[str, int] = {}
        """Aggregate cap -> the version of the federation's grant in force (`SetAllowance`)."""
        self.rules = FundingRules([], dict(self.allowances))
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
        self.observer: Callable[[Any], None] | None = None
        """Told of the `engine.Cluster` after every settle (tests: the §10 oracle)."""
        """Called after every settling (every decision instant); tests run the §10 oracle here."""
        # Indexes (derived from the state above; speed only).
        self._phase: dict[Phase, set[str]] = {p: set() for p in Phase}
        self._gpus_by_admitted: SortedDict = SortedDict()  # open lease GPUs by run admission time
        self._timed: set[str] = set()
        self._eta_running: set[str] = set()
        """Running runs that reported an ETA: what a reservation's forecast reads."""
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
        self._cand_cache: dict[object, tuple[list[Candidate], bool]] = {}
        self._empty_fit_cache: dict[PackRequest, bool] = {}
        """Whether a pack request fits its flavor's Ready nodes were every slot free (cleared
        with `_cand_cache` when budgets or nodes change)."""
        self._grow_tried: dict[str, tuple[int, int]] = {}
        self._width: dict[str, int] = {}
        """Run -> GPUs of its open active leases (its width), kept by `apply`."""
        self._edges: list[int] = []
        """Every envelope window's start and end instant, in order, as of `_edges_epoch`."""
        self._edges_epoch = -1
        self._spare_holders: dict[str, int] = {}
        """Run -> how many open spare leases it holds (runs with none are absent), kept by `apply`:
        the runs cut step 2 can take from."""
        self._queue_index = AdmissionQueue()
        """The queued runs in admission order; those waiting for capacity asleep (core.queue)."""
        self._queue_epoch = self._spec_epoch
        self._act_tried: dict[str, tuple[int, int]] = {}
        self._open_sorted: dict[str, tuple[Lease, ...]] = {}
        self._run_domains: dict[str, Sequence[tuple[str, Sequence[Lease]]]] = {}
        self._stale_runs: set[str] = set()
        """Run -> its open leases by name, and by domain, as cut worlds read them
        (`Cutting._refresh_sorted`, `Cutting._domains_of`): kept across decisions; `apply` marks
        a run stale when its leases change."""
        self._cut_runs: dict[str, tuple[RunSpec, RunStatus]] = {}
        """Run -> (spec, status) of every run with both, as cut worlds read them (`apply`)."""
        self._reclaims = ReclaimIndex()
        """What cut step 1 could free, per run and per flavor (`Cutting._reclaim_index` keeps it
        up to date from the funding view's `reclassified` runs and `_reclaim_dirty`)."""
        self._reclaim_dirty: set[str] = set()
        """Runs whose spec or status changed since the reclaim index last looked (kept only
        once it is built)."""
        self.funding.set_clock(now, frozenset())

    def __getstate__(self) -> dict[str, object]:
        """A copy (pickle, deepcopy) is the view without its history: the journal and fact
        lists start empty (callers slice them from a mark taken after the copy) and no observer
        is attached. What snapshots store and what a what-if plan copies."""
        state = dict(self.__dict__)
        state.update(journal=[], facts=[], observer=None, _open_sorted={}, _run_domains={},
                     _stale_runs=self._stale_runs | self._open_sorted.keys(), _reclaims=ReclaimIndex(),
                     _reclaim_dirty=set())
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_open_sorted", {})
        self.__dict__.setdefault("_run_domains", {})
        self.__dict__.setdefault("_empty_fit_cache", {})
        self.__dict__.setdefault("_edges_epoch", -1)
        self.__dict__.setdefault("_reclaims", ReclaimIndex())
        self.__dict__.setdefault("_reclaim_dirty", set())
        if "_eta_running" not in state:
            self._eta_running = {k for k, st in self.status.items() if st.phase is Phase.RUNNING and st.eta is not None}
        if "_cut_runs" not in state:
            self._cut_runs = {k: (r.spec, self.status[k]) for k, r in self.runs.items() if k in self.status}
        if "_spare_holders" not in state:
            self._spare_holders = self._count_spare_holders()
        if "_stale_runs" not in state:
            self._stale_runs = {k for k, ls in self.open_by_run.items() if ls}

    def _count_spare_holders(self) -> dict[str, int]:
        """`_spare_holders` counted afresh from the open leases."""
        out: dict[str, int] = {}
        for leases in self.open_by_run.values():
            for x in leases.values():
                if x.role is Role.SPARE:
                    out[x.run] = out.get(x.run, 0) + 1
        return out

    def forget_history(self) -> None:
        """Empty the journal and fact lists (a follower or the decision loop, once the ledger
        holds them: nothing in the core reads them back, so memory stays flat)."""
        self.journal.clear()
        self.facts.clear()

    @classmethod
    def replay(cls, config: ClusterConfig, nodes: Iterable[Node], start: int,
               journal: Iterable[JournalEntry]) -> Self:
        """Rebuild a view from its journal alone, deciding nothing (the audit property of §10)."""
        cl = cls(config, nodes, start)
        for t, item in journal:
            cl.replay_entry(t, item)
        return cl

    def replay_entry(self, t: int, item: Fact | SpecChange) -> None:
        """Apply one journal entry at its instant, deciding nothing (followers and replay)."""
        if t > self.now:
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
            self._index_cut_run(item.run.key)
        elif isinstance(item, SpecDeleted):
            self.runs.pop(item.run, None)
            self._terms_cache.pop(item.run, None)
            self._index_running(item.run, Phase.PENDING, None)
            self._index_queue(item.run, None)
            self._index_cut_run(item.run)
            self.deleted[item.run] = self.now
        elif isinstance(item, ClockAdvanced):
            pass  # the instant is the entry's: replay has already moved the clock there
        elif isinstance(item, SetAllowance):
            self._set_allowance(item)
        elif item.node.name in self.topo.nodes:
            self.topo.set_state(item.node.name, item.node.state)
        else:
            self.topo.add_node(item.node)
        self._epoch += 1
        if isinstance(item, (ApplyBudget, NodeStatePut, SetAllowance)):
            self._spec_epoch += 1  # what cover candidates depend on: budgets, allowances and nodes
        self.journal.append((self.now, item))

    def apply(self, fact: Fact) -> None:
        if isinstance(fact, LeaseMinted):
            lease = fact.lease
            self.topo.take(lease.slots, lease.name)
            self.leases[lease.name] = lease
            self.open_by_run.setdefault(lease.run, {})[lease.name] = lease
            self._stale_runs.add(lease.run)
            self._run_domains.pop(lease.run, None)
            self.funding.add(self._claim(lease))
            self._count_admitted(lease, +1)
            if lease.role is Role.ACTIVE:
                self._width[lease.run] = self._width.get(lease.run, 0) + lease.gpus
            else:
                self._spare_holders[lease.run] = self._spare_holders.get(lease.run, 0) + 1
            prefix, seq = lease.name.rsplit(".", 1)
            self._lease_seq[prefix] = max(self._lease_seq.get(prefix, 0), int(seq) + 1)
        elif isinstance(fact, LeaseClosed):
            old = self.leases[fact.name]
            self.topo.release(old.slots, old.name)
            self.leases[fact.name] = replace(old, end=fact.end, closure_reason=fact.reason)
            del self.open_by_run[old.run][old.name]
            self._stale_runs.add(old.run)
            self._run_domains.pop(old.run, None)
            self.funding.remove(old.name)
            self._count_admitted(old, -1)
            if old.role is Role.ACTIVE:
                left = self._width[old.run] - old.gpus
                if left:
                    self._width[old.run] = left
                else:
                    del self._width[old.run]
            else:
                spares = self._spare_holders[old.run] - 1
                if spares:
                    self._spare_holders[old.run] = spares
                else:
                    del self._spare_holders[old.run]
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
            self._index_cut_run(fact.run)
        self.facts.append(fact)
        self.journal.append((self.now, fact))

    def _index_cut_run(self, key: str) -> None:
        """Keep `_cut_runs` (run -> spec and status, as cut worlds read them) in step."""
        run, st = self.runs.get(key), self.status.get(key)
        if self._reclaims.epoch >= 0:
            self._reclaim_dirty.add(key)
        if run is None or st is None:
            self._cut_runs.pop(key, None)
        else:
            self._cut_runs[key] = (run.spec, st)

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
        if new.phase is Phase.RUNNING and new.eta is not None:
            self._eta_running.add(key)
        else:
            self._eta_running.discard(key)
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

    def _in_hold_down(self, key: str) -> bool:
        until = self.status[key].hold_down_until
        return until is not None and self.now < until

    def _spares_for(self, width: int, key: str) -> int:
        spec = self.runs[key].spec
        g = spec.locality.group_gpus
        return 0 if g is None else -(-width // g) * spec.spares_per_group

    def _next_lease_name(self, run: Run) -> str:
        prefix = f"{run.namespace}.{run.name}"
        return f"{prefix}.{self._lease_seq.get(prefix, 0):05d}"

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

    def _move_clock(self, t: int) -> None:
        """Integrate the meter up to `t`, splitting at every instant where classes change without a
        fact (window edges, GPU-hour exhaustion), so the meter is a function of the journal alone."""
        while self.now < t:
            step_to = min(t, self._next_breakpoint(t))
            unfunded = self.funding.unfunded_by_owner()
            self.meter.charge(step_to - self.now, self.funding.used, self.rules.hour_caps, unfunded.items())
            self.now = step_to
            self._epoch += 1
            self.funding.set_clock(step_to, self.meter.spent(self.rules.hour_caps))

    def _next_breakpoint(self, limit: int) -> int:
        edge = self._next_window_edge()
        best = limit if edge is None else min(limit, edge)
        self.funding.refresh()
        ex = self.meter.next_exhaustion(self.now, self.funding.used, self.rules.hour_caps)
        return min(best, ex) if ex is not None else best

    def _next_window_edge(self) -> int | None:
        """The first envelope window start or end after now. The instants are kept in order
        until budgets or nodes change: the clock asks with every decision and must not walk
        every envelope."""
        if self._edges_epoch != self._spec_epoch:
            self._edges = sorted({x for e in self.rules.envelopes.values() for x in (e.start, e.end) if x is not None})
            self._edges_epoch = self._spec_epoch
        i = bisect_right(self._edges, self.now)
        return self._edges[i] if i < len(self._edges) else None

    def _set_budget(self, budget: Budget) -> None:
        self.budgets = {**self.budgets, budget.name: budget}
        self._set_rules()

    def _set_allowance(self, item: SetAllowance) -> None:
        self.allowances = {k: v for k, v in self.allowances.items() if k != item.cap}
        if item.concurrency is not None:
            self.allowances[item.cap] = item.concurrency
        self.hour_allowances = {k: v for k, v in self.hour_allowances.items() if k != item.cap}
        if item.gpu_hours is not None:
            self.hour_allowances[item.cap] = item.gpu_hours
        self.allowance_versions = {**self.allowance_versions, item.cap: item.version}
        self._set_rules()

    def _set_rules(self) -> None:
        """Funding rules from the budgets and the allowances now (their GPU-hour meters kept)."""
        rules = FundingRules(self.budgets.values(), dict(self.allowances), dict(self.hour_allowances))
        self.rules = rules
        for (b, e), env in rules.envelopes.items():
            self.meter.reset_window(env_bound((b, e)), env.start)
        self.meter.note_caps(rules.hour_caps)
        self.funding.set_rules(rules)
        self.funding.set_clock(self.now, self.meter.spent(rules.hour_caps))
