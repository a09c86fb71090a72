"""The `jobtree.v1.Jobtree` gRPC service: validate, send commands to admission, read the follower.

Contract:
- Writes (SubmitRun, ApplyBudget, Apply, DeleteRun, ShrinkRun, CompleteRun, FailRun, AddSponsor) are
  validated through the schema and the core (`convert.*_from_proto`, which runs
  `jobtree.core.manifest`); bad input aborts with INVALID_ARGUMENT `field.path: problem` and
  sends nothing. Commands that name an existing run are checked against the gateway's view
  once it has caught up with the ledger's last sequence: an unknown run is NOT_FOUND. What a
  command may do to a run (not after it ended, not before it started, shrink only a malleable
  run) is the core's rule: admission answers FAILED_PRECONDITION and the gateway maps the code
  (`STATUS_OF`), keeping no copy of the rule. A valid write becomes one `bus.Command`
  (`command_id` = the request's `request_id`, or a fresh uuid4; the instant from the clock) sent
  to `jobtree.<c>.admission.command`; the `bus.CommandReply`'s error maps to a gRPC code
  (`STATUS_OF`), and its `ledger_sequence` is returned so the client can read its own write.
  While nobody answers the subject (a leader failover), the command is re-sent with the same id
  until `command_timeout`; a timeout is UNAVAILABLE. While the gateway has lost NATS, writes
  wait for it until their deadline and then fail UNAVAILABLE naming NATS (not admission). A
  request id already committed for a *different* request is refused INVALID_ARGUMENT on
  `request_id` (admission compares the command digests the ledger carries).
- Reads of runs, leases and reservations are answered from the gateway's own `Follower`, once it
  has applied `min_ledger_sequence` (UNAVAILABLE if it does not within `read_timeout`;
  OUT_OF_RANGE at once when the sequence is beyond the ledger's end). While the gateway has
  lost NATS, reads are answered from the view it has, with the trailing metadata
  `jobtree-stale` saying since when and at which ledger sequence (kubectl-runs prints it).
  WatchRuns streams the matching runs (ADDED), then ADDED/MODIFIED/DELETED as the follower
  applies batches; `after_ledger_sequence` resumes with the current state of every run that
  changed after that sequence (intermediate states are coalesced).
- Usage and ListSponsors are forwarded to the budget service, ListNodes and PlanRun to the
  packer (request/reply over NATS with the same messages; a reply typed `jobtree.v1.Error`
  maps like a command error); no responder is UNAVAILABLE naming the service. ListBudgets is
  read from the follower (the ledger carries every applied budget).
Not: a decision maker (admission decides), not a writer of the ledger (the binder is).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import grpc
import nats.errors
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import codec, subjects
from jobtree.bus.follower import Follower
from jobtree.bus.ledger import Ledger
from jobtree.bus.runtime import ServiceContext
from jobtree.core import facts, views
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.explain import Details, explain_lines
from jobtree.core.manifest import API_VERSION
from jobtree.core.model import Phase, Run
from jobtree.core.timefmt import format_time
from jobtree.services.gateway.clock import INSTANT_METADATA, Clock, instant_from_metadata

__all__ = ["STATUS_OF", "Gateway"]

M = TypeVar("M", bound=Message)
R = TypeVar("R")

STATUS_OF: dict[int, grpc.StatusCode] = {
    bus.ERROR_CODE_UNSPECIFIED: grpc.StatusCode.UNKNOWN,
    bus.ERROR_CODE_INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    bus.ERROR_CODE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    bus.ERROR_CODE_CONFLICT: grpc.StatusCode.ABORTED,  # the ledger moved on: retry with the same request id
    bus.ERROR_CODE_STALE_EPOCH: grpc.StatusCode.UNAVAILABLE,
    bus.ERROR_CODE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    bus.ERROR_CODE_INTERNAL: grpc.StatusCode.INTERNAL,
    bus.ERROR_CODE_FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}
"""bus.ErrorCode -> gRPC status code."""

REQUEST_ID_MAX = 128
RESEND_AFTER = 2.0
"""Seconds without an answer before a request to a service is sent again (a leader's lock
lapses in 2 s, so a request lost with a dead leader reaches its successor)."""
WATCH_QUEUE_MAX = 10_000
"""Events a watcher may fall behind by before its stream is ended (ABORTED, resume with
after_ledger_sequence)."""

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext


class _Abort(Exception):
    """Carries a gRPC status from helpers up to the handler (which aborts with it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(err: ValidationError) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))


