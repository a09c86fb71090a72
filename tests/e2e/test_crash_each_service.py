"""kill -9 of the gateway and of the read services during a stream of submissions.

`test_crash_recovery.py` kills the write path (admission, binder). This file kills the rest,
each twice with SIGKILL during a stream of commands, and starts it again:

- gateway: the stream goes through the public gRPC API (SubmitRun, ApplyBudget, CompleteRun,
  FailRun, DeleteRun), each request sent again with the same request id until it is answered,
  as a real client would. The first kill lands at a seeded random point; the second in the
  worst window of a seeded random report or deletion: admission has committed it, the gateway
  has not answered yet. Every acknowledged request must be in the ledger exactly once, with the
  sequence its reply named; the ledger must keep every §10 property and equal the same commands
  played in-process; the restarted gateway's GetRun / ListRuns / ListLeases must be the
  replayed ledger's view.
- budget, packer: kills at seeded random points of a stream sent straight to admission
  (virtual clock) that also fails, cordons, uncordons and repairs nodes and changes budgets.
  After each restart the stream is held still until the new process answers exactly what the
  replayed ledger gives (budget: the STATE at the ledger's last sequence and usage; packer:
  nodes and what-if plans), so it rebuilt its view from JetStream; then again after the stream.
  Every STATE the budget service answered during the stream is the replay of the ledger up to
  the sequence it named. The ledger checks are those of the write-path test.
- resolver: on the system clock (the resolver only ticks there), kills at seeded random points
  of a paced stream of short runs that finish on their own. While it is dead (the stream held),
  a probe run of 2 s is submitted: the new process learns of it from the ledger stream only,
  its first tick must be for a timer no later than the probe's end, and the probe must
  complete with no client command. After the stream every run with a runtime must complete
  (only ticks can do it), each exactly at bound + runtime; no command (tick or not) is in the
  ledger twice, no lease is minted or closed twice, and the ledger equals the clock steps,
  commands and ticks played in-process at the instants they were decided.

The seed of each test is printed (and can be set with JOBTREE_CRASH_SEED) to replay a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import grpc
import nats.errors
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client
from procs import (
    FLAVOR,
    T0,
    Reference,
    Service,
    Services,
    assert_same_view,
    bring_up,
    budget,
    check_ledger,
    command_subject,
    create_ledger,
    deliver,
    nodes,
    play,
    read_ledger,
    replayed,
    wait_admission,
    wait_binder,
)
from test_crash_recovery import OWNERS, SIZES, STEP, Stream, seed_for

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Record
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.model import Locality, NodeState, Phase, Run, RunSpec
from jobtree.core.views import state_json
from jobtree.services.budget import usage
from jobtree.services.gateway.clock import INSTANT_METADATA
from jobtree.services.packer import nodes as packer_nodes
from jobtree.services.packer import plan as packer_plan
from jobtree.sim.live import restore_state

pytestmark = pytest.mark.timeout(90)

KILL_MARGIN = 20
"""No kill in the first or last this many acknowledgements of a stream."""
SETTLE = 20.0
"""Seconds a restarted service has to answer what the ledger gives."""


@dataclass
class Proc(Service):
    """A `Service` with its own clock and extra arguments (the gateway's `--grpc-port`)."""

    clock: str = "virtual"
    args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--clock") + 1] = self.clock
        return argv + list(self.args)


def start(services: Services, name: str, *, clock: str = "virtual", args: tuple[str, ...] = ()) -> Service:
    """Start `name` (tag = name) through `services`, so `stop_all()` stops it."""
    if name not in services.all:
        services.log_dir.mkdir(parents=True, exist_ok=True)
        services.all[name] = Proc(name, name, services.cluster, services.url, services.log_dir / f"{name}.log",
                                  clock=clock, args=args)
    return services.start(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Valve:
    """Releases the commands of a `Stream` one at a time through its gates, optionally with a
    pause before each; `hold()` stops the stream once everything released is acknowledged (the
    ledger stands still: on a virtual clock nobody else writes), `release()` lets it go on."""

    stream: Stream
    count: int
    rng: Random
    pace: tuple[float, float] = (0.0, 0.0)
    released: int = 0
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.stream.gates.update({i: asyncio.Event() for i in range(self.count)})
        self.flowing.set()

    async def run(self) -> None:
        for i in range(self.count):
            await self.flowing.wait()
            if self.pace[1] > 0:
                await asyncio.sleep(self.rng.uniform(*self.pace))
                await self.flowing.wait()  # no await from here to the release: hold() sees it
            self.released = i + 1
            self.stream.gates[i].set()

    async def hold(self) -> None:
        self.flowing.clear()
        await self.stream.reached(self.released)

    def release(self) -> None:
        self.flowing.set()


@dataclass
class CommandSpy:
    """Sees every command sent to admission (a plain subscriber gets a copy of every request;
    admission alone answers): (wall-clock time seen, command id), and calls `on_command`."""

    seen: list[tuple[float, str]] = field(default_factory=list)
    on_command: Callable[[str], None] | None = None

    @classmethod
    async def on(cls, nc: Client, cluster: str) -> CommandSpy:
        spy = cls()

        async def seen(msg: Any) -> None:
            command_id = bus.Command.FromString(msg.data).command_id
            spy.seen.append((time.time(), command_id))
            if spy.on_command is not None:
                spy.on_command(command_id)

        await nc.subscribe(command_subject(cluster), cb=seen)
        await nc.flush()
        return spy

    def ticks(self) -> list[tuple[float, int]]:
        """(time seen, instant) of every tick."""
        return [(at, int(c[len("tick@"):])) for at, c in self.seen if c.startswith("tick@")]


@dataclass
class Kill:
    at: int
    """Acknowledgements before the kill."""
    killed: float = 0.0
    """Wall-clock time of the SIGKILL."""
    restarted: float = 0.0
    """Wall-clock time of the restart."""
    restarted_mono: float = 0.0
    settled: float = 0.0
    """Seconds from the restart until `settle` was satisfied."""


async def kill_and_restart(svc: Service, stream: Stream, kills: list[Kill], rng: Random,
                     down: tuple[float, float] = (0.05, 0.5),
                     settle: Callable[[Kill], Awaitable[None]] | None = None,
                     while_down: Callable[[Kill], Awaitable[None]] | None = None) -> None:
    """SIGKILL `svc` after each kill's number of acknowledgements (plus up to 30 ms: inside a
    decision or a request), await `while_down`, start it again after `down` seconds, then
    await `settle`."""
    for k in kills:
        await stream.reached(k.at)
        await asyncio.sleep(rng.uniform(0.0, 0.03))
        svc.kill()
        k.killed = time.time()
        pause = asyncio.ensure_future(asyncio.sleep(rng.uniform(*down)))
        if while_down is not None:
            await while_down(k)
        await pause
        svc.start()
        k.restarted, k.restarted_mono = time.time(), time.monotonic()
        if settle is not None:
            await settle(k)
        k.settled = round(time.time() - k.restarted, 2)


def kill_points(rng: Random, count: int) -> list[Kill]:
    return [Kill(at) for at in sorted(rng.sample(range(KILL_MARGIN, count - KILL_MARGIN), 2))]


async def run_stream(stream: Stream, cmds: list[bus.Command], *helpers: Awaitable[None],
                     readers: tuple[Awaitable[None], ...] = ()) -> None:
    """The stream and its helper tasks (valve, killer) until all are done, with `readers`
    running beside them until then; the first failure of any of them is raised."""
    finite = [asyncio.ensure_future(stream.run(cmds)), *(asyncio.ensure_future(h) for h in helpers)]
    endless = [asyncio.ensure_future(r) for r in readers]
    deadline = time.monotonic() + 60
    try:
        while not all(t.done() for t in finite):
            pending = [t for t in finite + endless if not t.done()]
            done, _ = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in finite + endless:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            assert done or time.monotonic() < deadline, "the stream did not finish within 60 s"
        for t in endless:
            assert not t.done(), "a reader stopped"
    finally:
        for t in finite + endless:
            t.cancel()
        await asyncio.gather(*finite, *endless, return_exceptions=True)


def assert_victim_restarted(services: Services, victim: str) -> None:
    assert len(services[victim].pids) == 3, f"{victim} was not killed twice: pids {services[victim].pids}"
    assert all(len(s.pids) == 1 for s in services.all.values() if s.tag != victim), services.logs()
    assert all(s.running for s in services.all.values()), services.logs()


# --- workloads -------------------------------------------------------------------------------


def mixed_workload(cluster: str, seed: int, n: int, *, node_events: bool) -> tuple[list[bus.Command], Reference]:
    """Like `test_crash_recovery.workload`: the setup batch and `n` commands, each chosen against
    the state the previous ones left, with budget changes and (with `node_events`) node failures,
    cordons, uncordons and repairs. A run is completed or failed only if it was already running
    before the command's instant (the gateway checks a report against the view it has then)."""
    rng = Random(seed)
    ref = Reference(cluster)
    setup: list[F.Command] = [F.AddNode(x) for x in nodes(("A", "B", "C"), 4)]
    setup += [F.ApplyBudget(budget("team-a", "org:a", 48)), F.ApplyBudget(budget("team-b", "org:b", 32))]
    cmds = [convert.batch_to_proto(setup, command_id="setup", instant=T0)]
    ref.play(cmds[0])
    for i in range(1, n + 1):
        t = T0 + STEP * i
        view = ref.view
        before = {k for k, s in view.status.items() if s.phase is Phase.RUNNING}
        view.advance(t)
        running = sorted(k for k, s in view.status.items()
                         if s.phase is Phase.RUNNING and k in view.runs and k in before)
        live = sorted(k for k, s in view.status.items() if not s.phase.terminal and k in view.runs)
        topo = view.topo.nodes
        ready = sorted(x for x, nd in topo.items() if nd.state is NodeState.READY)
        cordoned = sorted(x for x, nd in topo.items() if nd.state is NodeState.CORDONED)
        fenced = sorted(x for x, nd in topo.items() if nd.state is NodeState.FENCED)
        roll = rng.random()
        cmd: F.Command
        if running and roll < 0.18:
            cmd = F.CompleteRun(rng.choice(running))
        elif running and roll < 0.22:
            cmd = F.FailRun(rng.choice(running))
        elif live and roll < 0.26:
            cmd = F.DeleteRun(rng.choice(live))
        elif roll < 0.29:
            name, owner = rng.choice((("team-a", "org:a"), ("team-b", "org:b")))
            cmd = F.ApplyBudget(budget(name, owner, rng.choice((24, 32, 48, 64))))
        elif node_events and roll < 0.31 and fenced:
            cmd = F.AddNode(dataclasses.replace(topo[rng.choice(fenced)], state=NodeState.READY))  # repaired
        elif node_events and roll < 0.33 and len(fenced) < 2:
            cmd = F.FailNode(rng.choice(ready + cordoned))
        elif node_events and roll < 0.36 and cordoned:
            cmd = F.UncordonNode(rng.choice(cordoned))
        elif node_events and roll < 0.39 and len(cordoned) < 3:
            cmd = F.CordonNode(rng.choice(ready))
        else:
            ns, owner = rng.choice(OWNERS)
            gpus = rng.choice(SIZES)
            spec = RunSpec(owner, FLAVOR, gpus, locality=Locality(group_gpus=8 if gpus >= 8 else None),
                           runtime=rng.choice((None, None, None, 900, 3600)))
            cmd = F.ApplyRun(Run(ns, f"r{i:03d}", spec))
        msg = convert.command_to_proto(cmd, command_id=f"c{i:03d}", instant=t)
        ref.play(msg)  # a workload the core refuses would be a bug in this generator
        cmds.append(msg)
    return cmds, ref


# --- the gateway -------------------------------------------------------------------------------

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
"""gRPC codes a client answers by sending the same request (same request id) again: the
gateway is down or restarting, or the ledger moved on (CONFLICT)."""
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 250))


