"""admission: the per-cluster decision loop — the only place the calculus decides.

Contract: one leader per cluster (`LeaderLock`; standbys wait and take over when the lock
lapses). A standby keeps a hot replica of the ledger (a `Follower`) while it waits; the new
leader stops it, applies the tail it had not seen, refreshes the lock for the whole term (a
keeper task, so a long catch-up cannot let it lapse), then answers
`jobtree.C.admission.command` (bus.Command -> bus.CommandReply). Commands queue as they
arrive; the decision loop takes everything queued (up to MAX_GROUP) as one group and decides
its commands in arrival order exactly as it would one at a time — for each: move the clock to
the command's instant (virtual clock; on the system clock the clock moves to now once, before
the group), apply it, settle — and sends the
journal entries of the whole group, each tagged with its command id, as one ledger batch to the
binder with the sequence its view was built from, its fencing epoch and its view's next timer
once the group applies (`Cluster.next_timer`; the binder stamps it on the message, and the
resolver ticks from it without a view of its own). So the ledger holds the
same facts as a one-at-a-time loop would write, in fewer, larger messages; while one group
commits, the next one queues. Outcomes:
- a refused command (ValidationError) is answered with its error and writes nothing; the
  others of its group go on. The core leaves the view untouched when a lone command is
  refused; when a refused command had changed the view (it moved the clock, or part of its
  batch applied), the view is rebuilt from the ledger and the group decided again without it;
- a stale append (the ledger moved on) rebuilds the view and decides the group again;
- a command id already committed is answered with its original sequence without deciding —
  when it asks for the same thing: the first entry a command decides carries its digest
  (`convert.command_digest`) and who asked (`Command.identity`, as the sender says: the
  gateway's authenticated caller, or a service's `service:NAME`), and an id reused for a different request is refused
  INVALID_ARGUMENT on `command_id`, naming it;
- a group in which no command is decided (all already committed, refused or resent) commits
  nothing: the clock's own entries (on the system clock, time moved before the group) are
  carried into the next commit instead of being appended alone (a clock-only append under one
  fixed message id was taken by the stream as a duplicate of the previous one, which forced a
  full replay of the ledger);
- a command arriving while MAX_QUEUE commands wait (`JOBTREE_ADMISSION_MAX_QUEUE`) is refused
  UNAVAILABLE at once;
- a binder that does not answer fails the group UNAVAILABLE (the client retries with the
  same command id);
- anything else that breaks a decision (the bus, a bug) answers the group UNAVAILABLE and ends
  the term: the lock is given up and the process follows the ledger afresh and stands by.
Holds no scheduling logic.
Not: a writer of the ledger (the binder is), not a reader for clients (followers are).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from prometheus_client import Counter

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.follower import Follower, apply_batch, follow, record_ids
from jobtree.bus.leader import LEADER_TTL, LeaderLock, leader_bucket
from jobtree.bus.ledger import Ledger, LedgerError
from jobtree.bus.runtime import LATENCY, REQUESTS, ServiceContext
from jobtree.bus.snapshot import SnapshotStore, SnapshotWriter
from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError

STALE_RETRIES = 3
COMMIT_TIMEOUT = 1.0
"""Seconds to wait for the binder before resending the same append."""
COMMIT_ATTEMPTS = 8
REBUILDS = Counter("jobtree_admission_rebuilds_total",
                   "Times the decision loop read the ledger into its view (a rebuild, or a take-over's tail)", ["why"])
REBUILD_REASONS = frozenset({"take over", "a refused command had changed the view", "the binder did not answer",
                             "the ledger moved on", "committed earlier"})
MAX_QUEUE = 20_000
"""Commands waiting beyond this are refused UNAVAILABLE at once (overload: memory stays bounded
and callers learn it now, not at their deadline)."""
ENV_MAX_QUEUE = "JOBTREE_ADMISSION_MAX_QUEUE"
"""Environment override of MAX_QUEUE."""
MAX_GROUP = 1024
"""Most commands taken from the queue for one group."""
GROUP_SECONDS = 0.05
"""A group stops taking commands after this much deciding (the event loop must breathe: the
leader lock is refreshed on it), and commits."""
GROUP_BYTES = 256 * 1024
"""A group stops taking commands once its ledger message is this large (NATS carries at most
1 MiB by default)."""
YIELD_EVERY = 64
"""A rebuild lets other tasks run after this many ledger messages."""


def _error(code: int, path: str, problem: str) -> bus.Error:
    return bus.Error(code=code, field_path=path, problem=problem)  # type: ignore[arg-type]


@dataclass(slots=True)
class Pending:
    """One command waiting in the queue, and where its answer goes."""

    msg: bus.Command
    command_id: str
    cmds: tuple[facts.Command, ...]
    reply: Callable[[bus.CommandReply], Awaitable[None]]
    answer: bus.CommandReply | None = None
    """Set once the command is refused (or answered without deciding)."""
    span: tuple[int, int] = (0, 0)
    """The journal entries it decided in the current attempt."""
    digest: bytes = b""
    """What it asks for (`convert.command_digest`)."""


class Restart(Exception):
    """A refused command changed the view before it was refused: rebuild and decide the group again."""


class DecisionLoop:
    """The leader's view and its decisions, a group of queued commands at a time."""

    def __init__(self, ctx: ServiceContext, epoch: int) -> None:
        self.ctx = ctx
        self.epoch = epoch
        self.ledger = Ledger(ctx.js, ctx.cluster)
        self.cluster = Cluster(ctx.settings.config, (), 0)
        self.sequence = 0
        self.committed: dict[str, int] = {}
        self.digests: dict[str, bytes] = {}
        """Command id -> what it asked for, for the committed commands whose ledger says."""
        self.carried: list[bus.LedgerEntry] = []
        """The clock's entries of groups that decided no command: not in the ledger yet, already
        in the view; they lead the next commit."""
        self.queue: deque[Pending] = deque()
        self.max_queue = int(os.environ.get(ENV_MAX_QUEUE, MAX_QUEUE))
        self.queued = asyncio.Event()
        self.commit_subject = subjects.request(ctx.cluster, "binder", "commit")
        self.snapshots = SnapshotStore(ctx.js, ctx.cluster, ctx.settings.config)
        self.writer = SnapshotWriter(self.snapshots, ctx.log)

    async def rebuild(self, why: str) -> None:
        """The view from the ledger alone (deciding nothing): what a rejected decision leaves —
        from the newest valid snapshot and the ledger after it."""
        self.cluster, self.committed, self.sequence = Cluster(self.ctx.settings.config, (), 0), {}, 0
        self.digests, self.carried = {}, []
        with contextlib.suppress(nats.errors.Error, OSError):
            snap = await self.snapshots.load()
            if snap is not None:
                self.cluster, self.sequence = snap.cluster, snap.sequence
                self.committed, self.digests = snap.command_ids, snap.command_digests
                self.writer.last_sequence = max(self.writer.last_sequence, snap.sequence)
        await self._catch_up(why)

    async def take_over(self, standby: Follower) -> None:
        """Start a term from a standby's replica of the ledger: stop it and apply the tail it
        has not seen yet (the leader of a long ledger does not replay it all)."""
        await standby.stop()
        self.cluster, self.committed, self.sequence = standby.cluster, dict(standby.command_ids), standby.sequence
        self.digests, self.carried = dict(standby.command_digests), []
        self.writer.last_sequence = standby.restored_from  # the newest snapshot is there: no new one yet
        await self._catch_up("take over")

    async def _catch_up(self, why: str) -> None:
        """Apply every ledger message after `sequence` to the view."""
        started, first = time.perf_counter(), self.sequence
        for i, record in enumerate(await self.ledger.replay(after=self.sequence)):
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long replay must not starve the leader lock's refresh
            apply_batch(self.cluster, record.batch)
            record_ids(record.batch, record.sequence, self.committed, self.digests)
            self.sequence = record.sequence
        REBUILDS.labels(why if why in REBUILD_REASONS else "other").inc()
        self.ctx.log.info("view rebuilt from the ledger" if first == 0 else "view caught up with the ledger",
                          extra={"fields": {"why": why, "from": first, "sequence": self.sequence,
                                            "seconds": round(time.perf_counter() - started, 3)}})

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
        """When a command happens: its own instant on a virtual clock; on the system clock, the
        group's (the clock moved once, before the group: `_attempt`)."""
        if self.ctx.settings.clock == "virtual" and msg.HasField("instant"):
            return int(msg.instant.seconds)
        return self.cluster.now

    # -- the queue ---------------------------------------------------------------------------

    def enqueue(self, data: bytes, reply: Callable[[bus.CommandReply], Awaitable[None]]) -> Pending | None:
        """Parse a command and queue it; a command that cannot be parsed is answered at once
        (returns None and schedules the answer)."""
        try:
            msg = codec.parse(data, bus.Command)
        except codec.CodecError as exc:
            _spawn(reply(bus.CommandReply(error=_error(bus.ERROR_CODE_INVALID_ARGUMENT, "request", str(exc)))))
            return None
        command_id = msg.command_id or uuid.uuid4().hex
        try:
            cmds = tuple(convert.commands_from_proto(msg))
        except ValidationError as err:
            _spawn(reply(bus.CommandReply(command_id=command_id, error=convert.error_to_proto(err))))
            return None
        if len(self.queue) >= self.max_queue:
            _spawn(reply(bus.CommandReply(command_id=command_id, error=_error(
                bus.ERROR_CODE_UNAVAILABLE, "", f"admission is overloaded ({len(self.queue)} commands queued); "
                "retry later with the same command id"))))
            return None
        item = Pending(msg, command_id, cmds, reply, digest=convert.command_digest(msg))
        self.queue.append(item)
        self.queued.set()
        return item

    async def run(self) -> None:
        """Decide queued commands for ever, a group at a time."""
        while True:
            await self.queued.wait()
            await self.step()

    async def step(self) -> None:
        """Decide one group: what is queued, in order, as much as GROUP_SECONDS of deciding and
        GROUP_BYTES of ledger message allow (at least one command); the rest stays queued first."""
        group = [self.queue.popleft() for _ in range(min(MAX_GROUP, len(self.queue)))]
        if not self.queue:
            self.queued.clear()
        if not group:
            return
        try:
            decided = await self._decide(group)
        except Exception:
            for item in group:  # answered, not left to time out; the term ends (see _term)
                await item.reply(bus.CommandReply(command_id=item.command_id, error=_error(
                    bus.ERROR_CODE_UNAVAILABLE, "", "the decision loop failed; retry with the same command id")))
            raise
        self.queue.extendleft(reversed(group[decided:]))
        if self.queue:
            self.queued.set()
        for item in group[:decided]:
            assert item.answer is not None
            await item.reply(item.answer)
        if not self.carried:  # the view is the ledger's up to `sequence`: a snapshot may be taken
            self.writer.maybe(self.cluster, self.sequence, self.committed, self.digests)
        await asyncio.sleep(0)  # let the lock refresh and the replies go out between groups

    # -- deciding a group --------------------------------------------------------------------

    async def _decide(self, group: list[Pending]) -> int:
        """Decide the commands of `group` in order, as the one-at-a-time loop would, and commit
        what they decided as one ledger message; set each decided command's answer. Returns how
        many of the group it decided (the rest did not fit this group)."""
        stale = 0
        while True:
            try:
                entries, decided = self._attempt(group)
            except Restart:
                await self.rebuild("a refused command had changed the view")
                continue
            live = [item for item in group[:decided] if item.answer is None]
            if not live or not entries:  # nothing decided: the clock's entries wait for the next commit
                self.carried = entries
                for item in live:
                    item.answer = bus.CommandReply(command_id=item.command_id, ledger_sequence=self.sequence)
                return decided
            request = bus.AppendRequest(batch=bus.LedgerBatch(entries=entries), expected_last_sequence=self.sequence,
                                        epoch=self.epoch, msg_id=_message_id(live))
            due = self.cluster.next_timer()
            if due is not None:
                request.next_timer.seconds = due
            raw = await self._commit(request)
            if raw is None:
                await self.rebuild("the binder did not answer")
                self._fail(live, _error(bus.ERROR_CODE_UNAVAILABLE, "",
                                        "the binder did not answer; retry with the same command id"))
                return decided
            appended = bus.AppendReply.FromString(raw)
            if appended.error.code == bus.ERROR_CODE_CONFLICT and stale + 1 < STALE_RETRIES:
                stale += 1
                await self.rebuild("the ledger moved on")  # decided against a stale view: decide again
                continue
            if appended.error.code != bus.ERROR_CODE_UNSPECIFIED:
                await self.rebuild(f"the binder refused: {appended.error.problem}")
                self._fail(live, appended.error)
                return decided
            if appended.duplicate and not await self._is_ours(appended.sequence, request):
                await self.rebuild("committed earlier")  # a retry: the ledger's version is the truth
            else:
                self.sequence, self.carried = appended.sequence, []
            for item in live:
                if item.span[1] > item.span[0]:
                    self.committed[item.command_id] = appended.sequence
                    self.digests[item.command_id] = item.digest
                seq = self.committed.get(item.command_id, appended.sequence)
                item.answer = bus.CommandReply(command_id=item.command_id, ledger_sequence=seq,
                                               runs=self._runs_of(item) if seq == self.sequence else ())
            return decided

    def _runs_of(self, item: Pending) -> list[Any]:
        """The runs a command applied, as the view holds them now (at the reply's sequence)."""
        cl = self.cluster
        keys = dict.fromkeys(c.run.key for c in item.cmds if isinstance(c, facts.ApplyRun))
        return [convert.run_to_proto(cl.runs[k], cl.status.get(k)) for k in keys if k in cl.runs]

    async def _is_ours(self, sequence: int, request: bus.AppendRequest) -> bool:
        """Whether the message the binder found at `sequence` is this very append (a resend of a
        request whose first reply was lost): then the view is the ledger's and needs no rebuild."""
        if sequence != request.expected_last_sequence + 1:
            return False
        try:
            stored = await self.ledger.batch_at(sequence)
        except Exception:
            return False
        return stored == request.batch

    def _fail(self, items: list[Pending], error: bus.Error) -> None:
        for item in items:
            item.answer = bus.CommandReply(command_id=item.command_id, error=error)

    def _attempt(self, group: list[Pending]) -> tuple[list[bus.LedgerEntry], int]:
        """Apply the group's commands to the view, in order, until GROUP_SECONDS or GROUP_BYTES
        is spent; the journal entries to commit, each tagged with the command that decided it
        (on the system clock the group starts by moving the clock to now; what that decides
        carries no command id), and how many commands it took. A refused command that changed
        the view (it moved a virtual clock, or part of its batch applied) raises Restart: the
        caller rebuilds the view and attempts the group again without it."""
        started = time.perf_counter()
        self.cluster.forget_history()  # what earlier attempts journaled is in the ledger or thrown away
        out: list[bus.LedgerEntry] = list(self.carried)
        size = sum(e.ByteSize() for e in out)
        seen: dict[str, bytes] = {}
        if self.ctx.settings.clock != "virtual":  # time passes on its own: no command's doing
            start = len(self.cluster.journal)
            self.cluster.advance(max(int(time.time()), self.cluster.now))
            out.extend(convert.entry_to_proto(e, command_id="", epoch=self.epoch) for e in self.cluster.journal[start:])
        for n, item in enumerate(group):
            if n and (time.perf_counter() - started > GROUP_SECONDS or size > GROUP_BYTES):
                return out, n
            if item.answer is not None and item.answer.HasField("error"):
                continue
            item.answer, item.span = None, (0, 0)
            if item.command_id in self.committed or item.command_id in seen:
                first = self.digests.get(item.command_id) or seen.get(item.command_id)
                if first and first != item.digest:
                    item.answer = bus.CommandReply(command_id=item.command_id, error=_error(
                        bus.ERROR_CODE_INVALID_ARGUMENT, "command_id",
                        f"{item.command_id!r} was already used for a different request"
                        + (f" (committed at ledger sequence {self.committed[item.command_id]})"
                           if item.command_id in self.committed else "")
                        + "; send a new id for a new request, the same request to retry"))
                elif item.command_id in self.committed:
                    item.answer = bus.CommandReply(command_id=item.command_id,
                                                   ledger_sequence=self.committed[item.command_id])
                continue  # else a resent copy of a command this group decides: answered alike
            t = self._instant(item.msg)
            if t < self.cluster.now:
                item.answer = bus.CommandReply(command_id=item.command_id, error=_error(
                    bus.ERROR_CODE_INVALID_ARGUMENT, "instant",
                    f"time moves forward only: {t} is before the decision loop's {self.cluster.now}"))
                continue
            start = len(self.cluster.journal)
            try:
                self.cluster.advance(t)
                self.cluster.submit(*item.cmds)
            except ValidationError as err:
                if err.command_index is not None and len(item.cmds) > 1:
                    err = err.under(f"batch.commands[{err.command_index}]")
                item.answer = bus.CommandReply(command_id=item.command_id, error=convert.error_to_proto(err))
                if len(self.cluster.journal) > start or (err.command_index or 0) > 0:
                    raise Restart from None  # it moved the clock or applied part of a batch
                continue
            seen[item.command_id] = item.digest
            item.span = (start, len(self.cluster.journal))
            for i, e in enumerate(self.cluster.journal[start:item.span[1]]):
                entry = convert.entry_to_proto(e, command_id=item.command_id, epoch=self.epoch)
                if i == 0:
                    entry.command_digest = item.digest
                    entry.identity = item.msg.identity
                size += entry.ByteSize()
                out.append(entry)
        return out, len(group)


