"""The gateway servicer's base: errors and their gRPC codes, the view, sending, guards.

Part of the gateway's servicer (`servicer`): see its docstring for the contract.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import grpc
import nats.errors
from google.protobuf.message import Message

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import codec, subjects
from jobtree.bus.follower import Follower, Listener
from jobtree.bus.ledger import Ledger
from jobtree.bus.runtime import ServiceContext
from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.model import Phase, Run
from jobtree.services.gateway.auth import caller
from jobtree.services.gateway.clock import INSTANT_METADATA, Clock, instant_from_metadata
from jobtree.services.gateway.status import Abort

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
    bus.ERROR_CODE_PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
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


_Abort = Abort


def _invalid(err: ValidationError) -> _Abort:
    """A core refusal as the gRPC status of its kind (the one mapping: `convert.ERROR_CODE_OF_KIND`)."""
    return _Abort(STATUS_OF[convert.ERROR_CODE_OF_KIND[err.kind]], str(err))


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


_BATCH_ITEM = re.compile(r"^batch\.commands\[(\d+)\]")
_DECIDED: contextvars.ContextVar[Mapping[str, pb.Run]] = contextvars.ContextVar(
    "decided", default=MappingProxyType({}))
"""Run key -> the run as admission's reply to this request's command left it (each gRPC call
runs in its own task, so this is per request); never mutated, only replaced."""


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


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


class GatewayBase(api_grpc.JobtreeServicer):
    """The gateway's state and plumbing: its follower view, sending commands and requests over
    NATS, readiness and guards. The RPCs live in `writes.Writes` and `reads.Reads`."""

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
        follower.listeners.append(Listener(self._on_batch, self._restored))

    @property
    def view(self) -> Cluster:
        return self.follower.cluster

    def _restored(self, follower: Follower) -> None:
        """Started from a snapshot: every run in it changed, as far as a watch can tell, at its sequence."""
        for key in follower.cluster.runs:
            self._present.add(key)
            self.changed_at[key] = self.created_at[key] = follower.sequence

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
                   context: Context, timeout: float, *, absent: str | None = None) -> M:
        """Request/reply over NATS until the deadline: re-sent while nobody answers, and after
        RESEND_AFTER seconds without an answer (the same bytes, so the same command id: a
        request that reached a leader as it died is answered by its successor; admission
        decides a command id once). With `absent`, nobody subscribed is answered at once:
        UNAVAILABLE with that problem (a service that may not exist here at all)."""
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
                if absent is not None:
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, absent) from None
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
        sequence, or an abort with the mapped code. The runs the decision returned (`CommandReply.runs`)
        are kept for `_run_after` of this request (`decided`)."""
        command_id = self._command_id(request_id)
        instant = self._instant(context)
        if isinstance(cmd, list):
            msg = bus.Command(command_id=command_id)
            if instant is not None:
                msg.instant.seconds = instant
            msg.batch.commands.extend(convert.command_to_proto(c) for c in cmd)
        else:
            msg = convert.command_to_proto(cmd, command_id=command_id, instant=instant)
        msg.identity = caller().name  # recorded in the ledger with what it decided
        subject = subjects.request(self.ctx.cluster, "admission", "command")
        reply = await self._ask(subject, msg, bus.CommandReply, "admission", context, self.command_timeout)
        if reply.HasField("error") and reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
            if isinstance(cmd, list):  # name the object, as the request does
                reply.error.field_path = _BATCH_ITEM.sub(r"objects[\1]", reply.error.field_path)
            raise _error_abort(reply.error)
        self.ctx.log.debug("committed", extra={"fields": {"command_id": command_id,
                                                           "ledger_sequence": reply.ledger_sequence}})
        for run in reply.runs:
            _DECIDED.set({**_DECIDED.get(), f"{run.metadata.namespace}/{run.metadata.name}": run})
        return int(reply.ledger_sequence)

    async def _forward(self, service: str, verb: str, request: Message, reply_cls: type[M],
                       context: Context) -> M:
        subject = subjects.request(self.ctx.cluster, service, verb)
        return await self._ask(subject, request, reply_cls, f"the {service} service", context,
                               self.forward_timeout)

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
        """The run as the decision of this request left it (admission's reply), else as the view
        has it once it applied `sequence` (None if not in time)."""
        decided = _DECIDED.get().get(key)
        if decided is not None:
            return decided
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
