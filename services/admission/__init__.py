"""admission: the per-cluster decision loop — the only place the calculus decides.

Contract: one leader per cluster (`LeaderLock`; standbys wait and take over when the lock
lapses). The leader rebuilds a core `Cluster` from the ledger stream, then answers
`jobtree.C.admission.command` (bus.Command -> bus.CommandReply), one command at a time: it
moves the clock to the command's instant (virtual clock) or the clock object's now (system
clock), applies the command, and sends the journal entries of that decision as one batch to
the binder with the sequence its view was built from and its fencing epoch. A stale append
(the ledger moved on) rebuilds the view and decides again; a rejected command
(ValidationError) writes nothing and restores the view; a command id already committed is
answered with its original sequence without deciding again. Holds no scheduling logic.
Not: a writer of the ledger (the binder is), not a reader for clients (followers are).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import nats.errors
from nats.aio.msg import Msg

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.follower import apply_batch
from jobtree.bus.leader import LEADER_TTL, LeaderLock, leader_bucket
from jobtree.bus.ledger import Ledger
from jobtree.bus.runtime import LATENCY, REQUESTS, ServiceContext
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError

STALE_RETRIES = 3
COMMIT_TIMEOUT = 1.0
"""Seconds to wait for the binder before resending the same append."""
COMMIT_ATTEMPTS = 8


def _error(code: int, path: str, problem: str) -> bus.Error:
    return bus.Error(code=code, field_path=path, problem=problem)  # type: ignore[arg-type]


class DecisionLoop:
    """The leader's view and its one-at-a-time decisions."""

    def __init__(self, ctx: ServiceContext, epoch: int) -> None:
        self.ctx = ctx
        self.epoch = epoch
        self.ledger = Ledger(ctx.js, ctx.cluster)
        self.cluster = Cluster(ctx.settings.config, (), 0)
        self.sequence = 0
        self.committed: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.commit_subject = subjects.request(ctx.cluster, "binder", "commit")

    async def rebuild(self) -> None:
        """The view from the ledger alone (deciding nothing)."""
        cluster = Cluster(self.ctx.settings.config, (), 0)
        committed: dict[str, int] = {}
        seq = 0
        for record in await self.ledger.replay():
            apply_batch(cluster, record.batch)
            for entry in record.batch.entries:
                if entry.command_id:
                    committed[entry.command_id] = record.sequence
            seq = record.sequence
        self.cluster, self.committed, self.sequence = cluster, committed, seq

    async def _commit(self, request: bus.AppendRequest) -> bytes | None:
        """Send an append to the binder, resending the identical request (same message id and
        expected sequence, so it commits at most once) while the binder restarts."""
        data = request.SerializeToString()
        for _ in range(COMMIT_ATTEMPTS):
            try:
                return await self.ctx.request(self.commit_subject, data, timeout=COMMIT_TIMEOUT)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.NoRespondersError:
                await asyncio.sleep(COMMIT_TIMEOUT / 4)
        return None

    def _instant(self, msg: bus.Command) -> int:
        if self.ctx.settings.clock == "virtual":
            return int(msg.instant.seconds) if msg.HasField("instant") else self.cluster.now
        return max(int(time.time()), self.cluster.now)

    async def handle(self, data: bytes) -> bytes:
        try:
            msg = bus.Command.FromString(data)
        except Exception:
            return bus.CommandReply(error=_error(bus.ERROR_CODE_INVALID_ARGUMENT, "", "not a bus.Command")).SerializeToString()
        async with self.lock:
            reply = await self._decide(msg)
        return reply.SerializeToString()

    async def _decide(self, msg: bus.Command) -> bus.CommandReply:
        command_id = msg.command_id or uuid.uuid4().hex
        if command_id in self.committed:
            return bus.CommandReply(command_id=command_id, ledger_sequence=self.committed[command_id])
        try:
            cmds = convert.commands_from_proto(msg)
        except ValidationError as err:
            return bus.CommandReply(command_id=command_id, error=convert.error_to_proto(err))
        for _ in range(STALE_RETRIES):
            t = self._instant(msg)
            if t < self.cluster.now:
                return bus.CommandReply(command_id=command_id, error=_error(
                    bus.ERROR_CODE_INVALID_ARGUMENT, "instant",
                    f"time moves forward only: {t} is before the decision loop's {self.cluster.now}"))
            mark = len(self.cluster.journal)
            try:
                self.cluster.advance(t)
                self.cluster.submit(*cmds)
            except ValidationError as err:
                await self.rebuild()  # nothing was written: forget what this attempt decided
                if err.command_index is not None and len(cmds) > 1:
                    err = err.under(f"batch.commands[{err.command_index}]")
                return bus.CommandReply(command_id=command_id, error=convert.error_to_proto(err))
            entries = self.cluster.journal[mark:]
            if not entries:
                return bus.CommandReply(command_id=command_id, ledger_sequence=self.sequence)
            batch = bus.LedgerBatch(entries=[convert.entry_to_proto(e, command_id=command_id, epoch=self.epoch)
                                             for e in entries])
            request = bus.AppendRequest(batch=batch, expected_last_sequence=self.sequence,
                                        epoch=self.epoch, msg_id=command_id)
            raw = await self._commit(request)
            if raw is None:
                await self.rebuild()
                return bus.CommandReply(command_id=command_id, error=_error(
                    bus.ERROR_CODE_UNAVAILABLE, "", "the binder did not answer; retry with the same command id"))
            appended = bus.AppendReply.FromString(raw)
            if appended.error.code == bus.ERROR_CODE_CONFLICT:
                await self.rebuild()  # decided against a stale view: decide again
                continue
            if appended.error.code != bus.ERROR_CODE_UNSPECIFIED:
                await self.rebuild()
                return bus.CommandReply(command_id=command_id, error=appended.error)
            if appended.duplicate:
                await self.rebuild()  # committed earlier (a retry): the ledger's version is the truth
            else:
                self.sequence = appended.sequence
            self.committed[command_id] = appended.sequence
            return bus.CommandReply(command_id=command_id, ledger_sequence=appended.sequence)
        return bus.CommandReply(command_id=command_id, error=_error(
            bus.ERROR_CODE_CONFLICT, "", "the ledger kept moving; retry with the same command id"))


