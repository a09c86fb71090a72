"""Issue 13's defects, each against real processes: a real nats-server, the services as
processes, the gateway over real gRPC, the real `kubectl-runs`. Each test failed before its fix.

D1  a group holding only committed or refused commands appended a clock-only message under a
    fixed id; the second within the duplicate window forced a full replay ("committed earlier").
D2  a request id reused for a different request was answered OK, echoing a run never created.
D6  a valid but very large run got UNAVAILABLE ("maximum payload exceeded"), retried for ever.
D8  undecodable gRPC requests got UNKNOWN naming Python classes.
D9  a min_ledger_sequence beyond the ledger's end was UNAVAILABLE "retry shortly" after 5 s.
Also: garbage on binder.commit got no reply; a multi-document apply applied its first document
and then failed on the second.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import pytest
import yaml
from test_gateway import BUDGET, System, budget_msg, last_sequence, replay, run_msg, start_system

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.bus import codec, subjects
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def system(nats_server: NatsServer, tmp_path: Path) -> Iterator[System]:
    sys_ = start_system(nats_server, tmp_path / "sys")
    try:
        sys_.stub().ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(), request_id="budget"), timeout=10)
        yield sys_
    finally:
        sys_.stop()


def admission_log(system: System) -> list[dict[str, object]]:
    out = []
    for line in system.supervisor.processes["admission"].log_path.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def rebuilds(system: System) -> list[str]:
    return [str(d.get("why")) for d in admission_log(system) if d.get("msg") == "view caught up with the ledger"
            or d.get("msg") == "view rebuilt from the ledger"]


def request(url: str, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
    async def go() -> bytes:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            return bytes((await nc.request(subject, data, timeout=timeout)).data)
        finally:
            await nc.close()

    return asyncio.run(go())


# --- D1 ----------------------------------------------------------------------------------------


def test_d1_resent_and_refused_commands_commit_nothing_and_force_no_replay(system: System) -> None:
    """Admission on the system clock: a committed command re-sent three times 1.1 s apart, and a
    refused command, append nothing (before: a clock-only message each, the second taken as a
    duplicate of the first, and a full replay of the ledger). The clock's entries then lead the
    next real commit, and the ledger replays to the services' view."""
    stub = system.stub()
    child = convert.manifest_to_proto(_budget("d1-child", "org:b", ["org:a"]))
    stub.ApplyBudget(api.ApplyBudgetRequest(budget=child, request_id="d1-child"), timeout=10)
    first = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d1", 8), request_id="d1-submit"), timeout=10)
    before = last_sequence(system.url, system.cluster)
    for _ in range(3):
        time.sleep(1.1)  # the clock moves a second: the group starts with a clock step
        again = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d1", 8), request_id="d1-submit"), timeout=10)
        assert again.ledger_sequence == first.ledger_sequence
    time.sleep(1.1)
    cycle = convert.manifest_to_proto(_budget("team-a", "org:a", ["org:b"]))
    with pytest.raises(grpc.RpcError) as refused:  # admission refuses it: org:a and org:b would be a cycle
        stub.ApplyBudget(api.ApplyBudgetRequest(budget=cycle, request_id="d1-cycle"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cycle" in refused.value.details()
    assert last_sequence(system.url, system.cluster) == before, "a resent or refused command appended"
    assert "committed earlier" not in rebuilds(system), rebuilds(system)

    time.sleep(1.1)
    later = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d1-later", 8), request_id="d1-later"), timeout=10)
    assert later.ledger_sequence == before + 1
    records = replay(system.url, system.cluster)
    entries = records[-1].batch.entries
    clock = [e for e in entries if not e.command_id]
    assert clock and all(e.WhichOneof("fact") == "clock_advanced" for e in clock), entries
    assert {e.command_id for e in entries if e.command_id} == {"d1-later"}
    got = stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace="default", name="d1-later"),
                                        min_ledger_sequence=later.ledger_sequence), timeout=10)
    assert got.run.status.phase == "Running"
    assert rebuilds(system) == ["take over"], rebuilds(system)


