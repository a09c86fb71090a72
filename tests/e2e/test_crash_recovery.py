"""Crashes and leader failover of the write path, against real processes on a real nats-server.

A client streams ~200 commands (runs of random sizes over three fabric domains, two funded
teams and an unfunded one, workload completions and failures, deletions, runs that finish on
their own), each sent again with the same command id until it is answered, as a real client
would. Meanwhile a service is killed with SIGKILL at a seeded random point and started again.
When every command is acknowledged, the ledger must hold every command exactly once, no lease
lost or duplicated, the replayed view must satisfy every §10 property, and it must equal the
view of the same commands played in-process: nothing was lost and nothing decided twice.

The failover test runs two admission processes: the leader is killed, the standby must answer
within 5 s with a higher fencing epoch, having followed the ledger while it waited (it reads
only the tail at the take-over), and the ledger must show no double decision.

The seed of each test is printed (and can be set with JOBTREE_CRASH_SEED) to replay a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import zlib
from dataclasses import dataclass, field
from random import Random

import pytest
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
    deliver,
    epochs,
    nodes,
    play,
    read_ledger,
)

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F
from jobtree.core.model import Locality, Phase, Run, RunSpec

pytestmark = pytest.mark.timeout(90)

STREAM = 200
"""Commands per crash test (after the setup batch)."""
STEP = 60
"""Seconds of virtual time between two commands."""
FAILOVER_LIMIT = 5.0


def seed_for(name: str) -> int:
    override = os.environ.get("JOBTREE_CRASH_SEED")
    seed = int(override) if override else zlib.crc32(name.encode())
    print(f"{name}: seed {seed} (set JOBTREE_CRASH_SEED={seed} to replay)")
    return seed


# --- the workload ----------------------------------------------------------------------------

OWNERS = (("ns-a", "org:a"), ("ns-a", "org:a"), ("ns-b", "org:b"), ("ns-b", "org:b"), ("ns-c", "org:c"))
"""org:c has no budget: its runs wait unfunded."""
SIZES = (1, 2, 4, 4, 8, 8, 8, 16, 16, 24, 32)
RUNTIMES = (None, None, None, 900, 3600)


def workload(cluster: str, seed: int, n: int = STREAM) -> tuple[list[bus.Command], Reference]:
    """The setup batch and `n` commands, each chosen against the state the previous ones left
    (so completions name running runs), and the in-process play of all of them."""
    rng = Random(seed)
    ref = Reference(cluster)
    setup: list[F.Command] = [F.AddNode(x) for x in nodes(("A", "B", "C"), 4)]
    setup += [F.ApplyBudget(budget("team-a", "org:a", 48)), F.ApplyBudget(budget("team-b", "org:b", 32))]
    cmds = [convert.batch_to_proto(setup, command_id="setup", instant=T0)]
    ref.play(cmds[0])
    for i in range(1, n + 1):
        t = T0 + STEP * i
        view = ref.view
        view.advance(t)  # what the decision loop will see before the command
        running = sorted(k for k, s in view.status.items() if s.phase is Phase.RUNNING and k in view.runs)
        live = sorted(k for k, s in view.status.items() if not s.phase.terminal and k in view.runs)
        roll = rng.random()
        cmd: F.Command
        if running and roll < 0.22:
            cmd = F.CompleteRun(rng.choice(running))
        elif running and roll < 0.27:
            cmd = F.FailRun(rng.choice(running))
        elif live and roll < 0.31:
            cmd = F.DeleteRun(rng.choice(live))
        else:
            ns, owner = rng.choice(OWNERS)
            gpus = rng.choice(SIZES)
            spec = RunSpec(owner, FLAVOR, gpus, locality=Locality(group_gpus=8 if gpus >= 8 else None),
                           runtime=rng.choice(RUNTIMES))
            cmd = F.ApplyRun(Run(ns, f"r{i:03d}", spec))
        msg = convert.command_to_proto(cmd, command_id=f"c{i:03d}", instant=t)
        ref.play(msg)  # a workload the core refuses would be a bug in this generator
        cmds.append(msg)
    return cmds, ref


@dataclass
class Stream:
    """Sends commands one after another, each until answered; records what came back."""

    nc: Client
    cluster: str
    attempt_timeout: float = 2.0
    acked: dict[str, int] = field(default_factory=dict)
    acks: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time, ledger sequence) of every acknowledgement, in order."""
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    """Command index -> an event to wait for before sending that command."""
    retried: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, cmds: list[bus.Command]) -> None:
        for i, cmd in enumerate(cmds):
            if i in self.gates:
                await self.gates[i].wait()
            done = await deliver(self.nc, self.cluster, cmd, attempt_timeout=self.attempt_timeout, deadline=30.0)
            reply = done.reply
            assert not reply.HasField("error"), f"{cmd.command_id}: {reply.error}"
            assert reply.command_id == cmd.command_id and reply.ledger_sequence > 0, reply
            self.retried += done.attempts - 1
            self.acked[cmd.command_id] = reply.ledger_sequence
            self.acks.append((time.monotonic(), reply.ledger_sequence))
            async with self.progress:
                self.progress.notify_all()

    async def reached(self, count: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.acked) >= count)

    def longest_gap_after(self, instant: float, window: float = 30.0) -> float:
        """The longest wait for an acknowledgement in the `window` seconds after `instant`."""
        times = [instant] + [t for t, _ in self.acks if instant < t < instant + window]
        return max(b - a for a, b in itertools.pairwise(times))


