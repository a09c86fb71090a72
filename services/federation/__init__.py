"""federation: aggregate caps that span clusters, divided into allowances (CALCULUS §9).

Contract: runs on the federation's hub (a nats-server the member clusters' servers join as leaf
nodes), under the cluster name `fed` for its own subjects and KV bucket, with the config of
`config` (`jobtree serve federation --config FILE`: member clusters and caps). Every round
(`every`, default 1 s, and at once when a member publishes a run event — a run queued, started
or ended moves demand) it:
1. asks every member cluster `jobtree.<c>.budget.caps` (the budget service's view of that
   cluster's ledger): each cap's allowance in force and its grant version, funded use, demand
   and GPU-hours spent. A cluster that does not answer within the round is *unreachable*: it
   keeps its allowance, and the federation keeps counting it (nothing is granted in its stead);
2. per cap, once every member cluster has answered at least once (until then it is counted at
   what its ledger may hold, which only its report can say), keeps a `Book`: the allowance each
   cluster's ledger confirmed and every grant sent since. A report confirms the version it names;
3. divides the cap by demand (`allowances.targets`: funded use plus what could be funded; GPU-
   hours by the same shares of what is unspent, never below what a cluster spent) and plans the
   grants (`Book.plan`): lowers at once, raises only as far as `sum(held) <= cap` allows — so a
   raise waits until the donor's lower is confirmed from the donor's ledger;
4. stores the book in the KV bucket `jobtree_fed_grants` (key: the cap) and only then sends
   each grant to `jobtree.<c>.admission.command` as a `SetAllowance` command (command id
   `federation:<cap>:<cluster>:<version>`, so a resend is decided once), resending every
   unconfirmed grant each round. Admission commits it as an `allowance_set` ledger entry (every
   allowance change is audited with the leases it governs); its answer that the grant is
   committed (or already in force) confirms it, as does a later report; the raises that
   confirmed lowers make room for are then granted in the same round.
It answers `jobtree.<c>.federation.usage` for every member cluster `c` (service.GlobalUsageRequest
-> service.GlobalUsageResponse: each cap's allowances, held values, targets, funded use, demand,
reachability, the last rebalance and the cut seed), so a cluster's gateway asks under its own name.
Killed at any instant, it restarts from the bucket (grants in flight included): `held` never
shrinks by a restart. A book is stored by compare-and-set on its KV revision, and grants leave
only from a book that was stored: a second instance (by mistake, or a restart racing the old
process) cannot grant the same room twice — the one that loses the race takes the stored book. Editing the config file changes caps within a round; a config that does
not parse is not taken (the previous one stays in force, the error is logged).
Not: a scheduler (clusters decide alone within their allowances), not a cluster-side component.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import service_pb2 as svc
from jobtree.bus import codec, subjects
from jobtree.bus.hub import HUB
from jobtree.bus.runtime import ServiceContext
from jobtree.core import facts
from jobtree.core.allowances import targets
from jobtree.services.federation.book import MILLI, Book, Grant
from jobtree.services.federation.config import Cap, Config, ConfigError, load

ENV_CONFIG = "JOBTREE_FEDERATION_CONFIG"
"""Where `jobtree serve federation --config FILE` hands over the file (serve_cmd.ENV_FEDERATION_CONFIG)."""
IDENTITY = "service:federation"
NUDGE_GAP = 0.2
"""Seconds between a member's run event and the round it starts: a burst makes one round, and a
busy cluster starts at most about five rounds a second (each asks every member for its caps)."""
ASK_TIMEOUT = 0.8
"""Seconds a cluster has to answer a round's question (or a grant) before it counts as unreachable."""


def _milli(hours: float | None) -> int | None:
    return None if hours is None else round(hours * MILLI)