def grpc_call(stub: api_grpc.JobtreeStub, cmd: bus.Command) -> tuple[Any, Message]:
    """The gRPC method and request that carry a workload command (request id = command id)."""
    (c,) = convert.commands_from_proto(cmd)
    rid = cmd.command_id

    def ref(key: str) -> pb.RunRef:
        namespace, name = key.split("/")
        return pb.RunRef(namespace=namespace, name=name)

    match c:
        case F.ApplyRun(run):
            return stub.SubmitRun, api.SubmitRunRequest(run=convert.run_to_proto(run), request_id=rid)
        case F.ApplyBudget(b):
            return stub.ApplyBudget, api.ApplyBudgetRequest(budget=convert.budget_to_proto(b), request_id=rid)
        case F.CompleteRun(key):
            return stub.CompleteRun, api.CompleteRunRequest(run=ref(key), request_id=rid)
        case F.FailRun(key):
            return stub.FailRun, api.FailRunRequest(run=ref(key), request_id=rid)
        case F.DeleteRun(key):
            return stub.DeleteRun, api.DeleteRunRequest(run=ref(key), request_id=rid)
    raise AssertionError(f"no gRPC method for {c}")


@dataclass
class GrpcStream(Stream):
    """A `Stream` whose commands (after the setup batch, sent to admission) go through the
    gateway's gRPC API, each request re-sent with the same request id until it is answered."""

    stub: api_grpc.JobtreeStub | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    """Command id -> the requests it took."""

    async def run(self, cmds: list[bus.Command]) -> None:
        assert self.stub is not None
        for i, cmd in enumerate(cmds):
            if i in self.gates:
                await self.gates[i].wait()
            if cmd.WhichOneof("command") == "batch":  # the setup: nodes have no gRPC method
                done = await deliver(self.nc, self.cluster, cmd, attempt_timeout=self.attempt_timeout)
                assert not done.reply.HasField("error"), done.reply.error
                seq = done.reply.ledger_sequence
            else:
                seq = await self.request(cmd)
            assert seq > 0, cmd.command_id
            self.acked[cmd.command_id] = seq
            self.acks.append((time.monotonic(), seq))
            async with self.progress:
                self.progress.notify_all()

    async def request(self, cmd: bus.Command, deadline: float = 30.0) -> int:
        assert self.stub is not None
        method, req = grpc_call(self.stub, cmd)
        metadata = ((INSTANT_METADATA, str(cmd.instant.seconds)),)
        started = time.monotonic()
        errors: list[str] = []
        while True:
            try:
                reply = await method(req, timeout=self.attempt_timeout, metadata=metadata, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                errors.append(f"{code.name}: {err.details()}")
                if code not in RETRY_CODES:
                    raise AssertionError(
                        f"{cmd.command_id} ({type(req).__name__}) answered {code.name} on attempt {len(errors)}: "
                        f"{err.details()} (earlier attempts: {errors[:-1]})") from None
                if time.monotonic() - started > deadline:
                    raise AssertionError(f"{cmd.command_id} not answered within {deadline} s: {errors}") from None
                await asyncio.sleep(0.05)
                continue
            self.retried += len(errors)
            self.attempts[cmd.command_id] = len(errors) + 1
            return int(reply.ledger_sequence)


async def wait_serving(address: str, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        while time.monotonic() < deadline:
            try:
                status = (await health.Check(health_pb2.HealthCheckRequest(service="jobtree.v1.Jobtree"),
                                             timeout=1, wait_for_ready=True)).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway at {address} is not SERVING after {timeout} s (last: {status})")


REPORTS = ("complete_run", "fail_run", "delete_run")
"""Writes the gateway checks against its view before sending them (the run must exist, or be
live and started): a retry after such a write committed finds the run already changed."""


async def kill_gateway(gateway: Service, stream: GrpcStream, cmds: list[bus.Command], kills: list[Kill],
                       rng: Random, spy: CommandSpy) -> None:
    """The first kill lands at a random point; the second in the worst window: the first report
    or deletion after its point, between admission receiving it (the spy stops the gateway with
    SIGSTOP as it sees the command) and the gateway answering (it is killed once the ledger holds
    the command). The client's request fails, and it must send it again."""
    await kill_and_restart(gateway, stream, kills[:1], rng)
    second = kills[1]
    await stream.reached(second.at)
    after = len(stream.acked) + 1  # not sent yet: the stream sends one command at a time
    found = next((i for i in range(after, len(cmds)) if cmds[i].WhichOneof("command") in REPORTS), None)
    assert found is not None, f"no report or deletion after command {after}"
    second.at = found
    target = cmds[found].command_id
    stopped = asyncio.Event()

    def stop(command_id: str) -> None:
        if command_id == target and not stopped.is_set():
            os.kill(gateway.pid, signal.SIGSTOP)
            stopped.set()

    spy.on_command = stop
    await stopped.wait()
    spy.on_command = None
    deadline = time.monotonic() + SETTLE
    while target not in {e.command_id for r in await read_ledger(stream.nc, stream.cluster) for e in r.batch.entries}:
        assert time.monotonic() < deadline, f"{target} was not committed while the gateway was stopped"
        await asyncio.sleep(0.01)
    gateway.kill()
    second.killed = time.time()
    await asyncio.sleep(rng.uniform(0.05, 0.5))
    gateway.start()
    second.restarted, second.restarted_mono = time.time(), time.monotonic()


def test_kill_9_gateway_during_grpc_submissions(services: Services, nats_server: NatsServer, cluster: str) -> None:
    seed = seed_for("kill-gateway")
    rng = Random(seed)
    cmds, ref = mixed_workload(cluster, seed, 150, node_events=False)
    kills = kill_points(rng, len(cmds))
    address = f"127.0.0.1:{free_port()}"

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc, "admission")
        gateway = start(services, "gateway", args=("--grpc-port", address.rsplit(":", 1)[1]))
        await wait_serving(address)
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = api_grpc.JobtreeStub(channel)
            stream = GrpcStream(nc, cluster, attempt_timeout=3.0, stub=stub)
            spy = await CommandSpy.on(nc, cluster)
            started = time.monotonic()
            await run_stream(stream, cmds, kill_gateway(gateway, stream, cmds, kills, rng, spy))
            print(f"{len(cmds)} requests in {time.monotonic() - started:.1f} s, {stream.retried} retries, "
                  f"gateway killed after ack {kills[0].at} and between the commit and the answer of "
                  f"{cmds[kills[1].at].command_id}, longest wait for an ack after each kill "
                  f"{[round(stream.longest_gap_after(k.restarted_mono), 2) for k in kills]} s")
            assert_victim_restarted(services, "gateway")
            target = cmds[kills[1].at].command_id
            assert stream.attempts[target] > 1, f"{target} was answered before the gateway was killed"

            records = await read_ledger(nc, cluster)
            assert len(records) == len(cmds), "every command of this workload writes one ledger message"
            view = check_ledger(records, cluster, stream.acked)
            assert_same_view(view, ref.view)
            assert any(s.phase is Phase.COMPLETED for s in view.status.values())
            assert any(s.phase is Phase.FAILED for s in view.status.values())

            # The restarted gateway's reads are the replayed ledger's view.
            last = records[-1].sequence
            listed = await stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=last), timeout=10)
            assert listed.ledger_sequence == last
            want = [convert.run_to_proto(view.runs[k], view.status.get(k)) for k in sorted(view.runs)]
            assert len(listed.runs) == len(want) > 50
            diff = [(json_format.MessageToDict(a), json_format.MessageToDict(b))
                    for a, b in zip(listed.runs, want, strict=True) if a != b]
            assert not diff, f"ListRuns differs from the ledger's view: {diff[:2]}"
            for msg in want:
                got = await stub.GetRun(api.GetRunRequest(run=pb.RunRef(namespace=msg.metadata.namespace,
                                                                        name=msg.metadata.name)), timeout=10)
                assert got.run == msg, (json_format.MessageToDict(got.run), json_format.MessageToDict(msg))
            leases = await stub.ListLeases(api.ListLeasesRequest(min_ledger_sequence=last), timeout=10)
            assert list(leases.leases) == [convert.lease_to_proto(view.leases[n]) for n in sorted(view.leases)]

    try:
        play(nats_server.url, scenario)
    except BaseException:
        print(services.logs())
        raise


