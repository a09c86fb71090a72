"""The dashboard's four views as plain JSON, each a pure function of a cluster's view.

Part of the dashboard service (see its package docstring). Every function reads a core
`Cluster` at its `now` and decides nothing; the service serves what they return, the page
draws it. Instants are RFC 3339 text, GPU-hours floats rounded to 6 places.
- `fleet(cl)`: per fabric domain its nodes (GPUs, flavor, state) and every GPU slot's holder
  (an index into `holders`: run, owner, lease, funding class — owned, shared, borrowed,
  unfunded or spare), with per-domain totals. Compact on purpose: 1,000 nodes stay small.
- `budgets(cl, history)`: per budget and envelope, concurrency used against its cap, GPU-hours
  burned against the window (`BurnHistory` keeps the curve, sampled at every ledger instant),
  the projected exhaustion instant at the current funded pace (`projection`), and lending and
  borrowing; per owner, the GPUs its runs hold by class.
- `queue(cl)`: the runs not yet running — Pending and Reserved in admission order (admission
  time, then key: the order admission tries them), then Waiting ones — each with its reason in
  plain words, its ETA and what would let it start (`needs`).
- `run(cl, key)`: one run's leases on a timeline, its funding split, its `explain` sentences and
  the follow edges of its forest (upstreams and downstreams, transitively).
Not: a decision maker, not a renderer (the page in `static/` draws these).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jobtree.core import views
from jobtree.core.engine import R_CHECKPOINT, R_PREEMPTED, R_WINDOW, Cluster
from jobtree.core.explain import explain_lines
from jobtree.core.funding_rules import env_bound
from jobtree.core.meter import GPU_SECONDS_PER_HOUR, cap_seconds
from jobtree.core.model import Phase, RunStatus
from jobtree.core.timefmt import format_time

Json = dict[str, Any]
CLASSES = ("owned", "shared", "borrowed", "unfunded", "spare")
QUEUED = (Phase.WAITING, Phase.PENDING, Phase.RESERVED)
BURN_POINTS = 400
"""Points of an envelope's burn curve kept; older ones are thinned (every other dropped)."""


def _t(t: int | None) -> str | None:
    return None if t is None else format_time(t)


# --- fleet ---------------------------------------------------------------------------------


def fleet(cl: Cluster) -> Json:
    holders: list[Json] = []
    held: dict[tuple[str, int], int] = {}
    for key in sorted(cl.open_by_run):
        for name in sorted(cl.open_by_run[key]):
            lease = cl.open_by_run[key][name]
            holders.append({"run": lease.run, "owner": lease.owner, "lease": lease.name,
                            "class": views.drawn_class(cl, lease)})
            for slot in lease.slots:
                held[slot] = len(holders) - 1
    domains: dict[str, Json] = {}
    for node in sorted(cl.topo.nodes.values(), key=lambda n: (n.domain, n.name)):
        d = domains.setdefault(node.domain, {"name": node.domain, "gpus": 0, "free": 0,
                                             "classes": dict.fromkeys(CLASSES, 0), "nodes": []})
        slots = [held.get((node.name, i)) for i in range(node.gpus)]
        d["gpus"] += node.gpus
        for s in slots:
            if s is not None:
                d["classes"][holders[s]["class"]] += 1
            elif node.state.value != "Fenced":
                d["free"] += 1
        d["nodes"].append({"name": node.name, "gpus": node.gpus, "flavor": node.flavor,
                           "state": node.state.value, "slots": slots})
    owners = sorted({h["owner"] for h in holders})
    return {"time": format_time(cl.now), "domains": list(domains.values()), "holders": holders, "owners": owners}


# --- budgets -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Projection:
    """When an envelope's GPU-hours run out at the GPUs it funds now."""

    left_hours: float | None
    """GPU-hours left under its cap; None when uncapped."""
    exhausts_at: int | None
    """The instant they run out at the current pace; None when uncapped, idle, spent, or the
    window closes first."""
    window_ends_first: bool = False


def consumed_at(cl: Cluster, ref: tuple[str, str], at: int) -> int:
    """An envelope's funded GPU-seconds at `at` >= the view's `now`: the meter's figure, plus
    the GPUs it funds now for the seconds since (the widths change only at ledger facts, so
    this is exact until the next one), clamped at its cap as the meter clamps."""
    env = cl.rules.envelopes[ref]
    bound = env_bound(ref)
    used = cl.meter.consumed.get(bound, 0)
    if at > cl.now and env.window_open(cl.now):
        until = at if env.end is None else min(at, env.end)
        used += cl.funding.used_now(bound) * max(0, until - cl.now)
    if env.max_gpu_hours is not None:
        used = max(cl.meter.consumed.get(bound, 0), min(used, cap_seconds(env.max_gpu_hours)))
    return used


