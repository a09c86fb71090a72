"""A follower: a read-only replica of one cluster's view, kept in step with the ledger stream.

Contract: `Follower.start()` starts from the newest valid snapshot (`bus.snapshot`; none, or
one that fails a check, means the first message) and replays the ledger stream after it into a
core `Cluster` (facts and spec changes applied at their instants; nothing is decided), pulling
it, and returns once caught up; it then keeps applying new batches in order as they arrive (an
ordered push consumer from the next sequence). `sequence` is the
last applied stream sequence; `wait_for(seq)` returns once it has applied `seq` (the "reads
carry the sequence they depend on" rule). Views are read from `cluster` between awaits.
`command_ids` / `command_digests` say which command committed where and what it asked for.
A NATS outage does not end it: when the connection comes back (or the push consumer goes
quiet for `STALL_SECONDS` while the ledger has moved on) it re-attaches from its last applied
sequence (`reattached` counts how often) — a restarted nats-server loses the ephemeral
consumer, so waiting for the client to notice would take tens of seconds.
A listener that keeps something derived from earlier batches says how to start from a snapshot
with a `restored(follower)` method (called once the snapshot's view is in place, before the
tail); a follower with a listener that has none replays the whole ledger (`snapshot_refusal`
says so). `restored_from` is the snapshot's sequence (0: replayed from the start).
`follow(ctx)` retries every NATS error (the stream not existing yet, a timeout, a reconnect)
until the follower runs or the service stops.
On demand (`push=False`): a read service that answers now and then (the packer, the dashboard
with no page open) holds no consumer and applies nothing between reads. `catch_up()`, called
before a read, pulls what the ledger gained since; when that is more than `jump_after` messages
and the newest snapshot may be newer than the view (the ledger has moved on by `jump_after`
since the last look), it adopts that snapshot first (listeners are told through `restored`,
as at a start) and pulls only the tail after it. So an idle reader costs nothing, and a read
after a long quiet costs at most a snapshot load plus `jump_after` messages
(`docs/design/read-views.md`).
Not: a decision maker (only the admission leader decides), not a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger, LedgerError
from jobtree.bus.runtime import ServiceContext
from jobtree.bus.snapshot import SnapshotStore
from jobtree.core.engine import Cluster
from jobtree.core.facts import JournalEntry
from jobtree.core.model import ClusterConfig

WATCH_EVERY = 0.25
"""Seconds between checks of the connection by the re-attach watchdog."""
SNAPSHOT_LOOKUP_SECONDS = 2.0
"""How long a JetStream request of the snapshot lookup may take before the follower replays instead."""
STALL_SECONDS = 3.0
"""A push consumer silent this long while the ledger has moved on is re-attached."""


def apply_batch(cl: Cluster, batch: bus.LedgerBatch) -> list[JournalEntry]:
    """Apply one ledger batch to a view, deciding nothing (the view keeps no journal of it:
    the ledger is the journal); the batch's entries as core journal entries."""
    entries = [convert.entry_from_proto(entry) for entry in batch.entries]
    for t, item in entries:
        cl.replay_entry(t, item)
    cl.forget_history()
    return entries


class Listener:
    """A listener made of two callables: told of each batch, and of a snapshot start."""

    def __init__(self, on_batch: Any, restored: Any) -> None:
        self.on_batch = on_batch
        self.restored = restored

    def __call__(self, sequence: int, batch: bus.LedgerBatch) -> None:
        self.on_batch(sequence, batch)


JUMP_AFTER = 1000
"""An on-demand view this many ledger messages behind looks for a newer snapshot (the writer's
default cadence, `bus.snapshot.EVERY`)."""


