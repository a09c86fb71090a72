"""The gateway's read RPCs and watch streams.

Part of the gateway's servicer (`servicer`): see its docstring for the contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats.errors
import nats.js.errors
from google.protobuf import struct_pb2

from jobtree.api import convert
from jobtree.api.events import KINDS
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.bus import subjects
from jobtree.bus.eventstream import EventStream
from jobtree.core import views
from jobtree.core.engine import Cluster
from jobtree.core.explain import explain_lines
from jobtree.core.manifest import API_VERSION
from jobtree.core.timefmt import format_time
from jobtree.services.gateway.base import (
    WATCH_QUEUE_MAX,
    Context,
    GatewayBase,
    _Abort,
    _run_of,
    _split,
    _Watch,
    run_message,
)


def _gone_message(cl: Cluster, key: str) -> pb.Run:
    namespace, name = _split(key)
    msg = pb.Run(api_version=API_VERSION, kind="Run")
    msg.metadata.namespace, msg.metadata.name = namespace, name
    status = cl.status.get(key)
    if status is not None:
        msg.status.CopyFrom(convert.run_status_to_proto(status))
    return msg


def _struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(doc)
    return out


def _t(t: int | None) -> str | None:
    return None if t is None else format_time(t)


class Reads(GatewayBase):
    """The read RPCs: answered from the gateway's follower, or forwarded to the budget and
    packer services."""

    async def GetRun(self, request: api.GetRunRequest, context: Context) -> api.GetRunResponse:
        async def handle() -> api.GetRunResponse:
            key = self._key(request.run)
            await self._caught_up(request.min_ledger_sequence)
            self._existing(key)
            return api.GetRunResponse(run=run_message(self.view, key), ledger_sequence=self.follower.sequence)

        return await self._guard(context, handle)

    async def ListRuns(self, request: api.ListRunsRequest, context: Context) -> api.ListRunsResponse:
        async def handle() -> api.ListRunsResponse:
            await self._caught_up(request.min_ledger_sequence)
            cl = self.view
            phases = set(request.phases)
            out = []
            for key in sorted(cl.runs):
                run = cl.runs[key]
                if request.namespace and run.namespace != request.namespace:
                    continue
                if request.owner and run.spec.owner != request.owner:
                    continue
                if phases and (self._phase(key) or "") not in phases:
                    continue
                out.append(run_message(cl, key))
            return api.ListRunsResponse(runs=out, ledger_sequence=self.follower.sequence)

        return await self._guard(context, handle)

    async def WatchEvents(self, request: api.WatchEventsRequest, context: Context) -> AsyncIterator[bus.Event]:
        """Domain events from the cluster's events stream (the budget service publishes them),
        filtered by owner prefix, namespace and kinds, from a ledger sequence."""
        unknown = [k for k in request.kinds if k not in KINDS]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kinds: unknown kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
        kinds = set(request.kinds)
        stream = EventStream(self.ctx.js, self.ctx.cluster)
        try:
            async for e in stream.read(request.after_ledger_sequence, follow=not request.no_follow):
                if kinds and e.kind not in kinds:
                    continue
                if request.namespace and e.namespace != request.namespace:
                    continue
                if request.owner_prefix and not (e.owner == request.owner_prefix
                                                 or e.owner.startswith(request.owner_prefix.rstrip(":") + ":")):
                    continue
                yield e
        except nats.js.errors.NotFoundError:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no events stream yet: the budget service makes it when it starts")
        except nats.errors.Error as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the events stream cannot be read: {exc}")

    async def WatchRuns(self, request: api.WatchRunsRequest, context: Context) -> AsyncIterator[api.RunEvent]:
        try:
            await self._ready()
            after = request.after_ledger_sequence
            if after:
                await self._caught_up(after, "after_ledger_sequence")
        except _Abort as stop:
            await context.abort(stop.code, stop.message)
        watch = _Watch(request.namespace, request.names)
        cl = self.view
        seq = self.follower.sequence
        # No await from here until the watch is registered: the snapshot and the stream of
        # changes meet exactly at `seq`.
        initial: list[api.RunEvent] = []
        for key in sorted(cl.runs):
            if watch.matches(key):
                msg = run_message(cl, key)
                watch.sent[key] = msg
                if request.send_initial and not after:
                    initial.append(api.RunEvent(type=api.RunEvent.TYPE_ADDED, run=msg, ledger_sequence=seq))
        if after:
            for key in sorted(k for k, s in self.changed_at.items() if s > after and watch.matches(k)):
                if key in cl.runs:
                    new = self.created_at.get(key, 0) > after
                    kind = api.RunEvent.TYPE_ADDED if new else api.RunEvent.TYPE_MODIFIED
                    initial.append(api.RunEvent(type=kind, run=watch.sent[key], ledger_sequence=seq))
                elif self.created_at.get(key, 0) <= after:
                    initial.append(api.RunEvent(type=api.RunEvent.TYPE_DELETED, run=_gone_message(cl, key),
                                                ledger_sequence=seq))
        self._watches.add(watch)
        try:
            for event in initial:
                yield event
            while True:
                next_event = await watch.queue.get()
                if next_event is None:
                    if watch.overflow:
                        await context.abort(
                            grpc.StatusCode.ABORTED,
                            f"the watch fell more than {WATCH_QUEUE_MAX} events behind; "
                            f"resume with after_ledger_sequence={self.follower.sequence}",
                        )
                    return
                yield next_event
        finally:
            self._watches.discard(watch)

    async def ExplainRun(self, request: api.ExplainRunRequest, context: Context) -> api.ExplainRunResponse:
        async def handle() -> api.ExplainRunResponse:
            key = self._key(request.run)
            await self._caught_up(request.min_ledger_sequence)
            cl = self.view
            self._existing(key)
            st = cl.status[key]
            leases = sorted((lease for lease in cl.leases.values()
                             if lease.run == key and lease.start >= st.created), key=lambda lease: lease.name)
            reservations = sorted((r for r in cl.reservations.values() if r.run == key), key=lambda r: r.name)
            sim_view = views.run_json(cl, key)
            details = views.explain_details(cl, key)
            lines = explain_lines(sim_view, [views.lease_json(cl, lease) for lease in leases],
                                  [views.reservation_json(r) for r in reservations], details)
            return api.ExplainRunResponse(
                run=run_message(cl, key),
                leases=[convert.lease_to_proto(lease) for lease in leases],
                reservations=[convert.reservation_to_proto(r) for r in reservations],
                lines=lines,
                sim_view=_struct(sim_view),
                ledger_sequence=self.follower.sequence,
            )

        return await self._guard(context, handle)

    async def ListLeases(self, request: api.ListLeasesRequest, context: Context) -> api.ListLeasesResponse:
        async def handle() -> api.ListLeasesResponse:
            await self._caught_up(request.min_ledger_sequence)
            want_run = f"{request.namespace or 'default'}/{request.run}" if request.run else None
            out = []
            for name in sorted(self.view.leases):
                lease = self.view.leases[name]
                if request.open_only and not lease.open:
                    continue
                if want_run is not None and lease.run != want_run:
                    continue
                if request.namespace and _split(lease.run)[0] != request.namespace:
                    continue
                out.append(convert.lease_to_proto(lease))
            classes = {m.metadata.name: self.view.funding.class_of(m.metadata.name).value
                       for m in out if self.view.leases[m.metadata.name].open}
            return api.ListLeasesResponse(leases=out, ledger_sequence=self.follower.sequence, classes=classes)

        return await self._guard(context, handle)

    async def ListReservations(
        self, request: api.ListReservationsRequest, context: Context
    ) -> api.ListReservationsResponse:
        async def handle() -> api.ListReservationsResponse:
            await self._caught_up(request.min_ledger_sequence)
            want_run = f"{request.namespace or 'default'}/{request.run}" if request.run else None
            out = []
            for name in sorted(self.view.reservations):
                r = self.view.reservations[name]
                if want_run is not None and r.run != want_run:
                    continue
                if request.namespace and _split(r.run)[0] != request.namespace:
                    continue
                out.append(convert.reservation_to_proto(r))
            return api.ListReservationsResponse(reservations=out, ledger_sequence=self.follower.sequence)

        return await self._guard(context, handle)

    async def ListBudgets(self, request: api.ListBudgetsRequest, context: Context) -> api.ListBudgetsResponse:
        async def handle() -> api.ListBudgetsResponse:
            await self._ready()
            budgets = self.view.budgets
            out = [convert.budget_to_proto(budgets[n]) for n in sorted(budgets)
                   if not request.owner or budgets[n].owner == request.owner]
            return api.ListBudgetsResponse(budgets=out)

        return await self._guard(context, handle)

    async def Usage(self, request: api.UsageRequest, context: Context) -> api.UsageResponse:
        return await self._guard(context, lambda: self._forward("budget", "usage", request, api.UsageResponse, context))

    async def GlobalUsage(self, request: api.GlobalUsageRequest, context: Context) -> api.GlobalUsageResponse:
        """Forwarded to the federation service over the cluster's leaf connection to its hub."""
        subject = subjects.request(self.ctx.cluster, "federation", "usage")
        what = f"the federation service (on the hub cluster {self.ctx.cluster} joins as a leaf node)"
        absent = (f"no federation answers for cluster {self.ctx.cluster}: it is not joined to a federation hub "
                  "(docs/operator-guide/federation.md)")
        return await self._guard(context, lambda: self._ask(subject, request, api.GlobalUsageResponse, what, context,
                                                            self.forward_timeout, absent=absent))

    async def ListSponsors(self, request: api.ListSponsorsRequest, context: Context) -> api.ListSponsorsResponse:
        return await self._guard(
            context, lambda: self._forward("budget", "sponsors", request, api.ListSponsorsResponse, context)
        )

    async def ListNodes(self, request: api.ListNodesRequest, context: Context) -> api.ListNodesResponse:
        return await self._guard(context, lambda: self._forward("packer", "nodes", request, api.ListNodesResponse, context))

    async def PlanRun(self, request: api.PlanRunRequest, context: Context) -> api.PlanRunResponse:
        async def handle() -> api.PlanRunResponse:
            run = _run_of(request.run)
            forward = api.PlanRunRequest(run=convert.run_to_proto(run))
            return await self._forward("packer", "plan", forward, api.PlanRunResponse, context)

        return await self._guard(context, handle)
