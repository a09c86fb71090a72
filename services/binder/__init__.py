"""binder: the only writer of the lease ledger.

Contract: answers `jobtree.C.binder.commit` (bus.AppendRequest -> bus.AppendReply). It refuses
an append whose fencing epoch is older than the newest it has seen (a deposed leader), then
appends the batch as one stream message with JetStream's expected-last-sequence and the
command id as message id: a stale view is refused (CONFLICT, nothing written), a repeated
command commits once (`duplicate`). The ledger stream is file-backed and the nats-server syncs
before acknowledging when started with `sync_interval: always` (`jobtree up`). After a
commit it mirrors the specs the batch carries into the cluster's KV buckets (runs, budgets,
nodes) for tools that read specs directly. Appends are serialised.
Not: a decision maker; it never changes what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.js.errors

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.ledger import Ledger, LedgerError, StaleAppend
from jobtree.bus.runtime import ServiceContext


class Binder:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.ledger = Ledger(ctx.js, ctx.cluster)
        self.epoch = 0
        self.lock = asyncio.Lock()
        self.kv: dict[str, object] = {}

    async def start(self) -> None:
        """Find the newest epoch in the ledger (the last batch carries it)."""
        last = await self.ledger.last_sequence()
        if last:
            msg = await self.ctx.js.get_msg(self.ledger.stream, seq=last)
            batch = bus.LedgerBatch.FromString(msg.data or b"")
            self.epoch = max((e.epoch for e in batch.entries), default=0)
        for name in ("runs", "budgets", "nodes"):
            bucket = subjects.bucket(self.ctx.cluster, name)
            try:
                self.kv[name] = await self.ctx.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                self.kv[name] = await self.ctx.js.create_key_value(bucket=bucket, history=1)

    async def handle(self, data: bytes) -> bytes:
        req = bus.AppendRequest.FromString(data)
        async with self.lock:
            reply = await self._append(req)
        return reply.SerializeToString()

    async def _append(self, req: bus.AppendRequest) -> bus.AppendReply:
        if req.epoch < self.epoch:
            return bus.AppendReply(error=bus.Error(
                code=bus.ERROR_CODE_STALE_EPOCH, problem=f"epoch {req.epoch} is older than {self.epoch}"))
        try:
            done = await self.ledger.append(req.batch, expected_last_sequence=req.expected_last_sequence,
                                            msg_id=req.msg_id)
        except StaleAppend as stale:
            return bus.AppendReply(last_sequence=stale.last_sequence, error=bus.Error(
                code=bus.ERROR_CODE_CONFLICT, problem=str(stale)))
        except (LedgerError, ValueError) as err:
            return bus.AppendReply(error=bus.Error(code=bus.ERROR_CODE_UNAVAILABLE, problem=str(err)))
        self.epoch = max(self.epoch, req.epoch)
        await self._mirror_specs(req.batch)  # idempotent: a retry repairs a copy a crash cut short
        return bus.AppendReply(sequence=done.sequence, duplicate=done.duplicate, last_sequence=done.sequence)

    async def reconcile(self) -> None:
        """Rewrite the spec buckets from the ledger (a crash between append and copy loses nothing)."""
        latest = bus.LedgerBatch()
        seen: dict[tuple[str, str], bus.LedgerEntry] = {}
        for record in await self.ledger.replay():
            for entry in record.batch.entries:
                which = entry.WhichOneof("fact")
                if which == "spec_put":
                    m = entry.spec_put.run.metadata
                    seen[("run", f"{m.namespace}/{m.name}")] = entry
                elif which == "spec_deleted":
                    ref = entry.spec_deleted.run
                    seen[("run", f"{ref.namespace}/{ref.name}")] = entry
                elif which == "budget_put":
                    seen[("budget", entry.budget_put.budget.metadata.name)] = entry
                elif which == "node_state_put":
                    seen[("node", entry.node_state_put.node.name)] = entry
        latest.entries.extend(seen.values())
        await self._mirror_specs(latest)

    async def _mirror_specs(self, batch: bus.LedgerBatch) -> None:
        for entry in batch.entries:
            which = entry.WhichOneof("fact")
            if which == "spec_put":
                run = entry.spec_put.run
                await self.kv["runs"].put(  # type: ignore[attr-defined]
                    subjects.kv_key(run.metadata.namespace, run.metadata.name), run.SerializeToString())
            elif which == "spec_deleted":
                ref = entry.spec_deleted.run
                with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    await self.kv["runs"].delete(subjects.kv_key(ref.namespace, ref.name))  # type: ignore[attr-defined]
            elif which == "budget_put":
                b = entry.budget_put.budget
                await self.kv["budgets"].put(  # type: ignore[attr-defined]
                    subjects.kv_key(b.metadata.name), b.SerializeToString())
            elif which == "node_state_put":
                n = entry.node_state_put.node
                await self.kv["nodes"].put(subjects.kv_key(n.name), n.SerializeToString())  # type: ignore[attr-defined]


async def main(ctx: ServiceContext) -> None:
    binder = Binder(ctx)
    with contextlib.suppress(LedgerError):  # it exists (with the configuration `jobtree up` gave it)
        await binder.ledger.create()
    await binder.start()
    await binder.reconcile()
    await ctx.serve(subjects.request(ctx.cluster, "binder", "commit"), binder.handle)
    await ctx.stopping.wait()

