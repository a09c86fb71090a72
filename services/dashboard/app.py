"""The dashboard's HTTP routes (aiohttp): the page, the JSON views, the live stream.

Part of the dashboard service (see its package docstring for the routes). `Board` is what the
routes read: the follower (on demand: every route catches it up first, `fresh`, and `pump`
keeps it caught up every PUSH_EVERY seconds only while a page has its stream open), the burn
history, and one `asyncio.Event` per open stream, set by the follower listener `changed` (one
event each: a shared condition would wake every stream under one lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from jobtree.core.timefmt import format_time
from jobtree.services.dashboard import views

STATIC = Path(__file__).resolve().parent / "static"
PUSH_EVERY = 0.25
"""Seconds between two pushes to one stream (a burst of ledger batches is one refresh)."""
KEEPALIVE = 15.0


class Board:
    def __init__(self) -> None:
        self.follower: Any = None
        self.history: views.BurnHistory | None = None
        self.clock: Any = None
        """Where "now" comes from for the budgets' GPU-hours (None or a virtual clock: the view's)."""
        self.streams: set[asyncio.Event] = set()
        self.closing = asyncio.Event()
        self.log: Any = None

    async def fresh(self) -> None:
        """Catch the view up with the ledger before a read (a NATS error is logged: the read
        answers from the view at its sequence)."""
        await self.follower.catch_up(self.log)

    async def pump(self) -> None:
        """While a page has its stream open, catch up every PUSH_EVERY seconds (each applied
        batch sets the streams' events); with none open the view applies nothing."""
        while not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), PUSH_EVERY)
            if self.streams and not self.closing.is_set():
                await self.fresh()

    def changed(self, _sequence: int, _batch: object) -> None:
        for event in self.streams:
            event.set()

    def close(self) -> None:
        self.closing.set()
        for event in self.streams:
            event.set()

    def payload(self, doc: dict[str, Any]) -> web.Response:
        doc["sequence"] = self.follower.sequence
        return web.json_response(doc, headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def routes(board: Board) -> web.Application:
    app = web.Application()

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def healthz(_: web.Request) -> web.Response:
        if board.follower is None:
            return web.Response(status=503, text="catching up with the ledger\n")
        return web.Response(text="ok\n")

    async def fleet(_: web.Request) -> web.Response:
        await board.fresh()
        return board.payload(views.fleet(board.follower.cluster))

    async def budgets(_: web.Request) -> web.Response:
        await board.fresh()
        at = board.clock.now() if board.clock is not None else None
        return board.payload(views.budgets(board.follower.cluster, board.history, at))

    async def queue(_: web.Request) -> web.Response:
        await board.fresh()
        return board.payload(views.queue(board.follower.cluster))

    async def runs(_: web.Request) -> web.Response:
        await board.fresh()
        cl = board.follower.cluster
        rows = [{"key": k, "owner": cl.runs[k].spec.owner, "phase": cl.status[k].phase.value}
                for k in sorted(cl.runs) if k in cl.status]
        return board.payload({"time": format_time(cl.now), "runs": rows})

    async def one_run(request: web.Request) -> web.Response:
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        await board.fresh()
        doc = views.run(board.follower.cluster, key)
        if doc is None:
            return _error(404, f"runs/{key}: no such run in the cluster's view")
        return board.payload(doc)

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await board.fresh()
        event = asyncio.Event()
        event.set()
        board.streams.add(event)
        try:
            while not board.closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), KEEPALIVE)
                if board.closing.is_set():
                    break
                if not event.is_set():
                    await response.write(b": keepalive\n\n")
                    continue
                event.clear()
                cl = board.follower.cluster
                data = json.dumps({"sequence": board.follower.sequence, "time": format_time(cl.now)})
                await response.write(f"event: ledger\ndata: {data}\n\n".encode())
                await asyncio.sleep(PUSH_EVERY)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            board.streams.discard(event)
        return response

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_get("/api/budgets", budgets)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/runs", runs)
    app.router.add_get("/api/runs/{namespace}/{name}", one_run)
    app.router.add_get("/api/stream", stream)
    app.router.add_static("/static/", STATIC)
    return app


async def serve_http(board: Board, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the routes on host:port; (the runner to clean up, the bound port)."""
    runner = web.AppRunner(routes(board), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
