"""binder: the only writer of the lease ledger.

Contract: answers `jobtree.C.binder.commit` (bus.AppendRequest -> bus.AppendReply). It refuses
an append whose fencing epoch is older than the newest it has seen (a deposed leader), then
appends the batch as one stream message with JetStream's expected-last-sequence and the
command id as message id (and the request's `next_timer` as the header `Jobtree-Next-Timer`,
`bus.ledger`): a stale view is refused (CONFLICT, nothing written), a repeated
command commits once (`duplicate`). The ledger stream is file-backed and the nats-server syncs
before acknowledging when started with `sync_interval: always` (`jobtree up`). After a
commit it answers at once and mirrors the specs the batch carries into the cluster's KV
buckets (runs, budgets, nodes), for tools that read specs directly, off the commit path: one
mirror task takes every committed batch queued meanwhile, keeps the last change per key, and
writes them together, in commit order batch after batch (retrying until NATS takes them). The
buckets lag the ledger by that queue; a binder that dies before the copy rewrites the buckets
from the ledger after it starts (`reconcile`, in the background: commits are answered at once,
and the batches committed meanwhile are copied after it, in order). Appends are serialised. A request that is not an
AppendRequest is answered INVALID_ARGUMENT, a failure of the bus UNAVAILABLE: never silence.
While NATS is unreachable at start it waits for it (and says so) instead of exiting.
Not: a decision maker; it never changes what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
import nats.js.errors

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger, LedgerError, StaleAppend, stream_replicas
from jobtree.bus.runtime import ServiceContext

MIRROR_CHUNK = 512
"""Spec copies in flight at once."""


class Binder:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.ledger = Ledger(ctx.js, ctx.cluster)
        self.epoch = 0
        self.lock = asyncio.Lock()
        self.kv: dict[str, object] = {}
        self.mirror_queue: asyncio.Queue[bus.LedgerBatch] = asyncio.Queue()

    async def start(self) -> None:
        """Find the newest epoch in the ledger (the last batch carries it)."""
        last = await self.ledger.last_sequence()
        if last:
            batch = await self.ledger.batch_at(last)
            self.epoch = max((e.epoch for e in batch.entries), default=0)
        for name in ("runs", "budgets", "nodes"):
            bucket = subjects.bucket(self.ctx.cluster, name)
            try:
                self.kv[name] = await self.ctx.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                self.kv[name] = await self.ctx.js.create_key_value(bucket=bucket, history=1, replicas=stream_replicas())

    async def handle(self, data: bytes) -> bytes:
        try:
            req = codec.parse(data, bus.AppendRequest)
        except codec.CodecError as exc:
            return bus.AppendReply(error=bus.Error(
                code=bus.ERROR_CODE_INVALID_ARGUMENT, field_path="request",
                problem=f"{exc}; nothing was written")).SerializeToString()
        async with self.lock:
            reply = await self._append(req)
        return reply.SerializeToString()

    async def _append(self, req: bus.AppendRequest) -> bus.AppendReply:
        if req.epoch < self.epoch:
            return bus.AppendReply(error=bus.Error(
                code=bus.ERROR_CODE_STALE_EPOCH, problem=f"epoch {req.epoch} is older than {self.epoch}"))
        try:
            done = await self.ledger.append(
                req.batch, expected_last_sequence=req.expected_last_sequence, msg_id=req.msg_id,
                next_timer=int(req.next_timer.seconds) if req.HasField("next_timer") else None)
        except StaleAppend as stale:
            return bus.AppendReply(last_sequence=stale.last_sequence, error=bus.Error(
                code=bus.ERROR_CODE_CONFLICT, problem=str(stale)))
        except (LedgerError, ValueError) as err:
            return bus.AppendReply(error=bus.Error(code=bus.ERROR_CODE_UNAVAILABLE, problem=str(err)))
        self.epoch = max(self.epoch, req.epoch)
        self.mirror_queue.put_nowait(req.batch)  # a duplicate too: it repairs a copy a crash cut short
        return bus.AppendReply(sequence=done.sequence, duplicate=done.duplicate, last_sequence=done.sequence)

    async def reconcile(self) -> None:
        """Rewrite the spec buckets from the ledger (a crash between append and copy loses
        nothing), reading it batch by batch and keeping only the last change of each spec."""
        latest: dict[tuple[str, str], bytes | None] = {}
        async for record in self.ledger.records(0):
            _collect(record.batch, latest)
        await self._write_all(latest)

    async def repair_then_mirror(self) -> None:
        """`reconcile` (retried while NATS is away), then `mirror_forever`."""
        delay = 0.1
        while True:
            try:
                await self.reconcile()
                break
            except (nats.errors.Error, LedgerError) as exc:
                self.ctx.log.warning("cannot repair the spec buckets yet; retrying",
                                     extra={"fields": {"error": repr(exc)}})
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        await self.mirror_forever()

    async def mirror_forever(self) -> None:
        """Copy committed batches to the spec buckets, everything queued at a time, in order."""
        while True:
            batches = [await self.mirror_queue.get()]
            while not self.mirror_queue.empty():
                batches.append(self.mirror_queue.get_nowait())
            delay = 0.1
            while True:
                try:
                    await self._mirror(batches)
                    break
                except nats.errors.Error as exc:  # NATS away or slow: expected, retried
                    self.ctx.log.warning("spec copy failed; retrying", extra={"fields": {"error": repr(exc)}})
                except Exception:
                    self.ctx.log.warning("spec copy failed; retrying", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _mirror(self, batches: list[bus.LedgerBatch]) -> None:
        """Write the last change of each spec the batches carry, all at once."""
        latest: dict[tuple[str, str], bytes | None] = {}
        for batch in batches:
            _collect(batch, latest)
        await self._write_all(latest)

    async def _write_all(self, latest: dict[tuple[str, str], bytes | None]) -> None:
        writes = list(latest.items())
        for i in range(0, len(writes), MIRROR_CHUNK):
            await asyncio.gather(*(self._write(bucket, key, value) for (bucket, key), value in writes[i:i + MIRROR_CHUNK]))

    async def _write(self, bucket: str, key: str, value: bytes | None) -> None:
        kv = self.kv[bucket]
        if value is not None:
            await kv.put(key, value)  # type: ignore[attr-defined]
            return
        with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            await kv.delete(key)  # type: ignore[attr-defined]


def _collect(batch: bus.LedgerBatch, latest: dict[tuple[str, str], bytes | None]) -> None:
    """Note in `latest` the last change of each spec (run, budget, node) a batch carries."""
    for entry in batch.entries:
        which = entry.WhichOneof("fact")
        if which == "spec_put":
            m = entry.spec_put.run.metadata
            latest[("runs", subjects.kv_key(m.namespace, m.name))] = entry.spec_put.run.SerializeToString()
        elif which == "spec_deleted":
            ref = entry.spec_deleted.run
            latest[("runs", subjects.kv_key(ref.namespace, ref.name))] = None
        elif which == "budget_put":
            b = entry.budget_put.budget
            latest[("budgets", subjects.kv_key(b.metadata.name))] = b.SerializeToString()
        elif which == "node_state_put":
            n = entry.node_state_put.node
            latest[("nodes", subjects.kv_key(n.name))] = n.SerializeToString()


def _failed(exc: Exception) -> bytes:
    """The answer to an append that broke on the bus (the caller resends the same append)."""
    return bus.AppendReply(error=bus.Error(code=bus.ERROR_CODE_UNAVAILABLE,
                                           problem=f"the binder could not append: {exc!r}")).SerializeToString()


async def main(ctx: ServiceContext) -> None:
    binder = Binder(ctx)
    delay = 0.1
    while True:
        try:
            with contextlib.suppress(LedgerError):  # it exists (with the configuration `jobtree up` gave it)
                await binder.ledger.create()
            await binder.start()
            break
        except (nats.errors.Error, LedgerError) as exc:
            ctx.log.warning("cannot read the ledger yet; retrying", extra={"fields": {"error": repr(exc)}})
            await ctx.pause(delay)
            if ctx.stopping.is_set():
                return
            delay = min(2.0, delay * 2)
    # Commits are answered at once; the spec buckets are repaired from the ledger meanwhile (at
    # a million lease events that is minutes of KV writes), then kept by the batches committed
    # since, which queue until the repair is done, so no older value overwrites a newer one.
    mirror = asyncio.create_task(binder.repair_then_mirror())
    await ctx.serve(subjects.request(ctx.cluster, "binder", "commit"), binder.handle, on_error=_failed)
    try:
        await ctx.stopping.wait()
    finally:
        mirror.cancel()