# --- kill -9 during a stream of submissions ----------------------------------------------------


@pytest.mark.parametrize("victim", ["admission", "binder"])
def test_kill_9_during_submissions(victim: str, services: Services, nats_server: NatsServer, cluster: str) -> None:
    seed = seed_for(f"kill-{victim}")
    rng = Random(seed)
    cmds, ref = workload(cluster, seed)
    kills = sorted(rng.sample(range(20, len(cmds) - 20), 2))  # two crashes, after these many acks
    outages: list[tuple[float, float]] = []

    async def killer(stream: Stream) -> None:
        svc = services[victim]
        for at in kills:
            await stream.reached(at)
            await asyncio.sleep(rng.uniform(0.0, 0.03))  # lands inside one of the next decisions
            svc.kill()
            killed = time.monotonic()
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            svc.start()
            outages.append((killed, time.monotonic()))

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc, "admission")
        stream = Stream(nc, cluster)
        crash = asyncio.create_task(killer(stream))
        started = time.monotonic()
        try:
            await stream.run(cmds)
            await asyncio.wait_for(crash, 30)
        finally:
            crash.cancel()
        took = time.monotonic() - started
        assert len(services[victim].pids) == 3, "the victim was not killed twice"
        assert all(len(s.pids) == 1 for s in services.all.values() if s.tag != victim)
        assert all(s.running for s in services.all.values()), services.logs()
        print(f"{len(cmds)} commands in {took:.1f} s, {stream.retried} retries, "
              f"{victim} killed after acks {kills}, longest wait for an ack after each kill "
              f"{[round(stream.longest_gap_after(k), 2) for k, _ in outages]} s")

        records = await read_ledger(nc, cluster)
        assert len(records) == len(cmds), "every command of this workload writes one ledger message"
        view = check_ledger(records, cluster, stream.acked)
        assert_same_view(view, ref.view)
        assert sum(len(v) for v in view.open_by_run.values()) > 0
        assert any(s.phase is Phase.COMPLETED for s in view.status.values())

    try:
        play(nats_server.url, scenario)
    except BaseException:
        print(services.logs())
        raise


# --- leader failover ----------------------------------------------------------------------------


def leader(adms: list[Service]) -> tuple[Service, int]:
    """The instance whose newest `leader` log line has the highest epoch, and that epoch; it
    must be alive (its holder names its current pid)."""
    best: tuple[int, Service, str] | None = None
    for svc in adms:
        for epoch, holder in svc.leader_terms():
            if best is None or epoch > best[0]:
                best = (epoch, svc, holder)
    assert best is not None, "no admission instance ever led"
    epoch, svc, holder = best
    assert svc.running and holder.startswith(f"admission-{svc.pid}-"), (holder, svc.pid)
    return svc, epoch


