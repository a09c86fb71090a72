"""`kubectl-runs`: argument parsing, one-line errors, completions and the offline simulator mode.

The errors are checked on a real subprocess (exactly one stderr line, no traceback); parsing
and `--local` run in process. The commands against real servers are in
tests/e2e/test_kubectl_runs.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobtree.cli import runs
from jobtree.cli.runs import (
    EXIT_BAD_INPUT,
    EXIT_UNAVAILABLE,
    build_parser,
    completion_script,
    main,
    options_of,
)

REPO = Path(__file__).resolve().parents[2]
LIBS = REPO / "libs"

STATE = """\
# a small cluster for kubectl-runs --local
start: "2026-01-05T00:00:00Z"
nodes:
  - generate: {prefix: a-, count: 2, gpus: 8, labels: {region: r, cluster: c, fabric.domain: A, gpu.flavor: H100-80GB}}
steps:
  - {at: 0s, snapshot: empty}
"""

MANIFESTS = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team-a}
spec:
  owner: org:a
  envelopes:
    - {name: main, flavor: H100-80GB, selector: {cluster: c}, concurrency: 8}
---
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: train}
spec:
  owner: org:a
  resources: {gpuType: H100-80GB, totalGPUs: 12}
  locality: {groupGPUs: 4}
  malleable: {minTotalGPUs: 4, maxTotalGPUs: 12, stepGPUs: 4}
"""

