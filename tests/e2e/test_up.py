"""`jobtree up` and `jobtree serve` as real processes: the whole system starts, answers, stops
cleanly on Ctrl-C (SIGINT) leaving no process behind, and resumes from its data directory; a
standby admission takes over when the leader is killed; every process serves its metrics.

The system runs with the users and permissions of `jobtree.bus.security`, so a service doing
something its NATS user may not do shows up here as a permissions violation in the server log.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import IO, Any

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import subjects
from jobtree.bus.ledger import Ledger
from jobtree.bus.security import SERVICES as ALL_SERVICES
from jobtree.bus.security import Secrets
from jobtree.cli.serve_cmd import missing_services
from jobtree.cli.up_cmd import (
    DEMO_DOMAINS,
    DEMO_NODES_PER_DOMAIN,
    KUBE_BRIDGE,
    NOTIFIER,
    demo_budgets,
    demo_commands,
    port_in_use,
)

SERVICES = tuple(s for s in ALL_SERVICES if s not in (KUBE_BRIDGE, NOTIFIER))
"""What `jobtree up` runs without --kubeconfig and --notify (test_kube_bridge, test_notify_up add them)."""
REPO = Path(__file__).resolve().parents[2]
CLUSTER = "demo"
READY = 25.0
DEMO_NODES = len(DEMO_DOMAINS) * DEMO_NODES_PER_DOMAIN


def jobtree(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "jobtree.cli.main", *args], cwd=REPO, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, **kw)


class Up:
    """A running `jobtree up`: its stdout lines arrive on a queue; stderr goes to a file."""

    def __init__(self, data_dir: Path, *args: str, secure: bool = False) -> None:
        """`secure`: the default of `jobtree up` (TLS, a policy, an admin token); else `--insecure`."""
        self.data_dir = data_dir
        args = args if secure else ("--insecure", *args)
        self.err_path = data_dir.parent / f"{data_dir.name}-up-{time.monotonic_ns()}.err"
        self._err: IO[str] = self.err_path.open("w")
        self.proc = jobtree("up", "--data-dir", str(data_dir), "--grpc-port", "0", "--clock", "virtual", *args,
                            stderr=self._err)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.grpc = ""
        self.nats = ""
        self.metrics: dict[str, str] = {}
        self.printed: dict[str, str] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self) -> Up:
        """Until the `metrics:` line, the last of the startup output (after `nats:` and `grpc:`)."""
        deadline = time.monotonic() + READY
        while not self.metrics:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"jobtree up not ready (status {self.proc.returncode}):\n{self.stderr}")
                continue
            key, _, value = line.partition(": ")
            self.printed[key] = value
            if key == "nats":
                self.nats = value
            elif key == "grpc":
                self.grpc = value
            elif key == "metrics":
                assert self.grpc, "the metrics: line comes after the grpc: line"
                self.metrics = dict(item.split("=", 1) for item in value.split(" "))
        return self

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "up.json").read_text())
        return doc

    def admin_auth(self) -> dict[str, str]:
        """`nats.connect` options of the admin user (its nkey seed)."""
        return Secrets.load(self.data_dir / "secrets.json").connect_options("admin")

    def interrupt(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def violations(data_dir: Path) -> list[str]:
    return [line for line in (data_dir / "nats" / "nats-server.log").read_text().splitlines() if "Violation" in line]


async def bus_checks(up: Up, command: bus.Command | None) -> tuple[dict[str, bytes], int, bus.CommandReply | None]:
    """Every service's health over NATS, optionally one command to admission; the ledger's last sequence."""
    nc = await nats.connect(up.nats, **up.admin_auth(), connect_timeout=2,
                            allow_reconnect=False)
    try:
        health = {}
        for name in SERVICES:
            msg = await nc.request(subjects.request(CLUSTER, name, "health"), b"", timeout=5)
            health[name] = msg.data
        reply = None
        if command is not None:
            raw = await nc.request(subjects.request(CLUSTER, "admission", "command"), command.SerializeToString(),
                                   timeout=10)
            reply = bus.CommandReply.FromString(raw.data)
        return health, await Ledger(nc.jetstream(), CLUSTER).last_sequence(), reply
    finally:
        await nc.close()


async def ledger_facts(up: Up) -> Counter[str]:
    nc = await nats.connect(up.nats, **up.admin_auth(), connect_timeout=2,
                            allow_reconnect=False)
    try:
        records = await Ledger(nc.jetstream(), CLUSTER).replay()
        return Counter(str(e.WhichOneof("fact")) for r in records for e in r.batch.entries)
    finally:
        await nc.close()


async def leader_holder(up: Up) -> str:
    """The holder written in the admission leader lock (JetStream KV)."""
    nc = await nats.connect(up.nats, **up.admin_auth(), connect_timeout=2,
                            allow_reconnect=False)
    try:
        kv = await nc.jetstream().key_value(subjects.bucket(CLUSTER, "leader"))
        entry = await kv.get(subjects.kv_key("admission"))
        return (entry.value or b"").decode()
    finally:
        await nc.close()


def holds(holder: str, pid: int) -> bool:
    """Admission's holder is `admission-<pid>-<random>`."""
    return str(pid) in holder.split("-")