# --- budget and packer -------------------------------------------------------------------------


async def ask(nc: Client, cluster: str, service: str, verb: str, msg: Message, reply_cls: type[Any],
              timeout: float = SETTLE) -> Any:
    """One read, re-sent while nobody answers (the service is restarting) until `timeout`."""
    subject = subjects.request(cluster, service, verb)
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = await nc.request(subject, codec.encode(msg), timeout=2.0, headers=codec.headers(msg))
            return codec.decode(raw.data, reply_cls)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} did not answer {verb} within {timeout} s") from None
            await asyncio.sleep(0.05)


PROBES = (("org:a", 8), ("org:b", 16), ("org:c", 4), ("org:a", 64), ("org:b", 2))
"""What-if runs the packer plans (owner, GPUs): fits, reclaims, waits unfunded, reserves."""


def probe_requests() -> list[api.PlanRunRequest]:
    out = []
    for i, (owner, gpus) in enumerate(PROBES):
        spec = RunSpec(owner, FLAVOR, gpus, locality=Locality(group_gpus=8 if gpus >= 8 else None))
        out.append(api.PlanRunRequest(run=convert.run_to_proto(Run("probe", f"p{i}", spec))))
    return out


async def budget_view(nc: Client, cluster: str, sequence: int) -> tuple[int, dict[str, Any], api.UsageResponse]:
    """The budget service's STATE once it has applied `sequence`, and its usage right after."""
    reply = await ask(nc, cluster, "budget", "state", bus.StateRequest(min_ledger_sequence=sequence), bus.StateReply)
    assert not reply.HasField("error"), reply.error
    got = await ask(nc, cluster, "budget", "usage", api.UsageRequest(), api.UsageResponse)
    return int(reply.ledger_sequence), restore_state(json_format.MessageToDict(reply.state)), got