# --- D2 ----------------------------------------------------------------------------------------


def test_d2_a_request_id_reused_for_another_request_is_refused_naming_it(system: System) -> None:
    stub = system.stub()
    a = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d2-a", 8), request_id="r1"), timeout=10)
    with pytest.raises(grpc.RpcError) as reused:
        stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d2-b", 8), request_id="r1"), timeout=10)
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reused.value.details().startswith("request_id: 'r1' was already used for a different request")
    names = [r.metadata.name for r in stub.ListRuns(api.ListRunsRequest(), timeout=10).runs]
    assert "d2-a" in names and "d2-b" not in names
    # The same request again is still answered as the first.
    again = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("d2-a", 8), request_id="r1"), timeout=10)
    assert again.ledger_sequence == a.ledger_sequence
    # The verbs the gateway answers from its view check it too: r1 did not delete d2-a.
    with pytest.raises(grpc.RpcError) as delete:
        stub.DeleteRun(api.DeleteRunRequest(run=pb.RunRef(namespace="default", name="d2-a"), request_id="r1"),
                       timeout=10)
    assert delete.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id: 'r1'" in delete.value.details()
    assert "d2-a" in [r.metadata.name for r in stub.ListRuns(api.ListRunsRequest(), timeout=10).runs]


# --- D6 ----------------------------------------------------------------------------------------