def _message_id(items: list[Pending]) -> str:
    """The ledger message id of a group: its command's id when alone (a retried lone command is
    refused by the stream's de-duplication too), else a digest of its commands' ids."""
    if len(items) == 1:
        return items[0].command_id
    return "group-" + hashlib.sha256("\n".join(i.command_id for i in items).encode()).hexdigest()[:32]


def _spawn(coro: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Future[None]] = set()


async def _leader_kv(ctx: ServiceContext) -> Any:
    """The leader bucket, waiting for NATS and JetStream (None if told to stop first)."""
    while not ctx.stopping.is_set():
        try:
            # the lock's operations give up within the TTL: an answer later than that is moot, and
            # right after a nats-server restart the default 5 s would stall a take-over
            return await leader_bucket(ctx.nc.jetstream(timeout=LEADER_TTL), ctx.cluster)
        except nats.errors.Error as exc:
            ctx.log.info("waiting for the leader bucket", extra={"fields": {"error": repr(exc)}})
            await ctx.pause(LEADER_TTL / 4)
    return None


async def main(ctx: ServiceContext) -> None:
    kv = await _leader_kv(ctx)
    if kv is None:
        return
    holder = f"admission-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock = LeaderLock(kv, "admission", holder)
    try:
        while not ctx.stopping.is_set():
            standby = await follow(ctx)  # a hot replica while waiting (waits for the ledger stream)
            if standby is None:
                return
            try:
                while not await lock.acquire():
                    await ctx.pause(LEADER_TTL / 4)
                    if ctx.stopping.is_set():
                        return
            finally:
                if lock.epoch == 0 or ctx.stopping.is_set():
                    await standby.stop()
            try:
                await _term(ctx, lock, holder, standby)
            except Exception as exc:
                # Whatever broke (the bus, a bug), the view may not be the ledger's: give the
                # lock up, follow the ledger afresh and stand by again. NATS going away is
                # expected and says so in one line; anything else gets its traceback.
                fields = {"epoch": lock.epoch}
                if isinstance(exc, nats.errors.Error | LedgerError):
                    ctx.log.warning("the leader term failed on the bus; standing by again",
                                    extra={"fields": {**fields, "error": repr(exc)}})
                else:
                    ctx.log.exception("the leader term failed; standing by again", extra={"fields": fields})
                await lock.release()
                await ctx.pause(LEADER_TTL / 4)
            lock.epoch = 0
    finally:
        await lock.release()


