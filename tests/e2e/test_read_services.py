"""The read services against a live pipeline: budget (state, usage, sponsors), packer (nodes,
plan) and resolver, each a real `jobtree serve` process beside a real admission and binder.

The world is built once per module by commands sent to admission on a virtual clock; the same
commands are applied to an in-process core `Cluster`, which is the oracle for what the
services must answer. The resolver is tested on the system clock with its own cluster.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import service_pb2 as svc
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import NEXT_TIMER, Ledger
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.manifest import parse_manifest, parse_node
from jobtree.core.model import ClusterConfig, Node
from jobtree.core.views import state_json
from jobtree.sim.live import Service, restore_state, start_service, stop_services

T = TypeVar("T")
T0 = 1_767_571_200  # 2026-01-05T00:00:00Z
API = "rq.davidlangworthy.io/v1"
READ_SERVICES = ("admission", "binder", "budget", "packer", "resolver")


def node(name: str, domain: str) -> Node:
    labels = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": domain, "gpu.flavor": "H100-80GB"}
    return parse_node({"name": name, "gpus": 8, "labels": labels}, "")


def budget(name: str, owner: str, envelope: dict[str, Any]) -> dict[str, Any]:
    env = {"flavor": "H100-80GB", "selector": {"cluster": "gpu-a"}, **envelope}
    return {"apiVersion": API, "kind": "Budget", "metadata": {"name": name},
            "spec": {"owner": owner, "envelopes": [env]}}


def run_doc(name: str, owner: str, gpus: int, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Run", "metadata": {"name": name, "namespace": "default"},
            "spec": {"owner": owner, "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus}, **spec}}


WORLD: list[tuple[int, F.Command]] = [
    *[(T0, F.AddNode(node(n, d))) for n, d in
      (("a-00", "A"), ("a-01", "A"), ("a-02", "A"), ("a-03", "A"), ("b-00", "B"), ("b-01", "B"))],
    (T0, F.ApplyBudget(parse_manifest(budget("team-a", "org:team-a", {"name": "west", "concurrency": 16})))),
    (T0, F.ApplyBudget(parse_manifest(budget("lender", "org:lender", {
        "name": "pool", "concurrency": 40, "maxGPUHours": 500,
        "lending": {"allow": True, "to": ["org:team-*"], "maxConcurrency": 8, "maxGPUHours": 100}})))),
    (T0, F.ApplyRun(parse_manifest(run_doc("train", "org:team-a", 16, locality={"groupGPUs": 8})))),
    (T0, F.ApplyRun(parse_manifest(run_doc("opp", "org:nobody", 8)))),
    (T0, F.CordonNode("b-01")),
    (T0 + 3600, F.Tick()),
]
"""Commands and their instants: two budgets (one lends), a funded and an unfunded run, a cordon."""


async def ask(nc: Any, subject: str, msg: Message, reply: type[T], timeout: float = 10.0) -> T:
    raw = await nc.request(subject, codec.encode(msg), timeout=timeout, headers=codec.headers(msg))
    return codec.decode(raw.data, reply)  # type: ignore[arg-type, type-var, no-any-return]


def on(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    async def main() -> T:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            return await fn(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


async def wait_healthy(nc: Any, cluster: str, services: list[Service], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for s in services:
        while True:
            assert s.proc.poll() is None, f"{s.name} exited{s.tail()}"
            try:
                await nc.request(subjects.request(cluster, s.name, "health"), b"", timeout=0.5)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                assert time.monotonic() < deadline, f"{s.name} not healthy{s.tail()}"
                await asyncio.sleep(0.05)


async def send(nc: Any, cluster: str, cmd: F.Command, command_id: str, instant: int) -> int:
    """One command to admission (retried while the leader is being elected); its sequence."""
    msg = convert.command_to_proto(cmd, command_id=command_id, instant=instant)
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = await ask(nc, subjects.request(cluster, "admission", "command"), msg, bus.CommandReply)
            break
        except nats.errors.NoRespondersError:
            assert time.monotonic() < deadline, "admission never answered"
            await asyncio.sleep(0.1)
    assert not reply.HasField("error"), reply.error
    return reply.ledger_sequence


@dataclass
class Pipeline:
    url: str
    cluster: str
    services: list[Service]
    oracle: Cluster
    sequence: int

    def ask(self, service: str, verb: str, msg: Message, reply: type[T], timeout: float = 10.0) -> T:
        subject = subjects.request(self.cluster, service, verb)
        return on(self.url, lambda nc: ask(nc, subject, msg, reply, timeout))

    def last_sequence(self) -> int:
        async def last(nc: Any) -> int:
            return await Ledger(nc.jetstream(), self.cluster).last_sequence()

        return on(self.url, last)


def start_pipeline(server: NatsServer, cluster: str, log_dir: Path, clock: str,
                   names: tuple[str, ...] = READ_SERVICES) -> list[Service]:
    async def setup(nc: Any) -> None:
        await Ledger(nc.jetstream(), cluster).create()

    on(server.url, setup)
    config = ClusterConfig(cluster=cluster)
    services = [start_service(n, cluster, server.url, config, log_dir, clock) for n in names]
    try:
        on(server.url, lambda nc: wait_healthy(nc, cluster, services))
    except BaseException:
        stop_services(services)
        raise
    return services


@pytest.fixture(scope="module")
def pipeline(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    cluster = "e2e-read"
    services = start_pipeline(nats_server, cluster, tmp_path_factory.mktemp("read-services"), "virtual")
    oracle = Cluster(ClusterConfig(cluster=cluster), (), 0)
    try:
        async def build(nc: Any) -> int:
            seq = 0
            for i, (t, cmd) in enumerate(WORLD):
                seq = max(seq, await send(nc, cluster, cmd, f"world-{i}", t))
                oracle.advance(t)
                oracle.submit(cmd)
            return seq

        sequence = on(nats_server.url, build)
        yield Pipeline(nats_server.url, cluster, services, oracle, sequence)
    finally:
        stop_services(services)
    for s in services:
        assert s.proc.returncode == 0, f"{s.name} did not stop cleanly{s.tail()}"


# --- budget ------------------------------------------------------------------------------------


def test_state_is_the_core_view(pipeline: Pipeline) -> None:
    reply = pipeline.ask("budget", "state", bus.StateRequest(min_ledger_sequence=pipeline.sequence), bus.StateReply)
    assert not reply.HasField("error"), reply.error
    assert reply.ledger_sequence >= pipeline.sequence
    got = restore_state(json_format.MessageToDict(reply.state))
    assert got == state_json(pipeline.oracle)
    assert got["time"] == "2026-01-05T01:00:00Z"
    assert [(r["key"], r["phase"]) for r in got["runs"]] == [("default/opp", "Running"), ("default/train", "Running")]


def test_state_waits_for_its_sequence_then_answers_unavailable(pipeline: Pipeline) -> None:
    started = time.monotonic()
    reply = pipeline.ask("budget", "state", bus.StateRequest(min_ledger_sequence=pipeline.sequence + 100),
                         bus.StateReply, timeout=15)
    assert reply.error.code == bus.ERROR_CODE_UNAVAILABLE
    assert reply.ledger_sequence == pipeline.sequence
    assert "not yet" in reply.error.problem
    assert time.monotonic() - started >= 4  # it waited for the view before giving up


def test_usage(pipeline: Pipeline) -> None:
    usage = pipeline.ask("budget", "usage", svc.UsageRequest(), svc.UsageResponse)
    assert usage.at.seconds == T0 + 3600
    rows = {(e.budget, e.envelope): e for e in usage.envelopes}
    assert sorted(rows) == [("lender", "pool"), ("team-a", "west")]
    west = rows[("team-a", "west")]
    assert (west.owner, west.flavor, west.concurrency, west.headroom) == ("org:team-a", "H100-80GB", 16, 0)
    assert json_format.MessageToDict(west.funded, always_print_fields_with_no_presence=True) == {
        "owned": 16, "shared": 0, "borrowed": 0, "spare": 0}
    assert west.consumed_gpu_hours == pytest.approx(16.0)
    assert not west.HasField("max_gpu_hours")
    pool = rows[("lender", "pool")]
    assert pool.headroom == 40 and pool.max_gpu_hours == 500 and pool.consumed_gpu_hours == 0
    assert dict(usage.unfunded_gpu_hours) == {"org:nobody": pytest.approx(8.0)}
    # The view's numbers are the STATE's.
    expected = {(b["name"], e["name"]): e for b in state_json(pipeline.oracle)["budgets"] for e in b["envelopes"]}
    for key, row in rows.items():
        assert row.headroom == expected[key]["headroom"]
        assert row.consumed_gpu_hours == expected[key]["consumedGPUHours"]
    # Filters.
    mine = pipeline.ask("budget", "usage", svc.UsageRequest(owner="org:team-a"), svc.UsageResponse)
    assert [(e.budget, e.envelope) for e in mine.envelopes] == [("team-a", "west")]
    assert dict(mine.unfunded_gpu_hours) == {}
    assert not pipeline.ask("budget", "usage", svc.UsageRequest(flavor="A100-40GB"), svc.UsageResponse).envelopes
    assert [e.budget for e in pipeline.ask("budget", "usage", svc.UsageRequest(budget="lender"),
                                            svc.UsageResponse).envelopes] == ["lender"]


def test_sponsors(pipeline: Pipeline) -> None:
    got = pipeline.ask("budget", "sponsors", svc.ListSponsorsRequest(owner="org:team-a"), svc.ListSponsorsResponse)
    assert [(s.owner, s.budget, s.envelope, s.flavor) for s in got.sponsors] == [
        ("org:lender", "lender", "pool", "H100-80GB")]
    # Headroom 40, lowered to the lending cap of 8; hours: the lending cap (100) is below the
    # envelope's own (500).
    assert got.sponsors[0].lendable_gpus == 8
    assert got.sponsors[0].lendable_gpu_hours == pytest.approx(100.0)
    # The ACL is `org:team-*`: nobody else borrows; the lender's own envelope is not lending.
    for owner in ("org:nobody", "org:lender"):
        assert not pipeline.ask("budget", "sponsors", svc.ListSponsorsRequest(owner=owner),
                                svc.ListSponsorsResponse).sponsors
    assert not pipeline.ask("budget", "sponsors", svc.ListSponsorsRequest(owner="org:team-b", flavor="A100-40GB"),
                            svc.ListSponsorsResponse).sponsors


# --- packer ------------------------------------------------------------------------------------


def test_nodes(pipeline: Pipeline) -> None:
    got = pipeline.ask("packer", "nodes", svc.ListNodesRequest(), svc.ListNodesResponse)
    assert [(n.name, n.gpus, n.state) for n in got.nodes] == [
        ("a-00", 8, "Ready"), ("a-01", 8, "Ready"), ("a-02", 8, "Ready"), ("a-03", 8, "Ready"),
        ("b-00", 8, "Ready"), ("b-01", 8, "Cordoned")]
    assert dict(got.nodes[4].labels)["fabric.domain"] == "B"


def _plan(pipeline: Pipeline, doc: dict[str, Any]) -> svc.PlanRunResponse:
    msg = svc.PlanRunRequest()
    json_format.ParseDict(doc, msg.run)
    return pipeline.ask("packer", "plan", msg, svc.PlanRunResponse)


def _oracle_plan(pipeline: Pipeline, doc: dict[str, Any]) -> Cluster:
    what_if = copy.deepcopy(pipeline.oracle)
    what_if.submit(F.ApplyRun(parse_manifest(doc)))
    return what_if


def test_plan_fits_now_and_says_how_it_is_funded(pipeline: Pipeline) -> None:
    before = pipeline.last_sequence()
    doc = run_doc("borrow", "org:team-b", 8, funding={"allowBorrow": True, "sponsors": ["org:lender"]})
    plan = _plan(pipeline, doc)
    assert plan.fits_now and not plan.HasField("earliest_start")
    oracle = _oracle_plan(pipeline, doc)
    leases = oracle.open_by_run["default/borrow"].values()
    domains: dict[tuple[int, str], int] = {}
    for lease in leases:
        key = (lease.group, oracle.topo.domain_of(lease.node))
        domains[key] = domains.get(key, 0) + lease.gpus
    assert [(p.group, p.domain, p.gpus, p.spares) for p in plan.placement] == [
        (g, d, n, 0) for (g, d), n in sorted(domains.items())]
    assert sum(p.gpus for p in plan.placement) == 8
    assert [(f.paid_by.budget, f.paid_by.envelope, f.funding_class, f.gpus) for f in plan.funding] == [
        ("lender", "pool", "borrowed", 8)]
    assert plan.reasons[0].startswith("Running")
    # A plan writes nothing and changes no view.
    assert pipeline.last_sequence() == before
    state = pipeline.ask("budget", "state", bus.StateRequest(), bus.StateReply)
    assert "default/borrow" not in [r["key"] for r in restore_state(json_format.MessageToDict(state.state))["runs"]]
    again = _plan(pipeline, doc)
    assert again == plan


def test_plan_that_would_reclaim_and_one_that_would_reserve(pipeline: Pipeline) -> None:
    reclaim = _plan(pipeline, run_doc("fund", "org:lender", 24, locality={"groupGPUs": 8}))
    assert reclaim.fits_now
    assert [(p.group, p.gpus, p.spares) for p in reclaim.placement] == [(0, 8, 0), (1, 8, 0), (2, 8, 0)]
    assert [(f.funding_class, f.gpus) for f in reclaim.funding] == [("owned", 24)]
    assert any("would end lease default.opp.00000 of default/opp (ReclaimUnfunded" in r for r in reclaim.reasons)

    doc = run_doc("resv", "org:lender", 32, locality={"groupGPUs": 8})
    reserve = _plan(pipeline, doc)
    assert not reserve.fits_now and not reserve.placement and not reserve.funding
    oracle = _oracle_plan(pipeline, doc)
    res = oracle.reservations[oracle.status["default/resv"].reservation or ""]
    assert reserve.HasField("earliest_start") and reserve.earliest_start.seconds == res.earliest_start
    assert reserve.reasons[0].startswith("Reserved (Reserved)")


def test_plan_of_invalid_run_names_the_field(pipeline: Pipeline) -> None:
    plan = _plan(pipeline, run_doc("bad", "org:team-a", 0))
    assert not plan.fits_now
    assert len(plan.reasons) == 1 and plan.reasons[0].startswith("invalid: run.spec.resources.totalGPUs")


# --- resolver ----------------------------------------------------------------------------------


def test_resolver_ticks_on_the_system_clock(nats_server: NatsServer, tmp_path: Path) -> None:
    """A run with a 2 s simulated runtime completes with nobody but the resolver saying "now"."""
    cluster = "e2e-resolver"
    services = start_pipeline(nats_server, cluster, tmp_path, "system", ("admission", "binder", "budget", "resolver"))
    try:
        async def scenario(nc: Any) -> dict[str, Any]:
            now = int(time.time())
            await send(nc, cluster, F.AddNode(node("a-00", "A")), "n0", now)
            doc = run_doc("short", "org:x", 8)
            doc["metadata"]["annotations"] = {"jobtree.sim/runtime": "2s"}
            await send(nc, cluster, F.ApplyRun(parse_manifest(doc)), "r0", now)
            deadline = time.monotonic() + 20
            while True:
                reply = await ask(nc, subjects.request(cluster, "budget", "state"), bus.StateRequest(), bus.StateReply)
                state: dict[str, Any] = restore_state(json_format.MessageToDict(reply.state))
                if state["runs"] and state["runs"][0]["phase"] == "Completed":
                    return state
                assert time.monotonic() < deadline, f"never completed: {state['runs']}"
                await asyncio.sleep(0.2)

        state = on(nats_server.url, scenario)
        lease = state["leases"][0]
        assert lease["closureReason"] == "Completed"

        async def closing_ids(nc: Any) -> set[str]:
            records = await Ledger(nc.jetstream(), cluster).replay()
            closing = [r for r in records if any(e.WhichOneof("fact") == "lease_closed" for e in r.batch.entries)]
            assert len(closing) == 1, closing
            return {e.command_id for e in closing[0].batch.entries}

        # On the system clock the clock step before a group carries no command id; what else the
        # record holds can only be the resolver's ticks: the client sent nothing after r0.
        ids = on(nats_server.url, closing_ids)
        assert ids <= {""} | {i for i in ids if i.startswith("tick@")}, ids
        assert not ids & {"n0", "r0"}, "the completion was committed with a client's command"

        async def minting_header(nc: Any) -> tuple[int, str]:
            js = nc.jetstream()
            records = await Ledger(js, cluster).replay()
            minting = [r for r in records if any(e.WhichOneof("fact") == "lease_minted" for e in r.batch.entries)]
            assert len(minting) == 1, minting
            bound = max(e.instant.seconds for e in minting[0].batch.entries)
            msg = await js.get_msg(subjects.ledger_stream(cluster), seq=minting[0].sequence)
            return bound, (msg.headers or {}).get(NEXT_TIMER, "")

        # what the resolver ticked from: the binding message says when the run's runtime ends
        bound, header = on(nats_server.url, minting_header)
        assert header == str(bound + 2), (bound, header)
    finally:
        stop_services(services)


def test_a_reader_started_before_the_ledger_waits_for_it(nats_server: NatsServer, tmp_path: Path) -> None:
    """budget may start before the binder has created the stream: it waits, then follows."""
    cluster = "e2e-early-reader"
    services = [start_service("budget", cluster, nats_server.url, ClusterConfig(cluster=cluster), tmp_path)]
    try:
        async def scenario(nc: Any) -> dict[str, Any]:
            await wait_healthy(nc, cluster, services)
            await asyncio.sleep(0.5)
            assert services[0].proc.poll() is None, services[0].tail()
            ledger = Ledger(nc.jetstream(), cluster)
            await ledger.create()
            entry = convert.entry_to_proto((T0, F.NodeStatePut(node("a-00", "A"))), command_id="c0")
            await ledger.append([entry], expected_last_sequence=0, msg_id="c0")
            deadline = time.monotonic() + 20
            while True:
                try:
                    reply = await ask(nc, subjects.request(cluster, "budget", "state"),
                                      bus.StateRequest(min_ledger_sequence=1), bus.StateReply)
                    break
                except nats.errors.NoRespondersError:
                    assert time.monotonic() < deadline, services[0].tail()
                    await asyncio.sleep(0.1)
            assert not reply.HasField("error"), reply.error
            return restore_state(json_format.MessageToDict(reply.state))

        state = on(nats_server.url, scenario)
        assert state["time"] == "2026-01-05T00:00:00Z" and state["runs"] == []
    finally:
        stop_services(services)
    assert services[0].proc.returncode == 0, services[0].tail()