BAD = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: bad}
spec: {owner: org:a, resources: {gpuType: H100-80GB, totalGPU: 8}}
"""


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "JOBTREE_SERVER"}
    full_env.update(PYTHONPATH=str(LIBS), **(env or {}))
    return subprocess.run([sys.executable, "-m", "jobtree.cli.runs", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=60, check=False, input=stdin)


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, fragment: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kubectl-runs: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_in_process(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out, err)
    return code, out.getvalue(), err.getvalue()


# --- parsing -------------------------------------------------------------------------------------


def test_global_options_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBTREE_SERVER", raising=False)
    parser = build_parser()
    before = options_of(parser.parse_args(["-n", "ml", "--server", "h:1", "-o", "json", "get"]))
    after = options_of(parser.parse_args(["get", "-n", "ml", "--server", "h:1", "-o", "json"]))
    assert before == after
    assert (before.namespace, before.server, before.output) == ("ml", "h:1", "json")
    nested = options_of(parser.parse_args(["budgets", "usage", "-o", "json", "--owner", "org:a"]))
    assert nested.output == "json"
    defaults = options_of(parser.parse_args(["get"]))
    assert (defaults.namespace, defaults.server, defaults.output, defaults.timeout) == (
        "default", "127.0.0.1:50051", "table", 10.0)
    monkeypatch.setenv("JOBTREE_SERVER", "gw:7")
    assert options_of(parser.parse_args(["get"])).server == "gw:7"
    assert options_of(parser.parse_args(["--server", "x:1", "get"])).server == "x:1"
    args = parser.parse_args(["shrink", "train", "--to", "8", "--request-id", "r1"])
    assert (args.command, args.name, args.to, args.request_id) == ("shrink", "train", 8, "r1")
    args = parser.parse_args(["sponsors", "add", "train", "org:b"])
    assert (args.sponsors_command, args.name, args.sponsor) == ("add", "train", "org:b")
    args = parser.parse_args(["submit", "-f", "a.yaml", "-f", "b.yaml"])
    assert args.filename == ["a.yaml", "b.yaml"]
    args = parser.parse_args(["watch", "a", "b", "--until", "Running"])
    assert (args.names, args.until) == (["a", "b"], "Running")
    local = options_of(parser.parse_args(["--local", "--state", "s.yaml", "complete", "x", "--at", "10m"]))
    assert local.local and local.state == Path("s.yaml") and local.at == "10m"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "required: COMMAND"),
        (("launch",), "invalid choice: 'launch'"),
        (("submit",), "-f/--filename"),
        (("get", "-o", "xml"), "invalid choice: 'xml'"),
        (("shrink", "x"), "--to"),
        (("shrink", "x", "--to", "many"), "invalid int value: 'many'"),
        (("budgets",), "required: WHAT"),
        (("sponsors", "list"), "--owner"),
        (("completions", "tcsh"), "invalid choice: 'tcsh'"),
        (("get", "--bogus"), "unrecognized arguments: --bogus"),
        (("--local", "get"), "--local needs --state FILE"),
        (("--state", "s.yaml", "get"), "--state is only used with --local"),
        (("--at", "10m", "get"), "--at is only used with --local"),
        (("--timeout", "0", "get"), "--timeout: must be a positive number"),
        (("get", "a/"), "a run is NAME or NAMESPACE/NAME"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], fragment: str) -> None:
    assert_one_line(cli(*args), EXIT_BAD_INPUT, fragment)


def test_help_exits_0() -> None:
    proc = cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in runs.COMMANDS)
    proc = cli("submit", "--help")
    assert proc.returncode == 0 and "--filename" in proc.stdout and "--namespace" in proc.stdout


# --- bad input never reaches a server --------------------------------------------------------------


def test_bad_manifest_is_refused_before_any_call(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    # The server address is never dialled: validation happens first (exit 2, the field named).
    line = assert_one_line(cli("submit", "-f", str(bad), "--server", "127.0.0.1:1"), EXIT_BAD_INPUT,
                           "spec.resources.totalGPU: unknown field 'totalGPU'; allowed here: gpuType, totalGPUs")
    assert line.startswith(f"kubectl-runs: {bad}: ")
    two = tmp_path / "two.yaml"
    two.write_text(MANIFESTS + "---\n" + BAD)
    assert_one_line(cli("submit", "-f", str(two)), EXIT_BAD_INPUT, f"{two}[2]: spec.resources.totalGPU")
    assert_one_line(cli("submit", "-f", str(tmp_path / "nope.yaml")), EXIT_BAD_INPUT, "nope.yaml: no such file")
    (tmp_path / "broken.yaml").write_text("kind: [Run\n")
    assert_one_line(cli("submit", "-f", str(tmp_path / "broken.yaml")), EXIT_BAD_INPUT, "invalid YAML: line 2")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert_one_line(cli("submit", "-f", str(tmp_path / "empty.yaml")), EXIT_BAD_INPUT, "no manifest in the file")
    (tmp_path / "status.yaml").write_text(BAD.replace("totalGPU:", "totalGPUs:") + "status: {phase: Running}\n")
    assert_one_line(cli("submit", "-f", str(tmp_path / "status.yaml")), EXIT_BAD_INPUT, "status: unknown field")
    assert_one_line(cli("plan", "-f", str(two)), EXIT_BAD_INPUT, "kind Budget is not accepted here")
    # JSON and stdin.
    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": "j"},
           "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 0}}}
    assert_one_line(cli("submit", "-f", "-", stdin=json.dumps(doc)), EXIT_BAD_INPUT,
                    "-: spec.resources.totalGPUs: must be a positive integer, got 0")


def _alias_bomb() -> str:
    """Anchors inside a role's pod template (free-form, so the schema lets any key through)."""
    lines = ["apiVersion: rq.davidlangworthy.io/v1", "kind: Run", "metadata: {name: bomb}", "spec:",
             "  owner: org:a", "  resources: {gpuType: H100-80GB, totalGPUs: 8}", "  roles:", "  - name: worker",
             "    x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("text", "fragment"), [
    (_alias_bomb(), "line 14, column 9: this node stands for 1,111,111 nodes once its aliases are expanded; "
                    "at most 1,000,000 are allowed"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
    ("a: &x [*x]\n", "an alias refers to a node that contains it"),
], ids=["alias-bomb", "deep", "recursive"])
def test_hostile_yaml_is_one_line_and_cheap(tmp_path: Path, text: str, fragment: str) -> None:
    """D7: an alias bomb burned 27-80 s of CPU and ended in a traceback; 5,000-deep nesting in a
    RecursionError. Both are bounded and refused in one line, exit 2, before any call."""
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    started = time.monotonic()
    done = cli("submit", "-f", str(path), "--server", "127.0.0.1:1")
    line = assert_one_line(done, EXIT_BAD_INPUT, fragment)
    assert line.startswith(f"kubectl-runs: {path}: invalid YAML: line ")
    assert time.monotonic() - started < 20  # the CLI's start-up included; the bomb itself costs ~0.1 s


def test_manifest_files_are_bounded_in_size(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (runs.MAX_FILE_BYTES) + "\n")
    assert_one_line(cli("submit", "-f", str(big)), EXIT_BAD_INPUT, "big.yaml: larger than 4 MiB")
    assert_one_line(cli("submit", "-f", "-", stdin="#" * (runs.MAX_FILE_BYTES + 10)), EXIT_BAD_INPUT,
                    "-: larger than 4 MiB")