async def check_budget(nc: Client, cluster: str) -> None:
    """The budget service answers exactly what the replayed ledger gives (the ledger stands still)."""
    records = await read_ledger(nc, cluster)
    view = replayed(records, cluster)
    last = records[-1].sequence if records else 0
    seq, state, got = await budget_view(nc, cluster, last)
    assert seq == last
    assert state == state_json(view), "the budget service's STATE is not the replayed ledger's"
    assert got == usage(view, api.UsageRequest()), (json_format.MessageToDict(got),
                                                    json_format.MessageToDict(usage(view, api.UsageRequest())))


async def check_packer(nc: Client, cluster: str) -> None:
    """Until the packer answers nodes and every probe's plan exactly as the replayed ledger
    gives them (it may still be replaying), within SETTLE seconds."""
    records = await read_ledger(nc, cluster)
    view = replayed(records, cluster)
    want: list[Message] = [packer_nodes(view), *(packer_plan(view, p) for p in probe_requests())]
    deadline = time.monotonic() + SETTLE
    while True:
        got: list[Message] = [await ask(nc, cluster, "packer", "nodes", api.ListNodesRequest(), api.ListNodesResponse)]
        got += [await ask(nc, cluster, "packer", "plan", p, api.PlanRunResponse) for p in probe_requests()]
        if got == want:
            return
        if time.monotonic() > deadline:
            diff = [(json_format.MessageToDict(a), json_format.MessageToDict(b))
                    for a, b in zip(got, want, strict=True) if a != b]
            raise AssertionError(f"the packer does not answer what the replayed ledger gives: {diff[:2]}")
        await asyncio.sleep(0.1)


