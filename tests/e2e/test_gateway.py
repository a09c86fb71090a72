"""The gateway over real gRPC on loopback, in front of real services on a real nats-server.

Every service runs as its own process (`jobtree serve NAME`, through `jobtree.bus.supervisor`):
admission, binder, budget, packer and the gateway. The test talks to the gateway only over
gRPC, and reads the ledger stream itself to check what was committed.
`start_system` and `System` are shared with `test_kubectl_runs.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger, Record
from jobtree.bus.natsserver import NatsServer
from jobtree.bus.supervisor import Supervisor
from jobtree.core import facts as F
from jobtree.core.model import Node, labels_of

SERVICES = ("binder", "admission", "budget", "packer", "gateway")
_systems = itertools.count()


def node(name: str, domain: str = "A") -> Node:
    return Node(name, 8, labels_of({"region": "eu", "cluster": "gw", "fabric.domain": domain,
                                    "gpu.flavor": "H100-80GB"}))


NODES = (node("a-00"), node("a-01"), node("b-00", "B"), node("b-01", "B"))

BUDGET = {
    "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "team-a"},
    "spec": {"owner": "org:a", "envelopes": [
        {"name": "main", "flavor": "H100-80GB", "selector": {"cluster": "gw"}, "concurrency": 16}]},
}


def run_doc(name: str, gpus: int = 8, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus}, **spec},
    }


def run_msg(name: str, gpus: int = 8, namespace: str = "default", **spec: Any) -> pb.Run:
    return manifest_run(run_doc(name, gpus, namespace, **spec))


def manifest_run(doc: dict[str, Any]) -> pb.Run:
    msg = convert.manifest_to_proto(doc)
    assert isinstance(msg, pb.Run)
    return msg


def budget_msg(doc: dict[str, Any] = BUDGET) -> pb.Budget:
    msg = convert.manifest_to_proto(doc)
    assert isinstance(msg, pb.Budget)
    return msg


# --- the system under test -------------------------------------------------------------------


async def _nats(url: str) -> nats.aio.client.Client:
    return await nats.connect(url, connect_timeout=2, allow_reconnect=False)


def setup_cluster(url: str, cluster: str) -> None:
    """What `jobtree up` does before starting services: the ledger stream and the leader bucket."""

    async def go() -> None:
        nc = await _nats(url)
        try:
            js = nc.jetstream()
            await Ledger(js, cluster).create()
            await js.create_key_value(bucket=subjects.bucket(cluster, "leader"), ttl=2, history=1)
        finally:
            await nc.close()

    asyncio.run(go())


def send_commands(url: str, cluster: str, cmds: Sequence[F.Command], timeout: float = 30.0,
                  prefix: str = "setup") -> list[int]:
    """Send commands straight to admission (as an operator would), retrying until it answers;
    command ids `<prefix>-<cluster>-<i>` (a new prefix for each call that must not be deduplicated)."""

    async def go() -> list[int]:
        nc = await _nats(url)
        out = []
        try:
            subject = subjects.request(cluster, "admission", "command")
            for i, cmd in enumerate(cmds):
                msg = convert.command_to_proto(cmd, command_id=f"{prefix}-{cluster}-{i}")
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        raw = await nc.request(subject, codec.encode(msg), timeout=5, headers=codec.headers(msg))
                        break
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                reply = codec.decode(raw.data, bus.CommandReply)
                assert not reply.HasField("error"), reply
                out.append(reply.ledger_sequence)
        finally:
            await nc.close()
        return out

    return asyncio.run(go())


def wait_healthy(url: str, cluster: str, services: Sequence[str], timeout: float = 30.0) -> None:
    """Until every service answers `health` (it is up, with its signal handlers installed)."""

    async def go() -> None:
        nc = await _nats(url)
        try:
            for name in services:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        await nc.request(subjects.request(cluster, name, "health"), b"", timeout=1)
                        break
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        if time.monotonic() > deadline:
                            raise AssertionError(f"service {name} does not answer health") from None
                        await asyncio.sleep(0.05)
        finally:
            await nc.close()

    asyncio.run(go())


def replay(url: str, cluster: str) -> list[Record]:
    async def go() -> list[Record]:
        nc = await _nats(url)
        try:
            return await Ledger(nc.jetstream(), cluster).replay()
        finally:
            await nc.close()

    return asyncio.run(go())


def last_sequence(url: str, cluster: str) -> int:
    async def go() -> int:
        nc = await _nats(url)
        try:
            return await Ledger(nc.jetstream(), cluster).last_sequence()
        finally:
            await nc.close()

    return asyncio.run(go())


@dataclass
class System:
    cluster: str
    url: str
    data_dir: Path
    supervisor: Supervisor
    address: str = ""
    channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self) -> api_grpc.JobtreeStub:
        channel = grpc.insecure_channel(self.address)
        self.channels.append(channel)
        return api_grpc.JobtreeStub(channel)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{sp.log_tail(30)}" for name, sp in self.supervisor.processes.items())

    def stop(self) -> dict[str, int]:
        for channel in self.channels:
            channel.close()
        return self.supervisor.stop()


def wait_for_port(data_dir: Path, sup: Supervisor, timeout: float = 30.0) -> int:
    path = data_dir / "services" / "gateway" / "gateway.port"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        exited = sup.exited()
        if "gateway" in exited:
            raise AssertionError(f"the gateway exited ({exited['gateway']}):\n{sup.processes['gateway'].log_tail(40)}")
        time.sleep(0.05)
    raise AssertionError(f"no {path} after {timeout} s:\n{sup.processes['gateway'].log_tail(40)}")


def wait_serving(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="jobtree.v1.Jobtree"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"the gateway at {address} is not SERVING after {timeout} s (last: {status})")


def start_system(
    nats_server: NatsServer,
    data_dir: Path,
    *,
    services: Sequence[str] = SERVICES,
    nodes: Sequence[Node] = NODES,
    gateway_env: dict[str, str] | None = None,
    clock: str = "system",
) -> System:
    cluster = f"gw-{next(_systems)}"
    setup_cluster(nats_server.url, cluster)
    sup = Supervisor(data_dir, cluster, nats_server.url, clock=clock)
    system = System(cluster, nats_server.url, data_dir, sup)
    try:
        for name in services:
            if name == "gateway":
                sup.start(name, env={"JOBTREE_GRPC_INSECURE": "1", **(gateway_env or {})}, args=("--grpc-port", "0"))
            else:
                sup.start(name)
        wait_healthy(nats_server.url, cluster, services)
        if nodes and "admission" in services:
            send_commands(nats_server.url, cluster, [F.AddNode(n) for n in nodes])
        if "gateway" in services:
            system.address = f"127.0.0.1:{wait_for_port(data_dir, sup)}"
            wait_serving(system.address)
    except BaseException:
        logs = system.logs()
        system.stop()
        raise AssertionError(f"the system did not start:\n{logs}") from None
    return system


@pytest.fixture(scope="module")
def system(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    sys_ = start_system(nats_server, tmp_path_factory.mktemp("gateway"))
    yield sys_
    statuses = sys_.stop()
    assert all(code == 0 for code in statuses.values()), (statuses, sys_.logs())


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def leases_of(records: list[Record], run_key: str) -> list[bus.LedgerEntry]:
    ns, name = run_key.split("/")
    return [e for r in records for e in r.batch.entries
            if e.WhichOneof("fact") == "lease_minted"
            and e.lease_minted.lease.metadata.namespace == ns and e.lease_minted.lease.spec.run_ref == name]


# --- the tests ------------------------------------------------------------------------------


def test_listening_line_port_file_health_and_reflection(system: System) -> None:
    log = system.supervisor.processes["gateway"].log_path.read_text()
    listening = [json.loads(line) for line in log.splitlines() if '"grpc listening"' in line]
    assert listening and listening[0]["port"] == int(system.address.rsplit(":", 1)[1])
    with grpc.insecure_channel(system.address) as channel:
        overall = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"jobtree.v1.Jobtree", "grpc.health.v1.Health"} <= names


def test_submit_budget_and_run_lease_in_ledger_status_back(system: System) -> None:
    stub = system.stub()
    applied = stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg()), timeout=10)
    assert applied.ledger_sequence > 0
    assert applied.budget.metadata.name == "team-a"
    sub = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("first")), timeout=10)
    assert sub.ledger_sequence > applied.ledger_sequence
    assert sub.run.status.phase == "Running"
    # The ledger holds the leases, paid by the budget.
    minted = leases_of(replay(system.url, system.cluster), "default/first")
    assert sum(len(e.lease_minted.lease.spec.slots) for e in minted) == 8
    assert {e.lease_minted.lease.spec.paid_by.budget for e in minted} == {"team-a"}
    # Read your own write.
    got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="default", name="first"),
                                        min_ledger_sequence=sub.ledger_sequence), timeout=10)
    assert got.run.status.phase == "Running"
    assert got.ledger_sequence >= sub.ledger_sequence
    listed = stub.ListRuns(api.ListRunsRequest(namespace="default", phases=["Running"]), timeout=10)
    assert "first" in [r.metadata.name for r in listed.runs]
    leases = stub.ListLeases(api.ListLeasesRequest(namespace="default", run="first", open_only=True), timeout=10)
    assert sum(len(lease.spec.slots) for lease in leases.leases) == 8
    assert {lease.spec.run_ref for lease in leases.leases} == {"first"}


def test_invalid_input_is_invalid_argument_naming_the_field_and_writes_nothing(system: System) -> None:
    stub = system.stub()
    before = last_sequence(system.url, system.cluster)
    bad = run_msg("bad")
    bad.spec.resources.total_gpus = 0
    code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=bad), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("spec.resources.totalGPUs: "), details
    nameless = run_msg("x")
    nameless.metadata.ClearField("name")
    code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=nameless), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("metadata.name: "), details
    budget = budget_msg()
    budget.spec.envelopes[0].sharing = "sometimes"
    code, details = code_of(lambda: stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.envelopes[0].sharing: "), details
    code, details = code_of(lambda: stub.ShrinkRun(api.ShrinkRunRequest(
        run=pb.RunRef(name="first"), desired_total_gpus=-1), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("desiredTotalGPUs: "), details
    code, details = code_of(lambda: stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="default")), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("run.name: "), details
    # Instants come from the gateway's clock on a system clock, never from the request.
    code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=run_msg("timed")), timeout=10,
                                                   metadata=(("jobtree-instant", "0"),)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("jobtree-instant: "), details
    assert last_sequence(system.url, system.cluster) == before


def test_unknown_and_ended_runs(system: System) -> None:
    stub = system.stub()
    ref = pb.RunRef(namespace="default", name="nobody")
    for call in (lambda: stub.GetRun(api.GetRunRequest(run=ref), timeout=10),
                 lambda: stub.CompleteRun(api.CompleteRunRequest(run=ref), timeout=10),
                 lambda: stub.DeleteRun(api.DeleteRunRequest(run=ref), timeout=10),
                 lambda: stub.ExplainRun(api.ExplainRunRequest(run=ref), timeout=10)):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "default/nobody" in details, details
    done = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("done", 4)), timeout=10)
    assert done.run.status.phase == "Running"
    seq = stub.CompleteRun(api.CompleteRunRequest(run=pb.RunRef(name="done")), timeout=10).ledger_sequence
    got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(name="done"), min_ledger_sequence=seq), timeout=10)
    assert got.run.status.phase == "Completed"
    code, details = code_of(lambda: stub.FailRun(api.FailRunRequest(run=pb.RunRef(name="done")), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already ended" in details, details
    code, details = code_of(lambda: stub.ShrinkRun(api.ShrinkRunRequest(
        run=pb.RunRef(name="first"), desired_total_gpus=4), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not malleable" in details, details


def test_retried_submit_with_the_same_request_id_commits_once(system: System) -> None:
    stub = system.stub()
    req = api.SubmitRunRequest(run=run_msg("once", 4, namespace="retry"), request_id="submit-once-1")
    first = stub.SubmitRun(req, timeout=10)
    second = stub.SubmitRun(req, timeout=10)
    assert second.ledger_sequence == first.ledger_sequence
    committed = [r for r in replay(system.url, system.cluster)
                 if any(e.command_id == "submit-once-1" for e in r.batch.entries)]
    assert [r.sequence for r in committed] == [first.ledger_sequence]
    assert len(leases_of(committed, "retry/once")) >= 1
    bad_id = api.SubmitRunRequest(run=run_msg("once", 4, namespace="retry"), request_id="has spaces")
    code, details = code_of(lambda: stub.SubmitRun(bad_id, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id: ")


def test_every_retried_write_gets_its_first_answer(system: System) -> None:
    """A write repeated with its request id after the first committed (its answer lost) gets the
    original sequence, not a refusal from the state the first one produced."""
    stub = system.stub()
    ns = "retry-writes"
    for name in ("c", "f", "d"):
        stub.SubmitRun(api.SubmitRunRequest(run=run_msg(name, 4, namespace=ns)), timeout=10)
    elastic = run_msg("m", 8, namespace=ns, malleable={"minTotalGPUs": 4, "maxTotalGPUs": 8, "stepGPUs": 4})
    stub.SubmitRun(api.SubmitRunRequest(run=elastic), timeout=10)
    writes = {
        "retry-complete": lambda rid: stub.CompleteRun(
            api.CompleteRunRequest(run=pb.RunRef(namespace=ns, name="c"), request_id=rid), timeout=10),
        "retry-fail": lambda rid: stub.FailRun(
            api.FailRunRequest(run=pb.RunRef(namespace=ns, name="f"), request_id=rid), timeout=10),
        "retry-delete": lambda rid: stub.DeleteRun(
            api.DeleteRunRequest(run=pb.RunRef(namespace=ns, name="d"), request_id=rid), timeout=10),
        "retry-shrink": lambda rid: stub.ShrinkRun(
            api.ShrinkRunRequest(run=pb.RunRef(namespace=ns, name="m"), desired_total_gpus=4, request_id=rid),
            timeout=10),
    }
    for rid, write in writes.items():
        first = write(rid).ledger_sequence
        assert first > 0
        assert write(rid).ledger_sequence == first, rid
        committed = [r.sequence for r in replay(system.url, system.cluster)
                     if any(e.command_id == rid for e in r.batch.entries)]
        assert committed == [first], (rid, committed)
    # a new request id is checked against the state as usual
    code, details = code_of(lambda: writes["retry-complete"]("retry-complete-2"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already ended" in details, details


def test_watch_sees_the_run_go_running(system: System) -> None:
    stub = system.stub()
    stub.SubmitRun(api.SubmitRunRequest(run=run_msg("w0", 4, namespace="watch")), timeout=10)
    stream = stub.WatchRuns(api.WatchRunsRequest(namespace="watch", send_initial=True), timeout=30)
    events: list[api.RunEvent] = []
    seen_running, seen_deleted = threading.Event(), threading.Event()

    def read() -> None:
        for event in stream:
            events.append(event)
            if event.run.metadata.name == "w1" and event.run.status.phase == "Running":
                seen_running.set()
            if event.type == api.RunEvent.TYPE_DELETED:
                seen_deleted.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:  # the initial state: the watch is registered
        time.sleep(0.02)
    assert events and events[0].type == api.RunEvent.TYPE_ADDED and events[0].run.metadata.name == "w0"
    sub = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("w1", 4, namespace="watch")), timeout=10)
    assert seen_running.wait(10), [json_format.MessageToDict(e) for e in events]
    deleted = stub.DeleteRun(api.DeleteRunRequest(run=pb.RunRef(namespace="watch", name="w0")), timeout=10)
    assert seen_deleted.wait(10), [json_format.MessageToDict(e) for e in events]
    stream.cancel()
    assert (events[-1].run.metadata.name, events[-1].ledger_sequence) == ("w0", deleted.ledger_sequence)
    code, _ = code_of(lambda: stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="watch", name="w0"),
                                                            min_ledger_sequence=deleted.ledger_sequence), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    w1 = [e for e in events if e.run.metadata.name == "w1"]
    assert w1[0].type == api.RunEvent.TYPE_ADDED
    assert w1[-1].ledger_sequence == sub.ledger_sequence
    # Resuming after a sequence replays what changed since (coalesced), then follows.
    resumed = stub.WatchRuns(api.WatchRunsRequest(namespace="watch", after_ledger_sequence=sub.ledger_sequence - 1),
                             timeout=5)
    it = iter(resumed)
    replayed = {(e.run.metadata.name, e.type) for e in (next(it), next(it))}
    resumed.cancel()
    assert replayed == {("w1", api.RunEvent.TYPE_ADDED), ("w0", api.RunEvent.TYPE_DELETED)}


def test_explain_usage_sponsors_nodes_and_plan(system: System) -> None:
    stub = system.stub()
    sub = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("explained", 8, namespace="ex")), timeout=10)
    out = stub.ExplainRun(api.ExplainRunRequest(run=pb.RunRef(namespace="ex", name="explained"),
                                                min_ledger_sequence=sub.ledger_sequence), timeout=10)
    view = json_format.MessageToDict(out.sim_view)
    assert view["key"] == "ex/explained" and view["phase"] == "Running"
    assert view["width"]["allocated"] == 8
    assert out.lines[0].startswith("ex/explained is Running (Running)")
    assert any("Paid by" in line for line in out.lines)
    assert sum(len(lease.spec.slots) for lease in out.leases) == 8
    usage = stub.Usage(api.UsageRequest(owner="org:a"), timeout=10)
    assert [(e.budget, e.envelope) for e in usage.envelopes] == [("team-a", "main")]
    assert stub.ListSponsors(api.ListSponsorsRequest(owner="org:b"), timeout=10).sponsors == []
    nodes = stub.ListNodes(api.ListNodesRequest(), timeout=10)
    assert [n.name for n in nodes.nodes] == [n.name for n in NODES]
    budgets = stub.ListBudgets(api.ListBudgetsRequest(), timeout=10)
    assert [b.metadata.name for b in budgets.budgets] == ["team-a"]
    plan = stub.PlanRun(api.PlanRunRequest(run=run_msg("maybe", 64)), timeout=10)
    assert not plan.fits_now
    bad = run_msg("maybe", 64)
    bad.spec.resources.gpu_type = ""
    code, details = code_of(lambda: stub.PlanRun(api.PlanRunRequest(run=bad), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec.resources.gpuType"), details


def test_add_sponsor_updates_the_spec(system: System) -> None:
    stub = system.stub()
    stub.SubmitRun(api.SubmitRunRequest(run=run_msg("borrower", 4, namespace="sp")), timeout=10)
    out = stub.AddSponsor(api.AddSponsorRequest(run=pb.RunRef(namespace="sp", name="borrower"), sponsor="org:b"),
                          timeout=10)
    assert out.run.spec.funding.allow_borrow and list(out.run.spec.funding.sponsors) == ["org:b"]
    code, details = code_of(lambda: stub.AddSponsor(api.AddSponsorRequest(
        run=pb.RunRef(namespace="sp", name="borrower"), sponsor="not an owner"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sponsor: "), details


def test_unavailable_when_admission_and_readers_do_not_answer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    lonely = start_system(nats_server, tmp_path, services=("gateway",), nodes=(),
                          gateway_env={"JOBTREE_GATEWAY_COMMAND_TIMEOUT": "1",
                                                "JOBTREE_GATEWAY_READ_TIMEOUT": "1",
                                                "JOBTREE_GATEWAY_FORWARD_TIMEOUT": "1"})
    try:
        stub = lonely.stub()
        code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=run_msg("x")), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "admission" in details, details
        code, details = code_of(lambda: stub.Usage(api.UsageRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "budget service" in details, details
        code, details = code_of(lambda: stub.ListNodes(api.ListNodesRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "packer service" in details, details
        # Reads of its own view still work; a sequence beyond the ledger's end is OUT_OF_RANGE.
        assert list(stub.ListRuns(api.ListRunsRequest(), timeout=10).runs) == []
        code, details = code_of(lambda: stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=99), timeout=10))
        assert code == grpc.StatusCode.OUT_OF_RANGE and "beyond the ledger's end" in details, details
        assert last_sequence(lonely.url, lonely.cluster) == 0
    finally:
        statuses = lonely.stop()
    assert statuses == {"gateway": 0}
    assert not (tmp_path / "services" / "gateway" / "gateway.port").exists()


def test_virtual_clock_takes_the_instant_from_the_request(nats_server: NatsServer, tmp_path: Path) -> None:
    virtual = start_system(nats_server, tmp_path, clock="virtual")
    t0 = 1_767_571_200  # 2026-01-05T00:00:00Z
    try:
        stub = virtual.stub()
        at = (("jobtree-instant", "2026-01-05T00:00:00Z"),)
        sub = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("v", 8)), timeout=10, metadata=at)
        assert sub.run.status.phase == "Running" and sub.run.status.created.seconds == t0
        later = (("jobtree-instant", str(t0 + 3600)),)
        seq = stub.CompleteRun(api.CompleteRunRequest(run=pb.RunRef(name="v")), timeout=10,
                               metadata=later).ledger_sequence
        got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(name="v"), min_ledger_sequence=seq), timeout=10)
        assert got.run.status.phase == "Completed" and got.run.status.ended_at.seconds == t0 + 3600
        # Time moves forward only (the decision loop refuses); a malformed instant is refused here.
        code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=run_msg("w", 8)), timeout=10,
                                                       metadata=at))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "time moves forward only" in details, details
        code, details = code_of(lambda: stub.SubmitRun(api.SubmitRunRequest(run=run_msg("w", 8)), timeout=10,
                                                       metadata=(("jobtree-instant", "noon"),)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("jobtree-instant: "), details
        # Without an instant the command happens at the decision loop's own instant.
        sub = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("w", 8)), timeout=10)
        assert sub.run.status.created.seconds == t0 + 3600
    finally:
        statuses = virtual.stop()
    assert all(code == 0 for code in statuses.values()), statuses


def test_reservation_listed_and_explained(nats_server: NatsServer, tmp_path: Path) -> None:
    """Scenario 40's domain C through the gateway on a virtual clock: rc does not fit, reserves."""
    from jobtree.sim.scenario import load_scenario, load_yaml

    path = Path(__file__).resolve().parents[1] / "scenarios" / "40-reserve-earliest-start.yaml"
    doc = load_yaml(path.read_text())
    assert isinstance(doc, dict)
    first, later = doc["steps"][0]["apply"], doc["steps"][3]["apply"]
    virtual = start_system(nats_server, tmp_path, clock="virtual", nodes=load_scenario(path).nodes)
    try:
        stub = virtual.stub()
        t0 = (("jobtree-instant", "2026-01-05T00:00:00Z"),)
        for m in [d for d in first if d["kind"] == "Budget"]:
            stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(m)), timeout=10, metadata=t0)
        for m in [d for d in first if d["metadata"]["name"] in ("hc1", "hc2")]:
            assert stub.SubmitRun(api.SubmitRunRequest(run=manifest_run(m)), timeout=10,
                                  metadata=t0).run.status.phase == "Running"
        rc = next(d for d in later if d["metadata"]["name"] == "rc")
        sub = stub.SubmitRun(api.SubmitRunRequest(run=manifest_run(rc)), timeout=10,
                             metadata=(("jobtree-instant", "2026-01-05T00:01:00Z"),))
        assert sub.run.status.phase == "Reserved" and sub.run.status.reservation == "default.rc.r000"
        listed = stub.ListReservations(api.ListReservationsRequest(namespace="default", run="rc",
                                                                   min_ledger_sequence=sub.ledger_sequence), timeout=10)
        [res] = listed.reservations
        assert (res.metadata.name, res.spec.deficit_gpus, res.status.state) == ("default.rc.r000", 4, "Pending")
        lead = 15 * 60  # the default reservationLead (the services run the default config)
        assert res.spec.earliest_start.seconds == 1_767_571_200 + 60 + lead
        out = stub.ExplainRun(api.ExplainRunRequest(run=pb.RunRef(name="rc")), timeout=10)
        assert out.lines[0].startswith("default/rc is Reserved (Reserved)")
        assert ("Reservation default.rc.r000 holds its place: 4 GPUs are missing; earliest start "
                "2026-01-05T00:16:00Z.") in out.lines
        assert [r.metadata.name for r in out.reservations] == ["default.rc.r000"]
        view = json_format.MessageToDict(out.sim_view)
        assert (view["reservation"], view["earliestStart"]) == ("default.rc.r000", "2026-01-05T00:16:00Z")
    finally:
        statuses = virtual.stop()
    assert all(code == 0 for code in statuses.values()), statuses


def test_global_usage_on_a_cluster_not_joined_to_a_federation(system: System) -> None:
    started = time.monotonic()
    assert code_of(lambda: system.stub().GlobalUsage(api.GlobalUsageRequest(), timeout=10)) == (
        grpc.StatusCode.UNAVAILABLE, f"no federation answers for cluster {system.cluster}: "
                                  "it is not joined to a federation hub (docs/operator-guide/federation.md)")
    assert time.monotonic() - started < 3, "answered at once, not after the forward timeout"