async def wait_standby(svc: Service, timeout: float = 20.0) -> None:
    """Until the current life of `svc` has started (from then on it tries the leader lock
    every TTL/4)."""
    deadline = time.monotonic() + timeout
    while sum(d.get("msg") == "started" for d in svc.log_lines()) < len(svc.pids):
        assert svc.running, svc.log()
        assert time.monotonic() < deadline, f"{svc.tag} (pid {svc.pid}) did not start"
        await asyncio.sleep(0.05)


def test_leader_failover(services: Services, nats_server: NatsServer, cluster: str) -> None:
    seed = seed_for("failover")
    rng = Random(seed)
    cmds, ref = workload(cluster, seed, n=90)
    kills = [rng.randrange(10, 40), rng.randrange(50, 80)]  # the leader dies while deciding these
    events: list[dict[str, object]] = []

    async def killer(stream: Stream, adms: list[Service]) -> None:
        for at in kills:
            await stream.reached(at)  # the stream waits at the gate of command `at`
            old, old_epoch = leader(adms)
            standby = next(s for s in adms if s is not old)
            assert standby.running
            assert all(e < old_epoch for e, _ in standby.leader_terms()), "two leaders at once"
            stream.gates[at].set()
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            old.kill()
            events.append({"killed": time.monotonic(), "old": old_epoch, "standby": standby,
                           "acked_before_kill": len(stream.acked)})
            await stream.reached(len(stream.acked) + 2)  # the standby answers
            old.start()  # back as the standby for the next failover
            await wait_standby(old)

    async def scenario(nc: Client) -> None:
        await bring_up(services, nc, "adm-1")
        services.start("admission", "adm-2")  # the standby
        adms = [services["adm-1"], services["adm-2"]]
        await wait_standby(adms[1])
        first, _ = leader(adms)
        assert first.tag == "adm-1"
        assert adms[1].leader_terms() == [], "two leaders at once"
        stream = Stream(nc, cluster, attempt_timeout=0.5, gates={k: asyncio.Event() for k in kills})
        fail = asyncio.create_task(killer(stream, adms))
        try:
            await asyncio.gather(stream.run(cmds), fail)
        finally:
            fail.cancel()

        records = await read_ledger(nc, cluster)
        assert len(records) == len(cmds)
        view = check_ledger(records, cluster, stream.acked)
        assert_same_view(view, ref.view)

        epoch_of = dict(zip((r.sequence for r in records), epochs(records), strict=True))
        terms = [events[0]["old"]]
        measured = []
        for ev in events:
            killed, old_epoch, standby = ev["killed"], ev["old"], ev["standby"]
            assert isinstance(killed, float) and isinstance(old_epoch, int) and isinstance(standby, Service)
            after = [(t, epoch_of[seq]) for t, seq in stream.acks if t > killed]
            # at most the command in flight at the kill was answered from the old term
            assert sum(e == old_epoch for _, e in after) <= 1, after[:5]
            took, new_epoch = next((t - killed, e) for t, e in after if e != old_epoch)
            assert new_epoch > old_epoch, "the new leader's epoch must be higher"
            assert [e for e, _ in standby.leader_terms()][-1] == new_epoch, "the standby did not take over"
            takeovers = [d for d in standby.log_lines() if d.get("why") == "take over"]
            # it followed the ledger while it waited: only the tail was read at the take-over
            assert takeovers and isinstance(takeovers[-1]["from"], int) and takeovers[-1]["from"] >= min(
                10, int(ev["acked_before_kill"])), takeovers[-1:]  # type: ignore[call-overload]
            terms.append(new_epoch)
            measured.append(round(took, 3))
            assert took < FAILOVER_LIMIT, f"failover took {took:.2f} s"
        print(f"failovers (kill -9 of the leader -> first command decided by the new leader): {measured} s; "
              f"epochs {terms}")
        seen = epochs(records)
        assert sorted(set(seen)) == terms, (seen, terms)
        for ev, epoch in zip(events, terms[1:], strict=True):
            assert seen.index(epoch) >= ev["acked_before_kill"]  # type: ignore[operator]

    try:
        play(nats_server.url, scenario)
    except BaseException:
        print(services.logs())
        raise
