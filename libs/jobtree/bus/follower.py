"""A follower: a read-only replica of one cluster's view, kept in step with the ledger stream.

Contract: `Follower.start()` replays the ledger stream from its first message into a core
`Cluster` (facts and spec changes applied at their instants; nothing is decided), pulling it,
and returns once caught up; it then keeps applying new batches in order as they arrive (an
ordered push consumer from the next sequence). `sequence` is the
last applied stream sequence; `wait_for(seq)` returns once it has applied `seq` (the "reads
carry the sequence they depend on" rule). Views are read from `cluster` between awaits.
Not: a decision maker (only the admission leader decides), not a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger
from jobtree.bus.runtime import ServiceContext
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig


def apply_batch(cl: Cluster, batch: bus.LedgerBatch) -> None:
    """Apply one ledger batch to a view, deciding nothing."""
    for entry in batch.entries:
        t, item = convert.entry_from_proto(entry)
        cl.replay_entry(t, item)


class Follower:
    def __init__(self, js: JetStreamContext, cluster: str, config: ClusterConfig) -> None:
        self.js = js
        self.cluster_name = subjects.check_cluster(cluster)
        self.config = config
        self.cluster = Cluster(config, (), 0)
        self.sequence = 0
        self.command_ids: dict[str, int] = {}
        """Command id -> the sequence that committed it."""
        self._changed = asyncio.Condition()
        self._sub: Any = None
        self.listeners: list[Any] = []
        """Callables `f(sequence, batch)` told of every applied batch (watch streams)."""

    async def start(self) -> None:
        """Catch up with the ledger by pulling it (fetches of 256 messages, so a long ledger is
        read at the follower's pace: a push consumer outran the apply and the server cut it off
        as a slow consumer), then follow new messages with an ordered push consumer from the
        next sequence. Returns once caught up with the ledger as it was at the call."""
        async for record in Ledger(self.js, self.cluster_name).records(self.sequence):
            await self._applied(record.sequence, record.batch)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.sequence + 1)
        self._sub = await self.js.subscribe(
            subjects.ledger_filter(self.cluster_name),
            stream=subjects.ledger_stream(self.cluster_name),
            ordered_consumer=True,
            config=config,
            cb=self._on_msg,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Any) -> None:
        seq = int(msg.metadata.sequence.stream)
        if seq <= self.sequence:
            return
        await self._applied(seq, codec.decode(msg.data, bus.LedgerBatch, msg.headers))

    async def _applied(self, seq: int, batch: bus.LedgerBatch) -> None:
        apply_batch(self.cluster, batch)
        for entry in batch.entries:
            if entry.command_id:
                self.command_ids[entry.command_id] = seq
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


async def follow(ctx: ServiceContext) -> Follower | None:
    """A started follower of the cluster's ledger, waiting for the stream if it does not exist
    yet (services may start before the binder creates it); None if told to stop first."""
    delay = 0.05
    while not ctx.stopping.is_set():
        follower = Follower(ctx.js, ctx.cluster, ctx.settings.config)
        try:
            await follower.start()
            return follower
        except nats.js.errors.NotFoundError:
            if delay == 0.05:
                ctx.log.info("waiting for the ledger stream", extra={"fields": {"cluster": ctx.cluster}})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stopping.wait(), delay)
        delay = min(1.0, delay * 2)
    return None
