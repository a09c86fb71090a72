"""The lease ledger of one cluster as a JetStream stream: optimistic appends and ordered replay.

Contract:
- `Ledger(js, cluster).create()` creates (or finds, unchanged) the stream
  `subjects.ledger_stream(cluster)`, capturing `subjects.ledger_filter(cluster)`: file storage,
  no limits, deletes and purges refused (a ledger is append-only), duplicate window
  `duplicate_window` seconds.
- One stream message is one `bus.LedgerBatch`: the facts of one decision, committed all or
  none.
- `append(batch, expected_last_sequence=n, msg_id=id)` publishes with the headers
  `Nats-Expected-Last-Sequence: n` (the server refuses the append unless the stream's last
  sequence is still `n`: the world lock of the calculus, done optimistically) and
  `Nats-Msg-Id: id` (de-duplication). It returns `Appended(sequence, duplicate)`.
  - If the stream moved on, it raises `StaleAppend` and nothing is written: the caller
    re-reads from `StaleAppend.last_sequence` and decides again.
  - A retry of an append that already committed (same `msg_id`, typically after a lost ack)
    returns the original sequence with `duplicate=True` and writes nothing, whether the retry's
    expected sequence is now stale (the ledger looks back through the messages after it for the
    id, at most `lookback` of them) or not (the server's duplicate window).
- `append(..., next_timer=t)` also stamps the message with the header `Jobtree-Next-Timer`:
  the Unix second of the leader's next timer once the batch applies, or `none`. It is not part
  of the ledger's truth (replay ignores it; a follower's `Cluster.next_timer()` at that
  sequence gives the same instant); `next_timer()` reads it from the newest message, so the
  resolver needs no replica of the view. A message written without it reads as unknown.
- `batch_at(seq)` returns the batch stored at one sequence.
- `replay(after=0)` returns every batch after sequence `after`, up to the last sequence at the
  time of the call, in order, as `Record(sequence, batch)`; `records(after, follow=True)` goes
  on yielding new batches as they are committed. Payloads are type-checked by `codec`.

Not: the decision logic (the core), not who may write (NATS permissions: only the binder), not
the fencing epoch check (the binder compares `LedgerEntry.epoch` with the leader lock).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects

__all__ = ["NEXT_TIMER", "REPLICAS_ENV", "Appended", "Ledger", "LedgerError", "NextTimer", "Record", "StaleAppend",
           "stream_replicas"]

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"
EXPECTED_STREAM = "Nats-Expected-Stream"
NEXT_TIMER = "Jobtree-Next-Timer"
"""Header: the leader's next timer once the message's batch applies (Unix seconds, or `none`)."""
NO_TIMER = "none"
WRONG_LAST_SEQUENCE = 10071
"""JetStream error code: the stream's last sequence is not the expected one."""
STREAM_NAME_IN_USE = 10058
"""JetStream error code: a stream of that name exists with another configuration."""


REPLICAS_ENV = "JOBTREE_STREAM_REPLICAS"
"""How many copies JetStream keeps of the streams and buckets a service creates when they are
missing (1 by default; 3 on a clustered NATS: the Kubernetes deployment sets it)."""


def stream_replicas() -> int:
    """$JOBTREE_STREAM_REPLICAS (1 to 5), or 1."""
    raw = os.environ.get(REPLICAS_ENV, "")
    if not raw:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= 5:
        raise ValueError(f"{REPLICAS_ENV} must be a whole number from 1 to 5, got {raw!r}")
    return int(raw)


class LedgerError(RuntimeError):
    """The ledger stream could not be created, written or read."""


class StaleAppend(LedgerError):
    """The append was refused because the ledger moved on since `expected` (nothing was written)."""

    def __init__(self, expected: int, last_sequence: int) -> None:
        self.expected = expected
        self.last_sequence = last_sequence
        super().__init__(f"ledger moved on: expected last sequence {expected}, it is {last_sequence}")


@dataclass(frozen=True, slots=True)
class Appended:
    sequence: int
    """The stream sequence of the batch."""
    duplicate: bool
    """True when this append repeated one that had already committed (nothing new written)."""


@dataclass(frozen=True, slots=True)
class NextTimer:
    """What the newest ledger message says of the next timer."""

    sequence: int
    """The message it was read from (0: the ledger is empty)."""
    known: bool
    """False when that message carries no `Jobtree-Next-Timer` header (or an unreadable one)."""
    at: int | None
    """The instant (None: no timer, or unknown)."""


@dataclass(frozen=True, slots=True)
class Record:
    sequence: int
    batch: bus.LedgerBatch


