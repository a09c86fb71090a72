"""Snapshots over a real nats-server: a follower starts from the newest snapshot and replays only
the tail, ends where a full replay ends, and ignores (with its reason) a snapshot that does not
match its ledger prefix; the admission leader writes them as the ledger grows, and a leader
that rebuilds starts from them too."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from google.protobuf import json_format
from test_read_services import ask, on, send, wait_healthy

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus import snapshot as snap
from jobtree.bus.follower import Follower, Listener, apply_batch, record_ids
from jobtree.bus.ledger import Ledger, NextTimer
from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig
from jobtree.core.views import state_json
from jobtree.sim import scenario as S
from jobtree.sim.live import restore_state, start_service, stop_services
from jobtree.sim.runner import commands_of, played

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "47-cut-lottery.yaml"


def ledger_of(sc: S.Scenario, cluster: str) -> list[bus.LedgerBatch]:
    """A scenario as the services would commit it: its nodes first, then one message per step."""
    cl = Cluster(ClusterConfig(cluster=cluster), (), sc.start)
    cl.submit(*[F.AddNode(n) for n in sc.nodes])
    out = [bus.LedgerBatch(entries=[convert.entry_to_proto(e, command_id="nodes") for e in cl.journal])]
    cl.forget_history()
    for i, (_, entries) in enumerate(played(sc, cl)):
        out.append(bus.LedgerBatch(entries=[convert.entry_to_proto(e, command_id=f"step-{i}") for e in entries]))
    return out


def view_of(cl: Cluster) -> dict[str, Any]:
    return {"state": state_json(cl), "leases": cl.leases, "reservations": cl.reservations, "now": cl.now}


async def follower(nc: Any, cluster: str, **kw: Any) -> Follower:
    f = Follower(nc.jetstream(), cluster, ClusterConfig(cluster=cluster), **kw)
    await f.start()
    await f.stop()
    return f


def test_a_follower_starts_from_the_snapshot_and_ignores_one_that_does_not_match(
        nats_server: NatsServer, cluster: str) -> None:
    sc = S.load_scenario(SCENARIO)
    batches = ledger_of(sc, cluster)
    config = ClusterConfig(cluster=cluster)
    cut = len(batches) // 2

    async def scenario(nc: Any) -> None:
        js = nc.jetstream()
        ledger = Ledger(js, cluster)
        await ledger.create()
        for seq, batch in enumerate(batches):
            await ledger.append(batch, expected_last_sequence=seq, msg_id=f"m{seq}")
        store = snap.SnapshotStore(js, cluster, config)
        assert await store.load() is None and store.last_refusal == "there is no snapshot"
        whole = await follower(nc, cluster, snapshots=False)
        assert whole.restored_from == 0 and whole.sequence == len(batches)

        view = Cluster(config, (), 0)
        ids: dict[str, int] = {}
        digests: dict[str, bytes] = {}
        for seq, batch in enumerate(batches[:cut], 1):
            apply_batch(view, batch)
            record_ids(batch, seq, ids, digests)
        digest = await store.ledger_digest_at(cut)
        await store.save(snap.encode(cluster, view, cut, ids, digests, digest))
        resumed = await follower(nc, cluster)
        assert (resumed.restored_from, resumed.sequence, resumed.snapshot_refusal) == (cut, len(batches), "")
        assert view_of(resumed.cluster) == view_of(whole.cluster)
        assert resumed.command_ids == whole.command_ids

        # the same view claiming another ledger message, or one the ledger does not hold
        for seq, why in ((cut, "is not the one it was taken after"), (len(batches) + 5, "holds no message")):
            wrong = digest if seq != cut else "0" * 64
            await store.save(snap.encode(cluster, view, seq, {}, {}, wrong))
            f = await follower(nc, cluster)
            assert f.restored_from == 0 and why in f.snapshot_refusal, f.snapshot_refusal
            assert view_of(f.cluster) == view_of(whole.cluster)
        await store.save(b"not a snapshot at all")
        f = await follower(nc, cluster)
        assert f.restored_from == 0 and "bad magic" in f.snapshot_refusal
        # a listener that derives from every batch, and says nothing of snapshots: full replay
        await store.save(snap.encode(cluster, view, cut, {}, {}, digest))
        seen: list[int] = []
        f = Follower(js, cluster, config)
        f.listeners.append(lambda seq, _batch: seen.append(seq))
        await f.start()
        await f.stop()
        assert f.restored_from == 0 and "needs the whole ledger" in f.snapshot_refusal
        assert seen == list(range(1, len(batches) + 1))
        # a read that does not finish (its chunks purged by a newer snapshot) gives up: replay
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(snap, "READ_SECONDS", 0.0)
            mp.setattr(snap, "READ_BYTES_PER_SECOND", 1 << 60)
            f = await follower(nc, cluster)
        assert f.restored_from == 0 and "did not finish in time" in f.snapshot_refusal, f.snapshot_refusal
        assert view_of(f.cluster) == view_of(whole.cluster)

    on(nats_server.url, scenario)


def test_an_on_demand_follower_applies_nothing_until_asked_and_jumps_to_a_newer_snapshot(
        nats_server: NatsServer, cluster: str) -> None:
    """`push=False`: no batch is applied between reads; `catch_up` pulls the gap, or, when the
    gap is longer than `jump_after` and a newer snapshot exists, adopts it and pulls the tail.
    Either way the view is the one a full replay gives; a listener hears every batch applied."""
    sc = S.load_scenario(SCENARIO)
    # one entry per message: a ledger long enough for gaps of several messages
    batches = [bus.LedgerBatch(entries=[e]) for b in ledger_of(sc, cluster) for e in b.entries]
    config = ClusterConfig(cluster=cluster)
    first, cut = 3, len(batches) - 2
    assert cut - first > 4

    async def scenario(nc: Any) -> None:
        js = nc.jetstream()
        ledger = Ledger(js, cluster)
        await ledger.create()

        async def append(upto: int) -> None:
            for seq in range(await ledger.last_sequence(), upto):
                await ledger.append(batches[seq], expected_last_sequence=seq, msg_id=f"m{seq}")

        await append(first)
        seen: list[int] = []
        restored: list[int] = []
        lazy = Follower(js, cluster, config, push=False, jump_after=4)
        lazy.listeners.append(Listener(lambda seq, _b: seen.append(seq), lambda f: restored.append(f.sequence)))
        await lazy.start()
        assert lazy.sequence == first and lazy._sub is None and lazy._watchdog is None
        await append(first + 2)
        await asyncio.sleep(0.3)
        assert lazy.sequence == first, "an on-demand view applied a batch nobody asked for"
        assert await lazy.catch_up() == first + 2 and lazy.jumps == 0  # a short gap: pulled
        assert seen == list(range(1, first + 3))

        # a long gap with only an older snapshot: pulled as well
        await store_view(js, cluster, config, batches[:first])
        await append(cut)
        assert await lazy.catch_up() == cut and lazy.jumps == 0 and restored == []

        # a long gap and a snapshot past the view: adopted, then the tail
        await append(len(batches))
        now = await store_view(js, cluster, config, batches[:-1])
        more = [bus.LedgerBatch(entries=[convert.entry_to_proto((now, F.ClockAdvanced()), command_id=f"x{i}")])
                for i in range(5)]
        for i, batch in enumerate(more):
            await ledger.append(batch, expected_last_sequence=len(batches) + i, msg_id=f"x{i}")
        seen.clear()
        assert await lazy.catch_up() == len(batches) + len(more)
        assert lazy.jumps == 1 and lazy.restored_from == len(batches) - 1 and restored == [len(batches) - 1]
        assert seen == list(range(len(batches), len(batches) + len(more) + 1))
        whole = await follower(nc, cluster, snapshots=False)
        assert view_of(lazy.cluster) == view_of(whole.cluster)
        assert lazy.command_ids == whole.command_ids
        # nothing new: one look at the ledger, nothing applied
        seen.clear()
        assert await lazy.catch_up() == whole.sequence and seen == []

    on(nats_server.url, scenario)


async def store_view(js: Any, cluster: str, config: ClusterConfig, prefix: list[bus.LedgerBatch]) -> int:
    """Save the view of a ledger prefix as its snapshot (as the admission leader would); its now."""
    view = Cluster(config, (), 0)
    ids: dict[str, int] = {}
    digests: dict[str, bytes] = {}
    for seq, batch in enumerate(prefix, 1):
        apply_batch(view, batch)
        record_ids(batch, seq, ids, digests)
    store = snap.SnapshotStore(js, cluster, config)
    await store.save(snap.encode(cluster, view, len(prefix), ids, digests, await store.ledger_digest_at(len(prefix))))
    return view.now


def test_the_ledger_carries_the_next_timer_in_a_header(nats_server: NatsServer, cluster: str) -> None:
    """What the resolver reads instead of keeping a view: the newest message's header."""

    async def scenario(nc: Any) -> None:
        ledger = Ledger(nc.jetstream(), cluster)
        await ledger.create()
        assert await ledger.next_timer() == NextTimer(0, True, None)
        entry = bus.LedgerBatch(entries=[convert.entry_to_proto((5, F.ClockAdvanced()), command_id="a")])
        await ledger.append(entry, expected_last_sequence=0, msg_id="a", next_timer=1_767_571_230)
        assert await ledger.next_timer() == NextTimer(1, True, 1_767_571_230)
        await ledger.append(entry, expected_last_sequence=1, msg_id="b")
        assert await ledger.next_timer() == NextTimer(2, True, None)
        # a message written before the header existed: unknown, not "no timer"
        await nc.jetstream().publish(subjects.ledger_subject(cluster), codec.encode(entry, bus.LedgerBatch),
                                     headers={"Nats-Expected-Last-Sequence": "2"})
        assert await ledger.next_timer() == NextTimer(3, False, None)

    on(nats_server.url, scenario)


