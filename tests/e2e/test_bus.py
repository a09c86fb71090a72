"""The bus groundwork against a real nats-server: codec, subjects, the ledger stream, the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Appended, Ledger, LedgerError, StaleAppend
from jobtree.bus.natsserver import NatsServer, NatsServerError, Permissions, User, find_binary
from jobtree.core import facts as F
from jobtree.core.model import Lease, MintReason, Role

T = TypeVar("T")
T0 = 1_767_571_200  # 2026-01-05T00:00:00Z


def run(make: Callable[[Client], Awaitable[T]], url: str, **options: Any) -> T:
    """Run `make(connection)` on a fresh connection to `url` in its own event loop."""

    async def main() -> T:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **options)
        try:
            return await make(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


def lease(n: int, run_name: str = "r") -> Lease:
    return Lease(f"ns.{run_name}.{n:05d}", f"ns/{run_name}", "org:a", 0, Role.ACTIVE, (("a-00", n % 8),),
                 ("b", "e"), T0 + n, MintReason.START)


def batch(*ns: int, command_id: str = "c") -> bus.LedgerBatch:
    return bus.LedgerBatch(entries=[
        convert.entry_to_proto((T0 + n, F.LeaseMinted(lease(n))), command_id=command_id, epoch=1) for n in ns
    ])


# --- codec -----------------------------------------------------------------------------------


def test_codec_round_trip_over_nats(nats_server: NatsServer, cluster: str) -> None:
    cmd = convert.command_to_proto(F.ShrinkRun("ns/train.v2", 16), command_id="c-1", epoch=3, instant=T0)

    async def scenario(nc: Client) -> bus.Command:
        subject = subjects.request(cluster, "admission", "command")

        async def answer(msg: Any) -> None:
            got = codec.decode(msg.data, bus.Command, msg.headers)
            reply = bus.CommandReply(command_id=got.command_id, ledger_sequence=7)
            await msg.respond(codec.encode(reply, bus.CommandReply))

        await nc.subscribe(subject, queue=subjects.queue_group("admission"), cb=answer)
        reply = await nc.request(subject, codec.encode(cmd, bus.Command), timeout=2, headers=codec.headers(cmd))
        assert codec.decode(reply.data, bus.CommandReply) == bus.CommandReply(command_id="c-1", ledger_sequence=7)
        return cmd

    sent = run(scenario, nats_server.url)
    assert convert.command_from_proto(sent) == F.ShrinkRun("ns/train.v2", 16)
    # The type checks.
    with pytest.raises(codec.CodecError, match=r"expected jobtree\.v1\.LedgerBatch, got jobtree\.v1\.Command"):
        codec.encode(cmd, bus.LedgerBatch)
    with pytest.raises(codec.CodecError, match="only protobuf messages"):
        codec.encode({"run": "x"})  # type: ignore[arg-type]
    with pytest.raises(codec.CodecError, match=r"got a payload of type jobtree\.v1\.Command"):
        codec.decode(codec.encode(cmd), bus.LedgerBatch, codec.headers(cmd))
    with pytest.raises(codec.CodecError, match="does not parse"):
        codec.decode(b"\xff\xff\xff", bus.Command)
    assert codec.encode(cmd) == codec.encode(bus.Command.FromString(codec.encode(cmd)))


# --- subjects --------------------------------------------------------------------------------


def test_subjects_are_unique_and_well_formed() -> None:
    for cluster in ("gpu-a", "b"):
        entries = subjects.catalogue(cluster)
        values = [e.value for e in entries]
        assert len(values) == len(set(values))
        for e in entries:
            if e.kind in ("request", "ledger"):
                assert subjects.well_formed(e.value), e
                assert e.value.startswith(f"jobtree.{cluster}."), e
            elif e.kind in ("event-filter", "ledger-filter"):
                assert e.value.startswith(f"jobtree.{cluster}.") and e.value.endswith(".>"), e
            elif e.kind in ("stream", "bucket", "object-store"):
                assert all(c.isalnum() or c in "_-" for c in e.value), e
    a = {e.value for e in subjects.catalogue("gpu-a")}
    b = {e.value for e in subjects.catalogue("b")}
    assert not a & b
    assert subjects.request("gpu-a", "binder", "commit") == "jobtree.gpu-a.binder.commit"
    assert subjects.event("gpu-a", "run", "ns", "train.v2") == "jobtree.gpu-a.evt.run.ns.train%2Ev2"
    assert subjects.ledger_stream("gpu-a") == "jobtree_gpu-a_ledger"
    assert subjects.bucket("gpu-a", "runs") == "jobtree_gpu-a_runs"
    assert subjects.kv_key("ns", "train.v2") == "ns.train%2Ev2"
    for name in ("train.v2", "a b", "x*y>z", "100%", "org:ai:rai", "é"):
        assert subjects.well_formed(subjects.token(name))
        assert subjects.untoken(subjects.token(name)) == name
    for bad in (lambda: subjects.request("gpu-a", "binder", "drop"), lambda: subjects.request("gpu-a", "x", "y"),
                lambda: subjects.event("gpu-a", "run", "ns"), lambda: subjects.bucket("gpu-a", "x"),
                lambda: subjects.ledger_stream("GPU.A"), lambda: subjects.token("")):
        with pytest.raises(ValueError):
            bad()


def test_escaped_names_are_one_token_on_a_real_server(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> list[str]:
        got: list[str] = []
        sub = await nc.subscribe(f"jobtree.{cluster}.evt.run.*.*")
        for name in ("train.v2", "a.b.c", "plain"):
            await nc.publish(subjects.event(cluster, "run", "ns", name), b"")
        await nc.flush()
        for _ in range(3):
            msg = await sub.next_msg(timeout=2)
            got.append(subjects.untoken(msg.subject.split(".")[-1]))
        return got

    assert run(scenario, nats_server.url) == ["train.v2", "a.b.c", "plain"]


# --- the ledger ------------------------------------------------------------------------------


def test_ledger_append_and_replay(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        ledger = Ledger(nc.jetstream(), cluster)
        info = await ledger.create()
        assert info.config.storage == StorageType.FILE
        assert info.config.deny_delete and info.config.deny_purge
        await ledger.create()  # idempotent
        assert await ledger.replay() == []
        sequences = []
        for i, ns in enumerate([(0, 1), (2,), (3, 4, 5)]):
            done = await ledger.append(batch(*ns, command_id=f"c{i}"), expected_last_sequence=i, msg_id=f"c{i}")
            sequences.append(done.sequence)
        assert sequences == [1, 2, 3]
        records = await ledger.replay()
        assert [r.sequence for r in records] == [1, 2, 3]
        assert [r.batch for r in records] == [batch(0, 1, command_id="c0"), batch(2, command_id="c1"),
                                              batch(3, 4, 5, command_id="c2")]
        journal = [convert.entry_from_proto(e) for r in records for e in r.batch.entries]
        assert journal == [(T0 + n, F.LeaseMinted(lease(n))) for n in range(6)]
        assert [r.sequence for r in await ledger.replay(after=1)] == [2, 3]
        assert await ledger.replay(after=3) == []
        with pytest.raises(nats.js.errors.APIError):
            await nc.jetstream().purge_stream(ledger.stream)  # the ledger is append-only
        assert await ledger.last_sequence() == 3

    run(scenario, nats_server.url)


def test_a_stale_append_is_rejected_and_writes_nothing(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        ledger = Ledger(nc.jetstream(), cluster)
        await ledger.create()
        await ledger.append(batch(0), expected_last_sequence=0, msg_id="first")
        with pytest.raises(StaleAppend) as info:
            await ledger.append(batch(1), expected_last_sequence=0, msg_id="decided-on-a-stale-view")
        assert (info.value.expected, info.value.last_sequence) == (0, 1)
        with pytest.raises(StaleAppend):
            await ledger.append(batch(1), expected_last_sequence=5, msg_id="from-the-future")
        assert await ledger.last_sequence() == 1
        assert [r.batch for r in await ledger.replay()] == [batch(0)]
        # Two decisions taken from the same view: exactly one commits.
        results = await asyncio.gather(
            ledger.append(batch(2), expected_last_sequence=1, msg_id="left"),
            ledger.append(batch(3), expected_last_sequence=1, msg_id="right"),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["Appended", "StaleAppend"]
        assert await ledger.last_sequence() == 2

    run(scenario, nats_server.url)


def test_a_repeated_message_id_commits_once(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        ledger = Ledger(nc.jetstream(), cluster)
        await ledger.create()
        assert await ledger.append(batch(0), expected_last_sequence=0, msg_id="bind-1") == Appended(1, False)
        # The ack was lost and the binder retries with the view it had: the ledger finds the id.
        assert await ledger.append(batch(0), expected_last_sequence=0, msg_id="bind-1") == Appended(1, True)
        # A retry that happens to pass the sequence check: the server's duplicate window.
        assert await ledger.append(batch(0), expected_last_sequence=1, msg_id="bind-1") == Appended(1, True)
        assert await ledger.last_sequence() == 1
        assert await ledger.append(batch(1), expected_last_sequence=1, msg_id="bind-2") == Appended(2, False)
        assert await ledger.append(batch(0), expected_last_sequence=0, msg_id="bind-1") == Appended(1, True)
        assert [r.sequence for r in await ledger.replay()] == [1, 2]
        with pytest.raises(ValueError, match="msg_id is required"):
            await ledger.append(batch(2), expected_last_sequence=2, msg_id="")
        with pytest.raises(ValueError, match="at least one entry"):
            await ledger.append(bus.LedgerBatch(), expected_last_sequence=2, msg_id="x")

    run(scenario, nats_server.url)


def test_follow_yields_new_batches(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> list[int]:
        ledger = Ledger(nc.jetstream(), cluster)
        await ledger.create()
        await ledger.append(batch(0), expected_last_sequence=0, msg_id="a")
        seen: list[int] = []
        stream = ledger.records(follow=True, idle=0.2)

        async def writer() -> None:
            await asyncio.sleep(0.3)
            await ledger.append(batch(1), expected_last_sequence=1, msg_id="b")

        task = asyncio.create_task(writer())
        async for record in stream:
            seen.append(record.sequence)
            if len(seen) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        await task
        return seen

    assert run(scenario, nats_server.url) == [1, 2]


def test_a_stream_of_another_shape_is_not_taken_for_the_ledger(nats_server: NatsServer, cluster: str) -> None:
    async def scenario(nc: Client) -> None:
        ledger = Ledger(nc.jetstream(), cluster)
        await nc.jetstream().add_stream(name=ledger.stream, subjects=[subjects.ledger_filter(cluster)],
                                        storage=StorageType.MEMORY)
        with pytest.raises(LedgerError, match="exists with another configuration"):
            await ledger.create()

    run(scenario, nats_server.url)


# --- the server ------------------------------------------------------------------------------


def test_server_restart_resumes_the_ledger(tmp_path: Path, nats_binary: Path) -> None:
    server = NatsServer(tmp_path / "nats", binary=nats_binary)

    async def write(nc: Client) -> None:
        ledger = Ledger(nc.jetstream(), "gpu-a")
        await ledger.create()
        await ledger.append(batch(0, 1), expected_last_sequence=0, msg_id="a")

    async def read(nc: Client) -> list[bus.LedgerBatch]:
        ledger = Ledger(nc.jetstream(), "gpu-a")
        await ledger.create()  # finds the recovered stream unchanged
        return [r.batch for r in await ledger.replay()]

    with server:
        assert "sync_interval: always" in server.config_path.read_text()
        run(write, server.url)
        server.kill()  # as a crash would
    with server:
        assert run(read, server.url) == [batch(0, 1)]
    assert not server.running


def test_subject_permissions_refuse_other_writers(tmp_path: Path, nats_binary: Path) -> None:
    ledger_subjects = subjects.ledger_filter("gpu-a")
    users = (
        User("binder", "b-secret", Permissions(publish=(ledger_subjects, "$JS.API.>"), subscribe=("_INBOX.>",))),
        User("gateway", "g-secret", Permissions(publish=("$JS.API.>",), publish_deny=(ledger_subjects,),
                                                subscribe=("_INBOX.>",))),
    )
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    async def as_binder(nc: Client) -> int:
        ledger = Ledger(nc.jetstream(), "gpu-a")
        await ledger.create()
        return (await ledger.append(batch(0), expected_last_sequence=0, msg_id="a")).sequence

    async def as_gateway(nc: Client) -> int:
        ledger = Ledger(nc.jetstream(), "gpu-a", timeout=0.5)
        with pytest.raises(LedgerError):
            await ledger.append(batch(1), expected_last_sequence=1, msg_id="b")
        return await ledger.last_sequence()

    with NatsServer(tmp_path / "nats", binary=nats_binary, users=users) as server:
        assert run(as_binder, server.url, user="binder", password="b-secret") == 1
        assert run(as_gateway, server.url, user="gateway", password="g-secret", error_cb=on_error) == 1
        assert any("permissions violation" in e.lower() for e in errors), errors
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            run(as_binder, server.url, user="binder", password="wrong", error_cb=on_error)


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JOBTREE_NATS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(NatsServerError, match=r"JOBTREE_NATS_SERVER=.* is not an executable file"):
        find_binary()
    monkeypatch.delenv("JOBTREE_NATS_SERVER")
    assert find_binary().name == "nats-server"


def test_the_architecture_doc_lists_the_catalogue() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    rows = [f"| {e.kind} | {e.name} | `{e.value}` |" for e in subjects.catalogue("gpu-a")]
    table = "| kind | name | value |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    assert table in doc, "docs/architecture.md's subjects table is stale: regenerate it from subjects.catalogue('gpu-a')"
