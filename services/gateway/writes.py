"""The gateway's write RPCs.

Part of the gateway's servicer (`servicer`): see its docstring for the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import grpc

from jobtree.api import convert
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.auth.policy import Action
from jobtree.core import facts
from jobtree.core.errors import ValidationError
from jobtree.core.model import Budget, Run
from jobtree.services.gateway.auth import allow, caller
from jobtree.services.gateway.base import Context, GatewayBase, _Abort, _invalid, _run_of, run_message

MAX_APPLY_OBJECTS = 64


MAX_APPLY_BYTES = 512 * 1024
"""An Apply's limits: its objects travel as one command and commit as one ledger message."""


def _apply_commands(request: api.ApplyRequest) -> list[facts.Command]:
    """The commands of an Apply, each object validated (errors name `objects[i].<field>`)."""
    if not request.objects:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "objects: at least one Run or Budget is required")
    if len(request.objects) > MAX_APPLY_OBJECTS:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"objects: {len(request.objects)} objects; at most {MAX_APPLY_OBJECTS} apply together")
    size = sum(obj.ByteSize() for obj in request.objects)
    if size > MAX_APPLY_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"objects: {size:,} bytes together; at most "
                     f"{MAX_APPLY_BYTES:,} bytes ({MAX_APPLY_BYTES // 1024} KiB) apply together")
    cmds: list[facts.Command] = []
    for i, obj in enumerate(request.objects):
        which = obj.WhichOneof("object")
        if which == "run":
            cmds.append(facts.ApplyRun(_run_of(obj.run, f"objects[{i}].run")))
        elif which == "budget":
            try:
                cmds.append(facts.ApplyBudget(convert.budget_from_proto(obj.budget, f"objects[{i}].budget")))
            except ValidationError as err:
                raise _invalid(err) from None
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"objects[{i}]: must hold a run or a budget")
    return cmds


