"""Run services as child processes: start, watch, stop (what `jobtree up` uses).

Contract: `Supervisor(data_dir, cluster, nats_url)` starts each service as
`sys.executable -m jobtree.cli.main serve NAME --cluster C --nats URL --data-dir
D/services/NAME --clock K [extra args]`, its credentials and any extra variables passed in the
environment (never on the command line, which every local user can read), stdout and stderr
appended to `D/logs/NAME.log`. Children run in their own session (a Ctrl-C at the terminal
reaches only the supervising process, which stops them in order) and, on Linux, get SIGTERM
if the supervising thread dies. The Supervisor restarts nothing by itself: `exited()` reports
the services that stopped, and a `RestartPolicy` (what `jobtree up` uses) says when to start
each again — after a backoff that doubles with every restart in the last `window` seconds, and
never again once `limit` restarts fall in that window (a crash loop). `stop()` sends SIGTERM to every running service at once
and SIGKILLs those still alive after `timeout` seconds; it returns the exit statuses.
Not: health checks (the caller asks each service's `health` subject), not the nats-server
(see `natsserver`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobtree.bus.natsserver import orphan_safe

__all__ = ["RestartPolicy", "ServiceProcess", "Supervisor", "SupervisorError"]

CREDENTIAL_ENV = ("JOBTREE_NATS_USER", "JOBTREE_NATS_PASSWORD")


class SupervisorError(RuntimeError):
    """A service could not be started."""


@dataclass
class RestartPolicy:
    """When to restart a process that died: `first` seconds after its first death, doubling
    (at most `longest`) with every restart in the last `window` seconds; once `limit` restarts
    fall within the window it is crash-looping and is not restarted again. Times are whatever
    clock the caller passes (monotonic seconds)."""

    first: float = 0.25
    longest: float = 8.0
    window: float = 60.0
    limit: int = 5
    restarts: dict[str, list[float]] = field(default_factory=dict)

    def recent(self, name: str, now: float) -> int:
        """Restarts of `name` in the window ending at `now`."""
        kept = [t for t in self.restarts.get(name, []) if now - t < self.window]
        self.restarts[name] = kept
        return len(kept)

    def delay(self, name: str, now: float) -> float | None:
        """Seconds to wait before restarting `name`, which died at `now`; None: crash loop, give up."""
        n = self.recent(name, now)
        if n >= self.limit:
            return None
        return min(self.longest, self.first * 2 ** n)

    def restarted(self, name: str, at: float) -> None:
        self.restarts.setdefault(name, []).append(at)


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _package_root() -> Path:
    """The directory holding the `jobtree` package (put on the children's PYTHONPATH)."""
    import jobtree

    return Path(next(iter(jobtree.__path__))).resolve().parent


@dataclass
class Supervisor:
    data_dir: Path
    cluster: str
    nats_url: str
    clock: str = "system"
    python: str = sys.executable
    base_env: Mapping[str, str] | None = None
    """The children's environment before credentials (default: this process's, credentials removed)."""
    die_with_parent: bool = True
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def argv(self, name: str, args: Iterable[str] = ()) -> list[str]:
        return [self.python, "-m", "jobtree.cli.main", "serve", name, "--cluster", self.cluster,
                "--nats", self.nats_url, "--data-dir", str(self.data_dir / "services" / name),
                "--clock", self.clock, *args]

    def _env(self, env: Mapping[str, str]) -> dict[str, str]:
        out = dict(self.base_env if self.base_env is not None else os.environ)
        for key in CREDENTIAL_ENV:
            out.pop(key, None)
        root = str(_package_root())
        paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
        out["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p != root)])
        out["PYTHONUNBUFFERED"] = "1"
        out.update(env)
        return out

    def start(self, name: str, *, env: Mapping[str, str] | None = None, args: Iterable[str] = ()) -> ServiceProcess:
        """Start service `name` (credentials and other variables in `env`)."""
        current = self.processes.get(name)
        if current is not None and current.running:
            raise SupervisorError(f"service {name} is already running (pid {current.pid})")
        (self.data_dir / "services" / name).mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        argv = self.argv(name, args)
        with log_path.open("ab") as log:
            log.write(f"--- jobtree supervisor: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    orphan_safe(argv, self.die_with_parent),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env(env or {}),
                    start_new_session=True,
                )
            except OSError as exc:
                raise SupervisorError(f"cannot start service {name}: {exc}") from None
        started = ServiceProcess(name, proc, log_path, argv)
        self.processes[name] = started
        return started

    def exited(self) -> dict[str, int]:
        """Services that have stopped, with their exit statuses."""
        out: dict[str, int] = {}
        for name, sp in self.processes.items():
            code = sp.proc.poll()
            if code is not None:
                out[name] = code
        return out

    def pids(self) -> dict[str, int]:
        return {name: sp.pid for name, sp in self.processes.items() if sp.running}

    def stop(self, names: Iterable[str] | None = None, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM the services (all by default), SIGKILL the ones alive after `timeout` seconds."""
        chosen = [self.processes[n] for n in (names if names is not None else list(self.processes))
                  if n in self.processes]
        for sp in chosen:
            if sp.running:
                with contextlib.suppress(ProcessLookupError):
                    sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        statuses: dict[str, int] = {}
        for sp in chosen:
            try:
                statuses[sp.name] = sp.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                statuses[sp.name] = sp.proc.wait()
        return statuses

    def kill(self, name: str) -> None:
        """SIGKILL one service, as a crash would."""
        sp = self.processes[name]
        if sp.running:
            sp.proc.kill()
            sp.proc.wait()