CHECKS: dict[str, Callable[[Client, str], Awaitable[None]]] = {"budget": check_budget, "packer": check_packer}


@dataclass
class Reader:
    """Reads the victim while the stream runs (so a kill can land inside a read); keeps every
    budget STATE (as answered, read back later) with the sequence its view was at."""

    nc: Client
    cluster: str
    victim: str
    states: dict[int, Message] = field(default_factory=dict)
    answered: int = 0

    async def run(self) -> None:
        while True:
            try:
                if self.victim == "budget":
                    reply = await ask(self.nc, self.cluster, "budget", "state", bus.StateRequest(), bus.StateReply,
                                      timeout=0)
                    assert not reply.HasField("error"), reply.error
                    self.states[int(reply.ledger_sequence)] = reply.state
                else:
                    await ask(self.nc, self.cluster, "packer", "plan", probe_requests()[0], api.PlanRunResponse,
                              timeout=0)
                self.answered += 1
            except AssertionError as exc:
                if "did not answer" not in str(exc):
                    raise
            await asyncio.sleep(0.03)


@pytest.mark.parametrize("victim", ["budget", "packer"])
def test_kill_9_read_view_during_submissions(victim: str, services: Services, nats_server: NatsServer,
                                             cluster: str) -> None:
    seed = seed_for(f"kill-{victim}")
    rng = Random(seed)
    cmds, ref = mixed_workload(cluster, seed, 150, node_events=True)
    kills = kill_points(rng, len(cmds))
    check = CHECKS[victim]

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc, "admission")
        svc = start(services, victim)
        await check(nc, cluster)  # up, and following the (empty) ledger
        stream = Stream(nc, cluster)
        valve = Valve(stream, len(cmds), Random(seed + 1), pace=(0.0, 0.02))
        reader = Reader(nc, cluster, victim)

        async def settle(_: Kill) -> None:
            await valve.hold()
            await check(nc, cluster)  # the new process rebuilt its view from the ledger stream
            valve.release()

        started = time.monotonic()
        await run_stream(stream, cmds, valve.run(), kill_and_restart(svc, stream, kills, rng, settle=settle),
                         readers=(reader.run(),))
        print(f"{len(cmds)} commands in {time.monotonic() - started:.1f} s, {victim} killed after acks "
              f"{[k.at for k in kills]}, answered as the ledger says {[k.settled for k in kills]} s after each "
              f"restart; {reader.answered} reads during the stream")
        assert_victim_restarted(services, victim)

        records = await read_ledger(nc, cluster)
        assert len(records) == len(cmds)
        view = check_ledger(records, cluster, stream.acked)
        assert_same_view(view, ref.view)
        await check(nc, cluster)
        # Every STATE answered during the stream, by any of the victim's lives, was the ledger's
        # replay up to the sequence it named.
        if victim == "budget":
            assert len(reader.states) >= 5, sorted(reader.states)
            for seq, state in sorted(reader.states.items()):
                assert restore_state(json_format.MessageToDict(state)) == state_json(replayed(records[:seq], cluster)), \
                    f"the STATE answered at sequence {seq} is not the ledger's replay up to it"

    try:
        play(nats_server.url, scenario)
    except BaseException:
        print(services.logs())
        raise