def leader_log_holders(log: Path) -> list[str]:
    """The holders of the `leader` lines in an admission log."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("msg") == "leader":
                out.append(doc["holder"])
    return out


def requests_counted(address: str) -> dict[tuple[str, str, str], float]:
    """`jobtree_requests_total` scraped from http://address/metrics: (service, verb, outcome) -> count."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.labels["service"], s.labels["verb"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "jobtree_requests_total"}


def poll_until(what: str, probe: Any, timeout: float = 10.0) -> Any:
    """probe() until it returns something truthy; fail naming `what` (and the last value) if not in time."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s (last: {got!r})")
        time.sleep(0.1)


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below the kernel's ephemeral range."""
    for _ in range(50):
        base = random.randrange(20000, 30000 - count)
        if not any(port_in_use(p) for p in range(base, base + count)):
            return base
    raise AssertionError("no block of free ports found")


def run_manifest(name: str, gpus: int) -> pb.Run:
    return convert.manifest_to_proto({
        "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
        "metadata": {"name": name, "namespace": "vision"},
        "spec": {"owner": "org:ml:vision", "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus},
                 "locality": {"groupGPUs": 8}},
    })  # type: ignore[return-value]


def test_every_service_can_be_served() -> None:
    assert missing_services(list(ALL_SERVICES)) == []
    assert missing_services(["nosuch"]) == ["nosuch"]


