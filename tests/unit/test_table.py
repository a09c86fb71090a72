"""Human tables of the simulator output: aligned columns, every section, `(none)` when empty."""

from __future__ import annotations

from typing import Any

from jobtree.sim.table import format_columns, render_tables


def snapshot_state() -> dict[str, Any]:
    return {
        "time": "2026-01-05T00:20:00Z",
        "runs": [
            {"key": "default/j4", "owner": "org:team-c", "phase": "Running", "reason": "Started",
             "message": "", "width": {"min": 30, "max": 30, "desired": 30, "allocated": 30},
             "funding": {"owned": 30, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0},
             "reservation": "default.j4.r000", "earliestStart": None},
            {"key": "default/opp", "owner": "org:team-d", "phase": "Pending", "reason": "NoCapacity",
             "message": "", "width": {"min": 8, "max": 8, "desired": 8, "allocated": 0},
             "funding": {"owned": 0, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0},
             "reservation": None, "earliestStart": None},
        ],
        "leases": [
            {"name": "default.j4.00000", "run": "default/j4", "end": None},
            {"name": "default.opp.00000", "run": "default/opp", "end": "2026-01-05T00:16:00Z"},
        ],
        "reservations": [
            {"name": "default.j4.r000", "run": "default/j4", "state": "Released",
             "earliestStart": "2026-01-05T00:16:00Z", "deficitGPUs": 24,
             "seed": "0123456789abcdef0123", "conflictSet": ["default/opp"]},
        ],
        "budgets": [
            {"name": "team-c", "owner": "org:team-c", "envelopes": [
                {"name": "west", "concurrency": 32, "funded": {"owned": 30, "shared": 0, "borrowed": 0, "spare": 0},
                 "headroom": 2, "consumedGPUHours": 2.0}]},
            {"name": "team-z", "owner": "org:team-z", "envelopes": []},
        ],
        "unfundedGPUHours": {"org:team-d": 4.25},
    }


def empty_state() -> dict[str, Any]:
    return {"time": "2026-01-05T01:00:00Z", "runs": [], "leases": [], "reservations": [], "budgets": [],
            "unfundedGPUHours": {}}


def lines_after(text: str, title: str) -> list[str]:
    """The lines of the section titled `title`, up to the next blank line."""
    lines = text.splitlines()
    out: list[str] = []
    for line in lines[lines.index(title) + 1:]:
        if not line:
            break
        out.append(line)
    return out


def test_format_columns_aligns_and_right_justifies_numbers() -> None:
    text = format_columns(["NAME", "N"], [["a", "1"], ["longer", "100"]], [False, True])
    assert text.splitlines() == ["NAME      N", "a         1", "longer  100"]


def test_format_columns_empty() -> None:
    assert format_columns(["A"], []) == "(none)"


def test_snapshot_sections() -> None:
    text = render_tables({"snapshots": {"activated": snapshot_state()}})
    assert text.splitlines()[0] == "=== snapshot activated @ 2026-01-05T00:20:00Z ==="
    assert "leases: 1 open, 1 closed" in text

    runs = lines_after(text, "Runs")
    assert runs[0].split() == ["RUN", "OWNER", "PHASE", "REASON", "ALLOC/DESIRED", "OWNED", "SHARED", "BORROWED",
                               "UNFUNDED", "SPARE", "RESERVATION"]
    assert runs[1].split() == ["default/j4", "org:team-c", "Running", "Started", "30/30", "30", "0", "0", "0", "0",
                               "default.j4.r000"]
    assert runs[2].split() == ["default/opp", "org:team-d", "Pending", "NoCapacity", "0/8", "0", "0", "0", "0", "0",
                               "-"]
    # columns line up: every row's PHASE starts where the header's does
    col = runs[0].index("PHASE")
    assert all(r[col:].startswith(("Running", "Pending")) for r in runs[1:])
    # numbers are right-aligned: OWNED values end where the header ends
    end = runs[0].index("OWNED") + len("OWNED")
    assert [r[end - 2:end] for r in runs[1:]] == ["30", " 0"]

    res = lines_after(text, "Reservations")
    assert res[1].split() == ["default.j4.r000", "default/j4", "Released", "2026-01-05T00:16:00Z", "24",
                              "0123456789ab"]

    budgets = lines_after(text, "Budgets")
    assert budgets[0].split() == ["BUDGET", "ENVELOPE", "CONCURRENCY", "OWNED", "SHARED", "BORROWED", "HEADROOM",
                                  "GPU-HOURS"]
    assert budgets[1].split() == ["team-c", "west", "32", "30", "0", "0", "2", "2.00"]
    assert budgets[2].split()[0] == "team-z"

    unfunded = lines_after(text, "Unfunded GPU-hours")
    assert unfunded[1].split() == ["org:team-d", "4.25"]


def test_empty_sections_print_none() -> None:
    text = render_tables({"snapshots": {"final": empty_state()}})
    for title in ("Runs", "Reservations", "Budgets", "Unfunded GPU-hours"):
        assert lines_after(text, title) == ["(none)"], title


def test_snapshots_in_output_order_and_missing_fields_tolerated() -> None:
    text = render_tables({"snapshots": {"b": empty_state(), "a": {"runs": [{"key": "x/y"}]}, "final": {}}})
    headers = [line for line in text.splitlines() if line.startswith("=== ")]
    assert headers == ["=== snapshot b @ 2026-01-05T01:00:00Z ===", "=== snapshot a @ - ===",
                       "=== snapshot final @ - ==="]
    assert "x/y" in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_no_snapshots() -> None:
    assert render_tables({"snapshots": {}}) == "(no snapshots)\n"
    assert render_tables({}) == "(no snapshots)\n"


def test_no_trailing_whitespace() -> None:
    text = render_tables({"snapshots": {"activated": snapshot_state()}})
    assert all(line == line.rstrip() for line in text.splitlines())