STALE_METADATA = "jobtree-stale"
"""Trailing metadata of a read answered while the gateway has lost NATS: what may be stale."""


def _error_abort(err: bus.Error) -> _Abort:
    path = "request_id" if err.field_path == "command_id" else err.field_path  # the API's name for it
    text = f"{path}: {err.problem}" if path else err.problem or "refused"
    return _Abort(STATUS_OF.get(err.code, grpc.StatusCode.UNKNOWN), text)


def _run_of(given: pb.Run, path: str = "") -> Run:
    """A client's Run as a validated core Run (its status, if sent, is ignored); an abort with
    INVALID_ARGUMENT naming the field otherwise."""
    msg = pb.Run()
    msg.CopyFrom(given)
    msg.ClearField("status")
    try:
        return convert.run_from_proto(msg, path)
    except ValidationError as err:
        raise _invalid(err) from None


MAX_APPLY_OBJECTS = 64
MAX_APPLY_BYTES = 512 * 1024
"""An Apply's limits: its objects travel as one command and commit as one ledger message."""
_BATCH_ITEM = re.compile(r"^batch\.commands\[(\d+)\]")


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


def _run_key_of(msg: pb.Run) -> str:
    return f"{msg.metadata.namespace or 'default'}/{msg.metadata.name}"


def batch_run_keys(batch: bus.LedgerBatch) -> list[str]:
    """The run keys whose spec or status a ledger batch changes, in order of first mention."""
    keys: dict[str, None] = {}
    for entry in batch.entries:
        which = entry.WhichOneof("fact")
        if which == "spec_put":
            keys[_run_key_of(entry.spec_put.run)] = None
        elif which == "spec_deleted":
            keys[convert.run_key(entry.spec_deleted.run)] = None
        elif which == "run_status_put":
            keys[convert.run_key(entry.run_status_put.run)] = None
    return list(keys)


