"""The service runtime: what every jobtree service runs inside (`jobtree serve NAME`).

Contract: `run(main, settings)` connects to NATS (the first connection retried until it works
or the service is told to stop; afterwards reconnecting for ever), opens JetStream,
answers `health` on the service's subject, exposes Prometheus metrics when a port is set, logs
structured JSON lines to stderr, calls `main(ctx)` and, on SIGINT/SIGTERM or when `main`
returns, drains the connection and exits. `ServiceContext.serve` registers a request/reply
handler (optionally in the service's queue group). Handlers take the request bytes and
return the reply bytes; an exception in a handler is logged and, when the handler was
registered with `on_error`, answered with what `on_error(exc)` returns (else with nothing: the
caller times out) rather than crashing the service. `ctx.bus` says whether NATS is reachable
and since when it is not (`down_since`, from the client's disconnect/reconnect callbacks), so
answers can say they are stale and errors can name NATS. /metrics listens on
$JOBTREE_METRICS_HOST (default 127.0.0.1).
Not: scheduling logic (the core), not subjects (see `subjects`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, ports, subjects
from jobtree.bus.clock import Clock, clock_named
from jobtree.core.errors import ValidationError
from jobtree.core.model import ClusterConfig

Handler = Callable[[bytes], Awaitable[bytes | None]]

REQUESTS = Counter("jobtree_requests_total", "Requests a service handled, by subject verb and outcome",
                   ["service", "verb", "outcome"])
LATENCY = Histogram("jobtree_request_seconds", "Time a service spent answering a request",
                    ["service", "verb"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

METRICS_HOST_ENV = "JOBTREE_METRICS_HOST"
"""The address /metrics listens on (default 127.0.0.1; 0.0.0.0 in a pod, for probes and scrapes)."""

GC_PAUSES = Histogram("jobtree_gc_pause_seconds", "Time the Python garbage collector stopped the service, by generation",
                      ["generation"], buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks hook: every collection's pause into GC_PAUSES (long-lived views make full
    collections slow; this is where tail latency from them shows)."""
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        GC_PAUSES.labels(str(info.get("generation", -1))).observe(time.perf_counter() - _gc_started)


def time_gc_pauses() -> None:
    """Observe every garbage collection from now on (idempotent). `jobtree serve` calls it
    before importing the service, so the pauses of loading and replaying count too."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    name: str
    cluster: str
    nats_url: str
    user: str | None = None
    password: str | None = None
    nkey_seed: str | None = None
    """The user's nkey seed (`SU...`): it signs the server's nonce instead of a password."""
    data_dir: Path = Path(".")
    metrics_port: int = 0
    """Serve Prometheus /metrics on this port (0: not at all; `ports.ANY`: a free one); the
    port taken is written to `ports.METRICS_FILE` in `data_dir`."""
    clock: str = "system"
    """`system` (wall clock) or `virtual` (instants come only from commands)."""
    config: ClusterConfig = field(default_factory=ClusterConfig)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=True)


ERROR_CODE_INTERNAL = bus.ERROR_CODE_INTERNAL


def error_reply(exc: Exception) -> bus.Error:
    """The `jobtree.v1.Error` a request handler's exception is answered with."""
    if isinstance(exc, ValidationError):
        return convert.error_to_proto(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, codec.CodecError):
        return bus.Error(code=bus.ERROR_CODE_INVALID_ARGUMENT, field_path="request", problem=text)
    if isinstance(exc, DecodeError):
        what = text.partition("type '")[2].partition("'")[0] or "request message"
        return bus.Error(code=bus.ERROR_CODE_INVALID_ARGUMENT, field_path="request", problem=codec.not_valid(what, exc))
    return bus.Error(code=bus.ERROR_CODE_INTERNAL, problem=f"the service failed: {type(exc).__name__}: {text}")


def listen_address(host_env: str, port_env: str, default_host: str, default_port: int) -> tuple[str, int]:
    """A service's listening address from its environment (`port 0`: any free port);
    ValueError naming the variable when the port is not one."""
    host = os.environ.get(host_env) or default_host
    raw = os.environ.get(port_env)
    port = default_port if raw is None or raw == "" else int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port_env} must be a port number (0 = any free port), got {raw!r}")
    return host, port


