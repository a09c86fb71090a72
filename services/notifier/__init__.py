"""notifier: domain events to Slack, e-mail and webhooks, at least once, deduplicated (issue 10).

Contract: `jobtree serve notifier --config FILE` (the receivers and routes of `config`; an
invalid file exits 2 with one line naming the field) reads the cluster's events stream through
the durable consumer `notifier` and delivers each event along its routes (first match, then the
next while `continue: true`):
- **a run's own request**: a Run annotated `rq.davidlangworthy.io/notify: RECEIVER[,...]` (and
  optionally `...notify-kinds: KIND[,...]`) is told through those receivers too, as far as the
  config's `runRequests` allows them (receivers and kinds), grouped by run;
- **grouping**: events of one route, receiver and `groupBy` values wait `groupWait` after the
  first, then go as one message (a preemption storm is one message listing the runs); the next
  message of the same group waits until `repeatInterval` after the previous one, collecting
  what arrives meanwhile;
- **at least once**: a message of the stream is acknowledged only when every delivery it takes
  part in is recorded in the KV bucket `notified` (key receiver + event id, kept 7 days): as
  delivered, or as dead (after `retry.attempts`, or a refusal no retry changes). While it waits
  in a group its acknowledgement deadline is extended (`in_progress`), so a killed notifier's
  events come back to the next one within `ACK_WAIT` seconds;
- **deduplicated**: an event already recorded for a receiver is not sent to it again, so a
  duplicate can only come from a crash between a send and its record, and carries the same id
  (Slack text, the e-mail's `X-Jobtree-Event-Ids`, the CloudEvent `id`);
- **retries** back off exponentially with jitter from `retry.initial` to `retry.max`; an HTTP
  429's `Retry-After` is honoured; 5xx, 408, 429, network errors and SMTP 4xx are retried,
  other refusals are final;
- **rate limits**: at most `maxPerMinute` messages per receiver (a token bucket);
- metrics: `jobtree_notifier_delivered_total{receiver,kind}`, `..._messages_total{receiver}`,
  `..._failed_attempts_total{receiver}`, `..._dead_letters_total{receiver}`.
Not: deriving events (the budget service publishes them), not Kubernetes Events (the bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from prometheus_client import Counter

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import stream_replicas
from jobtree.bus.runtime import ServiceContext
from jobtree.services.notifier.config import Config, Receiver, Route
from jobtree.services.notifier.send import SendError, send

ENV_CONFIG = "JOBTREE_NOTIFIER_CONFIG"
DURABLE = "notifier"
ACK_WAIT = float(os.environ.get("JOBTREE_NOTIFIER_ACK_WAIT", "30"))
"""Seconds before the stream gives an unacknowledged event to another notifier (a killed one's)."""
KEEP_SECONDS = 7 * 24 * 3600.0
DELIVERED = b"delivered"

DELIVERED_TOTAL = Counter("jobtree_notifier_delivered_total", "Events delivered, by receiver and kind",
                          ["receiver", "kind"])
MESSAGES = Counter("jobtree_notifier_messages_total", "Messages sent (one per group), by receiver", ["receiver"])
FAILED = Counter("jobtree_notifier_failed_attempts_total", "Sends that failed (and were retried or given up)",
                 ["receiver"])
DEAD = Counter("jobtree_notifier_dead_letters_total", "Events given up on, by receiver", ["receiver"])


class TokenBucket:
    """Messages spaced by 60/per_minute seconds (a bucket of one token: Slack's webhooks take
    about one message a second, and a burst is what grouping is for)."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = 1.0
        self.tokens = 1.0
        self.rate = per_minute / 60.0
        self.at = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass
class Group:
    route: Route
    receiver: Receiver
    events: list[bus.Event] = field(default_factory=list)
    msgs: list[Any] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


def group_values(route: Route, e: bus.Event) -> tuple[str, ...]:
    return tuple(str(getattr(e, key)) for key in route.group_by)


class Notifier:
    def __init__(self, ctx: ServiceContext, config: Config, kv: Any, session: aiohttp.ClientSession) -> None:
        self.ctx, self.config, self.kv, self.session = ctx, config, kv, session
        self.groups: dict[tuple[Any, ...], Group] = {}
        self.last_sent: dict[tuple[Any, ...], float] = {}
        self.holds: dict[int, int] = {}
        """Stream sequence of a held message -> the groups still holding it."""
        self.held: dict[int, Any] = {}
        self.buckets = {name: TokenBucket(r.max_per_minute) for name, r in config.receivers.items()}
        self.sent_messages = 0

    async def recorded(self, receiver: str, event_id: str) -> bool:
        try:
            await self.kv.get(subjects.kv_key(receiver, event_id))
            return True
        except nats.js.errors.KeyNotFoundError:
            return False

    async def record(self, receiver: str, event_id: str, value: bytes) -> None:
        delay = 0.1
        while True:
            try:
                await self.kv.put(subjects.kv_key(receiver, event_id), value)
                return
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def take(self, msg: Any) -> None:
        """One message of the events stream: into the groups of its routes (or acknowledged)."""
        seq = int(msg.metadata.sequence.stream)
        try:
            event = codec.decode(msg.data, bus.Event, msg.headers)
        except codec.CodecError:
            await msg.ack()  # not an event: nothing to deliver
            return
        if seq in self.held:
            self.held[seq] = msg  # a redelivery of a message we hold: keep the newest handle
            return
        holds = 0
        routes: list[tuple[Any, Route]] = list(enumerate(self.config.routes_for(event.owner, event.namespace,
                                                                                event.kind)))
        for name in (n for n in event.data.get("notify", "").split(",") if n):  # the run's own request
            asked = self.config.run_requests.route(name, event.kind)
            if asked is not None and all(r.receiver != name for _, r in routes):
                routes.append((f"run:{name}", asked))
        for index, route in routes:
            if await self.recorded(route.receiver, event.id):
                continue
            key = (index, route.receiver, group_values(route, event))
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = Group(route, self.config.receivers[route.receiver])
            if any(e.id == event.id for e in group.events):
                continue
            group.events.append(event)
            group.msgs.append(seq)
            holds += 1
            if group.task is None:
                wait = route.group_wait
                last = self.last_sent.get(key)
                if last is not None:
                    wait = max(wait, last + route.repeat_interval - time.monotonic())
                group.task = asyncio.ensure_future(self._flush_after(key, max(0.0, wait)))
        if holds == 0:
            await msg.ack()
            return
        self.holds[seq] = holds
        self.held[seq] = msg

    async def _flush_after(self, key: tuple[Any, ...], wait: float) -> None:
        await asyncio.sleep(wait)
        group = self.groups.pop(key)
        outcome = await self.deliver(group)
        self.last_sent[key] = time.monotonic()
        for e in group.events:
            await self.record(group.receiver.name, e.id, outcome)
        for seq in group.msgs:
            self.holds[seq] -= 1
            if self.holds[seq] == 0:
                del self.holds[seq]
                msg = self.held.pop(seq)
                with contextlib.suppress(nats.errors.Error):
                    await msg.ack()

    async def deliver(self, group: Group) -> bytes:
        """Send one message for the group; what to record for its events (delivered or dead)."""
        r, retry = group.receiver, self.config.retry
        problem = ""
        for attempt in range(retry.attempts):
            await self.buckets[r.name].take()
            try:
                await send(r, group.events, self.session)
            except SendError as err:
                FAILED.labels(r.name).inc()
                problem = str(err)
                self.ctx.log.warning("delivery failed", extra={"fields": {
                    "receiver": r.name, "events": [e.id for e in group.events], "attempt": attempt + 1,
                    "error": problem, "retryable": err.retryable}})
                if not err.retryable:
                    break
                backoff = min(retry.maximum, retry.initial * 2 ** attempt) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(backoff, err.retry_after or 0.0))
                continue
            MESSAGES.labels(r.name).inc()
            self.sent_messages += 1
            for e in group.events:
                DELIVERED_TOTAL.labels(r.name, e.kind).inc()
            self.ctx.log.info("delivered", extra={"fields": {"receiver": r.name,
                                                             "events": [e.id for e in group.events]}})
            return DELIVERED
        DEAD.labels(r.name).inc(len(group.events))
        self.ctx.log.error("dead letter", extra={"fields": {"receiver": r.name, "error": problem,
                                                            "events": [e.id for e in group.events]}})
        return b"dead: " + problem.encode()[:500]

    async def keep_alive(self) -> None:
        """Extend the acknowledgement deadline of every held message (they wait in groups)."""
        while True:
            await asyncio.sleep(ACK_WAIT / 3)
            for msg in list(self.held.values()):
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()


async def _setup(ctx: ServiceContext) -> tuple[Any, Any]:
    """The `notified` bucket and the durable consumer, waiting for NATS and the events stream."""
    delay = 0.1
    while True:
        try:
            bucket = subjects.bucket(ctx.cluster, "notified")
            try:
                kv = await ctx.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await ctx.js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=KEEP_SECONDS,
                                                                  storage=StorageType.FILE,
                                                                  replicas=stream_replicas()))
            sub = await ctx.js.pull_subscribe(
                subjects.events_filter(ctx.cluster), durable=DURABLE, stream=subjects.events_stream(ctx.cluster),
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT, max_ack_pending=20_000,
                                      deliver_policy=DeliverPolicy.ALL))
            return kv, sub
        except (nats.errors.Error, TimeoutError) as exc:
            ctx.log.info("waiting for the events stream", extra={"fields": {"error": repr(exc)}})
            await ctx.pause(delay)
            if ctx.stopping.is_set():
                raise
            delay = min(2.0, delay * 2)


async def serve(ctx: ServiceContext, config: Config) -> Notifier | None:
    """Deliver until the service stops (the notifier, for the tests to look at after)."""
    try:
        kv, sub = await _setup(ctx)
    except (nats.errors.Error, TimeoutError):
        return None
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(ctx, config, kv, session)
        alive = asyncio.ensure_future(notifier.keep_alive())
        ctx.log.info("notifying", extra={"fields": {"receivers": sorted(config.receivers),
                                                    "routes": len(config.routes)}})
        try:
            while not ctx.stopping.is_set():
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except nats.errors.Error as exc:
                    ctx.log.info("fetch failed; retrying", extra={"fields": {"error": repr(exc)}})
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await notifier.take(msg)
        finally:
            alive.cancel()
            for group in notifier.groups.values():
                if group.task is not None:
                    group.task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return notifier


async def main(ctx: ServiceContext) -> None:
    from jobtree.services.notifier.config import load

    await serve(ctx, load(os.environ[ENV_CONFIG]))
