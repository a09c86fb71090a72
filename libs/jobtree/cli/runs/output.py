"""Output helpers: tables, rows of runs and leases, pods, usage and plans as text or JSON.

Part of `kubectl-runs` (`jobtree.cli.runs`): see the package docstring for the contract.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from jobtree.cli.runs.options import Json, RunsError

# ================================================================================================
# Output helpers
# ================================================================================================


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] = ()) -> str:
    from jobtree.sim.table import format_columns

    return format_columns(headers, [[_cell(c) for c in row] for row in rows], right)


def _cell(v: object) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}" if v == int(v) else f"{v:.2f}"
    return str(v)


def _ints(value: Any) -> Any:
    """Integral floats back to ints (a protobuf Struct carries every JSON number as a double)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


SIM_RUN_ORDER = {
    "": ("key", "owner", "phase", "reason", "message", "width", "funding", "reservation", "earliestStart"),
    "width": ("min", "max", "desired", "allocated"),
    "funding": ("owned", "shared", "borrowed", "unfunded", "spare"),
}
"""The key order of a run in the simulator's output (SCENARIOS.md STATE.runs[])."""


def sim_run(view: Mapping[str, Any]) -> Json:
    """A run of the simulator's schema (e.g. from a protobuf Struct) in the simulator's key order."""

    def order(value: Mapping[str, Any], keys: Sequence[str], at: str) -> Json:
        known = [k for k in keys if k in value] + sorted(k for k in value if k not in keys)
        return {k: order(value[k], SIM_RUN_ORDER.get(k, ()), k) if isinstance(value[k], Mapping) and not at
                else _ints(value[k]) for k in known}

    return order(view, SIM_RUN_ORDER[""], "")