def _split(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


def run_message(cl: Cluster, key: str) -> pb.Run:
    """The API object of a run of the view: its spec as it stands and its status."""
    return convert.run_to_proto(cl.runs[key], cl.status.get(key))


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


class _Watch:
    """One WatchRuns stream: its filter, what it has sent, and its queue of events."""

    def __init__(self, namespace: str, names: Iterable[str]) -> None:
        self.namespace = namespace
        self.names = frozenset(names)
        self.sent: dict[str, pb.Run] = {}
        self.queue: asyncio.Queue[api.RunEvent | None] = asyncio.Queue()
        self.overflow = False

    def matches(self, key: str) -> bool:
        namespace, name = _split(key)
        if self.namespace and namespace != self.namespace:
            return False
        return not self.names or name in self.names

    def put(self, event: api.RunEvent | None) -> None:
        if self.queue.qsize() >= WATCH_QUEUE_MAX:
            self.overflow = True
            event = None
        self.queue.put_nowait(event)

    def update(self, cl: Cluster, key: str, sequence: int) -> None:
        """Queue the event that brings this watcher's copy of `key` up to the view."""
        if not self.matches(key):
            return
        if key in cl.runs:
            msg = run_message(cl, key)
            before = self.sent.get(key)
            if before == msg:
                return
            kind = api.RunEvent.TYPE_MODIFIED if before is not None else api.RunEvent.TYPE_ADDED
            self.sent[key] = msg
        else:
            gone = self.sent.pop(key, None)
            if gone is None:
                return
            kind, msg = api.RunEvent.TYPE_DELETED, gone
        self.put(api.RunEvent(type=kind, run=msg, ledger_sequence=sequence))


class Gateway(api_grpc.JobtreeServicer):
    def __init__(
        self,
        ctx: ServiceContext,
        follower: Follower,
        ledger: Ledger,
        clock: Clock,
        *,
        command_timeout: float = 5.0,
        read_timeout: float = 5.0,
        forward_timeout: float = 5.0,
    ) -> None:
        self.ctx = ctx
        self.follower = follower
        self.ledger = ledger
        self.clock = clock
        self.command_timeout = command_timeout
        self.read_timeout = read_timeout
        self.forward_timeout = forward_timeout
        self.ready = asyncio.Event()
        self.changed_at: dict[str, int] = {}
        """Run key -> the last ledger sequence that changed its spec or status."""
        self.created_at: dict[str, int] = {}
        """Run key -> the ledger sequence at which it (last) appeared in the view."""
        self._present: set[str] = set()
        self._watches: set[_Watch] = set()
        follower.listeners.append(self._on_batch)

    # -- the follower ------------------------------------------------------------------------

    @property
    def view(self) -> Cluster:
        return self.follower.cluster

    def _on_batch(self, sequence: int, batch: bus.LedgerBatch) -> None:
        cl = self.view
        keys = batch_run_keys(batch)
        for key in keys:
            self.changed_at[key] = sequence
            if key in cl.runs and key not in self._present:
                self._present.add(key)
                self.created_at[key] = sequence
            elif key not in cl.runs:
                self._present.discard(key)
        for watch in list(self._watches):
            for key in keys:
                watch.update(cl, key, sequence)

    async def start(self, retry: float = 0.5) -> None:
        """Follow the ledger and catch up with it (retrying until the stream exists)."""
        waiting_logged = False
        while True:
            try:
                await self.follower.start()
                last = await self.ledger.last_sequence()
                break
            except Exception as exc:  # the stream does not exist yet, NATS is reconnecting...
                await self.follower.stop()
                if not waiting_logged:
                    self.ctx.log.info("waiting for the ledger stream",
                                      extra={"fields": {"stream": self.ledger.stream, "error": str(exc)}})
                    waiting_logged = True
                await asyncio.sleep(retry)
        while not await self.follower.wait_for(last, timeout=30.0):
            self.ctx.log.info("catching up with the ledger",
                              extra={"fields": {"at": self.follower.sequence, "target": last}})
        self.ready.set()
        self.ctx.log.info("view ready", extra={"fields": {"ledger_sequence": self.follower.sequence}})

    def close(self) -> None:
        """End every watch stream (the gateway is stopping)."""
        for watch in list(self._watches):
            watch.put(None)

    async def _ready(self) -> None:
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), self.read_timeout)
        except TimeoutError:
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         "the gateway is still reading the ledger; retry shortly") from None

    def _nats_down(self) -> str | None:
        """Why NATS cannot be reached now (None while connected: the connection decides, the
        bus state only says since when)."""
        if self.ctx.nc.is_connected:
            return None
        since = self.ctx.bus.down_since
        ago = f" {max(0.0, time.monotonic() - since):.1f} s ago" if since is not None else ""
        return f"NATS is unreachable (the gateway lost its connection{ago} and is reconnecting)"

    async def _caught_up(self, sequence: int, field: str = "min_ledger_sequence") -> None:
        await self._ready()
        if sequence > self.follower.sequence and self._nats_down() is None:
            try:
                last = await self.ledger.last_sequence()
            except Exception:
                last = None
            if last is not None and sequence > last:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                             f"{field}: {sequence} is beyond the ledger's end (its last sequence is {last}); "
                             "pass a sequence that a write returned")
        if not await self.follower.wait_for(sequence, timeout=self.read_timeout):
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the gateway's view has applied ledger sequence {self.follower.sequence}, "
                f"not yet {sequence}; retry shortly",
            )

    async def _fresh(self) -> None:
        """Catch up with the ledger's last sequence now (so checks see every committed write)."""
        await self._ready()
        try:
            last = await self.ledger.last_sequence()
        except Exception as exc:
            down = self._nats_down()
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"cannot read the ledger: {down or exc}; retry shortly") from None
        await self._caught_up(last)

    # -- sending -----------------------------------------------------------------------------

    def _instant(self, context: Context) -> int | None:
        sent = [v for k, v in (context.invocation_metadata() or ()) if k == INSTANT_METADATA]
        if not sent:
            return self.clock.now()
        if not self.clock.virtual:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{INSTANT_METADATA}: only a gateway on a virtual clock takes the instant from a request")
        value = sent[-1]
        try:
            return instant_from_metadata(value if isinstance(value, str) else value.decode())
        except ValidationError as err:
            raise _invalid(err) from None

    @staticmethod
    def _command_id(request_id: str) -> str:
        if not request_id:
            return str(uuid.uuid4())
        if len(request_id) > REQUEST_ID_MAX or not request_id.isprintable() or any(c.isspace() for c in request_id):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request_id: must be at most {REQUEST_ID_MAX} printable characters without spaces")
        return request_id

    def _deadline(self, context: Context, timeout: float) -> float:
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining - 0.05))
        return asyncio.get_running_loop().time() + timeout

    async def _ask(self, subject: str, payload: Message, reply_cls: type[M], what: str,
                   context: Context, timeout: float) -> M:
        """Request/reply over NATS until the deadline: re-sent while nobody answers, and after
        RESEND_AFTER seconds without an answer (the same bytes, so the same command id: a
        request that reached a leader as it died is answered by its successor; admission
        decides a command id once)."""
        loop = asyncio.get_running_loop()
        deadline = self._deadline(context, timeout)
        data, headers = codec.encode(payload), codec.headers(payload)
        problem = f"{what} did not answer within {timeout:g} s"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, problem)
            down = self._nats_down()
            if down is not None:  # a request now would only wait in the reconnect buffer
                problem = f"{down}; {what} cannot be reached; retry with the same request id"
                await asyncio.sleep(min(0.1, remaining))
                continue
            try:
                msg = await self.ctx.nc.request(subject, data, timeout=min(remaining, RESEND_AFTER), headers=headers)
            except nats.errors.NoRespondersError:
                problem = f"{what} is not running (nobody answers {subject})"
                await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
                continue
            except nats.errors.TimeoutError:
                if deadline - loop.time() > 0.05:
                    continue
                raise _Abort(grpc.StatusCode.UNAVAILABLE, problem) from None
            except nats.errors.Error as exc:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach {what}: {exc}") from None
            # A responder's `msg.respond` echoes the request's headers unless it sets its own, so
            # the type header of a reply is trusted only when it names an Error.
            sent_type = (msg.headers or {}).get(codec.TYPE_HEADER)
            try:
                if sent_type == codec.type_name(bus.Error):
                    raise _error_abort(codec.decode(msg.data, bus.Error))
                return codec.decode(msg.data, reply_cls)
            except codec.CodecError as exc:
                raise _Abort(grpc.StatusCode.INTERNAL, f"{what} answered garbage: {exc}") from None

    async def _commit(self, cmd: facts.Command | list[facts.Command], request_id: str, context: Context) -> int:
        """Send one command (or a list as one batch: all or none) to admission; its ledger
        sequence, or an abort with the mapped code."""
        command_id = self._command_id(request_id)
        instant = self._instant(context)
        if isinstance(cmd, list):
            msg = bus.Command(command_id=command_id)
            if instant is not None:
                msg.instant.seconds = instant
            msg.batch.commands.extend(convert.command_to_proto(c) for c in cmd)
        else:
            msg = convert.command_to_proto(cmd, command_id=command_id, instant=instant)
        subject = subjects.request(self.ctx.cluster, "admission", "command")
        reply = await self._ask(subject, msg, bus.CommandReply, "admission", context, self.command_timeout)
        if reply.HasField("error") and reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
            if isinstance(cmd, list):  # name the object, as the request does
                reply.error.field_path = _BATCH_ITEM.sub(r"objects[\1]", reply.error.field_path)
            raise _error_abort(reply.error)
        self.ctx.log.debug("committed", extra={"fields": {"command_id": command_id,
                                                           "ledger_sequence": reply.ledger_sequence}})
        return int(reply.ledger_sequence)

    async def _forward(self, service: str, verb: str, request: Message, reply_cls: type[M],
                       context: Context) -> M:
        subject = subjects.request(self.ctx.cluster, service, verb)
        return await self._ask(subject, request, reply_cls, f"the {service} service", context,
                               self.forward_timeout)

    # -- helpers for reads -------------------------------------------------------------------

    @staticmethod
    def _key(ref: pb.RunRef, path: str = "run") -> str:
        try:
            return convert.run_key(ref, path)
        except ValidationError as err:
            raise _invalid(err) from None

    def _existing(self, key: str) -> Run:
        run = self.view.runs.get(key)
        if run is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"run {key} not found")
        return run

    def _phase(self, key: str) -> Phase | None:
        st = self.view.status.get(key)
        return st.phase if st is not None else None

    async def _run_after(self, key: str, sequence: int) -> pb.Run | None:
        """The run as the view has it once it applied `sequence` (None if not in time)."""
        caught_up = sequence > 0 and await self.follower.wait_for(sequence, timeout=min(2.0, self.read_timeout))
        return run_message(self.view, key) if caught_up and key in self.view.runs else None

    async def _answered(self, request_id: str, cmd: facts.Command) -> int:
        """The ledger sequence that already committed `request_id` (0: none). A write repeated
        after its answer was lost gets the original answer, not a check against the state it
        produced (a completed run cannot be completed again); an id that committed a different
        request is refused."""
        if not request_id:
            return 0
        await self._fresh()
        done = self.follower.command_ids.get(request_id, 0)
        first = self.follower.command_digests.get(request_id)
        if done and first and first != convert.command_digest(convert.command_to_proto(cmd)):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request_id: {request_id!r} was already used for a different request (committed at "
                         f"ledger sequence {done}); send a new id for a new request, the same request to retry")
        return done

    async def _known_run(self, ref: pb.RunRef) -> str:
        """The key of a run the view (caught up with the ledger) holds; NOT_FOUND otherwise. What
        a command may do to it is the core's to say (admission answers FAILED_PRECONDITION)."""
        key = self._key(ref)
        await self._fresh()
        self._existing(key)
        return key

    # -- writes ------------------------------------------------------------------------------

    async def SubmitRun(self, request: api.SubmitRunRequest, context: Context) -> api.SubmitRunResponse:
        async def handle() -> api.SubmitRunResponse:
            run = _run_of(request.run)
            seq = await self._commit(facts.ApplyRun(run), request.request_id, context)
            out = await self._run_after(run.key, seq) or convert.run_to_proto(run)
            return api.SubmitRunResponse(run=out, ledger_sequence=seq)

        return await self._guard(context, handle)

    async def Apply(self, request: api.ApplyRequest, context: Context) -> api.ApplyResponse:
        async def handle() -> api.ApplyResponse:
            cmds = _apply_commands(request)
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
            seq = await self._commit(facts.ApplyBudget(budget), request.request_id, context)
            return api.ApplyBudgetResponse(budget=convert.budget_to_proto(budget), ledger_sequence=seq)

        return await self._guard(context, handle)

    async def DeleteRun(self, request: api.DeleteRunRequest, context: Context) -> api.DeleteRunResponse:
        async def handle() -> api.DeleteRunResponse:
            key = self._key(request.run)
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
            done = await self._answered(request.request_id, facts.CompleteRun(self._key(request.run)))
            if done:
                return api.CompleteRunResponse(ledger_sequence=done)
            key = await self._known_run(request.run)
            seq = await self._commit(facts.CompleteRun(key), request.request_id, context)
            return api.CompleteRunResponse(ledger_sequence=seq)

        return await self._guard(context, handle)

    async def FailRun(self, request: api.FailRunRequest, context: Context) -> api.FailRunResponse:
        async def handle() -> api.FailRunResponse:
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

    # -- reads from the follower ---------------------------------------------------------------

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
            run = self._existing(key)
            st = cl.status[key]
            leases = sorted((lease for lease in cl.leases.values()
                             if lease.run == key and lease.start >= st.created), key=lambda lease: lease.name)
            reservations = sorted((r for r in cl.reservations.values() if r.run == key), key=lambda r: r.name)
            sim_view = views.run_json(cl, key)
            follow = run.spec.follow
            details = Details(
                created=_t(st.created), admitted=_t(st.admitted), bound_at=_t(st.bound_at),
                hold_down_until=_t(st.hold_down_until), checkpoint_deadline=_t(st.checkpoint_deadline),
                ended_at=_t(st.ended_at), upstream_failed_at=_t(st.upstream_failed_at), eta=_t(st.eta),
                generation=st.generation,
                upstreams=follow.after if follow else (),
                on_upstream_failure=follow.on_upstream_failure.value if follow else None,
            )
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
            return api.ListLeasesResponse(leases=out, ledger_sequence=self.follower.sequence)

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

    # -- forwarded to the budget and packer services ----------------------------------------------

    async def Usage(self, request: api.UsageRequest, context: Context) -> api.UsageResponse:
        return await self._guard(context, lambda: self._forward("budget", "usage", request, api.UsageResponse, context))

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


    async def _guard(self, context: Context, handle: Callable[[], Awaitable[R]]) -> R:
        """Run a handler; an _Abort becomes the gRPC status it carries. An answer given while
        NATS is unreachable says so in the `jobtree-stale` trailing metadata."""
        try:
            out = await handle()
        except _Abort as stop:
            await _abort(context, stop.code, stop.message)
        down = self._nats_down()
        if down is not None:
            context.set_trailing_metadata(((STALE_METADATA, f"{down}; this answer is the gateway's view at ledger "
                                                            f"sequence {self.follower.sequence} and may be stale"),))
        return out


def _t(t: int | None) -> str | None:
    return None if t is None else format_time(t)


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises
