"""Derived views of a cluster: the STATE object of SCENARIOS.md, as plain JSON-ready dicts.

Contract: a pure function of the cluster's view at its `now` (leases, budgets, runs, meter);
lists are sorted (runs and reservations by key or name, leases by name) so two outputs compare
equal as text. Usage, headroom, run width and funding split are all derived here from leases,
budgets and the clock — nothing is stored. Not: a table renderer (see `jobtree.sim.table`).
"""

from __future__ import annotations

from typing import Any

from jobtree.core.engine import Cluster
from jobtree.core.explain import Details
from jobtree.core.funding_rules import INF, env_bound
from jobtree.core.model import FundingClass, Lease, Phase, Reservation, Role, slot_text
from jobtree.core.timefmt import format_time

Json = dict[str, Any]


def _t(t: int | None) -> str | None:
    return None if t is None else format_time(t)


def drawn_class(cl: Cluster, lease: Lease) -> str:
    """How an open lease's GPUs are shown (pictures, metrics, the dashboard): spare, else its
    funding class."""
    return "spare" if lease.role is Role.SPARE else cl.funding.class_of(lease.name).value


def explain_details(cl: Cluster, key: str, upstreams: tuple[str, ...] | None = None) -> Details:
    """What `explain` adds from a live view: the run's status instants and follow terms
    (`upstreams` as the spec names them unless given)."""
    st = cl.status[key]
    follow = cl.runs[key].spec.follow
    return Details(
        created=_t(st.created), admitted=_t(st.admitted), bound_at=_t(st.bound_at),
        hold_down_until=_t(st.hold_down_until), checkpoint_deadline=_t(st.checkpoint_deadline),
        ended_at=_t(st.ended_at), upstream_failed_at=_t(st.upstream_failed_at), eta=_t(st.eta),
        generation=st.generation,
        upstreams=upstreams if upstreams is not None else (follow.after if follow else ()),
        on_upstream_failure=follow.on_upstream_failure.value if follow else None,
    )


def lease_json(cl: Cluster, lease: Lease) -> Json:
    cls = cl.funding.class_of(lease.name).value if lease.open else None
    return {
        "name": lease.name,
        "run": lease.run,
        "owner": lease.owner,
        "group": lease.group,
        "role": lease.role.value,
        "slots": [slot_text(s) for s in lease.slots],
        "paidBy": None if lease.paid_by is None else {"budget": lease.paid_by[0], "envelope": lease.paid_by[1]},
        "class": cls,
        "start": format_time(lease.start),
        "end": _t(lease.end),
        "mintReason": lease.mint_reason.value,
        "closureReason": lease.closure_reason,
    }


def reservation_json(r: Reservation) -> Json:
    return {
        "name": r.name,
        "run": r.run,
        "state": r.state.value,
        "earliestStart": format_time(r.earliest_start),
        "deficitGPUs": r.deficit_gpus,
        "seed": r.seed,
        "conflictSet": list(r.conflict_set),
    }


def run_json(cl: Cluster, key: str) -> Json:
    run, st = cl.runs[key], cl.status[key]
    spec = run.spec
    funding = {"owned": 0, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0}
    allocated = 0
    for lease in cl.open_by_run.get(key, {}).values():
        funding[cl.funding.class_of(lease.name).value] += lease.gpus
        if lease.role is Role.SPARE:
            funding["spare"] += lease.gpus
        else:
            allocated += lease.gpus
    res = cl.reservations.get(st.reservation) if st.reservation else None
    return {
        "key": key,
        "owner": spec.owner,
        "phase": st.phase.value,
        "reason": st.reason,
        "message": st.message,
        "width": {"min": spec.min_width, "max": spec.max_width, "desired": spec.desired_width, "allocated": allocated},
        "funding": funding,
        "reservation": res.name if res else None,
        "earliestStart": format_time(res.earliest_start) if res else None,
    }