# --- resolver ----------------------------------------------------------------------------------

TICK_RUNS = 50
RUNTIMES_S = (1, 2, 3)
"""Simulated runtimes (seconds of wall-clock time) of the resolver test's runs."""


def timed_run(ns: str, name: str, owner: str, gpus: int, runtime: int | None, command_id: str) -> bus.Command:
    spec = RunSpec(owner, FLAVOR, gpus, locality=Locality(group_gpus=8 if gpus >= 8 else None), runtime=runtime)
    return convert.command_to_proto(F.ApplyRun(Run(ns, name, spec)), command_id=command_id)


def tick_workload(seed: int, n: int = TICK_RUNS) -> list[bus.Command]:
    """The setup batch, two runs that never end, then `n` funded runs that finish on their own
    after 1-3 s. On the system clock admission decides each at its own "now": no instants."""
    rng = Random(seed)
    setup: list[F.Command] = [F.AddNode(x) for x in nodes(("A", "B", "C"), 4)]
    setup += [F.ApplyBudget(budget("team-a", "org:a", 48)), F.ApplyBudget(budget("team-b", "org:b", 32))]
    cmds = [convert.batch_to_proto(setup, command_id="setup")]
    for i in range(1, n + 3):
        ns, owner = rng.choice((("ns-a", "org:a"), ("ns-b", "org:b")))
        gpus = 4 if i <= 2 else rng.choice((1, 2, 4, 8, 8, 16))
        cmds.append(timed_run(ns, f"r{i:03d}", owner, gpus, None if i <= 2 else rng.choice(RUNTIMES_S), f"c{i:03d}"))
    return cmds