class Follower:
    def __init__(self, js: JetStreamContext, cluster: str, config: ClusterConfig, *, snapshots: bool = True,
                 push: bool = True, jump_after: int = JUMP_AFTER) -> None:
        self.js = js
        self.snapshots = snapshots
        """Start from the newest valid snapshot (else replay the whole ledger)."""
        self.push = push
        """Follow every batch as it is appended (else: only when `catch_up` is called)."""
        self.jump_after = jump_after
        self._looked_at = 0
        """The ledger's last sequence when `catch_up` last looked for a snapshot."""
        self._catching = asyncio.Lock()
        self.jumps = 0
        """Times `catch_up` adopted a newer snapshot instead of pulling the whole gap."""
        self.restored_from = 0
        """The sequence of the snapshot this follower started from (0: none)."""
        self.snapshot_refusal = ""
        """Why it did not start from a snapshot ("" when it did, or did not look)."""
        self.cluster_name = subjects.check_cluster(cluster)
        self.ledger = Ledger(js, self.cluster_name)
        self.config = config
        self.cluster = Cluster(config, (), 0)
        self.sequence = 0
        self.command_ids: dict[str, int] = {}
        """Command id -> the sequence that committed it."""
        self.command_digests: dict[str, bytes] = {}
        """Command id -> what it asked for (`convert.command_digest`), where the ledger says."""
        self._changed = asyncio.Condition()
        self._sub: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._last_message = time.monotonic()
        self.reattached = 0
        """Times the follower re-attached to the ledger after losing its consumer."""
        self.listeners: list[Any] = []
        """Callables `f(sequence, batch)` told of every applied batch (watch streams)."""
        self.entries: list[JournalEntry] = []
        """The batch being told to the listeners as core journal entries (decoded once for all)."""

    async def start(self) -> None:
        """Catch up with the ledger by pulling it (fetches of 256 messages, so a long ledger is
        read at the follower's pace: a push consumer outran the apply and the server cut it off
        as a slow consumer), then follow new messages with an ordered push consumer from the
        next sequence. Returns once caught up with the ledger as it was at the call; from then on
        a watchdog re-attaches it whenever the connection to NATS was lost."""
        await self._attach()
        if self.push and self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())

    async def catch_up(self, log: Any = None) -> int:
        """Apply what the ledger gained since the last read (adopting a newer snapshot first when
        the gap is long; see the module contract); returns the sequence now applied. A NATS
        error leaves the view as it was, consistent at `sequence`: it propagates, or with `log`
        is logged (the reader answers from the view it has, which says its sequence)."""
        try:
            return await self._catch_up()
        except (nats.errors.Error, LedgerError) as exc:
            if log is None:
                raise
            log.warning("could not catch up with the ledger; answering from the view at its sequence",
                        extra={"fields": {"sequence": self.sequence, "error": repr(exc)}})
            return self.sequence

    async def _catch_up(self) -> int:
        async with self._catching:
            last = await self.ledger.last_sequence()
            if (self.snapshots and last - self.sequence > self.jump_after
                    and last - self._looked_at >= self.jump_after):
                self._looked_at = last
                await self._restore(newer_only=True)
            if last > self.sequence:
                async for record in self.ledger.records(self.sequence):
                    await self._applied(record.sequence, record.batch)
            return self.sequence

    async def _restore(self, *, newer_only: bool = False) -> None:
        """Adopt the newest valid snapshot, if every listener can start from one (with
        `newer_only`, only one past the view's sequence)."""
        blind = [listener for listener in self.listeners if getattr(listener, "restored", None) is None]
        if blind:
            self.snapshot_refusal = f"a listener needs the whole ledger ({blind[0]!r})"
            return
        # its own short request timeout: right after a nats-server restart a lookup that hangs
        # would delay the whole start, and the ledger is always there to replay instead
        store = SnapshotStore(self.js._nc.jetstream(timeout=SNAPSHOT_LOOKUP_SECONDS), self.cluster_name, self.config)
        try:
            snap = await store.load()
        except (nats.errors.Error, OSError) as exc:
            self.snapshot_refusal = f"could not read it: {exc!r}"
            return
        if snap is None:
            self.snapshot_refusal = store.last_refusal
            return
        if newer_only:
            if snap.sequence <= self.sequence:
                return
            self.jumps += 1
        self.cluster, self.sequence = snap.cluster, snap.sequence
        self.command_ids, self.command_digests = snap.command_ids, snap.command_digests
        self.restored_from, self.snapshot_refusal = snap.sequence, ""
        for listener in list(self.listeners):
            listener.restored(self)

    async def _attach(self) -> None:
        if self.sequence == 0 and self.snapshots:
            await self._restore()
        async for record in self.ledger.records(self.sequence):
            await self._applied(record.sequence, record.batch)
        self._looked_at = self.sequence
        if not self.push:
            return
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.sequence + 1)
        self._last_message = time.monotonic()
        self._sub = await self.js.subscribe(
            subjects.ledger_filter(self.cluster_name),
            stream=subjects.ledger_stream(self.cluster_name),
            ordered_consumer=True,
            config=config,
            cb=self._on_msg,
        )

    async def _detach(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _watch(self) -> None:
        """Re-attach from the last applied sequence after a reconnect, or when the push consumer
        is silent while the ledger has moved on; retried (with backoff) until it works."""
        nc = self.js._nc
        seen = nc.stats.get("reconnects", 0)
        delay = WATCH_EVERY
        while True:
            await asyncio.sleep(WATCH_EVERY)
            if not nc.is_connected:
                continue
            reconnects = nc.stats.get("reconnects", 0)
            stalled = False
            if reconnects == seen and time.monotonic() - self._last_message > STALL_SECONDS:
                self._last_message = time.monotonic()
                with contextlib.suppress(Exception):
                    stalled = await Ledger(self.js, self.cluster_name, timeout=1.0).last_sequence() > self.sequence
            if reconnects == seen and not stalled:
                continue
            await self._detach()
            try:
                await self._attach()
            except Exception:  # JetStream not ready yet after a restart: try again shortly
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            seen, delay = reconnects, WATCH_EVERY
            self.reattached += 1

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        await self._detach()

    async def _on_msg(self, msg: Any) -> None:
        self._last_message = time.monotonic()
        seq = int(msg.metadata.sequence.stream)
        if seq <= self.sequence:
            return
        await self._applied(seq, codec.decode(msg.data, bus.LedgerBatch, msg.headers))

    async def _applied(self, seq: int, batch: bus.LedgerBatch) -> None:
        self.entries = apply_batch(self.cluster, batch)
        record_ids(batch, seq, self.command_ids, self.command_digests)
        self.sequence = seq
        for listener in list(self.listeners):
            listener(seq, batch)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, sequence: int, timeout: float = 5.0) -> bool:
        """True once the view has applied `sequence` (False on timeout)."""
        if self.sequence >= sequence:
            return True
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.sequence >= sequence), timeout)
            except TimeoutError:
                return False
        return True


