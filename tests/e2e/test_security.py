"""The NATS users of `jobtree up` against a real nats-server: the refusals that matter, and the
allowed paths working with the services' own bus code (Ledger, Follower, LeaderLock, KV).

Refusals are observed twice: the client's error callback reports the server's permissions
violation, and what the publish would have changed did not change (the ledger's message
count, the messages a subscriber received, the leader key).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import security, snapshot, subjects
from jobtree.bus.follower import Follower
from jobtree.bus.leader import LEADER_TTL, LeaderLock, leader_bucket
from jobtree.bus.ledger import Ledger, LedgerError
from jobtree.bus.natsserver import NatsServer
from jobtree.bus.snapshot import SnapshotStore
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig

T = TypeVar("T")
C = "sec"
SERVICES = security.SERVICES
OTHERS = tuple(s for s in SERVICES if s != "binder")


def entry_batch(n: int, pad: int = 0) -> bus.LedgerBatch:
    entry = bus.LedgerEntry(command_id=f"c{n}" + "x" * pad)
    entry.instant.seconds = 1_767_571_200 + n
    entry.clock_advanced.SetInParent()
    return bus.LedgerBatch(entries=[entry])


class Session:
    """Connections as the cluster's users, each with the inbox prefix the runtime gives it."""

    def __init__(self, server: NatsServer, secrets: security.Secrets) -> None:
        self.server = server
        self.secrets = secrets
        self.errors: dict[str, list[str]] = {}

    async def connect(self, user: str, seed: str | None = None) -> Client:
        errors = self.errors.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc).lower())

        options: dict[str, Any] = {}
        if user in subjects.SERVICE_VERBS:
            options["inbox_prefix"] = subjects.inbox_prefix(C, user).encode()
        return await nats.connect(self.server.url, connect_timeout=2, allow_reconnect=False,
                                  nkeys_seed_str=self.secrets.seeds[user] if seed is None else seed,
                                  error_cb=on_error, **options)

    def violations(self, user: str) -> list[str]:
        return [e for e in self.errors.get(user, []) if "permissions violation" in e]

    async def refused(self, user: str, nc: Client, *needles: str, timeout: float = 2.0) -> None:
        """Wait until the server has reported a violation naming each needle (the error callback
        runs some time after the server's -ERR), then close the connection."""
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + timeout
        while not all(any(n.lower() in v for v in self.violations(user)) for n in needles):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{user}: no permissions violation for {needles}; errors: {self.errors[user]}")
            await asyncio.sleep(0.02)
        await nc.close()

    def run(self, make: Callable[[Session], Awaitable[T]]) -> T:
        return asyncio.run(make(self))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, nats_binary: Path) -> Iterator[tuple[NatsServer, security.Secrets]]:
    """A nats-server with the users `jobtree up` creates; the ledger and buckets made as admin."""
    secrets = security.Secrets.generate(C)
    server = NatsServer(tmp_path_factory.mktemp("secured"), binary=nats_binary,
                        users=security.server_users(C, secrets))
    server.start()

    async def setup(s: Session) -> None:
        nc = await s.connect("admin")
        await Ledger(nc.jetstream(), C).create()
        await leader_bucket(nc.jetstream(), C, LEADER_TTL)
        for name in ("runs", "budgets", "nodes"):
            await nc.jetstream().create_key_value(bucket=subjects.bucket(C, name), history=1)
        await nc.close()

    Session(server, secrets).run(setup)
    yield server, secrets
    server.stop()


@pytest.fixture
def session(secured: tuple[NatsServer, security.Secrets]) -> Session:
    return Session(*secured)


async def ledger_count(s: Session) -> int:
    nc = await s.connect("admin")
    try:
        info = await nc.jetstream().stream_info(subjects.ledger_stream(C))
        return int(info.state.messages)
    finally:
        await nc.close()


def log_lines(server: NatsServer) -> list[str]:
    return server.log_path.read_text().splitlines()


def server_log_violations(session: Session, user: str, since: int = 0) -> list[str]:
    """The server's log lines (from line `since`) reporting a violation by `user` (the server
    names an nkey user by its public key)."""
    key = session.secrets.public_key(user)
    return [line for line in log_lines(session.server)[since:] if "Violation" in line and key in line]


