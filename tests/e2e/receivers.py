"""Real receivers for the notifier tests: an aiohttp server standing in for Slack and webhooks,
and an aiosmtpd SMTP server. Both record what they received and can be scripted to refuse."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Http:
    """POSTs to /<path> recorded in `got[path]` (body, content type, monotonic time). `script[path]`
    is a list of (status, headers) answered before the default 200."""

    url: str = ""
    got: dict[str, list[tuple[Any, str, float]]] = field(default_factory=dict)
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.strip("/")
        self.tries[path] = self.tries.get(path, 0) + 1
        queue = self.script.get(path) or []
        if queue:
            status, headers = queue.pop(0)
            return web.Response(status=status, headers=headers, text="scripted")
        self.got.setdefault(path, []).append((json.loads(await request.text()),
                                              request.headers.get("Content-Type", ""), time.monotonic()))
        return web.Response(text="ok")


@contextmanager
def http_receiver() -> Iterator[Http]:
    """The receiver on a loopback port, served from a thread of its own (its own event loop)."""
    rec = Http()
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    runner: list[web.AppRunner] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_post("/{tail:.*}", rec.handle)
        r = web.AppRunner(app)
        loop.run_until_complete(r.setup())
        site = web.TCPSite(r, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        rec.url = f"http://127.0.0.1:{port}"
        runner.append(r)
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield rec
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class Mailbox:
    """An SMTP handler: messages in `messages`; the first `refuse` deliveries get 451."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.refuse = 0
        self.tries = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.tries += 1
        if self.refuse > 0:
            self.refuse -= 1
            return "451 4.3.0 try again later"
        assert isinstance(envelope.content, bytes)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))  # type: ignore[arg-type]
        return "250 OK"


@contextmanager
def smtp_server() -> Iterator[tuple[Mailbox, str]]:
    box = Mailbox()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, f"127.0.0.1:{port}"
    finally:
        controller.stop()
