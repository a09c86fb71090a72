"""A federation grant applied by a real cluster (CALCULUS §9): `SetAllowance` sent to admission
over NATS is committed as an `allowance_set` ledger entry, the run above the allowance turns
unfunded without stopping, a stale grant changes nothing, and a raise funds it again — as the
gateway's follower sees it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import pytest
from test_gateway import System, budget_msg, replay, run_msg, start_system

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.bus import codec, subjects
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts

CAPPED = {
    "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "team-a"},
    "spec": {"owner": "org:a", "envelopes": [
        {"name": "main", "flavor": "H100-80GB", "selector": {"cluster": "gw"}, "concurrency": 16}],
        "aggregateCaps": [{"name": "global", "flavor": "H100-80GB", "envelopes": ["main"], "maxConcurrency": 16}]},
}


@pytest.fixture(scope="module")
def system(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    sys_ = start_system(nats_server, tmp_path_factory.mktemp("allowances"))
    yield sys_
    statuses = sys_.stop()
    assert all(code == 0 for code in statuses.values()), (statuses, sys_.logs())


def grant(system: System, cmd: facts.SetAllowance, command_id: str) -> bus.CommandReply:
    async def go() -> bus.CommandReply:
        nc = await nats.connect(system.url, connect_timeout=2, allow_reconnect=False)
        try:
            msg = convert.command_to_proto(cmd, command_id=command_id)
            msg.identity = "service:federation"
            raw = await nc.request(subjects.request(system.cluster, "admission", "command"), codec.encode(msg),
                                   timeout=10, headers=codec.headers(msg))
            return codec.decode(raw.data, bus.CommandReply)
        finally:
            await nc.close()

    return asyncio.run(go())


def funding(system: System, sequence: int) -> str:
    """The run's funding by class, as `explain -o json` shows it (SCENARIOS.md STATE.runs[])."""
    got = system.stub().ExplainRun(api.ExplainRunRequest(run=pb.RunRef(namespace="default", name="wide"),
                                                         min_ledger_sequence=sequence), timeout=10)
    f = got.sim_view["funding"]
    return ", ".join(f"{int(f[k])} {k}" for k in ("owned", "unfunded") if f[k])


def test_a_grant_is_committed_and_classifies_the_run(system: System) -> None:
    stub = system.stub()
    stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(CAPPED)), timeout=10)
    done = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("wide", 16)), timeout=10)
    assert funding(system, done.ledger_sequence) == "16 owned"

    lower = grant(system, facts.SetAllowance("team-a/global", 8, 1), "grant-1")
    assert lower.error.code == bus.ERROR_CODE_UNSPECIFIED, lower
    assert funding(system, lower.ledger_sequence) == "8 owned, 8 unfunded"
    entries = [(r.sequence, e) for r in replay(system.url, system.cluster) for e in r.batch.entries
               if e.WhichOneof("fact") == "allowance_set"]
    assert [(e.allowance_set.cap, e.allowance_set.concurrency, e.allowance_set.version, e.identity)
            for _, e in entries] == [("team-a/global", 8, 1, "service:federation")]

    stale = grant(system, facts.SetAllowance("team-a/global", 16, 1), "grant-1-again")
    assert stale.error.code == bus.ERROR_CODE_UNSPECIFIED
    assert funding(system, stale.ledger_sequence) == "8 owned, 8 unfunded", "a stale grant changes nothing"

    unknown = grant(system, facts.SetAllowance("team-a/nosuch", 4, 2), "grant-bad")
    assert (unknown.error.code, unknown.error.field_path) == (bus.ERROR_CODE_NOT_FOUND, "allowance.cap")

    raise_ = grant(system, facts.SetAllowance("team-a/global", 16, 2), "grant-2")
    assert funding(system, raise_.ledger_sequence) == "16 owned"