# --- the table ---------------------------------------------------------------------------------


def test_the_permission_table_comes_from_the_subjects_module() -> None:
    ledger = subjects.ledger_filter(C)
    for service in SERVICES:
        perms = security.permissions(C, service)
        assert perms.subscribe == (subjects.service_filter(C, service), subjects.inbox_prefix(C, service) + ".>")
        assert "_INBOX.>" in perms.publish
        if service == "binder":
            assert ledger in perms.publish and not perms.publish_deny
        else:
            assert ledger not in perms.publish and perms.publish_deny == (ledger,)
            assert f"$JS.API.STREAM.CREATE.{subjects.ledger_stream(C)}" not in perms.publish
    creators = {s: sorted(p.removeprefix("$JS.API.STREAM.CREATE.") for p in security.permissions(C, s).publish
                          if p.startswith("$JS.API.STREAM.CREATE."))
                for s in SERVICES}
    assert creators["budget"] == [subjects.events_stream(C)], "the budget service publishes the events"
    assert creators["notifier"] == [f"KV_{subjects.bucket(C, 'notified')}"]
    publishers = [s for s in SERVICES if subjects.events_filter(C) in security.permissions(C, s).publish]
    assert publishers == ["budget"], "one publisher of events"
    senders = [s for s in SERVICES if subjects.request(C, "admission", "command") in security.permissions(C, s).publish]
    assert senders == ["gateway", "resolver", "kube-bridge"]
    assert [s for s in SERVICES if any(p.startswith(f"$KV.{subjects.bucket(C, 'leader')}")
                                       for p in security.permissions(C, s).publish)] == ["admission"]
    table = security.permission_table(C)
    assert table.count("\n") == len(SERVICES) + 2 and "| admin | everything |" in table
    with pytest.raises(ValueError, match="unknown grant"):
        security.expand(C, "delete ledger")
    with pytest.raises(ValueError, match="unknown service"):
        security.permissions(C, "nosuch")


def test_secrets_are_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    first = security.Secrets.load_or_create(path, C)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert set(first.seeds) == {"admin", *SERVICES}
    assert len(set(first.seeds.values())) == len(first.seeds)
    assert all(s.startswith("SU") for s in first.seeds.values())
    again = security.Secrets.load_or_create(path, C)
    assert again.seeds == first.seeds
    with pytest.raises(ValueError, match="cluster 'sec', not 'other'"):
        security.Secrets.load_or_create(path, "other")
    assert first.env("gateway") == {"JOBTREE_NATS_USER": "gateway",
                                    "JOBTREE_NATS_NKEY_SEED": first.seeds["gateway"]}
    # The server's users are public keys only: no seed is in its config.
    users = security.server_users(C, first)
    assert {u.nkey for u in users} == {first.public_key(u) for u in first.seeds}
    assert all(u.password is None and u.nkey and u.nkey.startswith("U") for u in users)
    conf = json.dumps([u.config() for u in users])
    assert not any(seed in conf for seed in first.seeds.values())
    # A secrets file of an older jobtree (passwords) gets seeds instead.
    path.write_text(json.dumps({"cluster": C, "users": {"admin": "pw"}}))
    migrated = security.Secrets.load_or_create(path, C)
    assert set(migrated.seeds) == {"admin", *SERVICES} and "users" not in json.loads(path.read_text())


# --- refusals ----------------------------------------------------------------------------------


def test_only_the_binder_appends_to_the_ledger(session: Session) -> None:
    mark = len(log_lines(session.server))

    async def scenario(s: Session) -> None:
        before = await ledger_count(s)
        binder = await s.connect("binder")
        ledger = Ledger(binder.jetstream(), C)
        last = await ledger.last_sequence()
        done = await ledger.append(entry_batch(1), expected_last_sequence=last, msg_id=f"ok-{last}")
        assert done.sequence == last + 1 and not done.duplicate
        await binder.close()
        assert await ledger_count(s) == before + 1
        for user in OTHERS:
            nc = await s.connect(user)
            with pytest.raises(LedgerError):  # never acknowledged: the server dropped it
                await Ledger(nc.jetstream(), C, timeout=0.3).append(
                    entry_batch(2), expected_last_sequence=last + 1, msg_id=f"forged-{user}")
            await nc.publish(subjects.ledger_subject(C), entry_batch(3).SerializeToString())  # a plain publish
            await s.refused(user, nc, subjects.ledger_subject(C))
        assert await ledger_count(s) == before + 1

    session.run(scenario)
    for user in OTHERS:  # and the server says so in its log
        assert any(subjects.ledger_subject(C) in line for line in server_log_violations(session, user, mark))


