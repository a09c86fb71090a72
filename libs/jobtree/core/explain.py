"""Why a run is where it is, in sentences: the `lines` of ExplainRun and `kubectl-runs explain`.

Contract: `explain_lines(run, leases, reservations, details)` is a pure function of the
simulator's JSON views (SCENARIOS.md STATE: `runs[]`, `leases[]`, `reservations[]`, as made by
`jobtree.core.views`) of one run, plus optional `details` that only a live view knows (status
instants, follow upstreams). It returns human sentences, most important first: phase and
reason, reservation, width, funding (who pays, what runs unfunded), timers, history.
The gateway calls it on its follower's view; `kubectl-runs --local` on the simulator's output,
so both explain a run the same way.
Not: a renderer of tables, not a source of truth (it only rephrases the views).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Json = Mapping[str, Any]

__all__ = ["Details", "explain_lines"]


@dataclass(frozen=True, slots=True)
class Details:
    """What a live view adds to the JSON views (RFC3339 instants; None when unknown)."""

    created: str | None = None
    admitted: str | None = None
    bound_at: str | None = None
    hold_down_until: str | None = None
    checkpoint_deadline: str | None = None
    ended_at: str | None = None
    upstream_failed_at: str | None = None
    eta: str | None = None
    generation: int = 0
    upstreams: tuple[str, ...] = ()
    on_upstream_failure: str | None = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _payer(paid_by: object) -> str:
    if isinstance(paid_by, Mapping):
        return f"{paid_by.get('budget')}/{paid_by.get('envelope')}"
    return "nobody (unfunded)"


def _funding_line(funding: Json) -> str | None:
    parts = [f"{funding.get(k, 0)} {k}" for k in ("owned", "shared", "borrowed", "unfunded") if funding.get(k)]
    if not parts:
        return None
    spare = funding.get("spare") or 0
    tail = f" (of which {_plural(spare, 'spare GPU')})" if spare else ""
    return "Funding of its open leases: " + ", ".join(parts) + f" GPUs{tail}."


def _width_line(phase: str, width: Json, open_leases: Sequence[Json]) -> str | None:
    lo, hi, desired, allocated = (width.get(k, 0) for k in ("min", "max", "desired", "allocated"))
    shape = f"{desired} GPUs" if lo == hi else f"{desired} GPUs desired (elastic {lo}..{hi})"
    if not open_leases:
        return f"It asks for {shape} and holds none." if phase not in ("Completed", "Failed") else None
    nodes = sorted({str(s).split("#", 1)[0] for lease in open_leases for s in lease.get("slots") or ()})
    groups = {int(lease.get("group") or 0) for lease in open_leases if lease.get("role") == "Active"}
    return (f"It holds {allocated} active GPUs of {shape} in {_plural(len(open_leases), 'open lease')} "
            f"on {_plural(len(nodes), 'node')} ({', '.join(nodes)}), {_plural(len(groups), 'group')}.")


def _payers_line(open_leases: Sequence[Json]) -> str | None:
    by_payer: Counter[str] = Counter()
    for lease in open_leases:
        by_payer[_payer(lease.get("paidBy"))] += len(lease.get("slots") or ())
    if not by_payer:
        return None
    parts = [f"{payer}: {gpus} GPUs" for payer, gpus in sorted(by_payer.items())]
    return "Paid by " + "; ".join(parts) + "."


def _reservation_lines(run: Json, reservations: Sequence[Json]) -> list[str]:
    out: list[str] = []
    current = run.get("reservation")
    for r in reservations:
        if r.get("name") != current:
            continue
        line = (f"Reservation {current} holds its place: {r.get('deficitGPUs')} GPUs are missing; "
                f"earliest start {r.get('earliestStart')}.")
        if r.get("seed"):
            line += f" Capacity is freed by the cut order (lottery seed {str(r['seed'])[:12]})."
        out.append(line)
        conflict = r.get("conflictSet") or []
        if conflict:
            out.append("Runs the activation may cut: " + ", ".join(conflict) + ".")
    earlier = [r for r in reservations if r.get("name") != current]
    if earlier:
        out.append("Earlier reservations: " + ", ".join(f"{r.get('name')} {r.get('state')}" for r in earlier) + ".")
    return out


def _phase_hint(run: Json, d: Details) -> str | None:
    phase, reason = run.get("phase"), run.get("reason")
    if phase == "Waiting":
        if d.upstreams:
            policy = f" (on upstream failure: {d.on_upstream_failure})" if d.on_upstream_failure else ""
            return f"It starts only after its upstream runs complete: {', '.join(d.upstreams)}{policy}."
        return "It waits for its upstream runs to complete."
    if phase == "Pending":
        if reason == "Preempted":
            return "It was preempted and is queued again; it keeps its admission time."
        if reason == "Unschedulable":
            return "It cannot be placed or funded now and no reservation could be made; it is retried when capacity or budgets change."
        return "It is queued for admission, in order of admission time."
    if phase == "Reserved" and reason == "AwaitingWindow":
        return "Its funding opens later: it binds when the envelope's window opens."
    return None


def explain_lines(
    run: Json, leases: Sequence[Json], reservations: Sequence[Json], details: Details | None = None
) -> list[str]:
    """Sentences explaining one run (its STATE `runs[]` entry, its leases and reservations)."""
    d = details or Details()
    phase = str(run.get("phase"))
    message = str(run.get("message") or "").rstrip(".")
    head = f"{run.get('key')} is {phase} ({run.get('reason')})"
    lines = [f"{head}: {message}." if message else f"{head}."]
    hint = _phase_hint(run, d)
    if hint:
        lines.append(hint)
    lines += _reservation_lines(run, reservations)
    open_leases = [lease for lease in leases if lease.get("end") is None]
    width = _width_line(phase, run.get("width") or {}, open_leases)
    if width:
        lines.append(width)
    funding = run.get("funding") or {}
    line = _funding_line(funding)
    if line:
        lines.append(line)
    line = _payers_line(open_leases)
    if line:
        lines.append(line)
    if funding.get("unfunded"):
        lines.append(f"{funding['unfunded']} GPUs run unfunded: the cut order reclaims them first "
                     "when funded work needs the capacity.")
    if d.hold_down_until:
        lines.append(f"Held down after a preemption until {d.hold_down_until}: it is not re-admitted before then.")
    if d.checkpoint_deadline:
        lines.append(f"It must run again before its checkpoint deadline {d.checkpoint_deadline}, or it fails.")
    if d.upstream_failed_at:
        lines.append(f"An upstream run failed or was deleted at {d.upstream_failed_at}; the follow grace counts from then.")
    if d.eta:
        lines.append(f"The workload reported it will finish at {d.eta}.")
    if d.bound_at and phase == "Running":
        lines.append(f"Bound at {d.bound_at}.")
    if d.ended_at and phase in ("Completed", "Failed"):
        lines.append(f"Ended at {d.ended_at}.")
    closed = Counter(str(lease.get("closureReason")).split("(", 1)[0] for lease in leases if lease.get("end"))
    if closed:
        parts = [f"{n} {reason}" for reason, n in sorted(closed.items())]
        lines.append(f"{_plural(sum(closed.values()), 'closed lease')}: " + ", ".join(parts) + ".")
    if d.generation:
        lines.append(f"Submission {d.generation + 1} of this run name (earlier ones ended).")
    return lines