class Federation:
    """The federation's state: the books, the last report of every cluster, the config."""

    def __init__(self, ctx: ServiceContext, path: Path) -> None:
        self.ctx, self.path = ctx, path
        self.config: Config = load(path)
        self._mtime = self._stat()
        self.books: dict[str, Book] = {}
        self.reports: dict[str, svc.ClusterCapsResponse] = {}
        self.reachable: dict[str, bool] = {}
        self.kv: Any = None
        self.revisions: dict[str, int] = {}
        """Cap -> the KV revision of the book as last read or stored (0: none stored)."""

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def reload(self) -> None:
        """Take an edited config (a bad edit is logged and not taken)."""
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            config = load(self.path)
        except ConfigError as e:
            self.ctx.log.error("federation config not taken", extra={"fields": {"error": str(e)}})
            return
        self.config = config
        self.ctx.log.info("federation config taken", extra={"fields": {"caps": [c.name for c in config.caps]}})

    # -- storage ---------------------------------------------------------------------------

    async def open(self) -> None:
        name = subjects.bucket(HUB, "grants")
        try:
            self.kv = await self.ctx.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another instance made it first
                await self.ctx.js.create_key_value(bucket=name, history=1)
            self.kv = await self.ctx.js.key_value(name)
        with contextlib.suppress(nats.js.errors.NoKeysError):
            for key in await self.kv.keys():
                self._take(await self.kv.get(key))
        self.ctx.log.info("books restored", extra={"fields": {"caps": sorted(self.books)}})

    def _take(self, entry: Any) -> None:
        book = Book.from_json(json.loads(entry.value))
        self.books[book.cap] = book
        self.revisions[book.cap] = entry.revision

    async def save(self, book: Book) -> bool:
        """Store the book if nobody stored another since this one was read (compare-and-set on
        the KV revision). False when another federation instance did: its book is taken instead,
        and nothing is sent this round — every grant goes out only from the latest stored book,
        so two instances can never grant the same room twice."""
        key = subjects.kv_key(*book.cap.split("/", 1))
        try:
            self.revisions[book.cap] = await self.kv.update(key, json.dumps(book.to_json()).encode(),
                                                            last=self.revisions.get(book.cap, 0))
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            self.ctx.log.warning("the book changed under us (another federation?); taking the stored one",
                                 extra={"fields": {"cap": book.cap}})
            self.books.pop(book.cap, None)
            self.revisions.pop(book.cap, None)
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                self._take(await self.kv.get(key))
            return False

    # -- a round ---------------------------------------------------------------------------

    async def ask(self, cluster: str) -> None:
        subject = subjects.request(cluster, "budget", "caps")
        try:
            raw = await self.ctx.nc.request(subject, svc.ClusterCapsRequest().SerializeToString(), timeout=ASK_TIMEOUT)
            self.reports[cluster] = svc.ClusterCapsResponse.FromString(raw.data)
            self.reachable[cluster] = True
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError):
            if self.reachable.get(cluster, True):
                self.ctx.log.warning("cluster unreachable", extra={"fields": {"cluster": cluster}})
            self.reachable[cluster] = False

    def usage_of(self, cluster: str, cap: str) -> svc.CapUsage | None:
        report = self.reports.get(cluster)
        if report is None:
            return None
        return next((u for u in report.caps if u.cap == cap), None)

    async def round(self) -> None:
        self.reload()
        await asyncio.gather(*(self.ask(c) for c in self.config.clusters))
        sends: list[Grant] = []
        for cap in self.config.caps:
            sends += await self.cap_round(cap)
        confirmed = await asyncio.gather(*(self.send(g) for g in sends))
        if any(g.version and ok for g, ok in zip(sends, confirmed, strict=True)):
            # lowers just committed free room: grant the raises now, not a round later
            more: list[Grant] = []
            for cap in self.config.caps:
                more += await self.replan(cap)
            await asyncio.gather(*(self.send(g) for g in more))

    async def replan(self, cap: Cap) -> list[Grant]:
        """The grants toward the goal of this round, after confirmations from admission replies."""
        book = self.books.get(cap.name)
        if book is None or not book.goal:
            return []
        grants = book.plan(book.goal)
        if not grants:
            return []
        book.last_rebalance = self.ctx.clock.now() or 0
        return grants if await self._stored(book) else []

    async def _stored(self, book: Book) -> bool:
        """`save`, a failure to store logged: nothing is sent unless this book is the stored one."""
        try:
            return await self.save(book)
        except Exception as exc:
            self.ctx.log.warning("book not stored; grants held back", extra={"fields": {"error": repr(exc)}})
            return False

    async def cap_round(self, cap: Cap) -> list[Grant]:
        book = self.books.get(cap.name)
        clusters = self.config.clusters if book is None else tuple(book.clusters)
        if book is not None and sorted(book.clusters) != sorted(self.config.clusters):
            self.ctx.log.error("the member clusters of a booked cap cannot change; keeping the booked ones",
                               extra={"fields": {"cap": cap.name, "booked": book.clusters}})
        seen = {c: self.usage_of(c, cap.name) for c in clusters}
        if book is None:
            if any(u is None for u in seen.values()):
                return []  # not every cluster has told what its ledger holds
            reported = {c: (u.allowance if u.HasField("allowance") else (
                            u.max_concurrency if u.HasField("max_concurrency") else cap.max_concurrency),
                            _milli(u.allowance_gpu_hours) if u.HasField("allowance_gpu_hours") else None,
                            u.version) for c, u in seen.items() if u is not None}
            book = Book.start(cap.name, cap.max_concurrency, _milli(cap.max_gpu_hours), reported)
            self.books[cap.name] = book
            self.ctx.log.info("cap booked", extra={"fields": {"cap": cap.name, "allowances": book.gpus.clusters}})
        for c, u in seen.items():
            if u is not None and self.reachable.get(c):
                book.confirm(c, u.version, u.allowance if u.HasField("allowance") else book.gpus.clusters[c],
                             _milli(u.allowance_gpu_hours) if u.HasField("allowance_gpu_hours") else None)
        book.set_cap(cap.max_concurrency, _milli(cap.max_gpu_hours))
        grants = book.plan(self.goal(book, cap, seen))
        if grants:
            book.last_rebalance = self.ctx.clock.now() or 0
            book.rounds += 1
        resend = [g for g in book.resend() if g not in grants]
        if not await self._stored(book):  # before any grant leaves: a restart must remember it
            return []
        return grants + resend

    def goal(self, book: Book, cap: Cap, seen: dict[str, svc.CapUsage | None]) -> dict[str, tuple[int, int | None]]:
        """Per cluster: (GPUs, GPU-hours in thousandths) by demand."""
        gpus = book.gpus.cap if book.gpus.cap_goal is None else book.gpus.cap_goal
        demand = {c: (u.demand if u is not None else 0) for c, u in seen.items()}
        goal_g = targets(gpus, demand)
        if book.hours is None:
            return {c: (goal_g[c], None) for c in demand}
        hours = book.hours.cap if book.hours.cap_goal is None else book.hours.cap_goal
        spent = {c: (_milli(u.spent_gpu_hours) or 0) if u is not None else book.hours.held(c) for c, u in seen.items()}
        if sum(spent.values()) >= hours:
            goal_h = dict(spent)  # nothing left to share: nobody gets more than it spent
        else:  # the unspent part by the same shares as the GPUs (demand), never below what was spent
            goal_h = targets(hours, {c: spent[c] + max(1, demand[c]) * hours for c in demand}, spent)
        return {c: (goal_g[c], goal_h[c]) for c in demand}

    async def send(self, grant: Grant) -> bool:
        """Send a grant; True once admission answered that it is committed (or already in force:
        a repeat of a decided command id, or an older version). Such an answer confirms it: the
        cluster's ledger holds this version or a newer one, and any newer one is still counted
        as sent, so `held` can only stay above what the cluster may use."""
        cmd = facts.SetAllowance(grant.cap, grant.gpus, grant.version,
                                 None if grant.milli_hours is None else grant.milli_hours / MILLI)
        msg = convert.command_to_proto(cmd, command_id=f"federation:{grant.cap}:{grant.cluster}:{grant.version}")
        msg.identity = IDENTITY
        subject = subjects.request(grant.cluster, "admission", "command")
        try:
            raw = await self.ctx.nc.request(subject, codec.encode(msg), timeout=ASK_TIMEOUT, headers=codec.headers(msg))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError):
            return False  # resent next round
        try:
            reply = codec.decode(raw.data, bus.CommandReply)
        except codec.CodecError as exc:
            self.ctx.log.warning("grant answered garbage", extra={"fields": {"cluster": grant.cluster, "error": str(exc)}})
            return False
        if reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
            self.ctx.log.warning("grant refused", extra={"fields": {
                "cluster": grant.cluster, "cap": grant.cap, "version": grant.version,
                "code": bus.ErrorCode.Name(reply.error.code), "problem": reply.error.problem}})
            return False
        book = self.books.get(grant.cap)
        if book is not None:
            book.confirm(grant.cluster, grant.version, grant.gpus, grant.milli_hours)
        self.ctx.log.info("grant committed", extra={"fields": {
            "cluster": grant.cluster, "cap": grant.cap, "version": grant.version, "gpus": grant.gpus,
            "ledger_sequence": reply.ledger_sequence}})
        return True

    # -- the global view -------------------------------------------------------------------

    def usage(self, req: svc.GlobalUsageRequest) -> svc.GlobalUsageResponse:
        out = svc.GlobalUsageResponse()
        out.at.seconds = self.ctx.clock.now() or 0
        for cap in self.config.caps:
            if req.cap and req.cap != cap.name:
                continue
            book = self.books.get(cap.name)
            item = out.caps.add(cap=cap.name, max_concurrency=cap.max_concurrency if book is None else book.gpus.cap)
            if book is not None and book.gpus.cap_goal is not None:
                item.lowering_to = book.gpus.cap_goal
            if cap.max_gpu_hours is not None:
                item.max_gpu_hours = cap.max_gpu_hours if book is None or book.hours is None else book.hours.cap / MILLI
            if book is not None:
                item.last_rebalance.seconds = book.last_rebalance
                item.cut_seed = book.cut_seed()
            for c in self.config.clusters:
                u = self.usage_of(c, cap.name)
                row = item.clusters.add(cluster=c, reachable=self.reachable.get(c, False))
                if u is not None:
                    row.funded, row.demand, row.spent_gpu_hours = u.funded, u.demand, u.spent_gpu_hours
                    row.last_report.CopyFrom(self.reports[c].at)
                if book is not None and c in book.gpus.clusters:
                    row.allowance = book.gpus.clusters[c]
                    row.version = book.gpus.confirmed_version[c]
                    row.held = book.gpus.held(c)
                    pending = book.gpus.pending(c)
                    if pending is not None:
                        row.pending = pending
                    row.target = book.goal.get(c, (row.allowance, None))[0]
                    if book.hours is not None:
                        row.allowance_gpu_hours = book.hours.clusters[c] / MILLI
        return out


