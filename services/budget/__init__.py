"""budget: the derived funding view of one cluster, answered from a ledger follower.

Contract: a `Follower` replays the cluster's ledger stream into a core `Cluster` and keeps
following it (waiting for the stream if it starts before the binder has created it);
the service decides nothing. It answers:
- `jobtree.C.budget.state` (bus.StateRequest -> bus.StateReply): the STATE object of
  SCENARIOS.md (`views.state_json`) as a `google.protobuf.Struct`, once the view has applied
  `min_ledger_sequence` (else `ERROR_CODE_UNAVAILABLE` after `WAIT_TIMEOUT` seconds).
  A Struct holds numbers as doubles and its keys unordered: readers that need the exact JSON
  text restore both (`jobtree.sim.live.restore_state`).
- `jobtree.C.budget.usage` (service.UsageRequest -> service.UsageResponse): every envelope's
  funded GPUs by class, headroom and consumed GPU-hours (`views.budgets_json`), optionally
  filtered by owner, budget and flavor, plus the unfunded GPU-hours per owner.
- `jobtree.C.budget.sponsors` (service.ListSponsorsRequest -> service.ListSponsorsResponse): the
  envelopes outside the owner's family whose lending ACL lends to the owner (what
  `spec.funding.sponsors` may name), with what they can lend now: the envelope's headroom,
  lowered to its lending concurrency cap, and the GPU-hours left under its lending and
  envelope hours caps (absent when neither is capped).
- `jobtree.C.budget.caps` (service.ClusterCapsRequest -> service.ClusterCapsResponse): every
  aggregate cap's bounds, allowance in force, funded use, demand and GPU-hours spent
  (`views.caps_json`): what the federation service rebalances allowances by (CALCULUS §9).
All four are request/reply handlers in the `budget` queue group (replicas share the load).
It also derives the domain events from the ledger (`jobtree.api.events`) and publishes them
into the cluster's events stream (`publisher`): the one publisher, so run one replica; and it
exports the fleet's metrics (`metrics`: GPUs by owner, class and domain, envelopes, the queue,
cuts, submit-to-bound latency).
Not: a decision maker (admission is), not a writer.
"""

from __future__ import annotations

import asyncio
import math

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import service_pb2 as svc
from jobtree.bus.follower import Follower, follow
from jobtree.bus.runtime import ServiceContext
from jobtree.core import views
from jobtree.core.engine import Cluster
from jobtree.core.funding_rules import env_bound, lend_bound

WAIT_TIMEOUT = 5.0
"""Seconds a read waits for the view to reach its `min_ledger_sequence`."""


def state_reply(follower: Follower) -> bus.StateReply:
    reply = bus.StateReply(ledger_sequence=follower.sequence)
    reply.state.update(views.state_json(follower.cluster))
    return reply


def usage(cl: Cluster, req: svc.UsageRequest) -> svc.UsageResponse:
    out = svc.UsageResponse()
    out.at.seconds = cl.now
    for row in views.budgets_json(cl):
        budget = cl.budgets[row["name"]]
        if req.owner and budget.owner != req.owner:
            continue
        if req.budget and budget.name != req.budget:
            continue
        for env_row, env in zip(row["envelopes"], budget.envelopes, strict=True):
            if req.flavor and env.flavor != req.flavor:
                continue
            item = out.envelopes.add(
                budget=budget.name,
                envelope=env.name,
                owner=budget.owner,
                flavor=env.flavor,
                concurrency=env.concurrency,
                funded=svc.FundedGPUs(**env_row["funded"]),
                headroom=env_row["headroom"],
                consumed_gpu_hours=env_row["consumedGPUHours"],
            )
            if env.max_gpu_hours is not None:
                item.max_gpu_hours = env.max_gpu_hours
    for owner, hours in sorted(cl.meter.unfunded.items()):
        if not req.owner or owner == req.owner:
            out.unfunded_gpu_hours[owner] = round(hours / 3600, 6)
    return out