def run_key(cmd: bus.Command) -> str:
    return f"{cmd.apply_run.run.metadata.namespace}/{cmd.apply_run.run.metadata.name}"


def clock_tagged(records: list[Record]) -> list[Record]:
    """The records with the entries no command decided (on the system clock admission first
    moves the clock to now for each group it decides: those entries carry no command id) tagged
    `clock@<sequence>`, so `check_ledger` can tell them from commands."""
    out = []
    for r in records:
        batch = bus.LedgerBatch()
        batch.CopyFrom(r.batch)
        for e in batch.entries:
            e.command_id = e.command_id or f"clock@{r.sequence}"
        out.append(Record(r.sequence, batch))
    return out


def decisions(records: list[Record]) -> list[tuple[str, int]]:
    """(command id, instant) of every decision of the ledger, in order: a command's instant is
    the latest of its entries (the clock moves to the decision's instant before it applies)."""
    out: list[tuple[str, int]] = []
    for r in records:
        latest: dict[str, int] = {}
        for e in r.batch.entries:
            latest[e.command_id] = max(latest.get(e.command_id, 0), int(e.instant.seconds))
        out += latest.items()
    return out


def closed_completed(records: list[Record]) -> dict[str, int]:
    """Lease name -> the sequence of the record that closed it Completed."""
    return {e.lease_closed.name: r.sequence for r in records for e in r.batch.entries
            if e.WhichOneof("fact") == "lease_closed" and e.lease_closed.reason == "Completed"}