def service_logger(name: str) -> logging.Logger:
    log = logging.getLogger(f"jobtree.{name}")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


@dataclass
class BusState:
    """Whether this process can reach NATS: `down_since` is the monotonic time the connection
    was lost (None while connected)."""

    down_since: float | None = None
    outages: int = 0
    client: Any = None
    """The connection, once made (whether it is connected is its own to say)."""

    @property
    def up(self) -> bool:
        return self.client is not None and bool(self.client.is_connected)

    async def disconnected(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1

    async def reconnected(self) -> None:
        self.down_since = None


@dataclass
class ServiceContext:
    settings: ServiceSettings
    nc: NATS
    js: JetStreamContext
    log: logging.Logger
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    bus: BusState = field(default_factory=BusState)
    _subs: list[Any] = field(default_factory=list)

    @property
    def cluster(self) -> str:
        return self.settings.cluster

    @property
    def clock(self) -> Clock:
        """The service's one clock (`--clock`): read time through it, never directly."""
        return clock_named(self.settings.clock)

    def subject(self, verb: str, service: str | None = None) -> str:
        return subjects.request(self.cluster, service or self.settings.name, verb)

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the service is told to stop meanwhile (between retries)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.0, seconds))

    async def serve(self, subject: str, handler: Handler, *, queue: bool = False,
                    on_error: Callable[[Exception], bytes] | None = None) -> None:
        """Answer requests on `subject` with `handler` (in the service's queue group if asked).
        A handler that raises is answered with `on_error(exc)` when given, else with a
        `jobtree.v1.Error` (typed by the `Jobtree-Type` header): INVALID_ARGUMENT `request: ...`
        for bytes that are not the request message or a request the core refuses, INTERNAL for
        anything else. A request is never left to time out."""

        verb = subject.rsplit(".", 1)[-1]
        service = self.settings.name

        async def on_msg(msg: Msg) -> None:
            started = time.perf_counter()
            try:
                reply = await handler(msg.data)
            except Exception as exc:
                REQUESTS.labels(service, verb, "error").inc()
                if on_error is not None:
                    self.log.warning("request refused", extra={"fields": {"subject": subject, "error": repr(exc)}})
                    if msg.reply:
                        await msg.respond(on_error(exc))
                    return
                error = error_reply(exc)
                if error.code == ERROR_CODE_INTERNAL:
                    self.log.exception("handler failed", extra={"fields": {"subject": subject}})
                else:
                    self.log.warning("request refused", extra={"fields": {"subject": subject, "error": error.problem}})
                if msg.reply:
                    await self.nc.publish(msg.reply, error.SerializeToString(), headers=codec.headers(error))
                return
            REQUESTS.labels(service, verb, "ok").inc()
            LATENCY.labels(service, verb).observe(time.perf_counter() - started)
            if reply is not None and msg.reply:
                try:
                    await msg.respond(reply)
                except nats.errors.MaxPayloadError:  # the caller gets why, not a timeout
                    limit = self.nc.max_payload
                    error = bus.Error(code=bus.ERROR_CODE_INVALID_ARGUMENT, problem=(
                        f"the answer is {len(reply):,} bytes, more than the bus carries ({limit:,}); "
                        "ask for less (a filter, one owner, one run)"))
                    self.log.warning("answer too large", extra={"fields": {"subject": subject, "bytes": len(reply)}})
                    await self.nc.publish(msg.reply, error.SerializeToString(), headers=codec.headers(error))
            self.log.debug("handled", extra={"fields": {"subject": subject,
                                                        "ms": round(1000 * (time.perf_counter() - started), 3)}})

        group = subjects.queue_group(self.settings.name) if queue else ""
        self._subs.append(await self.nc.subscribe(subject, queue=group, cb=on_msg))

    async def request(self, subject: str, data: bytes, timeout: float = 5.0) -> bytes:
        msg = await self.nc.request(subject, data, timeout=timeout)
        return bytes(msg.data)


