"""The decision loop's leader lock: a JetStream KV key with a TTL and a fencing epoch.

Contract: `LeaderLock.acquire()` creates the key (it succeeds only while no live holder has it)
and returns the fencing epoch — the key's revision at acquisition, which only grows across
terms. The holder refreshes it (`refresh()`, an update conditioned on its last revision) more
often than the bucket's TTL; a holder that fails to refresh has lost the lock and must stop
deciding at once. A standby that acquires after the TTL lapsed gets a higher epoch; once it has
committed, the binder refuses appends carrying an older one. Until then a deposed leader could
still append, but only on the ledger's current sequence (expected-last-sequence), so the two
can never both commit decisions taken against the same state. Any NATS error (a timeout, a
reconnect) counts as "not held": acquire returns False, refresh reports the lock lost. The
bucket's operations should time out within the TTL (admission opens it on a JetStream context
with timeout LEADER_TTL): an answer later than that is moot, and a longer timeout only delays
the next attempt (right after a nats-server restart, JetStream may not answer at first).
Not: the decision loop itself (see services/admission).
"""

from __future__ import annotations

import contextlib

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from jobtree.bus import subjects
from jobtree.bus.ledger import stream_replicas

LEADER_TTL = 2.0
"""Seconds a holder may go without refreshing before a standby may take over."""


async def leader_bucket(js: JetStreamContext, cluster: str, ttl: float = LEADER_TTL) -> KeyValue:
    """The cluster's leader bucket (created if missing)."""
    name = subjects.bucket(cluster, "leader")
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=name, ttl=ttl, history=1, replicas=stream_replicas())


class LeaderLock:
    def __init__(self, kv: KeyValue, loop: str, holder: str) -> None:
        self.kv = kv
        self.key = subjects.kv_key(loop)
        self.holder = holder
        self.epoch = 0
        self._revision = 0

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it; on success `epoch` is this term's fencing epoch."""
        try:
            rev = await self.kv.create(self.key, self.holder.encode())
        except nats.errors.Error:  # held by another, or NATS unreachable: not ours (yet)
            return False
        self._revision = self.epoch = int(rev)
        return True

    async def refresh(self) -> bool:
        """Keep the lock; False when it was lost (expired and taken, or deleted)."""
        try:
            self._revision = int(await self.kv.update(self.key, self.holder.encode(), last=self._revision))
        except nats.errors.Error:  # taken, deleted, or NATS unreachable: a lapsed lock may be taken
            return False
        return True

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            await self.kv.delete(self.key, last=self._revision)
