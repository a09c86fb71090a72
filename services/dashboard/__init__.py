"""dashboard: the fleet, budgets, queue and runs as a live web page, from a ledger follower.

Contract: `main(ctx)` reads the cluster's ledger on demand (`bus.follower.follow(push=False)`,
with a `views.BurnHistory` listening, so every envelope's burn curve is drawn from the batches
it applies, from the snapshot it started from on): every route catches the view up first, and
while a page has `/api/stream` open it is caught up every `PUSH_EVERY` seconds; with no page
open it applies nothing (after a long quiet it adopts the newest snapshot, and the burn curve
draws the stretch it skipped as a straight line: `docs/design/read-views.md`) and serves HTTP on `$JOBTREE_HTTP_HOST:$JOBTREE_HTTP_PORT` (default 127.0.0.1:8080; port 0
picks a free one). Once bound it logs `{"msg": "http listening", "port": N}` and writes N to
`<data_dir>/dashboard.port` (removed on a clean stop). Routes (`app`):
- `/` the page (`static/index.html`: views `#/fleet`, `#/budgets`, `#/queue`, `#/runs/NS/NAME`);
- `/api/fleet`, `/api/budgets` (GPU-hours carried forward to the wall clock at the funded
  widths, on a system clock: the view only moves at ledger facts), `/api/queue`, `/api/runs` (every run: key, owner, phase),
  `/api/runs/{namespace}/{name}`: JSON of `views`, each with the `sequence` it was read at;
  an unknown run is 404 with `{"error": ...}` naming it;
- `/api/stream`: server-sent events — `event: ledger` with `{"sequence", "time"}` at once and
  whenever the view moves (at most every `PUSH_EVERY` seconds), a comment every `KEEPALIVE`
  seconds; the page refetches the view it shows on each;
- `/healthz`: 200 once the follower has caught up (503 before).
It decides nothing and writes nothing: its NATS user may only follow the ledger. Identity and
authorisation are the gateway's once it has them (issue 9); until then it listens on loopback
by default and shows what any reader of the ledger could read.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from jobtree.bus import ports
from jobtree.bus.follower import Listener, follow
from jobtree.bus.runtime import ServiceContext, listen_address
from jobtree.services.dashboard.app import PUSH_EVERY, Board, serve_http
from jobtree.services.dashboard.views import BurnHistory

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "PORT_FILE", "PUSH_EVERY", "http_address", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
PORT_FILE = ports.DASHBOARD_FILE


def http_address() -> tuple[str, int]:
    return listen_address("JOBTREE_HTTP_HOST", "JOBTREE_HTTP_PORT", DEFAULT_HOST, DEFAULT_PORT)


async def main(ctx: ServiceContext) -> None:
    host, port = http_address()
    history = BurnHistory()
    board = Board()
    follower = await follow(ctx, listeners=[history, Listener(board.changed, lambda _follower: None)], push=False)
    if follower is None:
        return
    board.follower, board.history, board.log = follower, history, ctx.log
    board.clock = ctx.clock
    pump = asyncio.ensure_future(board.pump())
    runner, bound = await serve_http(board, host, port)
    port_file = ctx.settings.data_dir / PORT_FILE
    ports.write(port_file, bound)
    ctx.log.info("http listening", extra={"fields": {"port": bound, "host": host}})
    try:
        await ctx.stopping.wait()
    finally:
        board.close()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        await runner.cleanup()
        await follower.stop()
        with contextlib.suppress(FileNotFoundError):
            Path(port_file).unlink()
