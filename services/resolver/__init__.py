"""resolver: makes time happen on the system clock by sending `Tick` commands to admission.

Contract: the resolver holds no replica of the view. The admission leader stamps every ledger
message with its view's next timer once the batch applies (header `Jobtree-Next-Timer`, see
`bus.ledger`: reservation activations, grace, checkpoint and hold-down deadlines, window edges,
GPU-hour exhaustion, simulated completions); the resolver reads it from the newest ledger
message (`Ledger.next_timer`, one message read every `POLL` seconds) and sleeps until that
instant or the next multiple of `HEARTBEAT` seconds, whichever is first (a message without the
header, written before it existed, leaves only the heartbeat). When that instant `t` has come
it sends `bus.Command{tick, instant=t}` to `jobtree.C.admission.command` with `command_id =
"tick@<t>"`: the id depends on the instant alone, so two resolvers (replicas, or one restarted)
ticking for the same instant send the same command and the decision loop commits it once. It
never sends the same instant twice. Failures (no admission, timeouts, NATS down) are logged and
retried at the next wake-up.
On a virtual clock (`jobtree sim run --live`, tests) the scenario runner sends the ticks: the
resolver only answers `health`.
Not: a decision maker (admission is); it only says "now".
"""

from __future__ import annotations

import time

import nats.errors

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger, NextTimer
from jobtree.bus.runtime import ServiceContext

HEARTBEAT = 30
"""Seconds between ticks when no timer is due sooner (instants on multiples of it)."""
POLL = 0.25
"""Seconds between two reads of the ledger's next timer."""
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


async def _due(ctx: ServiceContext, ledger: Ledger, known: NextTimer | None) -> NextTimer | None:
    """The newest ledger message's next timer; None when NATS cannot answer (logged when the
    last read had worked: once per outage)."""
    try:
        return await ledger.next_timer()
    except nats.errors.Error as exc:
        if known is not None:
            ctx.log.warning("could not read the ledger's next timer", extra={"fields": {"error": repr(exc)}})
        return None


async def main(ctx: ServiceContext) -> None:
    if ctx.settings.clock != "system":
        ctx.log.info("virtual clock: idle (the scenario runner sends the ticks)")
        await ctx.stopping.wait()
        return
    ledger = Ledger(ctx.js, ctx.cluster, timeout=REQUEST_TIMEOUT)
    subject = subjects.request(ctx.cluster, "admission", "command")
    known: NextTimer | None = NextTimer(0, False, None)
    due: int | None = None
    last_sent: int | None = None
    ctx.log.info("ticking from the ledger's next-timer header", extra={"fields": {"poll": POLL}})
    while not ctx.stopping.is_set():
        known = await _due(ctx, ledger, known)
        if known is not None:
            due = known.at  # else the last one read stands
        now = int(time.time())
        target = next_wake(now, due, last_sent)
        if target > now:
            await ctx.pause(min(POLL, target - time.time()))
            continue
        cmd = tick_command(target)
        try:
            raw = await ctx.nc.request(subject, codec.encode(cmd, bus.Command), timeout=REQUEST_TIMEOUT,
                                       headers=codec.headers(cmd))
        except nats.errors.Error as exc:  # no leader yet, a timeout, NATS reconnecting
            ctx.log.warning("tick not answered", extra={"fields": {"instant": target, "error": repr(exc)}})
            await ctx.pause(1.0)
            continue
        reply = codec.decode(raw.data, bus.CommandReply)
        last_sent = target
        if reply.HasField("error"):
            ctx.log.warning("tick refused", extra={"fields": {"instant": target, "problem": reply.error.problem}})