def test_admission_writes_snapshots_as_the_ledger_grows(nats_server: NatsServer, cluster: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(snap.EVERY_ENV, "4")
    monkeypatch.setenv(snap.MIN_SECONDS_ENV, "0")
    sc = S.load_scenario(SCENARIO)
    config = ClusterConfig(cluster=cluster)

    async def setup(nc: Any) -> None:
        await Ledger(nc.jetstream(), cluster).create()
        await nc.jetstream().create_key_value(bucket=f"jobtree_{cluster}_leader", ttl=5.0, history=1)

    on(nats_server.url, setup)
    services = [start_service(n, cluster, nats_server.url, config, tmp_path, "virtual") for n in ("admission", "binder")]
    try:
        async def play(nc: Any) -> int:
            seq = 0
            for i, n in enumerate(sc.nodes):
                seq = max(seq, await send(nc, cluster, F.AddNode(n), f"node-{i}", sc.start))
            for i, step in enumerate(sc.steps):
                for j, cmd in enumerate(commands_of(step.action) or [F.Tick()]):
                    seq = max(seq, await send(nc, cluster, cmd, f"s{i}.{j}", step.at))
            return seq

        last = on(nats_server.url, play)
        assert last >= 8

        async def check(nc: Any) -> None:
            store = snap.SnapshotStore(nc.jetstream(), cluster, config)
            deadline = time.monotonic() + 20
            while True:
                got = await store.load()
                if got is not None and got.sequence >= last - 4:
                    break
                assert time.monotonic() < deadline, f"no recent snapshot: {store.last_refusal}"
                await asyncio.sleep(0.1)
            assert got.header["cluster"] == cluster and got.header["sequence"] == got.sequence
            assert got.command_ids and max(got.command_ids.values()) <= got.sequence
            whole = await follower(nc, cluster, snapshots=False)
            resumed = await follower(nc, cluster)
            assert resumed.restored_from >= got.sequence > 0  # (a newer one may have landed since)
            assert view_of(resumed.cluster) == view_of(whole.cluster)
            assert resumed.command_ids == whole.command_ids

        on(nats_server.url, check)
        log = (tmp_path / f"{cluster}-admission.log").read_text()
        assert '"snapshot written"' in log and os.environ[snap.EVERY_ENV] == "4"

        # a reader started now starts from the snapshot and answers what a full replay holds
        budget = start_service("budget", cluster, nats_server.url, config, tmp_path, "virtual")
        services.append(budget)

        async def state(nc: Any) -> None:
            await wait_healthy(nc, cluster, [budget])
            deadline = time.monotonic() + 30
            while True:  # health answers before the view is caught up and `state` subscribed
                try:
                    reply = await ask(nc, subjects.request(cluster, "budget", "state"),
                                      bus.StateRequest(min_ledger_sequence=last), bus.StateReply)
                    break
                except nats.errors.NoRespondersError:
                    assert time.monotonic() < deadline, "budget never answered state"
                    await asyncio.sleep(0.1)
            assert not reply.HasField("error"), reply.error
            whole = await follower(nc, cluster, snapshots=False)
            assert restore_state(json_format.MessageToDict(reply.state)) == state_json(whole.cluster)

        on(nats_server.url, state)
        started = [json.loads(line) for line in (tmp_path / f"{cluster}-budget.log").read_text().splitlines()
                   if '"following the ledger"' in line]
        assert started and started[-1]["from_snapshot"] > 0, started
    finally:
        stop_services(services)
