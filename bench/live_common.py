"""Shared harness of the live-system benchmarks (issue 3, item 9): not a benchmark itself.

Contract:
- `Up(data_dir, clock=...)` runs `jobtree up --no-demo --grpc-port 0 --data-dir D --clock K` as a
  subprocess (its stderr to `D.up.err`), waits for the `grpc:` line, and `stop()`s it with
  SIGINT (up's Ctrl-C), SIGKILL only if it does not exit within a bound; use it as a context
  manager so nothing is left running. `pids()` lists up, its nats-server and every service
  (from `D/up.json`) and `cpu()` samples their CPU seconds from /proc (utime + stime), so a
  phase can report where the CPU went on a shared machine.
- Fleet builders: `make_nodes(n)` (8-GPU H100-80GB nodes, 32 per fabric domain) and
  `make_budgets(k, fleet)` (k team budgets under one parent owner, envelopes summing to the
  fleet), and `load_fleet(...)`, which sends the nodes to admission as admin over NATS in
  `Batch` commands and the budgets through gRPC `ApplyBudget`.
- Output helpers (table, progress on stderr, one JSON line) and `machine()`.
Not: part of the installed package; the core benchmarks' `_world.py` is owned elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
FLAVOR = "H100-80GB"
GPUS_PER_NODE = 8
NODES_PER_DOMAIN = 32
REGION = "bench"
ROOT_OWNER = "org:bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit_json(obj: dict[str, object]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    return {"code": code_version(), "python": platform.python_version(), "platform": platform.platform(), "cpu_model": model,
            "nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit}


def code_version() -> dict[str, object]:
    """Which code was measured: where `jobtree` was imported from (a pinned `git archive` put
    first on PYTHONPATH, or the working tree), a digest of its sources (services included), the
    commit of the working tree and the paths that differ from it (the code is edited
    concurrently)."""
    import hashlib

    import jobtree

    root = Path(next(iter(jobtree.__path__))).resolve()
    digest = hashlib.sha256()
    for base in (root, (root / "services").resolve()):
        for f in sorted(base.rglob("*.py")):
            digest.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes())
    dirty = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "libs", "services"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout
    return {"imported_from": str(root), "sha256": digest.hexdigest()[:16],
            "worktree_dirty": sorted(line[3:] for line in dirty.splitlines())}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(c: object) -> str:
        if isinstance(c, float):
            if c != c:  # nan
                return "-"
            if abs(c) >= 100:
                return f"{c:,.0f}"
            if abs(c) >= 10:
                return f"{c:.1f}"
            return f"{c:.2f}"
        if isinstance(c, int):
            return f"{c:,}"
        return "-" if c is None else str(c)

    cells = [[str(h) for h in headers], *[[fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


# --- CPU accounting ------------------------------------------------------------------------


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --- jobtree up ----------------------------------------------------------------------------


class Up:
    """A `jobtree up` subprocess on a data directory."""

    def __init__(self, data_dir: Path, *, clock: str = "system", cluster: str = "demo",
                 env: dict[str, str] | None = None, ready_timeout: float = 90.0) -> None:
        self.data_dir = Path(data_dir)
        self.clock = clock
        self.cluster = cluster
        self.env = env
        self.ready_timeout = ready_timeout
        self.extra_args: list[str] = []
        """More `jobtree up` arguments (e.g. `--admission-replicas 1`)."""
        self.proc: subprocess.Popen[str] | None = None
        self.grpc = ""
        self.nats = ""
        self.lines: queue.Queue[str] = queue.Queue()
        self._err: IO[str] | None = None
        self.started_s = 0.0

    @property
    def err_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".up.err")

    def start(self) -> Up:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._err = self.err_path.open("w")
        env = {**os.environ, **(self.env or {})}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobtree.cli.main", "up", "--insecure", "--data-dir", str(self.data_dir), "--grpc-port", "0",
             "--no-demo", "--clock", self.clock, "--cluster", self.cluster, *self.extra_args],
            cwd=REPO, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.grpc:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"jobtree up not ready (status {self.proc.returncode}):\n"
                                       f"{self.err_path.read_text()[-3000:]}") from None
                continue
            key, _, value = line.partition(": ")
            if key == "nats":
                self.nats = value
            elif key == "grpc":
                self.grpc = value
        self.started_s = time.perf_counter() - t0
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "up.json").read_text())
        return doc

    def secrets(self) -> Any:
        """The NATS credentials `jobtree up` made (`jobtree.bus.security.Secrets`: nkey seeds)."""
        from jobtree.bus.security import Secrets

        return Secrets.load(self.data_dir / "secrets.json")

    def pids(self) -> dict[str, int]:
        st = self.state()
        out = {"up": int(st["pid"]), "nats-server": int(st["nats_pid"])}
        out.update({name: int(pid) for name, pid in st["services"].items()})
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of up, its nats-server and every service."""
        out = {}
        for name, pid in self.pids().items():
            c = proc_cpu(pid)
            if c is not None:
                out[name] = c
        return out

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGINT (Ctrl-C), then SIGKILL if up has not exited within `timeout` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                progress(f"jobtree up (pid {self.proc.pid}) did not stop within {timeout:.0f}s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()
            self._err = None
        return self.proc.returncode

    def __enter__(self) -> Up:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


# --- the fleet -----------------------------------------------------------------------------


def make_nodes(n: int, cluster: str) -> list[Any]:
    from jobtree.core.model import Node, labels_of

    return [Node(f"n{i:05d}", GPUS_PER_NODE, labels_of({
        "region": REGION, "cluster": cluster, "fabric.domain": f"fd{i // NODES_PER_DOMAIN:03d}",
        "gpu.flavor": FLAVOR})) for i in range(n)]


def team_owner(i: int) -> str:
    return f"{ROOT_OWNER}:t{i:02d}"


def make_budgets(k: int, fleet_gpus: int) -> list[Any]:
    """`k` team budgets (siblings under ROOT_OWNER, so family sharing applies), each an envelope
    of an equal share of the fleet."""
    from jobtree.core.model import Budget, Envelope, labels_of

    share = max(8, fleet_gpus // k)
    sel = labels_of({"region": REGION})
    return [Budget(f"team-{i:02d}", team_owner(i), (ROOT_OWNER,), None, (Envelope("main", FLAVOR, sel, share),))
            for i in range(k)]


async def admin_nats(up: Up) -> Any:
    import nats

    async def quiet(_: Exception) -> None:
        pass

    # replies come to `_INBOX.jobtree.<c>.bench.…`, where the bus tap (live_tap.py) sees them
    return await nats.connect(up.nats, **up.secrets().connect_options("admin"), connect_timeout=5,
                              allow_reconnect=False, error_cb=quiet, name="jobtree-bench",
                              inbox_prefix=f"_INBOX.jobtree.{up.cluster}.bench".encode())


async def load_fleet(up: Up, stub: Any, nodes: int, budgets: int, batch: int = 100) -> dict[str, float]:
    """AddNode Batch commands (as admin, straight to admission) and ApplyBudget over gRPC."""
    from jobtree.api import convert
    from jobtree.api.jobtree.v1 import bus_pb2 as bus
    from jobtree.api.jobtree.v1 import service_pb2 as api
    from jobtree.bus import subjects
    from jobtree.core import facts

    fleet = make_nodes(nodes, up.cluster)
    nc = await admin_nats(up)
    subject = subjects.request(up.cluster, "admission", "command")
    t0 = time.perf_counter()
    try:
        for i in range(0, len(fleet), batch):
            cmd = convert.batch_to_proto([facts.AddNode(n) for n in fleet[i:i + batch]],
                                         command_id=f"bench-nodes-{i:05d}", instant=int(time.time()))
            for attempt in range(20):
                try:
                    raw = await nc.request(subject, cmd.SerializeToString(), timeout=30.0)
                except Exception as exc:  # no leader yet: retry the same command id
                    if attempt == 19:
                        raise
                    progress(f"AddNode batch {i}: {exc!r}; retrying")
                    await asyncio.sleep(0.5)
                    continue
                reply = bus.CommandReply.FromString(raw.data)
                if reply.error.code == bus.ERROR_CODE_UNAVAILABLE and attempt < 19:
                    await asyncio.sleep(0.5)
                    continue
                if reply.error.code != bus.ERROR_CODE_UNSPECIFIED:
                    raise RuntimeError(f"AddNode batch {i} refused: {reply.error}")
                break
    finally:
        await nc.close()
    t1 = time.perf_counter()
    for b in make_budgets(budgets, nodes * GPUS_PER_NODE):
        await stub.ApplyBudget(api.ApplyBudgetRequest(budget=convert.budget_to_proto(b),
                                                      request_id=f"bench-budget-{b.name}"), timeout=30)
    t2 = time.perf_counter()
    return {"nodes_s": round(t1 - t0, 3), "budgets_s": round(t2 - t1, 3)}