async def main(ctx: ServiceContext) -> None:
    kv = await leader_bucket(ctx.js, ctx.cluster)
    holder = f"admission-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock = LeaderLock(kv, "admission", holder)
    ledger = Ledger(ctx.js, ctx.cluster)
    while not ctx.stopping.is_set():  # the ledger stream is made by `jobtree up` or the binder
        try:
            await ledger.last_sequence()
            break
        except Exception:
            await _sleep(ctx, 0.5)
    try:
        await _lead(ctx, lock, holder)
    finally:
        await lock.release()


async def _lead(ctx: ServiceContext, lock: LeaderLock, holder: str) -> None:
    while not ctx.stopping.is_set():
        if not await lock.acquire():
            await _sleep(ctx, LEADER_TTL / 4)
            continue
        ctx.log.info("leader", extra={"fields": {"epoch": lock.epoch, "holder": holder}})
        loop = DecisionLoop(ctx, lock.epoch)
        await loop.rebuild()

        async def answer(msg: Msg, loop: DecisionLoop = loop) -> None:
            started = time.perf_counter()
            reply = await loop.handle(msg.data)
            failed = bus.CommandReply.FromString(reply).error.code != bus.ERROR_CODE_UNSPECIFIED
            REQUESTS.labels("admission", "command", "refused" if failed else "ok").inc()
            LATENCY.labels("admission", "command").observe(time.perf_counter() - started)
            if msg.reply:
                await msg.respond(reply)

        sub = await ctx.nc.subscribe(subjects.request(ctx.cluster, "admission", "command"), cb=answer)
        try:
            while not ctx.stopping.is_set():
                await _sleep(ctx, LEADER_TTL / 4)
                if not await lock.refresh():
                    ctx.log.warning("lost the leader lock", extra={"fields": {"epoch": lock.epoch}})
                    break
        finally:
            await sub.unsubscribe()


async def _sleep(ctx: ServiceContext, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.stopping.wait(), seconds)
