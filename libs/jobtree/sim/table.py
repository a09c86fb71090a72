"""Human-readable tables of the simulator's JSON output (SCENARIOS.md, "Output").

Contract: `render_tables(output)` turns `{"snapshots": {label: STATE}}` into plain aligned text:
per snapshot a header line (label and time), then runs, reservations, budgets and unfunded
GPU-hours per owner; an empty section prints `(none)`. Tolerates missing fields (prints `-`).
Deterministic: snapshots in output order, rows in the order of the output lists.
Not: a parser — the JSON is the machine interface, these tables are for people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SEED_CHARS = 12
NONE = "(none)"


def format_columns(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] = ()) -> str:
    """An aligned text table: two spaces between columns, numeric (`right`) columns right-aligned."""
    if not rows:
        return NONE
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    align = [i < len(right) and right[i] for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if a else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _get(m: object, *path: str) -> object:
    for key in path:
        if not isinstance(m, Mapping):
            return None
        m = m.get(key)
    return m


def _list(v: object) -> list[Mapping[str, Any]]:
    if not isinstance(v, list):
        return []
    return [x for x in v if isinstance(x, Mapping)]


def render_runs(state: Mapping[str, Any]) -> str:
    headers = [
        "RUN",
        "OWNER",
        "PHASE",
        "REASON",
        "ALLOC/DESIRED",
        "OWNED",
        "SHARED",
        "BORROWED",
        "UNFUNDED",
        "SPARE",
        "RESERVATION",
    ]
    rows = []
    for r in _list(state.get("runs")):
        width = f"{_cell(_get(r, 'width', 'allocated'))}/{_cell(_get(r, 'width', 'desired'))}"
        rows.append(
            [
                _cell(r.get("key")),
                _cell(r.get("owner")),
                _cell(r.get("phase")),
                _cell(r.get("reason")),
                width,
                *(_cell(_get(r, "funding", k)) for k in ("owned", "shared", "borrowed", "unfunded", "spare")),
                _cell(r.get("reservation")),
            ]
        )
    right = [False] * 4 + [True] * 6 + [False]
    return format_columns(headers, rows, right)


def render_reservations(state: Mapping[str, Any]) -> str:
    headers = ["RESERVATION", "RUN", "STATE", "EARLIEST START", "DEFICIT", "SEED"]
    rows = []
    for r in _list(state.get("reservations")):
        seed = r.get("seed")
        rows.append(
            [
                _cell(r.get("name")),
                _cell(r.get("run")),
                _cell(r.get("state")),
                _cell(r.get("earliestStart")),
                _cell(r.get("deficitGPUs")),
                _cell(seed[:SEED_CHARS] if isinstance(seed, str) else seed),
            ]
        )
    return format_columns(headers, rows, [False, False, False, False, True, False])


def render_budgets(state: Mapping[str, Any]) -> str:
    headers = ["BUDGET", "ENVELOPE", "CONCURRENCY", "OWNED", "SHARED", "BORROWED", "HEADROOM", "GPU-HOURS"]
    rows = []
    for b in _list(state.get("budgets")):
        envelopes = _list(b.get("envelopes"))
        if not envelopes:
            rows.append([_cell(b.get("name")), "-", *(["-"] * 6)])
        for e in envelopes:
            rows.append(
                [
                    _cell(b.get("name")),
                    _cell(e.get("name")),
                    _cell(e.get("concurrency")),
                    *(_cell(_get(e, "funded", k)) for k in ("owned", "shared", "borrowed")),
                    _cell(e.get("headroom")),
                    _cell(e.get("consumedGPUHours")),
                ]
            )
    return format_columns(headers, rows, [False, False] + [True] * 6)


def render_unfunded(state: Mapping[str, Any]) -> str:
    hours = state.get("unfundedGPUHours")
    rows = []
    if isinstance(hours, Mapping):
        rows = [
            [str(owner), _cell(float(h) if isinstance(h, int | float) else h)] for owner, h in hours.items()
        ]
    return format_columns(["OWNER", "UNFUNDED GPU-HOURS"], rows, [False, True])


def render_snapshot(label: str, state: Mapping[str, Any]) -> str:
    leases = _list(state.get("leases"))
    open_leases = sum(1 for le in leases if le.get("end") is None)
    header = f"=== snapshot {label} @ {_cell(state.get('time'))} ==="
    parts = [
        header,
        f"leases: {open_leases} open, {len(leases) - open_leases} closed",
        "",
        "Runs",
        render_runs(state),
        "",
        "Reservations",
        render_reservations(state),
        "",
        "Budgets",
        render_budgets(state),
        "",
        "Unfunded GPU-hours",
        render_unfunded(state),
    ]
    return "\n".join(parts)


def render_tables(output: Mapping[str, Any]) -> str:
    """All snapshots of a simulator output as text tables, separated by blank lines."""
    snapshots = output.get("snapshots")
    if not isinstance(snapshots, Mapping) or not snapshots:
        return "(no snapshots)\n"
    blocks = [
        render_snapshot(str(label), state if isinstance(state, Mapping) else {})
        for label, state in snapshots.items()
    ]
    return "\n\n".join(blocks) + "\n"
