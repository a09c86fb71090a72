"""Garbled bus messages, as a misbehaving service would send them, to every service that answers
requests: each gets an error reply (never a silent timeout), and nothing changes.

Replies are read as the caller would: admission answers `CommandReply`, the binder
`AppendReply`, the budget and packer services a `jobtree.v1.Error` typed by the `Jobtree-Type`
header. Each case checks the code and the message, and that the ledger's last sequence and the
gateway's runs and budgets are as they were.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import nats
import pytest
from cases import ids
from test_bad_grpc import seen
from test_gateway import System

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.bus import codec, subjects

GARBAGE = b"\xff\xfe\x00garbage"


@dataclass(frozen=True)
class Case:
    id: str
    service: str
    verb: str
    payload: Callable[[], bytes]
    code: str
    message: str


def command(**fields: object) -> Callable[[], bytes]:
    def make() -> bytes:
        msg = bus.Command(command_id="misbehaving")
        for name, value in fields.items():
            getattr(msg, name).CopyFrom(value)
        return msg.SerializeToString()
    return make


def append(**fields: object) -> Callable[[], bytes]:
    return lambda: bus.AppendRequest(**fields).SerializeToString()  # type: ignore[arg-type]


CASES = [
    Case("admission-garbage", "admission", "command", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.Command: wire format was corrupt'),
    Case("admission-no-command", "admission", "command", command(),
         "INVALID_ARGUMENT", 'command: is required: one of apply_budget, apply_run, delete_run, complete_run, fail_run, '
         'fail_node, cordon_node, uncordon_node, add_node, shrink_run, report_eta, tick, batch, set_allowance'),
    Case("admission-bad-run", "admission", "command", command(apply_run=bus.ApplyRun(run=pb.Run())),
         "INVALID_ARGUMENT", 'apply_run.run.metadata: is required'),
    Case("admission-unknown-node", "admission", "command", command(cordon_node=bus.CordonNode(node="nosuch")),
         "NOT_FOUND", "cordon: unknown node 'nosuch'"),
    Case("admission-empty-batch", "admission", "command", command(batch=bus.Batch()),
         "INVALID_ARGUMENT", 'batch.commands: must hold at least one command'),
    Case("binder-garbage", "binder", "commit", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.AppendRequest: wire format was corrupt; nothing was written'),
    Case("binder-stale-epoch", "binder", "commit", append(epoch=0, expected_last_sequence=1),
         "STALE_EPOCH", 'epoch 0 is older than 1'),
    Case("budget-state-garbage", "budget", "state", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.StateRequest: wire format was corrupt'),
    Case("budget-usage-garbage", "budget", "usage", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.UsageRequest: wire format was corrupt'),
    Case("budget-sponsors-garbage", "budget", "sponsors", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.ListSponsorsRequest: wire format was corrupt'),
    Case("packer-nodes-garbage", "packer", "nodes", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.ListNodesRequest: wire format was corrupt'),
    Case("packer-plan-garbage", "packer", "plan", lambda: GARBAGE,
         "INVALID_ARGUMENT", 'request: not a valid jobtree.v1.PlanRunRequest: wire format was corrupt'),
]


def ask(system: System, case: Case) -> bus.Error:
    """The error the service answered with (the test fails on a timeout: no silent drops)."""
    async def go() -> bus.Error:
        nc = await nats.connect(system.url, connect_timeout=2, allow_reconnect=False)
        try:
            msg = await nc.request(subjects.request(system.cluster, case.service, case.verb), case.payload(),
                                   timeout=3)
        finally:
            await nc.close()
        if (msg.headers or {}).get(codec.TYPE_HEADER) == codec.type_name(bus.Error):
            return codec.decode(msg.data, bus.Error)
        if case.service == "admission":
            return bus.CommandReply.FromString(msg.data).error
        if case.service == "binder":
            return bus.AppendReply.FromString(msg.data).error
        raise AssertionError(f"{case.service}.{case.verb} answered garbage with something else: {msg.data!r}")

    return asyncio.run(go())


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_garbled_bus_message(system: System, case: Case) -> None:
    stub = system.stub()
    before = seen(system, stub)
    error = ask(system, case)
    code = bus.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_")
    assert (code, f"{error.field_path}: {error.problem}" if error.field_path else error.problem) == \
        (case.code, case.message)
    assert "Traceback" not in error.problem
    assert seen(system, stub) == before, "a garbled message changed the ledger or the state"