def sponsors(cl: Cluster, req: svc.ListSponsorsRequest) -> svc.ListSponsorsResponse:
    out = svc.ListSponsorsResponse()
    rules = cl.rules
    for ref in sorted(rules.envelopes):
        env = rules.envelopes[ref]
        owner = rules.owner_of[ref]
        if req.flavor and env.flavor != req.flavor:
            continue
        if rules.family.family_tier(req.owner, owner) is not None:
            continue  # family (or its own): funded through the family tiers, not lending
        if not env.lending.lends_to(req.owner):
            continue
        lend = lend_bound(ref)
        gpus = views.headroom(cl, ref)
        if env.lending.max_concurrency is not None:
            gpus = min(gpus, env.lending.max_concurrency - cl.funding.used_now(lend))
        if lend in cl.funding.spent:
            gpus = 0
        item = out.sponsors.add(owner=owner, budget=ref[0], envelope=ref[1], flavor=env.flavor,
                                lendable_gpus=max(0, gpus))
        left = math.inf
        if env.lending.max_gpu_hours is not None:
            left = env.lending.max_gpu_hours - cl.meter.hours(lend)
        if env.max_gpu_hours is not None:
            left = min(left, env.max_gpu_hours - cl.meter.hours(env_bound(ref)))
        if math.isfinite(left):
            item.lendable_gpu_hours = round(max(0.0, left), 6)
    return out


def caps(cl: Cluster, cluster: str, sequence: int) -> svc.ClusterCapsResponse:
    out = svc.ClusterCapsResponse(cluster=cluster, ledger_sequence=sequence)
    out.at.seconds = cl.now
    for row in views.caps_json(cl):
        item = out.caps.add(cap=row["cap"], flavor=row["flavor"], version=row["version"], funded=row["funded"],
                            demand=row["demand"], spent_gpu_hours=row["spentGPUHours"])
        for field, key in (("max_concurrency", "maxConcurrency"), ("max_gpu_hours", "maxGPUHours"),
                           ("allowance", "allowance"), ("allowance_gpu_hours", "allowanceGPUHours")):
            if row[key] is not None:
                setattr(item, field, row[key])
    return out


async def main(ctx: ServiceContext) -> None:
    from jobtree.services.budget.publisher import start

    publisher = await start(ctx)
    if publisher is None:
        return
    follower = await follow(ctx, listeners=[publisher])
    if follower is None:
        return
    publishing = asyncio.ensure_future(publisher.run())
    gauges = asyncio.ensure_future(publisher.refresh_forever())

    async def on_state(data: bytes) -> bytes:
        req = bus.StateRequest.FromString(data)
        if not await follower.wait_for(req.min_ledger_sequence, WAIT_TIMEOUT):
            return bus.StateReply(ledger_sequence=follower.sequence, error=bus.Error(
                code=bus.ERROR_CODE_UNAVAILABLE,
                problem=f"the view is at ledger sequence {follower.sequence}, "
                        f"not yet {req.min_ledger_sequence}; retry")).SerializeToString()
        return state_reply(follower).SerializeToString()

    async def on_usage(data: bytes) -> bytes:
        return usage(follower.cluster, svc.UsageRequest.FromString(data)).SerializeToString()

    async def on_sponsors(data: bytes) -> bytes:
        return sponsors(follower.cluster, svc.ListSponsorsRequest.FromString(data)).SerializeToString()

    await ctx.serve(ctx.subject("state"), on_state, queue=True)
    await ctx.serve(ctx.subject("usage"), on_usage, queue=True)
    async def on_caps(_: bytes) -> bytes:
        return caps(follower.cluster, ctx.cluster, follower.sequence).SerializeToString()

    await ctx.serve(ctx.subject("sponsors"), on_sponsors, queue=True)
    await ctx.serve(ctx.subject("caps"), on_caps, queue=True)
    try:
        await ctx.stopping.wait()
    finally:
        publishing.cancel()
        gauges.cancel()
        await follower.stop()

