"""packer: topology and what-if placement of one cluster, answered from a ledger follower.

Contract: an on-demand `Follower` (`push=False`: it holds no consumer and applies nothing
between requests) starts from the newest snapshot and the ledger after it (waiting for the
stream if it starts before the binder has created it), and catches up with the ledger before
each answer (`Follower.catch_up`: it answers from everything committed before the request, and
from the view it has, at its sequence, when NATS cannot be read). The service decides nothing
that is written. It answers:
- `jobtree.C.packer.nodes` (service.ListNodesRequest -> service.ListNodesResponse): every node
  by name with its labels, GPUs and state (Ready | Cordoned | Fenced).
- `jobtree.C.packer.plan` (service.PlanRunRequest -> service.PlanRunResponse): what would
  happen if the run were submitted now. The run is validated like a submission; then, on a
  deep copy of the view (the view itself is never touched), the copy's clock moves to now
  (the command instant of the decision loop: the view's own `now` on a virtual clock, the
  wall clock if later on the system clock), the run is submitted, and the core settles.
  The answer says whether it binds now (`fits_now`), where (per group and domain: Active
  GPUs and spares), how it is funded (per paying envelope and class), when it could start if
  it reserved instead (`earliest_start`), and why, in `reasons`: the run's phase, reason and
  message first, then every lease of another run the submission would end. Invalid input
  answers `fits_now = false` with one reason `invalid: <field path>: <problem>`.
Both are request/reply handlers in the `packer` queue group.
Not: the placement policy (the core's `pack` is), not a writer.
"""

from __future__ import annotations

import copy
import time

from jobtree.api import convert
from jobtree.api.jobtree.v1 import service_pb2 as svc
from jobtree.bus.follower import follow
from jobtree.bus.runtime import ServiceContext
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.facts import ApplyRun
from jobtree.core.model import Phase, Role


def nodes(cl: Cluster) -> svc.ListNodesResponse:
    topo = cl.topo
    return svc.ListNodesResponse(nodes=[convert.node_to_proto(topo.nodes[n]) for n in sorted(topo.nodes)])


def plan(cl: Cluster, req: svc.PlanRunRequest, now: int | None = None) -> svc.PlanRunResponse:
    """The what-if of submitting `req.run` at `now` (default: the view's now) on a copy of `cl`."""
    try:
        run = convert.run_from_proto(req.run, "run")
    except ValidationError as err:
        return svc.PlanRunResponse(reasons=[f"invalid: {err}"])
    what_if = copy.deepcopy(cl)
    key = run.key
    try:
        what_if.advance(max(what_if.now, now if now is not None else what_if.now))
        open_before = {name: lease.run for name, lease in what_if.leases.items() if lease.open}
        what_if.submit(ApplyRun(run))
    except ValidationError as err:
        return svc.PlanRunResponse(reasons=[f"invalid: {err}"])
    out = svc.PlanRunResponse()
    st = what_if.status.get(key)
    mine = sorted(what_if.open_by_run.get(key, {}).values(), key=lambda lease: lease.name)
    out.fits_now = st is not None and st.phase is Phase.RUNNING and bool(mine)
    groups: dict[tuple[int, str], list[int]] = {}
    for lease in mine:
        row = groups.setdefault((lease.group, what_if.topo.domain_of(lease.node)), [0, 0])
        row[1 if lease.role is Role.SPARE else 0] += lease.gpus
    for (group, domain), (gpus, spares) in sorted(groups.items()):
        out.placement.add(group=group, domain=domain, gpus=gpus, spares=spares)
    funding: dict[tuple[tuple[str, str] | None, str], int] = {}
    for lease in mine:
        cls = what_if.funding.class_of(lease.name).value
        funding[(lease.paid_by, cls)] = funding.get((lease.paid_by, cls), 0) + lease.gpus
    for (paid_by, cls), gpus in sorted(funding.items(), key=lambda kv: (kv[0][0] or ("", ""), kv[0][1])):
        item = out.funding.add(funding_class=cls, gpus=gpus)
        if paid_by is not None:
            item.paid_by.budget, item.paid_by.envelope = paid_by
    if st is not None:
        res = what_if.reservations.get(st.reservation) if st.reservation else None
        if res is not None and not out.fits_now:
            out.earliest_start.seconds = res.earliest_start
        out.reasons.append(f"{st.phase.value} ({st.reason}): {st.message}")
    for name, run_key in sorted(open_before.items()):
        lease = what_if.leases[name]
        if run_key != key and not lease.open:
            out.reasons.append(f"would end lease {name} of {run_key} ({lease.closure_reason})")
    return out


async def main(ctx: ServiceContext) -> None:
    follower = await follow(ctx, push=False)
    if follower is None:
        return
    wall_clock = ctx.settings.clock == "system"

    async def on_nodes(data: bytes) -> bytes:
        svc.ListNodesRequest.FromString(data)
        await follower.catch_up(ctx.log)
        return nodes(follower.cluster).SerializeToString()

    async def on_plan(data: bytes) -> bytes:
        req = svc.PlanRunRequest.FromString(data)
        await follower.catch_up(ctx.log)
        now = int(time.time()) if wall_clock else None
        return plan(follower.cluster, req, now).SerializeToString()

    await ctx.serve(ctx.subject("nodes"), on_nodes, queue=True)
    await ctx.serve(ctx.subject("plan"), on_plan, queue=True)
    try:
        await ctx.stopping.wait()
    finally:
        await follower.stop()