def test_kill_9_resolver_ticks_resume(services: Services, nats_server: NatsServer, cluster: str) -> None:
    seed = seed_for("kill-resolver")
    rng = Random(seed)
    cmds = tick_workload(seed)
    kills = [Kill(at) for at in sorted(rng.sample(range(10, len(cmds) - 10), 2))]
    by_id = {c.command_id: c for c in cmds}
    timed = {run_key(c) for c in cmds[1:] if "jobtree.sim/runtime" in c.apply_run.run.metadata.annotations}

    async def finished(nc: Client, keys: set[str], what: str, timeout: float) -> tuple[list[Record], Cluster]:
        """Until every run of `keys` completed (polling the ledger), within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            records = await read_ledger(nc, cluster)
            view = replayed(records, cluster)
            left = sorted(k for k in keys if k not in view.status or view.status[k].phase is not Phase.COMPLETED)
            if not left:
                return records, view
            assert time.monotonic() < deadline, f"{what}: never completed within {timeout} s: {left}"
            await asyncio.sleep(0.1)

    async def scenario(nc: Client) -> None:
        await bring_up_system(services, nc)
        spy = await CommandSpy.on(nc, cluster)
        resolver = start(services, "resolver", clock="system")
        stream = Stream(nc, cluster)
        valve = Valve(stream, len(cmds), Random(seed + 1), pace=(0.02, 0.12))

        probes: dict[int, tuple[str, int]] = {}
        """Kill -> (the probe run's key, the ledger sequence that submitted it)."""

        async def while_down(k: Kill) -> None:
            """With the stream held and the resolver dead, a 1-GPU run of 2 s: the new resolver
            process learns of it from the ledger stream only."""
            await valve.hold()
            probe = timed_run("ns-probe", f"probe-{k.at}", "org:a", 1, 2, f"probe-{k.at}")
            done = await deliver(nc, cluster, probe)
            assert not done.reply.HasField("error"), done.reply.error
            stream.acked[probe.command_id] = done.reply.ledger_sequence
            by_id[probe.command_id] = probe
            timed.add(run_key(probe))
            probes[k.at] = (run_key(probe), done.reply.ledger_sequence)

        async def settle(k: Kill) -> None:
            """Nobody but the new resolver process can say "now" for the probe: no client
            sends anything and the old process is dead. Its first tick is for a timer of the
            view it replayed (no later than the probe's end), and the probe completes."""
            key, submitted = probes[k.at]
            records, view = await finished(nc, {key}, f"the probe after the restart {k}", SETTLE)
            [lease] = [n for n, lease in view.leases.items() if lease.run == key]
            closer = records[closed_completed(records)[lease] - 1]
            assert closer.sequence > submitted
            assert all(not e.command_id or e.command_id.startswith("tick@") for e in closer.batch.entries), closer
            ended = view.status[key].ended_at
            first = next((t for at, t in spy.ticks() if at > k.restarted), None)  # the old one died before
            assert first is not None and ended is not None and first <= ended, (
                f"the new resolver's first tick was for {first}, after the probe's end {ended}: "
                "it did not rebuild its timers from the ledger")
            valve.release()

        started = time.monotonic()
        await run_stream(stream, cmds, valve.run(),
                         kill_and_restart(resolver, stream, kills, rng, down=(0.2, 1.0), settle=settle,
                                    while_down=while_down))
        streamed = time.monotonic()
        last_client = max(stream.acked.values())
        # Nobody sends commands any more: only the resolver's ticks can finish the runs left.
        records, _ = await finished(nc, timed, "after the stream", 40.0)
        print(f"{len(cmds)} commands in {streamed - started:.1f} s, resolver killed after acks "
              f"{[k.at for k in kills]}, a run completed by the new process {[k.settled for k in kills]} s after "
              f"each restart, the last runs completed {time.monotonic() - streamed:.1f} s after the stream")
        assert_victim_restarted(services, "resolver")
        assert any(seq > last_client for seq in closed_completed(records).values()), \
            "no run completed after the last client command"

        tagged = clock_tagged(records)
        others = {e.command_id: r.sequence for r in tagged for e in r.batch.entries if e.command_id not in by_id}
        assert all(c.startswith(("clock@", "tick@")) for c in others), sorted(others)
        view = check_ledger(tagged, cluster, {**stream.acked, **others})  # nothing decided twice, or lost
        forever = {run_key(c) for c in cmds[1:3]}
        assert {k for k, s in view.status.items() if s.phase is Phase.RUNNING} == forever
        for key in timed:  # each finished when its runtime was up, at its own instant
            st, runtime = view.status[key], view.runs[key].spec.runtime
            assert st.phase is Phase.COMPLETED and st.bound_at is not None and runtime is not None
            assert st.ended_at == st.bound_at + runtime, (key, st)
        # The ledger is the clock steps, the client's commands and the ticks decided one at a
        # time, in ledger order, each at the instant it was decided at.
        ref = Reference(cluster)
        for cid, t in decisions(records):
            if not cid:
                ref.view.advance(t)
                continue
            msg = bus.Command()
            if cid in by_id:
                msg.CopyFrom(by_id[cid])
            else:
                msg.command_id = cid
                msg.tick.SetInParent()
            msg.instant.seconds = t
            ref.play(msg)
        assert_same_view(view, ref.view)

    try:
        play(nats_server.url, scenario)
    except BaseException:
        print(services.logs())
        raise


async def bring_up_system(services: Services, nc: Client) -> None:
    """`bring_up` with admission and the binder on the system clock."""
    await create_ledger(nc, services.cluster)
    start(services, "binder", clock="system")
    start(services, "admission", clock="system")
    await wait_binder(nc, services.cluster)
    await wait_admission(nc, services.cluster)
