"""The budget service's event publisher: domain events from the ledger into the events stream.

Part of the budget service (see its package docstring). A follower listener: for every ledger
message the follower applies (from the first, or from a snapshot with the deriver's memory read
from its view, so the deriver's memory is the same on every start) it derives the events (`jobtree.api.events.Deriver`) and queues those of messages past
what the events stream already holds (`EventStream.last_ledger_sequence`, read at start); one
task publishes them in order, retrying while NATS is away. A crash between publishing and
acknowledging republishes under the same message id (stored once within the duplicate window).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors

from jobtree.api.events import Deriver
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus.eventstream import EventStream
from jobtree.bus.runtime import ServiceContext
from jobtree.services.budget.metrics import EVERY, Fleet


class Publisher:
    def __init__(self, ctx: ServiceContext, published_up_to: int) -> None:
        self.ctx = ctx
        self.stream = EventStream(ctx.js, ctx.cluster)
        self.published_up_to = published_up_to
        self.queue: asyncio.Queue[bus.Event] = asyncio.Queue()
        self.deriver = Deriver(ctx.cluster)
        self.follower: Any = None
        self.published = 0
        self.fleet = Fleet()

    def reset(self, follower: Any) -> None:
        self.follower = follower
        self.deriver = Deriver(self.ctx.cluster)
        while not self.queue.empty():
            self.queue.get_nowait()

    def restored(self, follower: Any) -> None:
        """Started from a snapshot: the deriver's memory is read from its view (`Deriver.from_view`
        derives, after it, what a deriver that had seen every message derives)."""
        self.follower = follower
        self.deriver = Deriver.from_view(self.ctx.cluster, follower.cluster)

    def __call__(self, sequence: int, batch: bus.LedgerBatch) -> None:
        events = self.deriver.derive(self.follower.cluster, sequence, self.follower.entries)
        if sequence > self.published_up_to:
            for event in events:
                self.queue.put_nowait(event)
                self.fleet.on_event(self.follower.cluster, event)

    async def refresh_forever(self) -> None:
        """The fleet gauges from the view, every EVERY seconds."""
        while True:
            if self.follower is not None:
                try:
                    self.fleet.refresh(self.follower.cluster)
                except Exception:  # a metric must never take the service down
                    self.ctx.log.warning("fleet metrics failed", exc_info=True)
            await asyncio.sleep(EVERY)

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            delay = 0.1
            while True:
                try:
                    await self.stream.publish(event)
                    self.published += 1
                    break
                except (nats.errors.Error, TimeoutError) as exc:
                    self.ctx.log.warning("publishing an event failed; retrying",
                                         extra={"fields": {"event": event.id, "error": repr(exc)}})
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)


async def start(ctx: ServiceContext) -> Publisher | None:
    """The events stream made (or found) and the publisher ready to listen; None if stopped first."""
    delay = 0.1
    stream = EventStream(ctx.js, ctx.cluster)
    while not ctx.stopping.is_set():
        try:
            await stream.create()
            return Publisher(ctx, await stream.last_ledger_sequence())
        except (nats.errors.Error, TimeoutError) as exc:
            ctx.log.info("waiting to make the events stream", extra={"fields": {"error": repr(exc)}})
            await ctx.pause(delay)
            delay = min(2.0, delay * 2)
    return None
