"""Bad gRPC requests to the gateway: the exact status and message, and nothing changed.

One system (nats-server, binder, admission, budget, packer, gateway: real processes) with a
budget, a running run and an ended one. Each case sends one request and checks its status code
and its whole message, then that the ledger's last sequence and everything the gateway shows
(runs, budgets) are what they were before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cases import ids
from test_gateway import BUDGET, System, budget_msg, last_sequence, run_msg

from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    request: Callable[[], Any]
    """The request message, or bytes sent as the request (not a message at all)."""
    code: grpc.StatusCode
    message: str


def run_with(**changes: Any) -> pb.Run:
    run = run_msg("bad", 8)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target: Any = run
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return run


def budget_with(mutate: Callable[[pb.Budget], None]) -> pb.Budget:
    budget = budget_msg()
    mutate(budget)
    return budget


def ref(name: str) -> pb.RunRef:
    return pb.RunRef(namespace="default", name=name)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _apply(*objects: pb.Run | pb.Budget) -> api.ApplyRequest:
    req = api.ApplyRequest()
    for obj in objects:
        item = req.objects.add()
        (item.run if isinstance(obj, pb.Run) else item.budget).CopyFrom(obj)
    return req


def _self_parent(b: pb.Budget) -> None:
    b.spec.parents.append(b.spec.owner)


def _no_flavor(b: pb.Budget) -> None:
    b.spec.envelopes[0].flavor = ""


def _negative(b: pb.Budget) -> None:
    b.spec.envelopes[0].concurrency = -1


def _twice(b: pb.Budget) -> None:
    b.spec.envelopes.add().CopyFrom(b.spec.envelopes[0])


CASES = [
    Case("submit-no-owner", "SubmitRun", lambda: api.SubmitRunRequest(run=run_with(spec__owner="")), INVALID,
         "spec.owner: must be an owner id such as org:ai:rai: a non-empty string without whitespace; got ''"),
    Case("submit-owner-with-space", "SubmitRun", lambda: api.SubmitRunRequest(run=run_with(spec__owner="org a")),
         INVALID, "spec.owner: must be an owner id such as org:ai:rai: a non-empty string without whitespace; "
                  "got 'org a'"),
    Case("submit-zero-gpus", "SubmitRun",
         lambda: api.SubmitRunRequest(run=run_with(spec__resources__total_gpus=0)), INVALID,
         'spec.resources.totalGPUs: must be a positive integer, got 0'),
    Case("submit-bad-name", "SubmitRun", lambda: api.SubmitRunRequest(run=run_with(metadata__name="Bad_Name")),
         INVALID,
         "metadata.name: must be a name of lowercase letters, digits, '-' and '.', starting and "
         "ending with a letter or digit, at most 253 characters; got 'Bad_Name'"),
    Case("submit-no-gpu-type", "SubmitRun", lambda: api.SubmitRunRequest(run=run_with(spec__resources__gpu_type="")),
         INVALID,
         'spec.resources.gpuType: must be a GPU flavor such as H100-80GB: a non-empty string without '
         "whitespace; got ''"),
    Case("submit-bad-namespace", "SubmitRun",
         lambda: api.SubmitRunRequest(run=run_with(metadata__namespace="Team A")), INVALID,
         "metadata.namespace: must be a namespace of lowercase letters, digits and '-', starting and "
         "ending with a letter or digit, at most 63 characters; got 'Team A'"),
    Case("submit-empty-run", "SubmitRun", lambda: api.SubmitRunRequest(), INVALID,
         'metadata: is required'),
    Case("submit-not-a-message", "SubmitRun", lambda: b"\xff\xff\xff\xff", INVALID,
         'request: not a valid jobtree.v1.SubmitRunRequest: wire format was corrupt'),
    Case("apply-nothing", "Apply", lambda: api.ApplyRequest(), INVALID,
         "objects: at least one Run or Budget is required"),
    Case("apply-too-many", "Apply", lambda: _apply(*(run_msg(f"r{i}") for i in range(65))), INVALID,
         "objects: 65 objects; at most 64 apply together"),
    Case("apply-empty-object", "Apply", lambda: api.ApplyRequest(objects=[api.ApplyObject()]), INVALID,
         "objects[0]: must hold a run or a budget"),
    Case("apply-second-object-bad", "Apply",
         lambda: _apply(run_msg("fine"), budget_with(_no_flavor)), INVALID,
         'objects[1].budget.spec.envelopes[0].flavor: must be a GPU flavor such as H100-80GB: a '
         "non-empty string without whitespace; got ''"),
    Case("budget-own-parent", "ApplyBudget", lambda: api.ApplyBudgetRequest(budget=budget_with(_self_parent)),
         INVALID,
         "spec.parents[0]: must not be the budget's own owner 'org:a' (a cycle)"),
    Case("budget-negative-concurrency", "ApplyBudget",
         lambda: api.ApplyBudgetRequest(budget=budget_with(_negative)), INVALID,
         'spec.envelopes[0].concurrency: must be a non-negative integer, got -1'),
    Case("budget-envelope-twice", "ApplyBudget", lambda: api.ApplyBudgetRequest(budget=budget_with(_twice)),
         INVALID,
         "spec.envelopes[1].name: duplicate envelope name 'main'; names must be unique within the "
         'budget'),
    Case("budget-empty", "ApplyBudget", lambda: api.ApplyBudgetRequest(), INVALID,
         'metadata: is required'),
    Case("delete-unknown", "DeleteRun", lambda: api.DeleteRunRequest(run=ref("nosuch")), NOT_FOUND,
         "run default/nosuch not found"),
    Case("delete-no-name", "DeleteRun", lambda: api.DeleteRunRequest(run=ref("")), INVALID,
         'run.name: is required'),
    Case("shrink-to-zero", "ShrinkRun", lambda: api.ShrinkRunRequest(run=ref("steady"), desired_total_gpus=0),
         INVALID, "desiredTotalGPUs: must be a positive integer, got 0"),
    Case("shrink-unknown", "ShrinkRun", lambda: api.ShrinkRunRequest(run=ref("nosuch"), desired_total_gpus=8),
         NOT_FOUND, "run default/nosuch not found"),
    Case("shrink-not-malleable", "ShrinkRun",
         lambda: api.ShrinkRunRequest(run=ref("steady"), desired_total_gpus=4), PRECONDITION,
         'shrink.run: run default/steady is not malleable; only malleable runs shrink'),
    Case("complete-ended", "CompleteRun", lambda: api.CompleteRunRequest(run=ref("ended")), PRECONDITION,
         'complete: run default/ended already ended (Completed)'),
    Case("fail-unknown", "FailRun", lambda: api.FailRunRequest(run=ref("nosuch")), NOT_FOUND,
         "run default/nosuch not found"),
    Case("sponsor-empty", "AddSponsor", lambda: api.AddSponsorRequest(run=ref("steady")), INVALID,
         "sponsor: is required (an owner id)"),
    Case("sponsor-with-space", "AddSponsor", lambda: api.AddSponsorRequest(run=ref("steady"), sponsor="org x"),
         INVALID,
         'sponsor: must be an owner id such as org:ai:rai: a non-empty string without whitespace; '
         "got 'org x'"),
    Case("sponsor-ended-run", "AddSponsor", lambda: api.AddSponsorRequest(run=ref("ended"), sponsor="org:b"),
         PRECONDITION,
         'run default/ended already ended (Completed); cannot add a sponsor to it'),
    Case("get-unknown", "GetRun", lambda: api.GetRunRequest(run=ref("nosuch")), NOT_FOUND,
         'run default/nosuch not found'),
    Case("get-beyond-the-ledger", "GetRun",
         lambda: api.GetRunRequest(run=ref("steady"), min_ledger_sequence=10**9), grpc.StatusCode.OUT_OF_RANGE,
         "min_ledger_sequence: 1000000000 is beyond the ledger's end (its last sequence is 8); pass "
         'a sequence that a write returned'),
    Case("request-id-reused", "SubmitRun",
         lambda: api.SubmitRunRequest(run=run_msg("other"), request_id="steady-submit"), INVALID,
         "request_id: 'steady-submit' was already used for a different request (committed at ledger "
         'sequence 6); send a new id for a new request, the same request to retry'),
    Case("plan-invalid-run", "PlanRun", lambda: api.PlanRunRequest(run=run_with(spec__owner="")), INVALID,
         'spec.owner: must be an owner id such as org:ai:rai: a non-empty string without whitespace; '
         "got ''"),
    Case("list-not-a-message", "ListRuns", lambda: b"\x0a\xff", INVALID,
         'request: not a valid jobtree.v1.ListRunsRequest: wire format was corrupt'),
]


@pytest.fixture(scope="module", autouse=True)
def seeded(system: System) -> None:
    """A budget, a running run (`steady`) and an ended one (`ended`)."""
    stub = system.stub()
    stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(BUDGET)), timeout=10)
    stub.SubmitRun(api.SubmitRunRequest(run=run_msg("steady", 8), request_id="steady-submit"), timeout=10)
    stub.SubmitRun(api.SubmitRunRequest(run=run_msg("ended", 8)), timeout=10)
    stub.CompleteRun(api.CompleteRunRequest(run=ref("ended")), timeout=10)


def seen(system: System, stub: api_grpc.JobtreeStub) -> tuple[int, bytes, bytes]:
    """The ledger's last sequence and what the gateway shows, once it has caught up with it."""
    seq = last_sequence(system.url, system.cluster)
    runs = stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=seq), timeout=10)
    budgets = stub.ListBudgets(api.ListBudgetsRequest(), timeout=10)
    return seq, runs.SerializeToString(deterministic=True), budgets.SerializeToString(deterministic=True)


def call(system: System, method: str, request: Any) -> grpc.RpcError:
    channel = grpc.insecure_channel(system.address)
    system.channels.append(channel)
    data = request if isinstance(request, bytes) else request.SerializeToString()
    raw = channel.unary_unary(f"/jobtree.v1.Jobtree/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw(data, timeout=10)
    return info.value


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bad_grpc_request(system: System, case: Case, tmp_path: Path) -> None:
    stub = system.stub()
    before = seen(system, stub)
    err = call(system, case.method, case.request())
    assert (err.code(), err.details()) == (case.code, case.message)  # type: ignore[attr-defined]
    assert "Traceback" not in err.details() and "\n" not in err.details()  # type: ignore[attr-defined]
    assert seen(system, stub) == before, "a refused request changed the ledger or the state"