def projection(cl: Cluster, ref: tuple[str, str], at: int | None = None) -> Projection:
    """When the envelope's GPU-hours run out at the GPUs it funds now, seen at `at` (default:
    the view's `now`)."""
    at = cl.now if at is None or at < cl.now else at
    env = cl.rules.envelopes[ref]
    if env.max_gpu_hours is None:
        return Projection(None, None)
    bound = env_bound(ref)
    left = max(0, cap_seconds(env.max_gpu_hours) - consumed_at(cl, ref, at))
    pace = cl.funding.used_now(bound) if env.window_open(at) else 0
    if left == 0 or pace <= 0:
        return Projection(round(left / GPU_SECONDS_PER_HOUR, 6), None)
    runs_out = at + -(-left // pace)
    if env.end is not None and runs_out >= env.end:
        return Projection(round(left / GPU_SECONDS_PER_HOUR, 6), None, window_ends_first=True)
    return Projection(round(left / GPU_SECONDS_PER_HOUR, 6), runs_out)


@dataclass
class BurnHistory:
    """Every envelope's consumed GPU-hours over time, sampled after each ledger batch (a
    follower listener: `observe(cl)`). Consumption is linear between two ledger instants (the
    funded widths change only at ledger facts), so the samples draw the curve exactly; a flat
    stretch keeps its two ends only."""

    points: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    follower: Any = None
    """The follower whose view `__call__` observes (set by `reset`, as `bus.follower.follow` does)."""

    def observe(self, cl: Cluster) -> None:
        for ref in cl.rules.envelopes:
            hours = round(cl.meter.hours(env_bound(ref)), 6)
            line = self.points.setdefault(ref, [])
            if (line and line[-1][0] == cl.now) or (len(line) >= 2 and line[-1][1] == line[-2][1] == hours):
                line[-1] = (cl.now, hours)
            else:
                line.append((cl.now, hours))
            if len(line) > BURN_POINTS:
                del line[1:-1:2]

    def reset(self, follower: Any = None) -> None:
        self.points.clear()
        self.follower = follower

    def __call__(self, _sequence: int, _batch: object) -> None:
        if self.follower is not None:
            self.observe(self.follower.cluster)

    def restored(self, follower: Any) -> None:
        """The view was put at a snapshot: at a start (`follow` has reset the curve) it starts
        there; when an on-demand view jumps to a newer snapshot, the curve keeps what it had and
        goes on from the snapshot's consumption (both ends of the stretch it skipped are exact; the
        stretch is drawn as one straight line)."""
        self.follower = follower
        self.observe(follower.cluster)


def budgets(cl: Cluster, history: BurnHistory | None = None, at: int | None = None) -> Json:
    """The budgets view at `at` (default and at least the view's `now`): GPU-hours and the
    projection carried forward from the last ledger instant at the current funded widths."""
    at = cl.now if at is None or at < cl.now else at
    rows = views.budgets_json(cl)
    out = []
    for row in rows:
        budget = cl.budgets[row["name"]]
        envs = []
        for env_row, env in zip(row["envelopes"], budget.envelopes, strict=True):
            ref = (budget.name, env.name)
            funded = env_row["funded"]
            used = funded["owned"] + funded["shared"] + funded["borrowed"]
            p = projection(cl, ref, at)
            hours = round(consumed_at(cl, ref, at) / GPU_SECONDS_PER_HOUR, 6)
            window = None
            if env.start is not None and env.end is not None:
                span = env.end - env.start
                window = min(1.0, max(0.0, (at - env.start) / span)) if span > 0 else 1.0
            burn = [[format_time(t), h] for t, h in (history.points.get(ref, []) if history else [])]
            if at > cl.now or not burn:
                burn.append([format_time(at), hours])
            envs.append({
                "name": env.name, "flavor": env.flavor, "concurrency": env.concurrency, "used": used,
                "funded": funded, "headroom": env_row["headroom"],
                "gpuHours": hours, "maxGPUHours": env.max_gpu_hours,
                "leftGPUHours": p.left_hours, "fundedNow": cl.funding.used_now(env_bound(ref)),
                "exhaustsAt": _t(p.exhausts_at), "windowEndsFirst": p.window_ends_first,
                "windowStart": _t(env.start), "windowEnd": _t(env.end), "windowElapsed": window,
                "windowOpen": env.window_open(at),
                "lending": {"allowed": env.lending.allow, "to": list(env.lending.to),
                            "maxConcurrency": env.lending.max_concurrency, "lentNow": funded["borrowed"]},
                "burn": burn,
            })
        out.append({"name": budget.name, "owner": budget.owner, "parents": list(budget.parents), "envelopes": envs})
    return {"time": format_time(at), "ledgerTime": format_time(cl.now), "budgets": out, "owners": owners(cl)}


def owners(cl: Cluster) -> list[Json]:
    """Per run owner: the GPUs its open leases hold by class (borrowed: funded by a sponsor's
    envelope), and its unfunded GPU-hours."""
    held: dict[str, Counter[str]] = {}
    for leases in cl.open_by_run.values():
        for lease in leases.values():
            held.setdefault(lease.owner, Counter())[views.drawn_class(cl, lease)] += lease.gpus
    names = sorted(set(held) | set(cl.meter.unfunded))
    return [{"owner": o, "gpus": {c: held.get(o, Counter())[c] for c in CLASSES},
             "unfundedGPUHours": round(cl.meter.unfunded.get(o, 0) / GPU_SECONDS_PER_HOUR, 6)} for o in names]


# --- queue ---------------------------------------------------------------------------------


def _gpus(cl: Cluster, key: str) -> int:
    spec = cl.runs[key].spec
    g = spec.locality.group_gpus
    spares = 0 if g is None else -(-spec.min_width // g) * spec.spares_per_group
    return spec.min_width + spares


def _upstreams(cl: Cluster, key: str) -> list[str]:
    follow = cl.runs[key].spec.follow
    ns = key.split("/", 1)[0]
    return [u if "/" in u else f"{ns}/{u}" for u in (follow.after if follow else ())]


def waiting_words(cl: Cluster, key: str) -> tuple[str, str | None, list[str]]:
    """(why, ETA, needs) of a run not running: its reason in plain words, when it is expected to
    start (a reservation's earliest start, a hold-down's end), and what would let it start."""
    st = cl.status[key]
    spec = cl.runs[key].spec
    gpus = _gpus(cl, key)
    if st.phase is Phase.WAITING:
        open_ups = [(u, cl.status[u].phase.value if u in cl.status else "missing") for u in _upstreams(cl, key)
                    if u not in cl.status or cl.status[u].phase is not Phase.COMPLETED]
        return ("waits for its upstream runs to complete",
                None, [f"{u} must complete (now {phase})" for u, phase in open_ups])
    res = cl.reservations.get(st.reservation) if st.reservation else None
    if st.phase is Phase.RESERVED and res is not None:
        if st.reason == R_WINDOW or res.window_only:
            return ("its envelope's window opens later", _t(res.earliest_start),
                    [f"the funding window opens at {format_time(res.earliest_start)}"])
        needs = [f"{res.deficit_gpus} GPUs must be freed; the cut order frees them at {format_time(res.earliest_start)}"]
        if res.conflict_set:
            needs.append("the activation may cut " + ", ".join(res.conflict_set))
        return ("reserved: holds its place until the GPUs are freed", _t(res.earliest_start), needs)
    needs = _capacity_needs(cl, key, gpus)
    cov = cl.admission_cover(key)
    if cov.funded_gpus < cov.total_gpus:
        needs.append(f"budgets fund {cov.funded_gpus} of its {cov.total_gpus} GPUs now: "
                     f"{cov.total_gpus - cov.funded_gpus} more headroom in an envelope for {spec.owner} "
                     f"would fund the rest (unfunded, it may still run on idle GPUs, reclaimed first)")
    if st.hold_down_until is not None and cl.now < st.hold_down_until:
        return (f"lost its GPUs to a cut; held down until {format_time(st.hold_down_until)} "
                "(it may bind on idle GPUs meanwhile)", _t(st.hold_down_until), needs)
    if st.reason == R_CHECKPOINT and st.checkpoint_deadline is not None:
        return (f"requeued after a node failure; fails unless running by {format_time(st.checkpoint_deadline)}",
                None, needs)
    if st.reason == R_PREEMPTED:
        return "preempted and queued again, keeping its admission time", None, needs
    if not needs:
        return "fits now: admitted at the next decision", None, []
    return "no fit now and nothing to reserve against: retried when capacity or budgets change", None, needs


def _capacity_needs(cl: Cluster, key: str, gpus: int) -> list[str]:
    spec = cl.runs[key].spec
    free = cl.topo.flavor_free(spec.gpu_type)
    ready = sum(n.gpus for n in cl.topo.nodes.values() if n.flavor == spec.gpu_type and n.state.value == "Ready")
    if ready < gpus:
        return [f"more {spec.gpu_type} nodes: the fleet has {ready} Ready GPUs of that flavor in all, "
                f"it needs {gpus}"]
    if free < gpus:
        return [f"{gpus - free} more {spec.gpu_type} GPUs must be freed ({free} free of the {gpus} it needs)"]
    g = spec.locality.group_gpus
    if g is not None:
        group = min(g, spec.min_width) + spec.spares_per_group
        largest = cl.topo.max_domain_free(spec.gpu_type)
        if largest < group:
            return [f"a fabric domain with {group} free {spec.gpu_type} GPUs for one group "
                    f"(the emptiest has {largest})"]
    if spec.locality.selector:
        sel = ", ".join(f"{k}={v}" for k, v in spec.locality.selector)
        return [f"{gpus} free {spec.gpu_type} GPUs on nodes matching {sel}"]
    return []


def _queue_order(cl: Cluster, key: str) -> tuple[bool, int, str]:
    """Admission's order (admission time, then key) for Pending and Reserved runs; Waiting runs
    after them (admission does not consider them until their upstreams complete)."""
    st: RunStatus = cl.status[key]
    return (st.phase is Phase.WAITING, st.admitted if st.admitted is not None else st.created, key)


def queue(cl: Cluster) -> Json:
    keys = sorted((k for k, st in cl.status.items() if st.phase in QUEUED and k in cl.runs),
                  key=lambda k: _queue_order(cl, k))
    rows = []
    for i, key in enumerate(keys, 1):
        st = cl.status[key]
        spec = cl.runs[key].spec
        why, eta, needs = waiting_words(cl, key)
        rows.append({"position": i, "key": key, "owner": spec.owner, "phase": st.phase.value, "reason": st.reason,
                     "gpus": _gpus(cl, key), "flavor": spec.gpu_type, "since": format_time(st.created),
                     "why": why, "eta": eta, "needs": needs, "reservation": st.reservation})
    depth = Counter(r["reason"] for r in rows)
    return {"time": format_time(cl.now), "runs": rows, "byReason": dict(sorted(depth.items()))}


# --- one run -------------------------------------------------------------------------------


def forest(cl: Cluster, key: str) -> Json:
    """The follow edges reachable from the run, both ways: nodes (key, phase) and edges
    (upstream, downstream)."""
    down: dict[str, list[str]] = {}
    for k in cl.runs:
        for u in _upstreams(cl, k):
            down.setdefault(u, []).append(k)
    seen, todo, edges = {key}, [key], set()
    while todo:
        k = todo.pop()
        ups = _upstreams(cl, k) if k in cl.runs else []
        for u in ups:
            edges.add((u, k))
        for n in [*ups, *down.get(k, [])]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
        for d in down.get(k, []):
            edges.add((k, d))
    nodes = [{"key": k, "phase": cl.status[k].phase.value if k in cl.status else "Missing"} for k in sorted(seen)]
    return {"nodes": nodes, "edges": sorted([list(e) for e in edges])}


def run(cl: Cluster, key: str) -> Json | None:
    """One run's page, or None when the cluster has no such run."""
    if key not in cl.runs or key not in cl.status:
        return None
    st = cl.status[key]
    leases = sorted((lease for lease in cl.leases.values() if lease.run == key and lease.start >= st.created),
                    key=lambda lease: (lease.start, lease.name))
    reservations = sorted((r for r in cl.reservations.values() if r.run == key), key=lambda r: r.name)
    view = views.run_json(cl, key)
    details = views.explain_details(cl, key, tuple(_upstreams(cl, key)))
    lease_rows = [views.lease_json(cl, lease) for lease in leases]
    for row, lease in zip(lease_rows, leases, strict=True):
        row["gpus"] = lease.gpus
        if lease.open:
            row["class"] = views.drawn_class(cl, lease)
    timeline = []
    for lease in leases:
        timeline.append({"at": format_time(lease.start), "what": lease.mint_reason.value, "lease": lease.name,
                         "gpus": lease.gpus})
        if lease.end is not None:
            timeline.append({"at": format_time(lease.end), "what": lease.closure_reason or "Closed",
                             "lease": lease.name, "gpus": lease.gpus})
    timeline.sort(key=lambda e: (e["at"], e["lease"]))
    queued = None
    if st.phase in QUEUED:
        why, eta, needs = waiting_words(cl, key)
        queued = {"why": why, "eta": eta, "needs": needs}
    return {
        "time": format_time(cl.now), "run": view, "created": format_time(st.created),
        "leases": lease_rows, "timeline": timeline,
        "reservations": [views.reservation_json(r) for r in reservations],
        "lines": explain_lines(view, lease_rows, [views.reservation_json(r) for r in reservations], details),
        "forest": forest(cl, key), "queued": queued,
    }