def test_d6_a_very_large_run_is_invalid_naming_the_field(system: System) -> None:
    stub = system.stub()
    before = last_sequence(system.url, system.cluster)
    upstreams = [f"upstream-run-number-{i:05d}-with-a-long-name" for i in range(10_000)]
    many = run_msg("d6-many", 8)
    many.spec.follow.after.extend(upstreams)
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitRun(api.SubmitRunRequest(run=many, request_id="d6-many"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "spec.follow.after: has 10,000 items; at most 256 are allowed"

    big = run_msg("d6-big", 8)
    big.metadata.annotations["example.org/notes"] = "x" * 1_500_000
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitRun(api.SubmitRunRequest(run=big, request_id="d6-big"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("metadata.annotations: makes the Run 1,5"), err.value.details()
    assert "at most 262,144 bytes (256 KiB)" in err.value.details()
    assert last_sequence(system.url, system.cluster) == before


# --- D8 ----------------------------------------------------------------------------------------


def test_d8_undecodable_requests_are_invalid_argument(system: System) -> None:
    with grpc.insecure_channel(system.address) as channel:
        for method, request_type in (("SubmitRun", "SubmitRunRequest"), ("GetRun", "GetRunRequest"),
                                     ("WatchRuns", "WatchRunsRequest")):
            path = f"/jobtree.v1.Jobtree/{method}"
            if method == "WatchRuns":
                call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as err:
                    list(call(b"\xff\xff\xff\xff", timeout=5))
            else:
                call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as err:
                    call(b"\xff\xff\xff\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
            assert err.value.details().startswith(f"request: not a valid jobtree.v1.{request_type}")
            assert "Error" not in err.value.details() and "Exception" not in err.value.details()


# --- D9 ----------------------------------------------------------------------------------------


def test_d9_a_sequence_beyond_the_ledger_is_out_of_range_at_once(system: System) -> None:
    stub = system.stub()
    last = last_sequence(system.url, system.cluster)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=last + 1000), timeout=10)
    assert time.monotonic() - started < 2.0
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.details() == (f"min_ledger_sequence: {last + 1000} is beyond the ledger's end (its last "
                                   f"sequence is {last}); pass a sequence that a write returned")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchRuns(api.WatchRunsRequest(after_ledger_sequence=last + 5), timeout=5))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.details().startswith(f"after_ledger_sequence: {last + 5} is beyond the ledger's end")


# --- the binder, and all-or-nothing applies ----------------------------------------------------------


def test_garbage_on_binder_commit_gets_an_error_reply(system: System) -> None:
    before = last_sequence(system.url, system.cluster)
    raw = request(system.url, subjects.request(system.cluster, "binder", "commit"), b"\xff\x00garbage")
    reply = bus.AppendReply.FromString(raw)
    assert reply.error.code == bus.ERROR_CODE_INVALID_ARGUMENT
    assert (reply.error.field_path, reply.error.problem) == (
        "request", "not a valid jobtree.v1.AppendRequest: wire format was corrupt; nothing was written")
    assert last_sequence(system.url, system.cluster) == before
    log = system.supervisor.processes["binder"].log_path.read_text()
    assert "Traceback" not in log


def _budget(name: str, owner: str, parents: list[str]) -> dict[str, object]:
    doc = json.loads(json.dumps(BUDGET))
    doc["metadata"]["name"] = name
    doc["spec"]["owner"] = owner
    doc["spec"]["parents"] = parents
    return doc


def kubectl_runs(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobtree.cli.runs", "--server", address, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_a_multi_document_apply_is_all_or_nothing(system: System, tmp_path: Path) -> None:
    """Two budgets that form a cycle: before, the first was applied and the second refused."""
    stub = system.stub()
    before = last_sequence(system.url, system.cluster)
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text(yaml.safe_dump_all([_budget("x", "org:x", ["org:y"]), _budget("y", "org:y", ["org:x"])]))
    done = kubectl_runs(system.address, "submit", "-f", str(cycle))
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kubectl-runs: {cycle}[1]: "), done.stderr
    assert "cycle" in lines[0]
    assert last_sequence(system.url, system.cluster) == before
    names = {b.metadata.name for b in stub.ListBudgets(api.ListBudgetsRequest(), timeout=10).budgets}
    assert not names & {"x", "y"}

    good = tmp_path / "good.yaml"
    runs = [{"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": f"m{i}"},
             "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 8}}} for i in range(2)]
    good.write_text(yaml.safe_dump_all([_budget("z", "org:z", []), *runs]))
    done = kubectl_runs(system.address, "submit", "-f", str(good), "--request-id", "multi")
    assert done.returncode == 0, done
    assert done.stdout.splitlines() == [
        f"budget/z applied (ledger sequence {before + 1})",
        f"run/default/m0 submitted: Running (ledger sequence {before + 1})",
        f"run/default/m1 submitted: Running (ledger sequence {before + 1})",
    ]
    assert last_sequence(system.url, system.cluster) == before + 1


def test_apply_refuses_bad_objects_naming_them(system: System) -> None:
    stub = system.stub()
    bad = run_msg("ok", 8)
    bad.spec.resources.total_gpus = 0
    with pytest.raises(grpc.RpcError) as err:
        stub.Apply(api.ApplyRequest(objects=[api.ApplyObject(run=run_msg("fine", 8)), api.ApplyObject(run=bad)]),
                   timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("objects[1].run.spec.resources.totalGPUs:"), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Apply(api.ApplyRequest(), timeout=10)
    assert err.value.details() == "objects: at least one Run or Budget is required"
    with pytest.raises(grpc.RpcError) as err:
        stub.Apply(api.ApplyRequest(objects=[api.ApplyObject(run=run_msg(f"r{i}", 8)) for i in range(65)]),
                   timeout=10)
    assert err.value.details() == "objects: 65 objects; at most 64 apply together"


def test_a_command_digest_ignores_what_a_retry_may_change() -> None:
    cmd = F.ApplyRun(convert.run_from_proto(run_msg("x", 8)))
    one = convert.command_to_proto(cmd, command_id="a", instant=100, epoch=3)
    two = convert.command_to_proto(cmd, command_id="b", instant=200, epoch=9, min_ledger_sequence=4)
    other = convert.command_to_proto(F.ApplyRun(convert.run_from_proto(run_msg("y", 8))), command_id="a")
    assert convert.command_digest(one) == convert.command_digest(two)
    assert convert.command_digest(one) != convert.command_digest(other)
    assert len(convert.command_digest(one)) == 16
    assert codec.type_name(bus.Command) == "jobtree.v1.Command"