async def connect(settings: ServiceSettings, bus: BusState | None = None,
                  stopping: asyncio.Event | None = None) -> NATS:
    """A connection that reconnects for ever, the first connection included (nats.py retries
    it while `max_reconnect_attempts` is -1); nats.errors.NoServersError if `stopping` is set
    before it connects. With `bus`, outages are tracked and logged (one line per outage)."""
    log = service_logger(settings.name)
    opts: dict[str, Any] = {
        "servers": [settings.nats_url],
        "name": f"jobtree-{settings.name}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "inbox_prefix": subjects.inbox_prefix(settings.cluster, settings.name).encode(),
    }
    if bus is not None:
        async def disconnected() -> None:
            if stopping is not None and stopping.is_set():
                return  # a clean stop drains and closes the connection: not an outage
            await bus.disconnected()
            log.warning("lost NATS; reconnecting", extra={"fields": {"url": settings.nats_url}})

        async def reconnected() -> None:
            down = time.monotonic() - bus.down_since if bus.down_since is not None else 0.0
            await bus.reconnected()
            log.info("NATS is back", extra={"fields": {"url": settings.nats_url, "seconds": round(down, 3)}})

        async def failed(exc: Exception) -> None:
            """Every asynchronous error: a failed (re)connect attempt while NATS is away, or an
            error on a live connection (a permissions violation, a slow consumer) — which must
            not mark the bus down."""
            if bus.client is not None and bus.client.is_connected:
                log.warning("NATS error", extra={"fields": {"error": repr(exc)}})
                return
            if bus.down_since is None:
                await bus.disconnected()
                log.warning("cannot reach NATS; retrying", extra={"fields": {"url": settings.nats_url,
                                                                              "error": repr(exc)}})

        opts.update(disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=failed)
    if settings.nkey_seed:
        opts["nkeys_seed_str"] = settings.nkey_seed
    elif settings.user:
        opts["user"] = settings.user
        opts["password"] = settings.password or ""
    task = asyncio.ensure_future(nats.connect(**opts))
    if stopping is None:
        nc = await task
        if bus is not None:
            bus.client = nc
        return nc
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if task in done:
        nc = task.result()
        if bus is not None:
            bus.client = nc
        return nc
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise nats.errors.NoServersError()


HARD_STOP_SECONDS = 12.0
"""A process told to stop (SIGTERM/SIGINT) exits within this, whatever it waits on: its parent
(`jobtree up`, a test) may be gone, and with it the SIGKILL that would have followed."""
DRAIN_SECONDS = 3.0


async def run(main: Callable[[ServiceContext], Awaitable[None]], settings: ServiceSettings) -> int:
    """Run one service until it is told to stop; returns the process exit status (1 when it had
    to be cut short after HARD_STOP_SECONDS)."""
    log = service_logger(settings.name)
    time_gc_pauses()
    stopping, bus = asyncio.Event(), BusState()
    loop = asyncio.get_running_loop()

    def hard_exit() -> None:  # a stop stuck on a bus that is gone (a drain, a shielded shutdown)
        log.error("did not stop in time; exiting", extra={"fields": {"seconds": HARD_STOP_SECONDS}})
        logging.shutdown()
        os._exit(1)

    def on_signal() -> None:
        if not stopping.is_set():
            loop.call_later(HARD_STOP_SECONDS, hard_exit)
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    try:
        nc = await connect(settings, bus, stopping)
    except nats.errors.NoServersError:
        log.info("stopped before NATS could be reached")
        return 0
    await bus.reconnected()
    ctx = ServiceContext(settings, nc, nc.jetstream(), log, stopping, bus)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        metrics, _ = start_http_server(max(settings.metrics_port, 0), addr=os.environ.get(METRICS_HOST_ENV) or "127.0.0.1")
        ports.write(settings.data_dir / ports.METRICS_FILE, metrics.server_port)

    async def health(_: bytes) -> bytes:
        return b"ok"

    await ctx.serve(ctx.subject("health"), health)
    log.info("started", extra={"fields": {"cluster": settings.cluster, "clock": settings.clock,
                                          "event_loop": type(asyncio.get_running_loop()).__module__}})
    task: asyncio.Task[None] = asyncio.ensure_future(main(ctx))
    stop = asyncio.create_task(ctx.stopping.wait())
    done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if task in done and task.exception() is not None:
        log.error("service failed", exc_info=task.exception())
        status = 1
    ctx.stopping.set()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    stop.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), DRAIN_SECONDS)
    with contextlib.suppress(Exception):
        await nc.close()
    log.info("stopped")
    return status
