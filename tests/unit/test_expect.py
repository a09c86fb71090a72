"""The partial-expectation checker finds every kind of mismatch and accepts what matches."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobtree.sim.expect import ExpectError, check_expectations, validate_expectations

SHARED = Path("/work/shared/scenarios")
EXPECT_FILES = sorted(SHARED.glob("*.expect.yaml")) if SHARED.is_dir() else []


def lease(name: str, run: str, group: int, node: str, *, role: str = "Active", end: str | None = None,
          reason: str | None = None, gpus: int = 8) -> dict[str, Any]:
    return {
        "name": name, "run": run, "owner": "org:t", "group": group, "role": role,
        "slots": [f"{node}#{i}" for i in range(gpus)],
        "paidBy": {"budget": "team-t", "envelope": "west"},
        "class": "owned" if end is None else None,
        "start": "2026-01-05T00:00:00Z", "end": end, "mintReason": "Start", "closureReason": reason,
    }


def state() -> dict[str, Any]:
    return {
        "time": "2026-01-05T01:00:00Z",
        "runs": [
            {"key": "t/e1", "owner": "org:t", "phase": "Running", "reason": "Running", "message": "running",
             "width": {"min": 16, "max": 48, "desired": 24, "allocated": 24},
             "funding": {"owned": 24, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0},
             "reservation": None, "earliestStart": None},
            {"key": "t/j4", "owner": "org:t", "phase": "Reserved", "reason": "Reserved", "message": "waits",
             "width": {"min": 30, "max": 30, "desired": 30, "allocated": 0},
             "funding": {"owned": 0, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0},
             "reservation": "t.j4.r001", "earliestStart": "2026-01-05T00:16:00Z"},
        ],
        "leases": [
            lease("t.e1.00000", "t/e1", 0, "a-00"),
            lease("t.e1.00001", "t/e1", 1, "a-01"),
            lease("t.e1.00002", "t/e1", 2, "a-02", gpus=4),
            lease("t.e1.00003", "t/e1", 2, "a-03", gpus=4),
            lease("t.e1.00004", "t/e1", 3, "b-00", end="2026-01-05T01:00:00Z", reason="Shrink"),
            lease("t.e1.00005", "t/e1", 4, "b-01", end="2026-01-05T01:00:00Z", reason="Shrink"),
            lease("t.e1.00006", "t/e1", 4, "b-02", role="Spare", end="2026-01-05T01:00:00Z", reason="DropSpare"),
            lease("t.opp.00000", "t/opp", 0, "b-03", end="2026-01-05T00:16:00Z", reason="ReclaimUnfunded(ab12cd)"),
        ],
        "reservations": [
            {"name": "t.j4.r000", "run": "t/j4", "state": "Failed", "earliestStart": "2026-01-05T00:10:00Z",
             "deficitGPUs": 30, "seed": None, "conflictSet": []},
            {"name": "t.j4.r001", "run": "t/j4", "state": "Pending", "earliestStart": "2026-01-05T00:16:00Z",
             "deficitGPUs": 24, "seed": "00ff", "conflictSet": ["t/opp"]},
        ],
        "budgets": [
            {"name": "team-t", "owner": "org:t", "envelopes": [
                {"name": "west", "concurrency": 64, "funded": {"owned": 24, "shared": 0, "borrowed": 0, "spare": 0},
                 "headroom": 40, "consumedGPUHours": 8.0000001}]},
        ],
        "unfundedGPUHours": {"org:t": 4.0},
    }


def output() -> dict[str, Any]:
    return {"snapshots": {"shrunk": state(), "final": state()}}


FULL_EXPECT = """
snapshots:
  shrunk:
    time: "2026-01-05T01:00:00Z"
    runs:
      t/e1: {phase: Running, width: {desired: 24, allocated: 24}, funding: {owned: 24.0}, reservation: null}
      t/j4: {phase: Reserved, earliestStart: "2026-01-05T00:16:00Z"}
    reservationsByRun:
      t/j4: {state: Pending, deficitGPUs: 24, conflictSet: [t/opp]}
    budgets:
      team-t: {west: {funded: {owned: 24}, headroom: 40, consumedGPUHours: 8.0}}
    groupDomains:
      t/e1: {0: a, 1: a, 2: a}
    closedGroups:
      t/e1: {3: Shrink, 4: Shrink}
    closureReasonPrefixes:
      t/e1: [Shrink, DropSpare]
      t/opp: [ReclaimUnfunded(]
    unfundedGPUHours: {"org:t": 4.0, "org:nobody": 0}
    leases:
      t.e1.00000: {group: 0, slots: ["a-00#0", "a-00#1", "a-00#2", "a-00#3", "a-00#4", "a-00#5", "a-00#6", "a-00#7"]}
  final:
    runs:
      t/e1: {phase: Running}
"""


def check(expect_yaml: str, out: dict[str, Any] | None = None) -> list[str]:
    return check_expectations(out if out is not None else output(), yaml.safe_load(expect_yaml))


def test_everything_matches() -> None:
    assert check(FULL_EXPECT) == []


def test_empty_expectations_match() -> None:
    assert check("snapshots: {}") == []
    assert check("snapshots: {shrunk: {}}") == []


@pytest.mark.parametrize(
    ("expect", "fragment"),
    [
        ("snapshots: {later: {runs: {t/e1: {phase: Running}}}}", "snapshot later: missing from the output"),
        ("snapshots: {shrunk: {runs: {t/nope: {phase: Running}}}}", "runs[t/nope]: no run t/nope"),
        ("snapshots: {shrunk: {runs: {t/e1: {phase: Pending}}}}", "runs[t/e1].phase: expected 'Pending', got 'Running'"),
        ("snapshots: {shrunk: {runs: {t/e1: {width: {allocated: 16}}}}}", "runs[t/e1].width.allocated: expected 16, got 24"),
        ("snapshots: {shrunk: {runs: {t/e1: {funding: {lent: 0}}}}}", "runs[t/e1].funding.lent: missing from the output"),
        ("snapshots: {shrunk: {runs: {t/e1: {reservation: x}}}}", "runs[t/e1].reservation: expected 'x', got null"),
        ("snapshots: {shrunk: {runs: {t/j4: {reservation: null}}}}", "expected null, got 't.j4.r001'"),
        ("snapshots: {shrunk: {runs: {t/e1: {phase: 1}}}}", "runs[t/e1].phase: expected 1, got 'Running'"),
        ("snapshots: {shrunk: {time: '2026-01-05T02:00:00Z'}}", "time: expected '2026-01-05T02:00:00Z'"),
        ("snapshots: {shrunk: {reservationsByRun: {t/e1: {state: Pending}}}}", "reservationsByRun[t/e1]: run t/e1 has no reservation"),
        ("snapshots: {shrunk: {reservationsByRun: {t/j4: {state: Released}}}}", "reservationsByRun[t/j4].state: expected 'Released', got 'Pending'"),
        ("snapshots: {shrunk: {reservationsByRun: {t/j4: {conflictSet: []}}}}", "conflictSet: expected 0 items, got 1"),
        ("snapshots: {shrunk: {budgets: {team-x: {west: {headroom: 0}}}}}", "budgets[team-x]: no budget team-x"),
        ("snapshots: {shrunk: {budgets: {team-t: {east: {headroom: 0}}}}}", "budgets[team-t/east]: budget team-t has no envelope east"),
        ("snapshots: {shrunk: {budgets: {team-t: {west: {headroom: 0}}}}}", "budgets[team-t/west].headroom: expected 0, got 40"),
        ("snapshots: {shrunk: {budgets: {team-t: {west: {consumedGPUHours: 8.01}}}}}", "consumedGPUHours: expected 8.01, got 8.0000001"),
        ("snapshots: {shrunk: {groupDomains: {t/e1: {0: a, 1: a, 2: b}}}}", "groupDomains[t/e1][2]: expected every open Active lease on b-* nodes, found a-02, a-03"),
        ("snapshots: {shrunk: {groupDomains: {t/e1: {0: a, 1: a, 2: a, 3: b}}}}", "groupDomains[t/e1][3]: expected open Active leases on b-* nodes, found none"),
        ("snapshots: {shrunk: {groupDomains: {t/e1: {0: a, 1: a}}}}", "groupDomains[t/e1][2]: group 2 holds open Active leases on a-02, a-03 but is not listed"),
        ("snapshots: {shrunk: {groupDomains: {t/zz: {0: a}}}}", "groupDomains[t/zz][0]: expected open Active leases"),
        ("snapshots: {shrunk: {closedGroups: {t/e1: {1: Shrink}}}}", "closedGroups[t/e1][1]: lease t.e1.00001 is still open"),
        ("snapshots: {shrunk: {closedGroups: {t/e1: {3: Completed}}}}", "closedGroups[t/e1][3]: lease t.e1.00004 closed 'Shrink', expected 'Completed'"),
        ("snapshots: {shrunk: {closedGroups: {t/e1: {9: Shrink}}}}", "closedGroups[t/e1][9]: no Active leases of group 9"),
        ("snapshots: {shrunk: {closureReasonPrefixes: {t/e1: [RandomPreempt(]}}}", "closureReasonPrefixes[t/e1]: no closed lease with a closure reason starting 'RandomPreempt('"),
        ("snapshots: {shrunk: {closureReasonPrefixes: {t/zz: [Shrink]}}}", "(closure reasons: none)"),
        ("snapshots: {shrunk: {unfundedGPUHours: {'org:t': 3.5}}}", "unfundedGPUHours[org:t]: expected 3.5, got 4.0"),
        ("snapshots: {shrunk: {unfundedGPUHours: {'org:x': 1.0}}}", "unfundedGPUHours[org:x]: expected 1.0, got 0.0"),
        ("snapshots: {shrunk: {leases: {t.e1.99999: {group: 0}}}}", "leases[t.e1.99999]: no item t.e1.99999"),
        ("snapshots: {shrunk: {leases: {t.e1.00000: {end: '2026-01-05T01:00:00Z'}}}}", "leases[t.e1.00000].end: expected '2026-01-05T01:00:00Z', got null"),
        ("snapshots: {shrunk: {nonsense: 1}}", "snapshot shrunk: nonsense: missing from the output"),
    ],
)
def test_each_mismatch_is_reported(expect: str, fragment: str) -> None:
    problems = check(expect)
    assert len(problems) == 1, problems
    assert fragment in problems[0], problems[0]
    assert problems[0].startswith("snapshot ")


def test_tolerance_is_1e_6() -> None:
    assert check("snapshots: {shrunk: {budgets: {team-t: {west: {consumedGPUHours: 8.0}}}}}") == []
    out = output()
    out["snapshots"]["shrunk"]["budgets"][0]["envelopes"][0]["consumedGPUHours"] = 8.00001
    assert len(check("snapshots: {shrunk: {budgets: {team-t: {west: {consumedGPUHours: 8.0}}}}}", out)) == 1


def test_booleans_are_not_numbers() -> None:
    out = output()
    out["snapshots"]["shrunk"]["runs"][0]["funding"]["owned"] = True
    assert check("snapshots: {shrunk: {runs: {t/e1: {funding: {owned: 1}}}}}", out) != []


def test_several_mismatches_are_all_listed() -> None:
    problems = check(
        "snapshots: {shrunk: {runs: {t/e1: {phase: Completed, width: {allocated: 0}}}}, gone: {}}"
    )
    assert len(problems) == 3


def test_missing_lists_are_mismatches() -> None:
    out = output()
    for key in ("runs", "leases", "reservations", "budgets", "unfundedGPUHours"):
        del out["snapshots"]["shrunk"][key]
    problems = check(FULL_EXPECT, out)
    for key in ("runs", "reservationsByRun", "budgets", "groupDomains", "closedGroups",
                "closureReasonPrefixes", "unfundedGPUHours", "leases"):
        assert any(f": {key}" in p for p in problems), (key, problems)


def test_output_without_snapshots() -> None:
    assert check_expectations({}, {"snapshots": {"a": {}}}) == ["output: has no `snapshots` mapping"]


def test_reference_expectation_shapes_are_accepted() -> None:
    # The shapes used by /work/shared/scenarios/*.expect.yaml (integer group keys, nested envelopes).
    out = copy.deepcopy(output())
    expect = yaml.safe_load(
        "snapshots:\n  shrunk:\n    groupDomains:\n      t/e1: {0: a, 1: a, 2: a}\n"
        "    closedGroups:\n      t/e1: {3: Shrink, 4: Shrink}\n"
        "    budgets:\n      team-t: {west: {consumedGPUHours: 8.0}}\n"
    )
    assert check_expectations(out, expect) == []


@pytest.mark.parametrize(
    "expect",
    [
        [],
        {"snapshot": {}},
        {"snapshots": []},
        {"snapshots": {"shrunk": 3}},
        {"snapshots": {"shrunk": {"runs": []}}},
        {"snapshots": {"shrunk": {"budgets": {"team-t": [1]}}}},
        {"snapshots": {"shrunk": {"groupDomains": {"t/e1": {"x": "a"}}}}},
        {"snapshots": {"shrunk": {"closureReasonPrefixes": {"t/e1": 3}}}},
        {"snapshots": {"shrunk": {"closedGroups": {"t/e1": {"3": None}}}}},
        {"snapshots": {"shrunk": {"unfundedGPUHours": {"org:t": "4h"}}}},
        {"snapshots": {"shrunk": {"reservationsByRun": {"t/j4": "Pending"}}}},
    ],
)
def test_malformed_expectations_raise(expect: Any) -> None:
    with pytest.raises(ExpectError):
        check_expectations(output(), expect)


@pytest.mark.parametrize("path", EXPECT_FILES, ids=lambda p: p.name)
def test_reference_expectation_files_are_well_formed(path: Path) -> None:
    validate_expectations(yaml.safe_load(path.read_text(encoding="utf-8")))


def test_absent_items() -> None:
    """`{absent: true}` asserts a keyed item is missing (e.g. a deleted run leaves `runs`)."""
    output = {"snapshots": {"s": {"runs": [{"key": "a/x", "phase": "Running"}]}}}
    ok = {"snapshots": {"s": {"runs": {"a/gone": {"absent": True}}}}}
    assert check_expectations(output, ok) == []
    bad = {"snapshots": {"s": {"runs": {"a/x": {"absent": True}}}}}
    problems = check_expectations(output, bad)
    assert len(problems) == 1 and "expected no run a/x" in problems[0]