def test_serve_refuses_an_unknown_service_in_one_line() -> None:
    proc = jobtree("serve", "nosuch", stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("jobtree: unknown service 'nosuch'; services: ")
    for name in SERVICES:
        assert name in err
    assert out == ""


@pytest.mark.parametrize("port", ["x", "-1", "65536", ""])
def test_serve_refuses_a_bad_metrics_port_in_one_line(port: str) -> None:
    proc = jobtree("serve", "binder", "--metrics-port", port, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert err == f"jobtree: --metrics-port: must be a port number or auto, got {port!r}\n"
    assert out == ""


def test_the_demo_is_valid_for_the_core() -> None:
    cmds = demo_commands(CLUSTER)
    assert len(cmds) == DEMO_NODES + len(demo_budgets(CLUSTER))
    assert len({cid for cid, _ in cmds}) == len(cmds)  # one id each: a retried load commits once


def test_up_serves_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "jt"
    up = Up(data).wait_ready()
    try:
        state = up.state()
        assert state["ready"] and state["cluster"] == CLUSTER and state["grpc"] == up.grpc
        pids = [state["pid"], state["nats_pid"], *state["services"].values()]
        assert sorted(state["services"]) == sorted([*SERVICES, "admission-2"])  # default: one standby
        assert "demo loaded" in up.stderr
        assert oct((data / "secrets.json").stat().st_mode & 0o777) == "0o600"

        # Every service answers health over NATS; the demo is in the ledger, once.
        health, demo_seq, _ = asyncio.run(bus_checks(up, None))
        assert health == dict.fromkeys(SERVICES, b"ok")
        facts = asyncio.run(ledger_facts(up))
        assert facts["budget_put"] == len(demo_budgets(CLUSTER)) and facts["node_state_put"] == DEMO_NODES, facts

        # The public entry: gRPC health, the demo through the gateway's view, a submission.
        with grpc.insecure_channel(up.grpc) as channel:
            probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert probe.status == health_pb2.HealthCheckResponse.SERVING
            stub = api_grpc.JobtreeStub(channel)
            nodes = stub.ListNodes(api.ListNodesRequest(), timeout=5).nodes
            assert len(nodes) == DEMO_NODES and {n.gpus for n in nodes} == {8}
            submitted = stub.SubmitRun(api.SubmitRunRequest(run=run_manifest("resnet", 16), request_id="t-1"),
                                       timeout=10)
            assert submitted.ledger_sequence > demo_seq
            got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="vision", name="resnet"),
                                                min_ledger_sequence=submitted.ledger_sequence), timeout=5)
            assert got.run.status.phase == "Running"

        # A command on the bus, as the admin user (the gateway is the public way in).
        cmd = bus.Command(command_id="t-2", tick=bus.Tick())
        _, before, reply = asyncio.run(bus_checks(up, cmd))
        assert reply is not None and not reply.HasField("error"), reply

        # A second `up` on the same directory is refused at once.
        other = jobtree("up", "--data-dir", str(data), "--grpc-port", "0", stderr=subprocess.PIPE)
        _, err = other.communicate(timeout=30)
        assert other.returncode == 2 and err.startswith("jobtree: another `jobtree up` is running on ")

        assert up.interrupt() == 0, up.stderr
    finally:
        up.stop()
    assert "Traceback" not in up.stderr and "jobtree up: stopped" in up.stderr
    assert not [pid for pid in pids if alive(pid)], "processes left behind"
    assert not (data / "up.json").exists()
    assert violations(data) == [], "a service did something its NATS user may not"

    # Again on the same directory: resumed, nothing loaded twice, the ledger intact.
    again = Up(data).wait_ready()
    try:
        assert "resumed at ledger sequence" in again.stderr and "demo loaded" not in again.stderr
        health, seq, _ = asyncio.run(bus_checks(again, None))
        assert health == dict.fromkeys(SERVICES, b"ok")
        assert seq >= before
        assert asyncio.run(ledger_facts(again))["budget_put"] == len(demo_budgets(CLUSTER))
        with grpc.insecure_channel(again.grpc) as channel:
            stub = api_grpc.JobtreeStub(channel)
            got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="vision", name="resnet"),
                                                min_ledger_sequence=seq), timeout=5)
            assert got.run.status.phase == "Running"
        pids = [again.state()["pid"], again.state()["nats_pid"], *again.state()["services"].values()]
        assert again.interrupt() == 0, again.stderr
    finally:
        again.stop()
    assert not [pid for pid in pids if alive(pid)]
    assert violations(data) == []