async def main(ctx: ServiceContext) -> None:
    path = Path(os.environ.get(ENV_CONFIG, ""))
    fed = Federation(ctx, path)
    await fed.open()

    async def on_usage(data: bytes) -> bytes:
        return fed.usage(codec.parse(data, svc.GlobalUsageRequest)).SerializeToString()

    for cluster in (HUB, *fed.config.clusters):
        await ctx.serve(subjects.request(cluster, "federation", "usage"), on_usage, queue=True)
    nudge = asyncio.Event()

    async def on_run_event(_: Any) -> None:  # a run queued, started or ended: demand moved
        nudge.set()

    for cluster in fed.config.clusters:
        await ctx.nc.subscribe(subjects.events_filter(cluster, "run"), cb=on_run_event)
    loop = asyncio.get_running_loop()
    while not ctx.stopping.is_set():
        started = loop.time()
        nudge.clear()
        try:
            await fed.round()
        except Exception:
            ctx.log.exception("federation round failed")
        left = fed.config.every - (loop.time() - started)
        woken = asyncio.ensure_future(nudge.wait())
        halt = asyncio.ensure_future(ctx.stopping.wait())
        await asyncio.wait({woken, halt}, timeout=max(NUDGE_GAP, left), return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        halt.cancel()
        if nudge.is_set() and not ctx.stopping.is_set():
            await asyncio.sleep(NUDGE_GAP)  # let a burst of events land: one round for all of them
