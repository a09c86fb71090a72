"""resolver: makes time happen on the system clock by sending `Tick` commands to admission.

Contract: a `Follower` keeps the cluster's view (waiting for the ledger stream if need be); on the system clock the resolver sleeps until
the view's `next_timer()` (reservation activations, grace, checkpoint and hold-down deadlines,
window edges, GPU-hour exhaustion, simulated completions) or the next multiple of
`HEARTBEAT` seconds, whichever is first, waking early when a new ledger batch arrives (it may
bring an earlier timer). When that instant `t` has come it sends `bus.Command{tick,
instant=t}` to `jobtree.C.admission.command` with `command_id = "tick@<t>"`: the id depends on
the instant alone, so two resolvers (replicas, or one restarted) ticking for the same instant
send the same command and the decision loop commits it once. It never sends the same instant
twice. Failures (no admission, timeouts) are logged and retried at the next wake-up.
On a virtual clock (`jobtree sim run --live`, tests) the scenario runner sends the ticks: the
resolver only answers `health`.
Not: a decision maker (admission is); it only says "now".
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
import nats.js.errors

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.follower import follow
from jobtree.bus.runtime import ServiceContext

HEARTBEAT = 30
"""Seconds between ticks when no timer is due sooner (instants on multiples of it)."""
REQUEST_TIMEOUT = 10.0


def tick_command(instant: int) -> bus.Command:
    cmd = bus.Command(command_id=f"tick@{instant}", identity="service:resolver")
    cmd.instant.seconds = instant
    cmd.tick.SetInParent()
    return cmd


def next_wake(now: int, due: int | None, last_sent: int | None) -> int:
    """The next instant to tick at: the due timer or the next heartbeat, never `last_sent` again."""
    beat = (now // HEARTBEAT + 1) * HEARTBEAT
    target = beat if due is None else min(due, beat)
    if last_sent is not None and target <= last_sent:
        target = max(beat, (last_sent // HEARTBEAT + 1) * HEARTBEAT)
    return target


async def _wait(ctx: ServiceContext, changed: asyncio.Event, seconds: float) -> None:
    waits = [asyncio.ensure_future(ctx.stopping.wait()), asyncio.ensure_future(changed.wait())]
    try:
        await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w


async def main(ctx: ServiceContext) -> None:
    if ctx.settings.clock != "system":
        ctx.log.info("virtual clock: idle (the scenario runner sends the ticks)")
        await ctx.stopping.wait()
        return
    follower = await follow(ctx)
    if follower is None:
        return
    changed = asyncio.Event()
    follower.listeners.append(lambda _seq, _batch: changed.set())
    subject = subjects.request(ctx.cluster, "admission", "command")
    last_sent: int | None = None
    try:
        while not ctx.stopping.is_set():
            now = int(time.time())
            target = next_wake(now, follower.cluster.next_timer(), last_sent)
            if target > now:
                changed.clear()
                await _wait(ctx, changed, target - time.time())
                continue
            cmd = tick_command(target)
            try:
                raw = await ctx.nc.request(subject, codec.encode(cmd, bus.Command), timeout=REQUEST_TIMEOUT,
                                           headers=codec.headers(cmd))
            except nats.errors.Error as exc:  # no leader yet, a timeout, NATS reconnecting
                ctx.log.warning("tick not answered", extra={"fields": {"instant": target, "error": repr(exc)}})
                await _wait(ctx, changed, 1.0)
                continue
            reply = codec.decode(raw.data, bus.CommandReply)
            last_sent = target
            if reply.HasField("error"):
                ctx.log.warning("tick refused", extra={"fields": {"instant": target, "problem": reply.error.problem}})
            else:
                await follower.wait_for(reply.ledger_sequence)
    finally:
        await follower.stop()
