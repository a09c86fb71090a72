"""Fuzzing (hypothesis) against a real system: generated protobuf requests to every gateway
method and to admission, and generated manifests through `kubectl-runs submit`.

Properties, for every generated input:
- no crash: every process stays up, and its log holds no traceback (the `system` fixture);
- an answer, never a traceback: a gRPC status the API documents for bad input (or OK), with a
  one-line message; admission answers a `CommandReply`; the CLI exits 0 or 2 with one line;
- no partial write: a refused input leaves the ledger's last sequence where it was (an Apply of
  several objects commits all of them or none).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import grpc
import nats
import pytest
import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_gateway import BUDGET, System, budget_msg, last_sequence, run_doc, run_msg

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.bus import subjects
from jobtree.cli.runs import main as kubectl_runs

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS}
SERVICE = api.DESCRIPTOR.services_by_name["Jobtree"]
UNARY = [m for m in SERVICE.methods if not m.server_streaming]
NAMES = st.sampled_from(["", "a", "steady", "team-a", "org:a", "H100-80GB", "default", "x" * 300, "Bad Name", "é",
                         "\x00", "org:a:*", "-1", "gw"])
TEXT = st.one_of(NAMES, st.text(max_size=12))
INTS = st.one_of(st.sampled_from([0, 1, -1, 8, 16, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, 1, 5, 10**9]), st.integers(0, 2**64 - 1))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    return INTS


@st.composite
def message(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> Message:
    """A message of type `desc` with a random subset of its fields set to random values."""
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if depth > 4 or not draw(st.booleans()):
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                if value.message_type is None:
                    for _ in range(draw(st.integers(0, 2))):
                        getattr(msg, field.name)[draw(_scalar(key))] = draw(_scalar(value))
                continue
            if field.message_type.full_name.startswith("google.protobuf."):
                if field.message_type.full_name == "google.protobuf.Timestamp":
                    getattr(msg, field.name).seconds = draw(st.integers(-(2**34), 2**34))
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 2))):
                    getattr(msg, field.name).add().CopyFrom(draw(message(field.message_type, depth + 1)))
            else:
                getattr(msg, field.name).CopyFrom(draw(message(field.message_type, depth + 1)))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _valid_request(method: str) -> Message | None:
    """A valid request to start mutating from, for the writes (a fully random one rarely parses)."""
    if method == "SubmitRun":
        return api.SubmitRunRequest(run=run_msg("fuzz", 8))
    if method == "ApplyBudget":
        return api.ApplyBudgetRequest(budget=budget_msg(BUDGET))
    return None


@st.composite
def request(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method, request bytes): a random message, a mutated valid one, or random bytes."""
    method = draw(st.sampled_from(UNARY))
    how = draw(st.sampled_from(["random", "mutated", "bytes"]))
    base = _valid_request(method.name)
    if how == "bytes":
        return method.name, draw(st.binary(max_size=64))
    if how == "mutated" and base is not None:
        extra = draw(message(method.input_type))
        base.MergeFrom(extra)
        return method.name, base.SerializeToString()
    return method.name, draw(message(method.input_type)).SerializeToString()


@pytest.fixture(scope="module", autouse=True)
def seeded(system: System) -> None:
    system.stub().ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(BUDGET)), timeout=10)
    system.stub().SubmitRun(api.SubmitRunRequest(run=run_msg("steady", 8)), timeout=10)


@FUZZ
@given(req=request())
def test_fuzzed_gateway_requests(system: System, req: tuple[str, bytes]) -> None:
    method, data = req
    before = last_sequence(system.url, system.cluster)
    channel = grpc.insecure_channel(system.address)
    try:
        raw = channel.unary_unary(f"/jobtree.v1.Jobtree/{method}", request_serializer=None,
                                  response_deserializer=None)
        try:
            raw(data, timeout=10)
            event(f"{method}: OK")
            return  # answered: a write that was valid may have committed
        except grpc.RpcError as err:
            code, details = err.code(), err.details()  # type: ignore[attr-defined]
            event(f"{method}: {code.name}")
    finally:
        channel.close()
    if method == "GlobalUsage" and code == grpc.StatusCode.UNAVAILABLE:  # a valid question; no federation here
        assert details.startswith(f"no federation answers for cluster {system.cluster}: it is not joined"), details
        return
    assert code in BAD_INPUT, (method, code, details)
    assert details and "\n" not in details and "Traceback" not in details, details
    assert last_sequence(system.url, system.cluster) == before, f"{method} was refused ({details}) but wrote"


@FUZZ
@given(cmd=st.one_of(message(bus.Command.DESCRIPTOR), st.binary(max_size=64)))
def test_fuzzed_admission_commands(system: System, cmd: Message | bytes) -> None:
    data = cmd if isinstance(cmd, bytes) else cmd.SerializeToString()
    before = last_sequence(system.url, system.cluster)

    async def ask() -> bus.CommandReply:
        nc = await nats.connect(system.url, connect_timeout=2, allow_reconnect=False)
        try:
            msg = await nc.request(subjects.request(system.cluster, "admission", "command"), data, timeout=10)
        finally:
            await nc.close()
        return bus.CommandReply.FromString(msg.data)

    reply = asyncio.run(ask())
    event(bus.ErrorCode.Name(reply.error.code))
    if reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
        assert reply.error.code in (bus.ERROR_CODE_INVALID_ARGUMENT, bus.ERROR_CODE_NOT_FOUND,
                                    bus.ERROR_CODE_FAILED_PRECONDITION), reply
        assert "\n" not in reply.error.problem and "Traceback" not in reply.error.problem
        assert last_sequence(system.url, system.cluster) == before, f"refused ({reply.error.problem}) but wrote"


def _mutate(doc: Any, path: list[str | int], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict) and isinstance(head, str):
        return {**doc, head: _mutate(doc.get(head), rest, value)}
    if isinstance(doc, list) and isinstance(head, int) and doc:
        i = head % len(doc)
        return [*doc[:i], _mutate(doc[i], rest, value), *doc[i + 1:]]
    return value


KEYS = st.sampled_from(["apiVersion", "kind", "metadata", "name", "namespace", "spec", "owner", "resources",
                        "gpuType", "totalGPUs", "locality", "groupGPUs", "envelopes", "concurrency", "parents",
                        "funding", "sponsors", "malleable", "roles", "colour"])
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), INTS, TEXT, st.floats(allow_nan=False)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
                      max_leaves=6)


@FUZZ
@given(docs=st.lists(st.tuples(st.sampled_from(["run", "budget"]), st.lists(st.one_of(KEYS, st.integers(0, 3)),
                                                                             max_size=4), VALUES),
                     min_size=1, max_size=3))
def test_fuzzed_manifests_through_kubectl_runs(system: System, docs: list[tuple[str, list[Any], Any]],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    manifests = [_mutate(run_doc("fuzz-m", 8) if kind == "run" else BUDGET, path, value) for kind, path, value in docs]
    path = tmp_path_factory.mktemp("m") / "fuzz.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    before = last_sequence(system.url, system.cluster)
    out, err = io.StringIO(), io.StringIO()
    code = kubectl_runs(["--server", system.address, "submit", "-f", str(path)], out=out, err=err)
    assert code in (0, 2), (code, err.getvalue())
    event(f"exit {code}")
    if code == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kubectl-runs: "), err.getvalue()
        assert last_sequence(system.url, system.cluster) == before, f"refused ({lines[0]}) but wrote"