async def _keep(ctx: ServiceContext, lock: LeaderLock, lost: asyncio.Event) -> None:
    """Refresh the leader lock every TTL/4 for the whole term (the take-over's replay included)."""
    while not ctx.stopping.is_set():
        await ctx.pause(LEADER_TTL / 4)
        if ctx.stopping.is_set():
            return
        if not await lock.refresh():
            ctx.log.warning("lost the leader lock", extra={"fields": {"epoch": lock.epoch}})
            lost.set()
            return


async def _term(ctx: ServiceContext, lock: LeaderLock, holder: str, standby: Follower) -> None:
    """One leader term: take over from the standby replica, decide until the lock is lost or
    the service stops."""
    ctx.log.info("leader", extra={"fields": {"epoch": lock.epoch, "holder": holder}})
    lost = asyncio.Event()
    keeper = asyncio.create_task(_keep(ctx, lock, lost))
    loop = DecisionLoop(ctx, lock.epoch)
    worker: asyncio.Task[None] | None = None
    sub = None
    try:
        await loop.take_over(standby)
        if lost.is_set():
            return
        worker = asyncio.create_task(loop.run())

        async def answer(msg: Msg) -> None:
            started = time.perf_counter()

            async def reply(r: bus.CommandReply) -> None:
                failed = r.error.code != bus.ERROR_CODE_UNSPECIFIED
                REQUESTS.labels("admission", "command", "refused" if failed else "ok").inc()
                LATENCY.labels("admission", "command").observe(time.perf_counter() - started)
                if msg.reply:
                    await msg.respond(r.SerializeToString())

            loop.enqueue(msg.data, reply)  # returns at once: the worker decides what queued meanwhile

        sub = await ctx.nc.subscribe(subjects.request(ctx.cluster, "admission", "command"), cb=answer)
        waits = [asyncio.create_task(lost.wait()), asyncio.create_task(ctx.stopping.wait())]
        try:
            await asyncio.wait([*waits, worker], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if worker.done():
            worker.result()  # the decision loop failed: its exception ends the term
    finally:
        if sub is not None:
            await sub.unsubscribe()
        for task in (worker, keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await loop.writer.stop()


