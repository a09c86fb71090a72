"""The `jobtree` command: bad input exits 2 with one stderr line; output formats; --check; demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobtree.cli.main import main

REPO = Path(__file__).resolve().parents[2]
LIBS = REPO / "libs"

GOOD = """\
start: "2026-01-05T00:00:00Z"
nodes:
  - generate: {prefix: a-, count: 2, gpus: 8, labels: {region: r, cluster: c, fabric.domain: A, gpu.flavor: H100-80GB}}
steps:
  - apply:
      - {apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: j1}, spec: {owner: org:a, resources: {gpuType: H100-80GB, totalGPUs: 8}}}
  - {at: 10m, snapshot: s1}
"""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(LIBS))
    return subprocess.run(
        [sys.executable, "-m", "jobtree.cli.main", *args],
        capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=60, check=False,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- bad input: exit 2, exactly one line, no traceback (real subprocess) -------------------

BAD_SCENARIOS = {
    "yaml": ("start: [oops\n", "invalid YAML"),
    "field": (GOOD.replace("{at: 10m, snapshot: s1}", "{at: 10m, shrink: {run: default/j1, desiredTotalGPUs: 0}}"),
              "steps[1].shrink.desiredTotalGPUs: must be a positive integer, got 0"),
    "manifest": (GOOD.replace("totalGPUs: 8", "totalGPUs: -8"), "steps[0].apply[0].spec.resources.totalGPUs"),
    "backwards": (GOOD + "  - {at: 5m, snapshot: s2}\n", "steps[2].at: time moves backwards"),
    "unknown key": (GOOD + "extra: 1\n", "extra: unknown top-level key"),
    "final": (GOOD.replace("snapshot: s1", "snapshot: final"), "steps[1].snapshot"),
    "binary": ("\udcff", ""),
}


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobtree: ")
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    text, fragment = BAD_SCENARIOS[case]
    path = tmp_path / "bad.yaml"
    if case == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
        fragment = "not UTF-8"
    else:
        path.write_text(text, encoding="utf-8")
    assert_one_line_error(run_cli("sim", "run", str(path)), fragment)


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("sim", "run", str(tmp_path / "nope.yaml")), "nope.yaml: no such file")


def test_directory_exits_2(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("sim", "run", str(tmp_path)), "is a directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "required: COMMAND"),
        (("sim",), "required"),
        (("sim", "run"), "FILE"),
        (("sim", "walk", "x"), "invalid choice: 'walk'"),
        (("launch",), "invalid choice: 'launch'"),
        (("sim", "run", "x.yaml", "--output", "xml"), "invalid choice: 'xml'"),
        (("sim", "run", "x.yaml", "--bogus"), "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], fragment: str) -> None:
    assert_one_line_error(run_cli(*args), fragment)


def test_missing_check_file_exits_2(tmp_path: Path) -> None:
    scenario = write(tmp_path, "s.yaml", GOOD)
    assert_one_line_error(run_cli("sim", "run", str(scenario), "--check", str(tmp_path / "e.yaml")),
                          "e.yaml: no such file")


def test_help_exits_0() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("sim", "serve", "up", "demo"))
    proc = run_cli("sim", "run", "--help")
    assert proc.returncode == 0 and "--check" in proc.stdout and "--output" in proc.stdout


# --- playing, with the real simulator (in process) -----------------------------------------


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    assert main(["sim", "run", str(path)]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert list(doc["snapshots"]) == ["s1", "final"]
    s1 = doc["snapshots"]["s1"]
    assert s1["time"] == "2026-01-05T00:10:00Z"
    assert s1["runs"][0]["funding"]["unfunded"] == 8  # no budget: runs unfunded
    assert out.out.startswith('{\n  "snapshots": {\n    "s1"')  # indent=2, keys in output order
    assert out.err == ""


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    assert main(["sim", "run", str(path), "--output", "table"]) == 0
    out = capsys.readouterr().out
    assert "=== snapshot s1 @ 2026-01-05T00:10:00Z ===" in out
    assert "default/j1" in out and "=== snapshot final" in out


def test_check_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    expect = write(tmp_path, "s.expect.yaml",
                   "snapshots:\n  s1:\n    runs:\n      default/j1: {phase: Running, funding: {unfunded: 8}}\n"
                   "    unfundedGPUHours: {'org:a': 1.333333}\n")
    assert main(["sim", "run", str(path), "--check", str(expect)]) == 0
    err = capsys.readouterr().err
    assert "all expectations" in err and "met" in err


def test_check_fails_listing_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    expect = write(tmp_path, "s.expect.yaml",
                   "snapshots:\n  s1:\n    runs:\n      default/j1: {phase: Completed, funding: {owned: 8}}\n"
                   "  s9: {}\n")
    assert main(["sim", "run", str(path), "--check", str(expect)]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["snapshots"]["s1"]["time"] == "2026-01-05T00:10:00Z"
    lines = out.err.splitlines()
    assert lines[0].startswith("jobtree: 3 expectation(s)")
    assert any("runs[default/j1].phase: expected 'Completed', got 'Running'" in line for line in lines)
    assert any("runs[default/j1].funding.owned: expected 8, got 0" in line for line in lines)
    assert any("snapshot s9: missing from the output" in line for line in lines)


def test_malformed_check_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    expect = write(tmp_path, "e.yaml", "snapshots:\n  s1:\n    runs: [default/j1]\n")
    assert main(["sim", "run", str(path), "--check", str(expect)]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("jobtree: ") and "runs" in err[0]
    assert captured.out == ""  # rejected before playing
    expect = write(tmp_path, "e2.yaml", "- 1\n")
    assert main(["sim", "run", str(path), "--check", str(expect)]) == 2


CYCLIC = GOOD.replace("""      - {apiVersion: rq.davidlangworthy.io/v1, kind: Run""", """      - {apiVersion: rq.davidlangworthy.io/v1, kind: Budget, metadata: {name: a}, spec: {owner: org:a, parents: [org:b]}}
      - {apiVersion: rq.davidlangworthy.io/v1, kind: Budget, metadata: {name: b}, spec: {owner: org:b, parents: [org:a]}}
      - {apiVersion: rq.davidlangworthy.io/v1, kind: Run""")


def test_runtime_rejection_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A command the calculus rejects while playing (a family cycle) is one line naming the step."""
    path = write(tmp_path, "s.yaml", CYCLIC)
    assert main(["sim", "run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("jobtree: steps[0].apply")
    assert "acyclic" in captured.err and captured.out == ""


def test_demo_json_and_scenario_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", GOOD)
    assert main(["demo", "--scenario", str(path), "--output", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["snapshots"]["s1"]["time"] == "2026-01-05T00:10:00Z"


# --- reference scenarios and the demo ------------------------------------------------------

SHARED = REPO.parent / "shared" / "scenarios"
REFERENCE = sorted(p for p in SHARED.glob("*.yaml") if not p.name.endswith(".expect.yaml"))


def test_reference_scenarios_are_present() -> None:
    assert len(REFERENCE) >= 4, f"reference scenarios missing under {SHARED}"


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.name)
def test_reference_scenarios_meet_their_expectations(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "run", str(path), "--check", str(path.with_name(path.stem + ".expect.yaml"))])
    err = capsys.readouterr().err
    assert code == 0, err


def test_real_demo_plays_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for label in ("morning", "reserved", "activated", "afternoon", "evening", "final"):
        assert f"=== snapshot {label} @ " in out
    assert "Traceback" not in out


def test_real_json_output_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    demo = str(REPO / "examples" / "demo.yaml")
    assert main(["sim", "run", demo]) == 0
    first = capsys.readouterr().out
    assert main(["sim", "run", demo]) == 0
    assert capsys.readouterr().out == first
    assert set(json.loads(first)["snapshots"]) >= {"morning", "final"}


@pytest.mark.parametrize(("var", "value", "fragment"), [
    ("JOBTREE_SNAPSHOT_EVERY", "often", "JOBTREE_SNAPSHOT_EVERY must be a whole number of ledger messages"),
    ("JOBTREE_SNAPSHOT_EVERY", "-5", "got '-5'"),
    ("JOBTREE_SNAPSHOT_MIN_SECONDS", "soon", "JOBTREE_SNAPSHOT_MIN_SECONDS must be a number of seconds >= 0"),
    ("JOBTREE_SNAPSHOT_MIN_SECONDS", "-1", "got '-1'"),
])
def test_bad_snapshot_settings_stop_admission_before_it_starts(var: str, value: str, fragment: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, value)
    proc = run_cli("serve", "admission", "--nats", "nats://127.0.0.1:1")
    assert_one_line_error(proc, fragment)