def budgets_json(cl: Cluster) -> list[Json]:
    cl.funding.refresh()
    funded: dict[tuple[str, str], dict[str, int]] = {}
    for claim in cl.funding.claims():
        if claim.payer is None:
            continue
        cls = cl.funding.class_of(claim.name)
        if cls is FundingClass.UNFUNDED:
            continue
        row = funded.setdefault(claim.payer, {"owned": 0, "shared": 0, "borrowed": 0, "spare": 0})
        row[cls.value] += claim.gpus
        if claim.role is Role.SPARE:
            row["spare"] += claim.gpus
    out = []
    for name in sorted(cl.budgets):
        b = cl.budgets[name]
        envs = []
        for e in b.envelopes:
            ref = (b.name, e.name)
            row = funded.get(ref, {"owned": 0, "shared": 0, "borrowed": 0, "spare": 0})
            envs.append({
                "name": e.name,
                "concurrency": e.concurrency,
                "funded": row,
                "headroom": headroom(cl, ref),
                "consumedGPUHours": round(cl.meter.hours(env_bound(ref)), 6),
            })
        out.append({"name": b.name, "owner": b.owner, "envelopes": envs})
    return out


def headroom(cl: Cluster, ref: tuple[str, str]) -> int:
    """Concurrency minus funded GPUs, lowered to what aggregate caps allow; 0 when the window is
    closed or the GPU-hours are spent."""
    e = cl.rules.envelopes[ref]
    bound = env_bound(ref)
    if not e.window_open(cl.now) or bound in cl.funding.spent:
        return 0
    room = e.concurrency - cl.funding.used_now(bound)
    for cap_bound, cap in cl.rules.caps_of[ref]:
        if cap_bound in cl.funding.spent:
            return 0
        if cap < INF:
            room = min(room, cap - cl.funding.used_now(cap_bound))
    return max(0, room)


def state_json(cl: Cluster) -> Json:
    """The STATE object of SCENARIOS.md at the cluster's `now`."""
    return {
        "time": format_time(cl.now),
        "runs": [run_json(cl, k) for k in sorted(cl.runs)],
        "leases": [lease_json(cl, cl.leases[n]) for n in sorted(cl.leases)],
        "reservations": [reservation_json(cl.reservations[n]) for n in sorted(cl.reservations)],
        "budgets": budgets_json(cl),
        "unfundedGPUHours": {o: round(s / 3600, 6) for o, s in sorted(cl.meter.unfunded.items())},
    }





def caps_json(cl: Cluster) -> list[Json]:
    """Every aggregate cap of this cluster as the federation needs it (CALCULUS §9): its bounds,
    the allowance in force and its grant version, the GPUs funded under it now, the demand on it
    (funded use, plus the open leases and queued runs it could fund: their owner may draw on
    one of its envelopes of the run's flavor) and the GPU-hours debited under it."""
    out: list[Json] = []
    rules = cl.rules
    for budget in sorted(cl.budgets.values(), key=lambda b: b.name):
        for cap in budget.aggregate_caps:
            key = f"{budget.name}/{cap.name}"
            bound = ("cap", budget.name, cap.name)
            refs = [(budget.name, e) for e in cap.envelopes if (budget.name, e) in rules.envelopes]

            def eligible(owner: str, flavor: str, borrow: bool, refs: list[tuple[str, str]] = refs) -> bool:
                return any(rules.envelopes[r].flavor == flavor and rules.tier(owner, r, borrow) is not None
                           for r in refs)

            funded = cl.funding.used_now(bound)
            extra = 0
            for run_key, run in cl.runs.items():
                st = cl.status.get(run_key)
                if st is None or st.phase.terminal:
                    continue
                spec = run.spec
                if not eligible(spec.owner, spec.gpu_type, spec.funding.allow_borrow):
                    continue
                if st.phase in (Phase.PENDING, Phase.RESERVED):
                    extra += spec.desired_width
                else:
                    extra += sum(lease.gpus for lease in cl.open_by_run.get(run_key, {}).values()
                                 if lease.role is not Role.SPARE
                                 and cl.funding.class_of(lease.name) is FundingClass.UNFUNDED)
            out.append({
                "cap": key,
                "flavor": cap.flavor,
                "maxConcurrency": cap.max_concurrency,
                "maxGPUHours": cap.max_gpu_hours,
                "allowance": cl.allowances.get(key),
                "allowanceGPUHours": cl.hour_allowances.get(key),
                "version": cl.allowance_versions.get(key, 0),
                "funded": funded,
                "demand": funded + extra,
                "spentGPUHours": round(cl.meter.hours(bound), 6),
            })
    return out