def _dump(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _split_key(key: str) -> tuple[str, str]:
    ns, _, name = key.partition("/")
    return ns, name


def _run_key(name: str, namespace: str) -> str:
    if "/" in name:
        ns, _, short = name.partition("/")
        if not ns or not short:
            raise RunsError(f"a run is NAME or NAMESPACE/NAME, got {name!r}")
        return name
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class LeaseRow:
    """A lease as both modes show it (from a GPULease message or the simulator's JSON)."""

    name: str
    run: str
    group: int
    role: str
    slots: tuple[str, ...]
    paid_by: str | None
    start: str | None
    end: str | None
    closure: str | None

    @property
    def node(self) -> str:
        return self.slots[0].split("#", 1)[0] if self.slots else "-"

    @property
    def open(self) -> bool:
        return self.end is None


def _lease_rows_table(rows: Sequence[LeaseRow]) -> str:
    return _table(["LEASE", "RUN", "GROUP", "ROLE", "NODE", "GPUS", "PAID BY", "START", "END", "CLOSURE"],
                  [[r.name, r.run, r.group, r.role, r.node, len(r.slots), r.paid_by, r.start, r.end, r.closure]
                   for r in rows], [False, False, True, False, False, True])


def pods_of(rows: Sequence[LeaseRow]) -> list[Json]:
    """The workload pods the kube-bridge makes of a run's open Active leases: one per lease (one
    node, one group) for the run's first role, named by `jobtree.api.crds.pod_name` (a spare
    lease has none)."""
    from jobtree.api.crds import pod_name

    out = []
    for r in sorted((r for r in rows if r.open and r.role == "Active"), key=lambda r: (r.group, r.name)):
        out.append({
            "pod": pod_name(r.name, r.group),
            "node": r.node,
            "group": r.group,
            "role": r.role,
            "gpus": len(r.slots),
            "gpuIndices": [int(s.split("#", 1)[1]) for s in r.slots],
            "lease": r.name,
        })
    return out


def _pods_table(pods: Sequence[Json]) -> str:
    return _table(["POD", "NODE", "GROUP", "ROLE", "GPUS", "GPU INDICES", "LEASE"],
                  [[p["pod"], p["node"], p["group"], p["role"], p["gpus"], ",".join(map(str, p["gpuIndices"])),
                    p["lease"]] for p in pods], [False, False, True, False, True])


@dataclass(frozen=True)
class RunRow:
    key: str
    owner: str
    phase: str
    reason: str
    gpus: str
    message: str


def _runs_table(rows: Sequence[RunRow]) -> str:
    return _table(["RUN", "OWNER", "PHASE", "REASON", "GPUS", "MESSAGE"],
                  [[r.key, r.owner, r.phase, r.reason, r.gpus, r.message] for r in rows],
                  [False, False, False, False, True])


def _usage_table(envelopes: Sequence[Json], unfunded: Mapping[str, float]) -> str:
    rows = [[e["budget"], e["envelope"], e.get("owner"), e.get("flavor"), e["concurrency"],
             e["funded"]["owned"], e["funded"]["shared"], e["funded"]["borrowed"], e["funded"]["spare"],
             e["headroom"], e["consumedGPUHours"], e.get("maxGPUHours")] for e in envelopes]
    text = _table(["BUDGET", "ENVELOPE", "OWNER", "FLAVOR", "CONCURRENCY", "OWNED", "SHARED", "BORROWED", "SPARE",
                   "HEADROOM", "GPU-HOURS", "MAX GPU-HOURS"], rows,
                  [False, False, False, False, True, True, True, True, True, True, True, True])
    if unfunded:
        text += "\n\nUnfunded GPU-hours\n" + _table(["OWNER", "GPU-HOURS"], sorted(unfunded.items()), [False, True])
    return text


def global_usage_text(resp: Any) -> str:
    """`global usage` as text: a line per cap (the cap in force, a lower pending, the last
    rebalance and the cut seed), then a row per cluster."""
    from jobtree.core.timefmt import format_time

    if not resp.caps:
        return "no aggregate caps span clusters"
    parts = []
    for cap in resp.caps:
        head = f"{cap.cap}: cap {cap.max_concurrency} GPUs"
        if cap.HasField("lowering_to"):
            head += f" (lowering to {cap.lowering_to})"
        if cap.HasField("max_gpu_hours"):
            head += f", {cap.max_gpu_hours:g} GPU-hours"
        head += (f"; last rebalance {format_time(cap.last_rebalance.seconds)}, cut seed {cap.cut_seed}"
                 if cap.last_rebalance.seconds else "; not rebalanced yet")
        rows = [[c.cluster, c.allowance, c.held, c.pending if c.HasField("pending") else None, c.target, c.funded,
                 c.demand, round(c.spent_gpu_hours, 3),
                 c.allowance_gpu_hours if c.HasField("allowance_gpu_hours") else None,
                 "yes" if c.reachable else "no",
                 format_time(c.last_report.seconds) if c.last_report.seconds else None] for c in cap.clusters]
        parts.append(head + "\n" + _table(
            ["CLUSTER", "ALLOWANCE", "HELD", "PENDING", "TARGET", "FUNDED", "DEMAND", "GPU-HOURS", "ALLOWED GPU-HOURS",
             "REACHABLE", "LAST REPORT"], rows,
            [False, True, True, True, True, True, True, True, True, False, False]))
    return "\n\n".join(parts)


def _plan_text(plan: Json) -> str:
    lines = [f"{plan['run']}: fits now: {_cell(plan['fitsNow'])}"]
    if plan.get("earliestStart"):
        lines.append(f"earliest start: {plan['earliestStart']}")
    if plan.get("placement"):
        lines.append(_table(["GROUP", "DOMAIN", "GPUS", "SPARES"],
                            [[p.get("group", 0), p.get("domain"), p.get("gpus", 0), p.get("spares", 0)]
                             for p in plan["placement"]], [True, False, True, True]))
    if plan.get("funding"):
        lines.append(_table(["PAID BY", "CLASS", "GPUS"],
                            [[_paid_text(f.get("paidBy")), f.get("fundingClass"), f.get("gpus", 0)]
                             for f in plan["funding"]], [False, False, True]))
    lines += [f"- {r}" for r in plan.get("reasons", [])]
    return "\n".join(lines)


def _paid_text(paid: object) -> str | None:
    if isinstance(paid, Mapping) and paid.get("budget"):
        return f"{paid.get('budget')}/{paid.get('envelope')}"
    return None


def _print_plans(plans: Sequence[Json], output: str, out: TextIO) -> None:
    if output == "json":
        _dump(plans, out)
    else:
        out.write("\n\n".join(_plan_text(p) for p in plans) + "\n")


def _print_usage(envelopes: Sequence[Json], unfunded: Mapping[str, float], output: str, out: TextIO) -> None:
    if output == "json":
        _dump({"envelopes": list(envelopes), "unfundedGPUHours": dict(unfunded)}, out)
    else:
        out.write(_usage_table(envelopes, unfunded) + "\n")


def _print_pods(pods: Sequence[Json], output: str, out: TextIO) -> None:
    if output == "json":
        _dump(list(pods), out)
    else:
        out.write(_pods_table(pods) + "\n")


def _to_dict(msg: Any) -> Json:
    from google.protobuf import json_format

    out: Json = _ints(json_format.MessageToDict(msg))
    return out


def kinds_of(text: str) -> list[str]:
    """`--kinds A,B` checked against the event kinds (RunsError naming the unknown one)."""
    from jobtree.api.events import KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise RunsError(f"--kinds: unknown kind {k!r}; kinds: {', '.join(KINDS)}")
    return kinds


def print_events(events: Iterable[Any], output: str, out: TextIO) -> int:
    """Events as CloudEvents JSON lines, or as a table printed row by row (for -w)."""
    from jobtree.api.events import cloudevent
    from jobtree.core.timefmt import format_time

    header = False
    count = 0
    for e in events:
        count += 1
        if output == "json":
            out.write(json.dumps(cloudevent(e)) + "\n")
        else:
            if not header:
                out.write(f"{'TIME':<20}  {'SEQ':>6}  {'KIND':<24} {'SUBJECT':<32} MESSAGE\n")
                header = True
            out.write(f"{format_time(e.time.seconds):<20}  {e.ledger_sequence:>6}  {e.kind:<24} "
                      f"{e.subject:<32} {e.message}\n")
        out.flush()
    if not count and output != "json":
        out.write("(none)\n")
    return count


def print_burn(owner: str, envelopes: Sequence[Json], at: str, output: str, out: TextIO) -> int:
    """`budgets burn OWNER`: each of the owner's envelopes as `pictures.burn` (JSON: the numbers)."""
    from jobtree.cli.runs.pictures import burn
    from jobtree.core.timefmt import format_time, parse_time

    mine = [e for e in envelopes if e["owner"] == owner]
    if not mine:
        raise RunsError(f"owner {owner!r} has no envelope (see `budgets list`)")
    rows = []
    for e in mine:
        funded = sum(e["funded"].get(k, 0) for k in ("owned", "shared", "borrowed"))
        cap, used = e.get("maxGPUHours"), float(e["consumedGPUHours"])
        exhausts = None
        if cap and funded and used < cap:
            exhausts = format_time(parse_time(at) + int((cap - used) * 3600 / funded))
        rows.append({**e, "fundedNow": funded, "at": at, "exhaustsAt": exhausts})
    if output == "json":
        _dump(rows, out)
    else:
        out.write("\n".join(burn(f"{r['budget']}/{r['envelope']}", float(r["consumedGPUHours"]), r.get("maxGPUHours"),
                                  r["fundedNow"], at, r["exhaustsAt"]) for r in rows) + "\n")
    return len(rows)


def print_top(nodes: Sequence[Any], slots: Sequence[Any], args: Any, output: str, out: TextIO) -> None:
    from jobtree.cli.runs.pictures import fleet

    if output == "json":
        _dump({"nodes": [n.__dict__ for n in nodes], "slots": [s.__dict__ for s in slots]}, out)
        return
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    out.write(fleet(nodes, slots, color=color, summary=args.summary) + "\n")