def test_up_refuses_a_data_dir_of_another_cluster(tmp_path: Path) -> None:
    data = tmp_path / "jt"
    data.mkdir()
    (data / "secrets.json").write_text(json.dumps({"cluster": "gpu-a", "users": {}}))
    proc = jobtree("up", "--data-dir", str(data), "--grpc-port", "0", stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "cluster 'gpu-a', not 'demo'" in err and out == ""
    assert not (data / "nats").exists()


def test_up_names_the_services_it_cannot_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """While a service has no package yet, `up` refuses before starting anything."""
    from jobtree.bus import security
    from jobtree.cli.main import main

    monkeypatch.setattr(security, "SERVICES", (*ALL_SERVICES, "accountant"))  # a service with no package yet
    assert main(["up", "--data-dir", str(tmp_path / "jt"), "--grpc-port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("jobtree: cannot start: service(s) not available yet: accountant ")
    assert "jobtree demo" in err and not (tmp_path / "jt").exists()


@pytest.mark.parametrize(("args", "start"), [
    (["--admission-replicas", "0"], "jobtree: --admission-replicas: must be at least 1"),
    (["--admission-replicas", "-2"], "jobtree: --admission-replicas: must be at least 1"),
    (["--admission-replicas", "two"], "jobtree: argument --admission-replicas: invalid int value"),
    (["--metrics-port-base", "-1"], "jobtree: --metrics-port-base: 8 ports from -1 must be port numbers"),
    (["--metrics-port-base", "65530"], "jobtree: --metrics-port-base: 8 ports from 65530 must be port numbers"),
    (["--admission-replicas", "3", "--metrics-port-base", "65529"],
     "jobtree: --metrics-port-base: 9 ports from 65529 must be port numbers"),
    (["--metrics-port-base", "x"], "jobtree: argument --metrics-port-base: invalid int value"),
])
def test_up_refuses_bad_replicas_and_metrics_ports_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], start: str
) -> None:
    from jobtree.cli.main import main

    assert main(["up", "--data-dir", str(tmp_path / "jt"), "--grpc-port", "0", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(start), err
    assert not (tmp_path / "jt").exists()


def test_up_refuses_metrics_ports_in_use_or_overlapping_grpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobtree.cli.main import main

    data = tmp_path / "jt"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert main(["up", "--data-dir", str(data), "--grpc-port", "0", "--metrics-port-base", str(busy)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith(f"jobtree: --metrics-port-base: 127.0.0.1:{busy} is in use"), err
    base = free_port_block(len(SERVICES) + 1)
    grpc_port = base + 3
    assert main(["up", "--data-dir", str(data), "--grpc-port", str(grpc_port), "--metrics-port-base", str(base)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"jobtree: --metrics-port-base: ports {base}-{base + len(SERVICES)} include "
                          f"the --grpc-port {grpc_port}"), err
    assert not data.exists()


def test_up_serves_the_metrics_of_every_process(tmp_path: Path) -> None:
    """`--metrics-port-base M`: ports M.. in start order, printed and in up.json; each process's
    /metrics counts its own service's requests, admission's leader its commands."""
    data = tmp_path / "jt"
    names = ["binder", "admission", "budget", "packer", "resolver", "gateway", "dashboard", "admission-2", "admission-3"]
    assert sorted(set(names) - {"admission-2", "admission-3"}) == sorted(SERVICES)
    base = free_port_block(len(names))
    up = Up(data, "--admission-replicas", "3", "--metrics-port-base", str(base)).wait_ready()
    try:
        state = up.state()
        assert state["metrics"] == up.metrics == {name: f"127.0.0.1:{base + i}" for i, name in enumerate(names)}
        assert list(up.metrics) == names  # the printed order is the start order
        assert sorted(state["services"]) == sorted(names)
        assert state["admission_replicas"] == ["admission", "admission-2", "admission-3"]
        assert all(alive(pid) for pid in state["services"].values())

        # Every process handles the health requests of its service's subject (standbys too).
        asyncio.run(bus_checks(up, None))
        for name in names:
            service = name.split("-")[0]
            got = poll_until(f"{name}'s /metrics counting health requests",
                             lambda name=name, service=service: (
                                 c if (c := requests_counted(up.metrics[name])).get((service, "health", "ok"), 0) >= 1
                                 else None))
            assert {svc for svc, _, _ in got} == {service}, (name, got)  # its own registry, not another's

        # The leader counted the demo's commands; a submission adds exactly one.
        holder = asyncio.run(leader_holder(up))
        leader = [n for n in state["admission_replicas"] if holds(holder, state["services"][n])]
        assert len(leader) == 1, (holder, state["services"])
        before = requests_counted(up.metrics[leader[0]]).get(("admission", "command", "ok"), 0)
        assert before >= len(demo_commands(CLUSTER))
        for standby in set(state["admission_replicas"]) - set(leader):
            assert ("admission", "command", "ok") not in requests_counted(up.metrics[standby])
        with grpc.insecure_channel(up.grpc) as channel:
            api_grpc.JobtreeStub(channel).SubmitRun(
                api.SubmitRunRequest(run=run_manifest("metered", 8), request_id="t-metrics"), timeout=10)
        poll_until("the leader counting one more command", lambda: requests_counted(
            up.metrics[leader[0]]).get(("admission", "command", "ok")) == before + 1)
        assert up.interrupt() == 0, up.stderr
    finally:
        up.stop()
    assert "Traceback" not in up.stderr
    assert not [pid for pid in state["services"].values() if alive(pid)], "processes left behind"


def test_up_standby_admission_takes_over_when_the_leader_is_killed(tmp_path: Path) -> None:
    """Default: two admissions. SIGKILL the one holding the lock; a submission through the gateway
    succeeds within 5 s, decided by the other; `up` reports the dead one and restarts it."""
    data = tmp_path / "jt"
    up = Up(data).wait_ready()
    try:
        state = up.state()
        replicas = state["admission_replicas"]
        assert replicas == ["admission", "admission-2"]
        pids = {name: state["services"][name] for name in replicas}
        assert len(set(pids.values())) == 2 and all(alive(pid) for pid in pids.values())

        holder = asyncio.run(leader_holder(up))
        leaders = [name for name, pid in pids.items() if holds(holder, pid)]
        assert len(leaders) == 1, (holder, pids)
        leader = leaders[0]
        standby = next(name for name in replicas if name != leader)
        assert leader_log_holders(data / "logs" / f"{leader}.log") == [holder]
        assert leader_log_holders(data / "logs" / f"{standby}.log") == []

        with grpc.insecure_channel(up.grpc) as channel:
            stub = api_grpc.JobtreeStub(channel)
            assert len(stub.ListNodes(api.ListNodesRequest(), timeout=5).nodes) == DEMO_NODES  # channel open
            os.kill(pids[leader], signal.SIGKILL)
            killed = time.monotonic()
            # One call, no client retry: the gateway re-sends by itself, both while nobody answers
            # admission's subject and when a request reached the leader as it died (same command id).
            try:
                submitted = stub.SubmitRun(
                    api.SubmitRunRequest(run=run_manifest("after-failover", 16), request_id="t-failover"), timeout=5.0)
            except grpc.RpcError as e:
                raise AssertionError(f"no submission accepted within 5 s of killing the leader: {e}\n"
                                     + (data / "logs" / f"{standby}.log").read_text()[-3000:]) from None
            took = time.monotonic() - killed
            assert took <= 5.0
            got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="vision", name="after-failover"),
                                                min_ledger_sequence=submitted.ledger_sequence), timeout=5)
            assert got.run.status.phase == "Running"

        # `up` reports the dead process and restarts it (0.25 s later: it may win the lapsed lock
        # against the standby).
        poll_until("up reporting the killed admission", lambda: (
            f"jobtree up: {leader} died (signal 9); restarting it" in up.stderr
            and f"jobtree up: {leader} restarted (pid " in up.stderr))
        assert up.proc.poll() is None and not alive(pids[leader])
        restarted = up.state()["services"][leader]
        assert restarted != pids[leader] and alive(restarted)

        # The new leader — the standby or the restarted process — says so in the lock and its log;
        # the one that decided the submission counted it.
        new_holder = asyncio.run(leader_holder(up))
        assert new_holder != holder
        leads = standby if holds(new_holder, pids[standby]) else leader
        assert holds(new_holder, pids[standby] if leads == standby else restarted), (new_holder, pids, restarted)
        assert leader_log_holders(data / "logs" / f"{leads}.log")[-1] == new_holder
        if leads == standby:
            assert requests_counted(up.metrics[standby]).get(("admission", "command", "ok"), 0) >= 1
        state = up.state()
        assert up.interrupt() == 0, up.stderr
    finally:
        up.stop()
    assert "Traceback" not in up.stderr and "jobtree up: stopped" in up.stderr
    assert not [pid for pid in state["services"].values() if alive(pid)], "processes left behind"
    assert violations(data) == []