def test_unreachable_server_exits_1_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    assert_one_line(cli("get", "--server", f"127.0.0.1:{port}"), EXIT_UNAVAILABLE,
                    f"cannot reach the jobtree gateway at 127.0.0.1:{port}")
    good = tmp_path / "good.yaml"
    good.write_text(MANIFESTS)
    assert_one_line(cli("submit", "-f", str(good), env={"JOBTREE_SERVER": f"127.0.0.1:{port}"}),
                    EXIT_UNAVAILABLE, f"127.0.0.1:{port}")


# --- completions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions(shell: str) -> None:
    proc = cli("completions", shell)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == completion_script(shell)
    for command in runs.COMMANDS:
        assert command in proc.stdout
    assert "--namespace" in proc.stdout or "-l namespace" in proc.stdout
    binary = shutil.which(shell)
    if binary is not None and shell in ("bash", "zsh"):
        check = subprocess.run([binary, "-n"], input=proc.stdout, capture_output=True, text=True, timeout=30,
                               check=False)
        assert check.returncode == 0, check.stderr


def test_bash_completion_completes_commands_and_nested_words() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.fail("the bash completion test needs bash")  # pragma: no cover
    script = completion_script("bash")

    def complete(*words: str) -> list[str]:
        line = " ".join(["kubectl-runs", *words])
        program = (script + f"\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}; _kubectl_runs; "
                   'printf "%s\\n" "${COMPREPLY[@]}"\n')
        out = subprocess.run([bash, "-c", program], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.split()

    assert {"submit", "watch", "explain"} <= set(complete(""))
    assert complete("sp") == ["sponsors"]
    assert sorted(complete("budgets", "")) == ["burn", "list", "usage"]
    assert complete("completions", "f") == ["fish"]
    assert "--to" in complete("shrink", "x", "--")
    assert sorted(complete("get", "-o", "")) == ["json", "table"]


# --- --local: the simulator on a scenario file ----------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.yaml"
    path.write_text(STATE)
    (tmp_path / "m.yaml").write_text(MANIFESTS)
    return path


def test_local_submit_appends_an_apply_step_and_keeps_comments(state: Path) -> None:
    code, out, err = run_in_process("--local", "--state", str(state), "submit", "-f", str(state.parent / "m.yaml"))
    assert (code, err) == (0, "")
    assert out.splitlines() == ["budget/team-a applied (step 1)", "run/default/train submitted: Running (step 1)"]
    text = state.read_text()
    assert text.startswith(STATE)  # appended, comment kept
    from jobtree.sim.scenario import load_scenario

    scenario = load_scenario(state)
    assert len(scenario.steps) == 2


def test_local_explain_json_is_the_simulators_run(state: Path) -> None:
    base = ("--local", "--state", str(state))
    assert run_in_process(*base, "submit", "-f", str(state.parent / "m.yaml"))[0] == 0
    code, out, _ = run_in_process(*base, "explain", "train", "-o", "json")
    assert code == 0
    from jobtree.sim.runner import run_scenario
    from jobtree.sim.scenario import load_scenario

    final = run_scenario(load_scenario(state))["snapshots"]["final"]
    assert json.loads(out) == next(r for r in final["runs"] if r["key"] == "default/train")
    # An elastic run grows only into funded capacity: 8 of its 12.
    assert json.loads(out)["width"] == {"min": 4, "max": 12, "desired": 12, "allocated": 8}
    code, out, _ = run_in_process(*base, "explain", "train")
    assert code == 0 and out.startswith("default/train is Running (Running)")
    assert "Paid by team-a/main: 8 GPUs." in out


def test_local_writes_reads_and_time(state: Path) -> None:
    base = ("--local", "--state", str(state))
    assert run_in_process(*base, "submit", "-f", str(state.parent / "m.yaml"))[0] == 0
    code, out, _ = run_in_process(*base, "-o", "json", "pods", "train")
    pods = json.loads(out)
    assert [p["pod"] for p in pods] == ["train-g0-00000", "train-g1-00001"]
    assert sum(p["gpus"] for p in pods) == 8
    assert run_in_process(*base, "shrink", "train", "--to", "4", "--at", "1h") == (
        0, "run/default/train shrunk to 4 GPUs (step 2)\n", "")
    code, out, _ = run_in_process(*base, "-o", "json", "leases", "train", "--all")
    closed = [le for le in json.loads(out) if le["end"] is not None]
    assert [le["closureReason"] for le in closed] == ["Shrink"]
    code, out, _ = run_in_process(*base, "budgets", "usage", "-o", "json")
    usage = json.loads(out)
    assert usage["envelopes"][0]["funded"]["owned"] == 4 and usage["envelopes"][0]["headroom"] == 4
    assert run_in_process(*base, "complete", "train", "--at", "2h")[0] == 0
    code, out, _ = run_in_process(*base, "get", "train", "-o", "json")
    assert json.loads(out)["phase"] == "Completed"
    code, out, _ = run_in_process(*base, "watch", "train", "-o", "json")
    phases = [(json.loads(line)["type"], json.loads(line)["run"]["phase"]) for line in out.splitlines()]
    assert phases[0] == ("ADDED", "Running") and phases[-1] == ("MODIFIED", "Completed")
    # Refusals name the step and field; nothing is written.
    before = state.read_text()
    code, _, err = run_in_process(*base, "complete", "train")
    assert code == EXIT_BAD_INPUT and "already ended" in err and err.count("\n") == 1
    code, _, err = run_in_process(*base, "complete", "ghost")
    assert code == EXIT_BAD_INPUT and err == "kubectl-runs: run default/ghost not found\n"
    code, _, err = run_in_process(*base, "delete", "train", "--at", "1m")
    assert code == EXIT_BAD_INPUT and "time moves backwards" in err
    assert state.read_text() == before


def test_local_plan_writes_nothing(state: Path) -> None:
    base = ("--local", "--state", str(state))
    before = state.read_text()
    code, _, err = run_in_process(*base, "plan", "-f", str(state.parent / "run.yaml"))
    assert code == EXIT_BAD_INPUT and "run.yaml: no such file" in err
    (state.parent / "run.yaml").write_text(MANIFESTS.split("---\n")[1])
    code, out, _ = run_in_process(*base, "-o", "json", "plan", "-f", str(state.parent / "run.yaml"))
    plan = json.loads(out)[0]
    # No budget yet: an elastic run starts at its minimum, unfunded.
    assert plan["fitsNow"] and sum(p["gpus"] for p in plan["placement"]) == 4
    assert plan["funding"] == [{"paidBy": None, "fundingClass": "unfunded", "gpus": 4}]
    assert state.read_text() == before


def test_local_missing_or_bad_state_file(tmp_path: Path) -> None:
    code, _, err = run_in_process("--local", "--state", str(tmp_path / "none.yaml"), "get")
    assert code == EXIT_BAD_INPUT and "none.yaml: no such file" in err
    (tmp_path / "bad.yaml").write_text("start: x\nsteps: []\n")
    code, _, err = run_in_process("--local", "--state", str(tmp_path / "bad.yaml"), "get")
    assert code == EXIT_BAD_INPUT and "start" in err and err.count("\n") == 1
    code, _, err = run_in_process("--local", "--state", str(tmp_path / "bad.yaml"), "sponsors", "list",
                                  "--owner", "x")
    assert code == EXIT_BAD_INPUT


def test_local_explain_reservation_and_preemption(tmp_path: Path) -> None:
    """Scenario 40 up to its `reserved` snapshot, explained; then read later with --at."""
    import yaml

    from jobtree.sim.scenario import load_yaml

    source = REPO / "tests" / "scenarios" / "40-reserve-earliest-start.yaml"
    doc = load_yaml(source.read_text())
    assert isinstance(doc, dict)
    cut = next(i for i, step in enumerate(doc["steps"]) if step.get("snapshot") == "reserved")
    doc["steps"] = doc["steps"][:cut]
    state = tmp_path / "s40.yaml"
    state.write_text(yaml.safe_dump(doc, sort_keys=False))
    base = ("--local", "--state", str(state))
    code, out, err = run_in_process(*base, "explain", "rc")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "default/rc is Reserved (Reserved): " + lines[0].split(": ", 1)[1]
    assert ("Reservation default.rc.r000 holds its place: 4 GPUs are missing; "
            "earliest start 2026-01-05T00:11:00Z.") in lines
    assert "It asks for 12 GPUs and holds none." in lines
    # At 11m the reservation activates: the lottery preempts hc1 (CALCULUS §7, scenario 40).
    code, out, _ = run_in_process(*base, "--at", "11m", "explain", "hc1")
    assert code == 0 and out.startswith("default/hc1 is Pending (Preempted)")
    assert "It was preempted and is queued again; it keeps its admission time." in out
    assert "1 closed lease: 1 RandomPreempt." in out
    code, out, _ = run_in_process(*base, "--at", "11m", "explain", "rc")
    assert "Earlier reservations: default.rc.r000 Released." in out
    assert state.read_text() == yaml.safe_dump(doc, sort_keys=False)  # reads never write