def record_ids(batch: bus.LedgerBatch, seq: int, ids: dict[str, int], digests: dict[str, bytes]) -> None:
    """Note which commands a ledger batch at `seq` committed, and what they asked for."""
    for entry in batch.entries:
        if entry.command_id:
            ids[entry.command_id] = seq
            if entry.command_digest:
                digests[entry.command_id] = entry.command_digest


async def follow(ctx: ServiceContext, listeners: Sequence[Any] = (), *, snapshots: bool = True,
                 push: bool = True) -> Follower | None:
    """A started follower of the cluster's ledger, waiting for the stream if it does not exist
    yet (services may start before the binder creates it) and for NATS while it is unreachable
    (a timeout or a reconnect is retried, never fatal); None if told to stop first. `listeners`
    are told of every batch from the first (the catch-up included); a failed start begins again
    with a fresh view, so a listener with a `reset(follower)` method is told of the follower it
    listens to (it drops what it derived from an earlier attempt). `push=False`: an on-demand
    view (see the module contract), caught up by its reader."""
    delay = 0.05
    while not ctx.stopping.is_set():
        follower = Follower(ctx.js, ctx.cluster, ctx.settings.config, snapshots=snapshots, push=push)
        for listener in listeners:
            reset = getattr(listener, "reset", None)
            if reset is not None:
                reset(follower)
            follower.listeners.append(listener)
        try:
            await follower.start()
            ctx.log.info("following the ledger" if push else "reading the ledger on demand", extra={"fields": {
                "sequence": follower.sequence, "from_snapshot": follower.restored_from,
                **({"snapshot_not_used": follower.snapshot_refusal} if follower.snapshot_refusal else {})}})
            return follower
        except (nats.errors.Error, LedgerError) as exc:
            await follower.stop()
            if delay == 0.05:
                what = ("waiting for the ledger stream" if isinstance(exc, nats.js.errors.NotFoundError)
                        else "waiting for NATS")
                ctx.log.info(what, extra={"fields": {"cluster": ctx.cluster, "error": repr(exc)}})
        await ctx.pause(delay)
        delay = min(1.0, delay * 2)
    return None