class Writes(GatewayBase):
    """The write RPCs: validated, authorised (`auth.allow`: the caller's grants cover the owner of
    what it writes, and of what it replaces), sent to admission as one command each, answered
    with the ledger sequence that reflects them."""

    def _allow_run(self, action: Action, run: Run) -> None:
        """The caller may write `run`: its owner, and the owner of the run of that name it replaces."""
        before = self.view.runs.get(run.key)
        allow(action, run.spec.owner, *((before.spec.owner,) if before is not None else ()))

    def _allow_budget(self, budget: Budget) -> None:
        before = self.view.budgets.get(budget.name)
        allow(Action.APPLY_BUDGET, budget.owner, *((before.owner,) if before is not None else ()))

    async def _allow_key(self, action: Action, key: str) -> None:
        """The caller may take `action` on the run `key`, if the view (caught up) holds it."""
        def check() -> None:
            run = self.view.runs.get(key)
            if run is not None:
                allow(action, run.spec.owner)

        await self._authorise(check)

    async def _authorise(self, check: Callable[[], None]) -> None:
        """Run `check` against the view caught up with the ledger; an operator may do anything
        (and costs no catching up)."""
        if caller().operator:
            return
        await self._fresh()
        check()

    def _allow_commands(self, cmds: list[facts.Command]) -> None:
        for cmd in cmds:
            if isinstance(cmd, facts.ApplyRun):
                self._allow_run(Action.SUBMIT, cmd.run)
            elif isinstance(cmd, facts.ApplyBudget):
                self._allow_budget(cmd.budget)

    async def SubmitRun(self, request: api.SubmitRunRequest, context: Context) -> api.SubmitRunResponse:
        async def handle() -> api.SubmitRunResponse:
            run = _run_of(request.run)
            await self._authorise(lambda: self._allow_run(Action.SUBMIT, run))
            seq = await self._commit(facts.ApplyRun(run), request.request_id, context)
            out = await self._run_after(run.key, seq) or convert.run_to_proto(run)
            return api.SubmitRunResponse(run=out, ledger_sequence=seq)

        return await self._guard(context, handle)

    async def Apply(self, request: api.ApplyRequest, context: Context) -> api.ApplyResponse:
        async def handle() -> api.ApplyResponse:
            cmds = _apply_commands(request)
            await self._authorise(lambda: self._allow_commands(cmds))
            seq = await self._commit(cmds, request.request_id, context)
            out = api.ApplyResponse(ledger_sequence=seq)
            for cmd in cmds:
                if isinstance(cmd, facts.ApplyRun):
                    out.objects.add().run.CopyFrom(await self._run_after(cmd.run.key, seq) or convert.run_to_proto(cmd.run))
                elif isinstance(cmd, facts.ApplyBudget):
                    out.objects.add().budget.CopyFrom(convert.budget_to_proto(cmd.budget))
            return out

        return await self._guard(context, handle)

    async def ApplyBudget(self, request: api.ApplyBudgetRequest, context: Context) -> api.ApplyBudgetResponse:
        async def handle() -> api.ApplyBudgetResponse:
            try:
                budget = convert.budget_from_proto(request.budget)
            except ValidationError as err:
                raise _invalid(err) from None
            await self._authorise(lambda: self._allow_budget(budget))
            seq = await self._commit(facts.ApplyBudget(budget), request.request_id, context)
            return api.ApplyBudgetResponse(budget=convert.budget_to_proto(budget), ledger_sequence=seq)

        return await self._guard(context, handle)

    async def DeleteRun(self, request: api.DeleteRunRequest, context: Context) -> api.DeleteRunResponse:
        async def handle() -> api.DeleteRunResponse:
            key = self._key(request.run)
            await self._allow_key(Action.CANCEL, key)
            done = await self._answered(request.request_id, facts.DeleteRun(key))
            if done:
                return api.DeleteRunResponse(ledger_sequence=done)
            await self._fresh()
            self._existing(key)
            seq = await self._commit(facts.DeleteRun(key), request.request_id, context)
            return api.DeleteRunResponse(ledger_sequence=seq)

        return await self._guard(context, handle)

    async def ShrinkRun(self, request: api.ShrinkRunRequest, context: Context) -> api.ShrinkRunResponse:
        async def handle() -> api.ShrinkRunResponse:
            if request.desired_total_gpus <= 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"desiredTotalGPUs: must be a positive integer, got {request.desired_total_gpus}")
            shrink = facts.ShrinkRun(self._key(request.run), request.desired_total_gpus)
            await self._allow_key(Action.SHRINK, shrink.run)
            done = await self._answered(request.request_id, shrink)
            if done:
                return api.ShrinkRunResponse(run=await self._run_after(shrink.run, done), ledger_sequence=done)
            key = await self._known_run(request.run)
            seq = await self._commit(facts.ShrinkRun(key, request.desired_total_gpus), request.request_id, context)
            out = await self._run_after(key, seq)
            return api.ShrinkRunResponse(run=out, ledger_sequence=seq)

        return await self._guard(context, handle)

    async def CompleteRun(self, request: api.CompleteRunRequest, context: Context) -> api.CompleteRunResponse:
        async def handle() -> api.CompleteRunResponse:
            await self._allow_key(Action.REPORT, self._key(request.run))
            done = await self._answered(request.request_id, facts.CompleteRun(self._key(request.run)))
            if done:
                return api.CompleteRunResponse(ledger_sequence=done)
            key = await self._known_run(request.run)
            seq = await self._commit(facts.CompleteRun(key), request.request_id, context)
            return api.CompleteRunResponse(ledger_sequence=seq)

        return await self._guard(context, handle)

    async def FailRun(self, request: api.FailRunRequest, context: Context) -> api.FailRunResponse:
        async def handle() -> api.FailRunResponse:
            await self._allow_key(Action.REPORT, self._key(request.run))
            done = await self._answered(request.request_id, facts.FailRun(self._key(request.run)))
            if done:
                return api.FailRunResponse(ledger_sequence=done)
            key = await self._known_run(request.run)
            if request.message:
                self.ctx.log.info("workload failed", extra={"fields": {"run": key, "message": request.message}})
            seq = await self._commit(facts.FailRun(key), request.request_id, context)
            return api.FailRunResponse(ledger_sequence=seq)

        return await self._guard(context, handle)

    async def AddSponsor(self, request: api.AddSponsorRequest, context: Context) -> api.AddSponsorResponse:
        async def handle() -> api.AddSponsorResponse:
            if not request.sponsor:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "sponsor: is required (an owner id)")
            allow(Action.SPONSOR, request.sponsor)  # the sponsor's budget owner agrees to lend
            key = await self._known_run(request.run)
            st = self.view.status.get(key)
            if st is not None and st.phase.terminal:  # applying the changed spec would resubmit it
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"run {key} already ended ({st.phase.value}); cannot add a sponsor to it")
            run = self.view.runs[key]
            funding = run.spec.funding
            if funding.allow_borrow and request.sponsor in funding.sponsors:
                return api.AddSponsorResponse(run=run_message(self.view, key), ledger_sequence=self.follower.sequence)
            sponsors = funding.sponsors if request.sponsor in funding.sponsors else (*funding.sponsors, request.sponsor)
            changed = replace(run, spec=replace(run.spec, funding=replace(funding, allow_borrow=True, sponsors=sponsors)))
            try:  # through the schema and the core again, so a bad owner id is named
                updated = convert.run_from_proto(convert.run_to_proto(changed))
            except ValidationError as err:
                if err.path.startswith("spec.funding.sponsors"):
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"sponsor: {err.problem}") from None
                raise _invalid(err) from None
            seq = await self._commit(facts.ApplyRun(updated), request.request_id, context)
            out = await self._run_after(key, seq) or convert.run_to_proto(updated)
            return api.AddSponsorResponse(run=out, ledger_sequence=seq)

        return await self._guard(context, handle)