class Ledger:
    def __init__(
        self, js: JetStreamContext, cluster: str, *, timeout: float = 5.0, lookback: int = 256
    ) -> None:
        self.js = js
        self.cluster = subjects.check_cluster(cluster)
        self.stream = subjects.ledger_stream(cluster)
        self.subject = subjects.ledger_subject(cluster)
        self.timeout = timeout
        self.lookback = lookback

    # -- the stream -------------------------------------------------------------------------

    def stream_config(self, *, replicas: int = 1, duplicate_window: float = 120.0) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            description=f"jobtree lease ledger of cluster {self.cluster}",
            subjects=[subjects.ledger_filter(self.cluster)],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW,
            num_replicas=replicas,
            duplicate_window=duplicate_window,
            deny_delete=True,
            deny_purge=True,
            allow_rollup_hdrs=False,
        )

    async def create(self, *, replicas: int | None = None, duplicate_window: float = 120.0) -> StreamInfo:
        """Create the stream, or find it if it exists with the same configuration (replicas: by
        default `stream_replicas()`)."""
        replicas = stream_replicas() if replicas is None else replicas
        config = self.stream_config(replicas=replicas, duplicate_window=duplicate_window)
        try:
            return await self.js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == STREAM_NAME_IN_USE:
                raise LedgerError(
                    f"stream {self.stream} exists with another configuration: {exc.description}"
                ) from None
            raise LedgerError(f"cannot create stream {self.stream}: {exc}") from None

    async def last_sequence(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    # -- appending --------------------------------------------------------------------------

    async def append(
        self,
        batch: bus.LedgerBatch | Sequence[bus.LedgerEntry],
        *,
        expected_last_sequence: int,
        msg_id: str,
        next_timer: int | None = None,
    ) -> Appended:
        """Commit one batch if the ledger's last sequence is still `expected_last_sequence`
        (stamped with the leader's `next_timer`, see the module contract)."""
        if not isinstance(batch, bus.LedgerBatch):
            batch = bus.LedgerBatch(entries=list(batch))
        if not batch.entries:
            raise ValueError("a ledger batch holds at least one entry")
        if not msg_id:
            raise ValueError("msg_id is required: it makes a retried append commit once")
        if expected_last_sequence < 0:
            raise ValueError(f"expected_last_sequence must be >= 0, got {expected_last_sequence}")
        headers = {
            **codec.headers(batch),
            MSG_ID: msg_id,
            EXPECTED_LAST_SEQUENCE: str(expected_last_sequence),
            EXPECTED_STREAM: self.stream,
            NEXT_TIMER: NO_TIMER if next_timer is None else str(next_timer),
        }
        data = codec.encode(batch, bus.LedgerBatch)
        try:
            ack = await self.js.publish(self.subject, data, timeout=self.timeout, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise LedgerError(f"append to {self.stream} refused: {exc.description}") from None
            last = await self.last_sequence()
            committed = await self._find_msg_id(msg_id, expected_last_sequence, last)
            if committed is not None:
                return Appended(committed, True)
            raise StaleAppend(expected_last_sequence, last) from None
        except nats.errors.TimeoutError:
            raise LedgerError(
                f"append to {self.stream} not acknowledged within {self.timeout} s; retry with the same msg_id"
            ) from None
        return Appended(int(ack.seq), bool(ack.duplicate))

    async def _find_msg_id(self, msg_id: str, after: int, last: int) -> int | None:
        """The sequence in (after, last] whose message carries `msg_id`, newest first, looking
        at no more than `lookback` messages."""
        low = max(after, last - self.lookback)
        for seq in range(last, low, -1):
            try:
                msg = await self.js.get_msg(self.stream, seq=seq)
            except nats.js.errors.NotFoundError:
                continue
            if (msg.headers or {}).get(MSG_ID) == msg_id:
                return seq
        return None

    # -- reading ----------------------------------------------------------------------------

    async def next_timer(self) -> NextTimer:
        """The next timer as the newest ledger message's header says (one message read)."""
        try:
            msg = await self.js.get_last_msg(self.stream, self.subject)
        except nats.js.errors.NotFoundError:
            return NextTimer(0, True, None)
        raw = (msg.headers or {}).get(NEXT_TIMER, "")
        seq = int(msg.seq or 0)
        if raw == NO_TIMER:
            return NextTimer(seq, True, None)
        if raw.isdigit():
            return NextTimer(seq, True, int(raw))
        return NextTimer(seq, False, None)

    async def records(
        self, after: int = 0, *, follow: bool = False, batch_size: int = 256, idle: float = 1.0
    ) -> AsyncIterator[Record]:
        """The batches after sequence `after`, in order: up to the current last sequence, or
        (with `follow`) for ever, waiting `idle` seconds per poll when there is nothing new."""
        upto = None if follow else await self.last_sequence()
        if upto is not None and upto <= after:
            return
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        psub = await self.js.pull_subscribe(subjects.ledger_filter(self.cluster), stream=self.stream, config=config)
        seq = after
        try:
            while upto is None or seq < upto:
                want = batch_size if upto is None else min(batch_size, upto - seq)
                try:
                    msgs = await psub.fetch(want, timeout=idle if upto is None else self.timeout)
                except nats.errors.TimeoutError:
                    if upto is None:
                        continue
                    raise LedgerError(f"replay of {self.stream} stalled after sequence {seq}") from None
                for msg in msgs:
                    seq = int(msg.metadata.sequence.stream)
                    yield Record(seq, codec.decode(msg.data, bus.LedgerBatch, msg.headers))
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            with contextlib.suppress(Exception):
                info = await psub.consumer_info()
                await self.js.delete_consumer(self.stream, info.name)

    async def batch_at(self, sequence: int) -> bus.LedgerBatch:
        """The batch stored at `sequence` (nats.js.errors.NotFoundError if there is none)."""
        msg = await self.js.get_msg(self.stream, seq=sequence)
        return codec.decode(msg.data or b"", bus.LedgerBatch, msg.headers)

    async def replay(self, after: int = 0, *, batch_size: int = 256) -> list[Record]:
        """Every batch after sequence `after`, up to the last sequence now, in order."""
        return [r async for r in self.records(after, batch_size=batch_size)]