def test_requests_reach_a_service_only_from_its_callers(session: Session) -> None:
    """admission.command only from the gateway (and the resolver's ticks, the kube-bridge's
    objects); binder.commit only from admission; the read services' verbs only from the gateway.
    Admin may do anything."""
    callers = {
        subjects.request(C, "admission", "command"): {"gateway", "resolver", "kube-bridge", "admin"},
        subjects.request(C, "binder", "commit"): {"admission", "admin"},
        subjects.request(C, "budget", "state"): {"gateway", "admin"},
        subjects.request(C, "packer", "plan"): {"gateway", "admin"},
    }

    async def scenario(s: Session) -> None:
        spy = await s.connect("admin")
        received: dict[str, set[str]] = {subject: set() for subject in callers}

        def recorder(subject: str) -> Callable[[Any], Awaitable[None]]:
            async def record(msg: Any) -> None:
                received[subject].add(msg.data.decode())
            return record

        for subject in callers:
            await spy.subscribe(subject, cb=recorder(subject))
        await spy.flush()
        for user in ("admin", *SERVICES):
            nc = await s.connect(user)
            for subject in callers:
                await nc.publish(subject, user.encode())
            await s.refused(user, nc, *(subject for subject, allowed in callers.items() if user not in allowed))
        await spy.flush()
        await asyncio.sleep(0.1)
        await spy.close()
        for subject, allowed in callers.items():
            assert received[subject] == allowed, subject

    session.run(scenario)


def test_no_service_can_listen_to_another_services_requests(session: Session) -> None:
    async def scenario(s: Session) -> None:
        nc = await s.connect("gateway")
        await nc.subscribe(subjects.request(C, "binder", "commit"))
        await nc.subscribe("_INBOX.jobtree.sec.admission.>")
        await nc.subscribe(subjects.ledger_filter(C))
        await s.refused("gateway", nc, subjects.request(C, "binder", "commit"), "_INBOX.jobtree.sec.admission.>",
                        subjects.ledger_filter(C))
        assert all("subscription" in v for v in s.violations("gateway"))

    session.run(scenario)


def test_only_admission_holds_the_leader_lock(session: Session) -> None:
    async def scenario(s: Session) -> None:
        adm = await s.connect("admission")
        kv = await leader_bucket(adm.jetstream(), C)
        lock = LeaderLock(kv, "admission", "the-leader")
        assert await lock.acquire() and lock.epoch > 0
        assert await lock.refresh()
        assert (await kv.get(lock.key)).value == b"the-leader"
        for user in ("gateway", "binder", "resolver"):
            nc = await s.connect(user)
            with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
                await leader_bucket(nc.jetstream(timeout=0.3), C)  # not even the bucket's info
            await nc.publish(f"$KV.{subjects.bucket(C, 'leader')}.{lock.key}", b"usurper")
            await s.refused(user, nc, f"$KV.{subjects.bucket(C, 'leader')}.{lock.key}")
            assert await lock.refresh()  # still ours (the TTL is short)
        entry = await kv.get(lock.key)
        assert entry.value == b"the-leader"
        assert await lock.refresh()  # still ours: nobody else wrote the key
        await lock.release()
        await adm.close()

    session.run(scenario)


def test_no_one_but_admin_deletes_or_purges_streams(session: Session) -> None:
    async def scenario(s: Session) -> None:
        for user in SERVICES:
            nc = await s.connect(user)
            js = nc.jetstream(timeout=0.2)
            for attempt in (js.delete_stream(subjects.ledger_stream(C)), js.purge_stream(subjects.ledger_stream(C)),
                            js.delete_stream(f"KV_{subjects.bucket(C, 'leader')}")):
                with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
                    await attempt
            await s.refused(user, nc, "$JS.API.STREAM.DELETE", "$JS.API.STREAM.PURGE")
        assert await ledger_count(s) >= 0  # the stream is still there

    session.run(scenario)


