"""The events stream of one cluster: domain events (bus.Event) kept for whoever follows them.

Contract: `EventStream(js, cluster)`: `create()` makes the stream `subjects.events_stream`
capturing `subjects.events_filter` (file storage, `MAX_AGE` of history, duplicate window
120 s); `last_ledger_sequence()` is the ledger sequence of the newest event published (0 when
none): a publisher that restarts derives every event again but publishes only past it;
`publish(event)` publishes one event on its subject (`jobtree.api.events.bus_subject`) with its
id as the JetStream message id, so a republished event within the window is stored once;
`read(after_ledger_sequence)` yields the kept events of messages after a ledger sequence, then
(`follow=True`) the new ones, in order. Headers: `Jobtree-Type` (codec), `Jobtree-Ledger-Sequence`.
Not: deriving events (jobtree.api.events), delivering them (the notifier).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from jobtree.api.events import bus_subject
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import stream_replicas

LEDGER_SEQUENCE_HEADER = "Jobtree-Ledger-Sequence"
MSG_ID = "Nats-Msg-Id"
MAX_AGE = 90 * 24 * 3600.0
"""Seconds of events kept (the ledger keeps everything; events can always be derived again)."""


class EventStream:
    def __init__(self, js: JetStreamContext, cluster: str) -> None:
        self.js = js
        self.cluster = subjects.check_cluster(cluster)
        self.stream = subjects.events_stream(cluster)

    def config(self, replicas: int) -> StreamConfig:
        return StreamConfig(name=self.stream, description=f"jobtree domain events of cluster {self.cluster}",
                            subjects=[subjects.events_filter(self.cluster)], storage=StorageType.FILE,
                            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD, max_age=MAX_AGE,
                            num_replicas=replicas, duplicate_window=120.0)

    async def create(self, replicas: int | None = None) -> None:
        try:
            await self.js.add_stream(self.config(stream_replicas() if replicas is None else replicas))
        except nats.js.errors.BadRequestError:
            await self.js.stream_info(self.stream)  # it exists (perhaps with other limits): use it

    async def last_ledger_sequence(self) -> int:
        info = await self.js.stream_info(self.stream)
        last = int(info.state.last_seq)
        if last == 0 or info.state.messages == 0:
            return 0
        msg = await self.js.get_msg(self.stream, last)
        return int((msg.headers or {}).get(LEDGER_SEQUENCE_HEADER, "0"))

    async def publish(self, event: bus.Event) -> None:
        headers = {**codec.headers(event), MSG_ID: f"{self.cluster}/{event.id}",
                   LEDGER_SEQUENCE_HEADER: str(event.ledger_sequence)}
        await self.js.publish(bus_subject(self.cluster, event), codec.encode(event), stream=self.stream,
                              headers=headers)

    async def read(self, after_ledger_sequence: int = 0, *, follow: bool = True,
                   idle: float = 0.5) -> AsyncIterator[bus.Event]:
        """Kept events of ledger messages after `after_ledger_sequence`, in order; then new ones
        while `follow` (an ordered consumer), else stop once `idle` seconds bring nothing."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            await queue.put(msg)

        info = await self.js.stream_info(self.stream)
        sub = await self.js.subscribe(subjects.events_filter(self.cluster), stream=self.stream,
                                      ordered_consumer=True, cb=on_msg,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            seen, last = 0, int(info.state.last_seq)
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), None if follow else idle)
                except TimeoutError:
                    return
                seen = int(msg.metadata.sequence.stream)
                event = codec.decode(msg.data, bus.Event, msg.headers)
                if event.ledger_sequence > after_ledger_sequence:
                    yield event
                if not follow and seen >= last:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
