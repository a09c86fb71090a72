"""Ports and processes of `jobtree up`: free ports, the nats-server's kept port, and the keeper
that restarts what dies (part of `up_cmd`, whose contract item 6 it implements; `up_federation`
uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from jobtree.cli.sim_cmd import CliError

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0


class UpError(Exception):
    """`jobtree up` could not start: printed as one line, exit status 1."""


def _say(text: str, stream: IO[str] | None = None) -> None:
    print(text, file=stream or sys.stderr, flush=True)


def _finish(server: Any, state_path: Path, loop: asyncio.AbstractEventLoop, ready: bool) -> None:
    """The end of `up`: its nats-server stopped, `up.json` removed, the signal handlers given back."""
    server.stop()
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    if ready:
        _say("jobtree up: stopped")


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def accepts(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def check_metrics_base(base: int, count: int, grpc_port: int) -> None:
    """CliError (one line) unless `count` ports from `base` are usable (base 0: pick free ones)."""
    if base == 0:
        return
    last = base + count - 1
    if base < 0 or last > 65535:
        raise CliError(f"--metrics-port-base: {count} ports from {base} must be port numbers "
                       f"(at most {65535 - count + 1}; 0 for free ports), got {base}")
    if grpc_port and base <= grpc_port <= last:
        raise CliError(f"--metrics-port-base: ports {base}-{last} include the --grpc-port {grpc_port}; "
                       "pick another base or 0 for free ports")
    busy = [p for p in range(base, last + 1) if port_in_use(p)]
    if busy:
        raise CliError(f"--metrics-port-base: {HOST}:{busy[0]} is in use (ports {base}-{last} are needed); "
                       "pick another base or 0 for free ports")


SUPERVISE_EVERY = 0.1
"""Seconds between looks at the processes `up` supervises."""
NATS = "nats-server"


def _kept_nats_port(nats_dir: Path) -> int:
    """The nats-server's client port kept from the first start (-1: let it choose, first time)."""
    with contextlib.suppress(OSError, ValueError):
        port = int((nats_dir / "client.port").read_text())
        if 0 < port <= 65535:
            return port
    return -1


def _keep_nats_port(server: Any) -> None:
    """Remember the port the server listens on, for every later start and restart."""
    from urllib.parse import urlsplit

    port = urlsplit(server.url).port
    path = server.data_dir / "client.port"
    if port and _kept_nats_port(server.data_dir) != port:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, path)
    server.port = port or server.port


def _status_text(code: int | None) -> str:
    if code is None:
        return "status unknown"
    return f"signal {-code}" if code < 0 else f"status {code}"


class _Keeper:
    """Restarts what dies (see the contract, item 6): one line when a process dies, one when it
    is back, one when it is given up on. `tend(now)` looks once; False when the nats-server is
    crash-looping (then `up` ends)."""

    def __init__(self, server: Any, supervisor: Any, start: Any, saved: Any) -> None:
        from jobtree.bus.supervisor import RestartPolicy

        self.server, self.supervisor, self.start, self.saved = server, supervisor, start, saved
        self.policy = RestartPolicy()
        self.due: dict[str, float] = {}
        """Process -> when it is to be restarted."""
        self.given_up: set[str] = set()
        self.restarts: dict[str, int] = {}
        """Process -> how often it was restarted (up.json's `restarts`)."""

    def _died(self, name: str, code: int | None, log: Path, now: float) -> bool:
        delay = self.policy.delay(name, now)
        if delay is None:
            self.given_up.add(name)
            _say(f"jobtree up: {name} died ({_status_text(code)}) and is crash-looping "
                 f"({self.policy.limit} restarts within {self.policy.window:.0f} s); not restarting it; see {log}")
            return False
        self.due[name] = now + delay
        _say(f"jobtree up: {name} died ({_status_text(code)}); restarting it in {delay:g} s "
             f"(restart {self.policy.recent(name, now) + 1} within {self.policy.window:.0f} s); see {log}")
        return True

    async def run(self, stop: asyncio.Event) -> int:
        """Tend until `stop` is set: 0, or 1 once the nats-server is crash-looping."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SUPERVISE_EVERY)
            if not stop.is_set() and not self.tend(time.monotonic()):
                return 1
        _say("jobtree up: stopping")
        return 0

    def tend(self, now: float) -> bool:
        from jobtree.bus.natsserver import NatsServerError
        from jobtree.bus.supervisor import SupervisorError

        if NATS not in self.due and NATS not in self.given_up:
            code = self.server.reap()
            if code is not None and not self._died(NATS, code, self.server.log_path, now):
                return False
        for name, code in self.supervisor.exited().items():
            if name not in self.due and name not in self.given_up:
                self._died(name, code, self.supervisor.processes[name].log_path, now)
        for name, at in sorted(self.due.items(), key=lambda item: item[1]):
            if at > now:
                continue
            del self.due[name]
            self.policy.restarted(name, now)
            try:
                if name == NATS:
                    self.server.start()
                    pid = self.server.pid
                else:
                    self.start(name)
                    pid = self.supervisor.processes[name].pid
            except (NatsServerError, SupervisorError, UpError) as e:
                _say(f"jobtree up: {name} could not be restarted: {' '.join(str(e).split())}")
                if not self._died(name, None, Path("-"), now) and name == NATS:
                    return False
                continue
            self.restarts[name] = self.restarts.get(name, 0) + 1
            _say(f"jobtree up: {name} restarted (pid {pid})")
            self.saved()
        return True


async def _until(stop: asyncio.Event, work: Any) -> bool:
    """Run `work` unless `stop` is set first (then False)."""
    task = asyncio.ensure_future(work)
    halt = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, halt}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        halt.cancel()
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False


async def _poll(sp: Any, name: str, ok: Any, what: str, deadline: float) -> None:
    """Until `ok()`; UpError naming the log if the process `name` exits or the deadline passes."""
    while True:
        if await ok():
            return
        if not sp.running:
            raise UpError(f"service {name} exited with status {sp.proc.returncode} while starting; "
                          f"see {sp.log_path}")
        if time.monotonic() > deadline:
            raise UpError(f"service {name} did not {what} within {READY_TIMEOUT:.0f} s; see {sp.log_path}")
        await asyncio.sleep(0.1)