def test_a_wrong_nkey_is_refused(session: Session) -> None:
    async def scenario(s: Session) -> None:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await s.connect("binder", seed=security.new_seed())  # a key the server does not list

    session.run(scenario)


# --- what is allowed works -----------------------------------------------------------------------


def test_every_service_follows_replays_and_reads_the_ledger(session: Session) -> None:
    mark = len(log_lines(session.server))

    async def scenario(s: Session) -> None:
        binder = await s.connect("binder")
        ledger = Ledger(binder.jetstream(), C)
        last = await ledger.last_sequence()
        # About 6 MB: past the point where the server waits for a flow-control reply
        # ($JS.FC.<stream>.>) before it delivers more to a push consumer.
        for i in range(12):
            await ledger.append(entry_batch(100 + i, pad=500_000), expected_last_sequence=last + i, msg_id=f"big-{i}")
        last += 12
        await binder.close()
        for user in (u for u in SERVICES if "follow ledger" in security.GRANTS[u]):
            nc = await s.connect(user)
            reads = {"read snapshots", "write snapshots"} & set(security.GRANTS[user])  # not the binder
            follower = Follower(nc.jetstream(), C, ClusterConfig(cluster=C), snapshots=bool(reads))
            await follower.start()
            assert await follower.wait_for(last, timeout=10), (user, follower.sequence)
            await follower.stop()
            records = await Ledger(nc.jetstream(), C).replay()
            assert records[-1].sequence == last
            # one message by its sequence (admission checks a resent append this way)
            assert await Ledger(nc.jetstream(), C).batch_at(last) == records[-1].batch
            await nc.close()
            assert not s.violations(user), (user, s.errors[user])

    session.run(scenario)
    for user in SERVICES:
        assert not server_log_violations(session, user, mark), user


def test_the_binder_creates_its_stream_and_mirrors_specs(session: Session) -> None:
    async def scenario(s: Session) -> None:
        nc = await s.connect("binder")
        js = nc.jetstream()
        await Ledger(js, C).create()  # finds the stream admin made, unchanged
        for name in ("runs", "budgets", "nodes"):
            kv = await js.key_value(subjects.bucket(C, name))
            await kv.put("k", b"v")
            assert (await kv.get("k")).value == b"v"
            await kv.delete("k")
        await nc.close()
        assert not s.violations("binder"), s.errors["binder"]
        gw = await s.connect("gateway")
        with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
            await gw.jetstream(timeout=0.5).key_value(subjects.bucket(C, "runs"))
        await gw.close()

    session.run(scenario)


def test_admission_writes_the_snapshots_every_follower_reads_them(session: Session) -> None:
    config = ClusterConfig(cluster=C)

    async def scenario(s: Session) -> None:
        binder = await s.connect("binder")
        ledger = Ledger(binder.jetstream(), C)
        last = await ledger.last_sequence()
        seq = (await ledger.append(entry_batch(900), expected_last_sequence=last, msg_id="snap-900")).sequence
        await binder.close()
        admission = await s.connect("admission")
        store = SnapshotStore(admission.jetstream(), C, config)
        view = Cluster(config, (), 0)
        await store.save(snapshot.encode(C, view, seq, {}, {}, await store.ledger_digest_at(seq)))
        assert (await store.load()) is not None, store.last_refusal
        await admission.close()
        assert not s.violations("admission"), s.errors["admission"]
        readers = [u for u in SERVICES if "read snapshots" in security.GRANTS[u]]
        assert sorted(readers) == sorted(u for u in SERVICES if "follow ledger" in security.GRANTS[u]
                                         and u not in ("admission", "binder"))
        for user in readers:
            nc = await s.connect(user)
            follower = Follower(nc.jetstream(), C, config)
            await follower.start()
            assert follower.restored_from == seq, (user, follower.snapshot_refusal)
            await follower.stop()
            with pytest.raises((nats.errors.Error, nats.js.errors.Error)):  # only the leader writes them
                await SnapshotStore(nc.jetstream(timeout=0.5), C, config).save(b"forged")
            await nc.close()
            assert any("$o." in v or "obj_" in v for v in s.violations(user)), (user, s.errors[user])

    session.run(scenario)
