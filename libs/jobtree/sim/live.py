"""Play a scenario through the running services (`jobtree sim run FILE --live [NATS_URL]`).

Contract: `play_live(scenario, url=None)` returns exactly what `runner.run_scenario(scenario)`
returns, but every decision is taken by the services over NATS on a virtual clock:
- Without `url` it starts its own nats-server (JetStream in a temporary directory); with one it
  uses that server. Either way it creates the cluster's ledger stream and leader bucket (the
  cluster must not have a ledger yet: a scenario starts from nothing) and starts the services
  it needs — admission, binder and budget — as subprocesses on a virtual clock with the
  scenario's cluster config, waits until each answers `health`, and stops them at the end (and
  the server it started), whatever happened.
- Playing: the scenario's nodes become AddNode commands at the start instant (a Tick when
  there are none, so the view starts at `start`); each step's action becomes the commands of
  `runner._commands`, sent to `jobtree.C.admission.command` with the step's instant. An `apply`
  of several objects is one `Batch` command (the core applies them all, then settles once,
  exactly like the in-process runner); `apply_mode="sequential"` sends them as consecutive
  commands at the same instant instead (not equivalent: the core then settles after each).
  Before a snapshot, and for a step with only `at`, a Tick at the step's instant. Command ids
  are deterministic (`sim:<step>`...), so a retried command (timeout, no responder yet)
  commits once. A snapshot, and the final state, is `budget.state` with
  `min_ledger_sequence` = the highest sequence a reply reported.
- The STATE comes back as a protobuf Struct (numbers as doubles, keys unordered):
  `restore_state` gives it back its exact JSON form — the key order of SCENARIOS.md and
  integers as integers (only `consumedGPUHours` and `unfundedGPUHours` are floats).
- A command the calculus rejects raises ScenarioError naming the step like the in-process
  runner (`steps[3].apply[1].spec.parents: ...`); a service that does not start or answer
  raises LiveError with the tail of its log.
`start_service` / `stop_services` run one service as `jobtree serve NAME --config FILE` (also
used by the end-to-end tests).
Not: the calculus (the services call it), not the services themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
from google.protobuf import json_format

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import codec, subjects
from jobtree.bus.ledger import Ledger
from jobtree.bus.natsserver import NatsServer, orphan_safe
from jobtree.core import facts as F
from jobtree.core.model import ClusterConfig
from jobtree.sim import scenario as S
from jobtree.sim.runner import commands_of

__all__ = [
    "SERVICES",
    "LiveError",
    "play_live",
    "play_live_async",
    "restore_state",
    "start_service",
    "stop_services",
]

SERVICES = ("admission", "binder", "budget")
"""The services a scenario needs: the decision loop, the ledger writer, the STATE reader."""

READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
RETRIES = 5


class LiveError(RuntimeError):
    """The services could not be started or did not answer (not a problem of the scenario)."""


# --- the STATE object back from a Struct -------------------------------------------------------

_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {
    (): ("time", "runs", "leases", "reservations", "budgets", "unfundedGPUHours"),
    ("runs",): ("key", "owner", "phase", "reason", "message", "width", "funding", "reservation",
                "earliestStart"),
    ("runs", "width"): ("min", "max", "desired", "allocated"),
    ("runs", "funding"): ("owned", "shared", "borrowed", "unfunded", "spare"),
    ("leases",): ("name", "run", "owner", "group", "role", "slots", "paidBy", "class", "start", "end",
                  "mintReason", "closureReason"),
    ("leases", "paidBy"): ("budget", "envelope"),
    ("reservations",): ("name", "run", "state", "earliestStart", "deficitGPUs", "seed", "conflictSet"),
    ("budgets",): ("name", "owner", "envelopes"),
    ("budgets", "envelopes"): ("name", "concurrency", "funded", "headroom", "consumedGPUHours"),
    ("budgets", "envelopes", "funded"): ("owned", "shared", "borrowed", "spare"),
}
"""Key order of each object of the STATE (SCENARIOS.md), by its path of keys (lists skipped)."""

_FLOATS = {("budgets", "envelopes", "consumedGPUHours"), ("unfundedGPUHours", "*")}
"""The only numbers of the STATE that are floats; every other number is an integer."""


def restore_state(value: Any, path: tuple[str, ...] = ()) -> Any:
    """A STATE read back from a Struct, in the exact form `views.state_json` gives it."""
    if isinstance(value, dict):
        order = _ORDER.get(path)
        if order is None:  # a map (unfundedGPUHours): keys sorted, like the view sorts them
            return {k: restore_state(value[k], (*path, "*")) for k in sorted(value)}
        keys = [k for k in order if k in value] + sorted(k for k in value if k not in order)
        return {k: restore_state(value[k], (*path, k)) for k in keys}
    if isinstance(value, list):
        return [restore_state(v, path) for v in value]
    if isinstance(value, float):
        if path in _FLOATS:
            return value
        if value.is_integer():
            return int(value)
    return value


# --- services as subprocesses ------------------------------------------------------------------


def config_document(config: ClusterConfig) -> dict[str, Any]:
    """`config` as the mapping `jobtree serve --config FILE` reads (a scenario's `config:` keys)."""
    return {
        "cluster": config.cluster,
        "period": config.period,
        "reservationLead": config.reservation_lead,
        "preemptionHoldDown": config.preemption_hold_down,
        "capAllowances": dict(config.cap_allowances),
    }


@dataclasses.dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {self.name} log ({self.log}) ---\n" + "\n".join(text)


def start_service(
    name: str, cluster: str, url: str, config: ClusterConfig, log_dir: Path, clock: str = "virtual"
) -> Service:
    """`jobtree serve NAME` as a child process, its output appended to `log_dir/<cluster>-<name>.log`."""
    log = log_dir / f"{cluster}-{name}.log"
    config_file = log_dir / f"{cluster}-config.json"
    config_file.write_text(json.dumps(config_document(dataclasses.replace(config, cluster=cluster))))
    argv = [sys.executable, "-m", "jobtree.cli.main", "serve", name, "--cluster", cluster, "--nats", url,
            "--clock", clock, "--config", str(config_file), "--data-dir", str(log_dir)]
    with log.open("ab") as out:
        proc = subprocess.Popen(orphan_safe(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Service(name, proc, log)


def stop_services(services: Sequence[Service], timeout: float = 10.0) -> None:
    for s in services:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for s in services:
        try:
            s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


# --- the player --------------------------------------------------------------------------------


class _Player:
    def __init__(self, nc: Any, cluster: str, services: Sequence[Service]) -> None:
        self.nc = nc
        self.cluster = cluster
        self.services = services
        self.sequence = 0
        self.command_subject = subjects.request(cluster, "admission", "command")
        self.state_subject = subjects.request(cluster, "budget", "state")

    def _check_alive(self) -> None:
        for s in self.services:
            if s.proc.poll() is not None:
                raise LiveError(f"service {s.name} of cluster {self.cluster} exited with status "
                                f"{s.proc.returncode}{s.tail()}")

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for s in self.services:
            subject = subjects.request(self.cluster, s.name, "health")
            while True:
                self._check_alive()
                try:
                    await self.nc.request(subject, b"", timeout=0.5)
                    break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    if time.monotonic() > deadline:
                        raise LiveError(f"service {s.name} did not answer health within "
                                        f"{READY_TIMEOUT:.0f} s{s.tail()}") from None
                    await asyncio.sleep(0.05)

    async def _request(self, subject: str, msg: Any, what: str) -> bytes:
        """Send with retries: no responder yet (a leader being elected), timeouts, services busy."""
        data = codec.encode(msg)
        headers = codec.headers(msg)
        delay = 0.05
        deadline = time.monotonic() + READY_TIMEOUT + REQUEST_TIMEOUT
        while True:
            self._check_alive()
            try:
                reply = await self.nc.request(subject, data, timeout=REQUEST_TIMEOUT, headers=headers)
                return bytes(reply.data)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if time.monotonic() > deadline:
                    raise LiveError(f"{what}: no answer on {subject} ({type(exc).__name__})"
                                    + "".join(s.tail() for s in self.services)) from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def command(self, msg: bus.Command, where: str, apply_index: int | None = None) -> None:
        for attempt in range(RETRIES):
            reply = codec.decode(await self._request(self.command_subject, msg, where), bus.CommandReply)
            if not reply.HasField("error"):
                self.sequence = max(self.sequence, reply.ledger_sequence)
                return
            err = reply.error
            if err.code in REFUSALS:  # the core refused it: the in-process runner's error, in its words
                raise S.ScenarioError(_scenario_message(where, apply_index, err))
            if err.code in (bus.ERROR_CODE_CONFLICT, bus.ERROR_CODE_UNAVAILABLE) and attempt + 1 < RETRIES:
                await asyncio.sleep(0.1 * (attempt + 1))  # same command id: it commits once
                continue
            code = bus.ErrorCode.Name(err.code)
            raise LiveError(f"{where}: admission answered {code}: {err.field_path} {err.problem}".strip())

    async def state(self) -> dict[str, Any]:
        req = bus.StateRequest(min_ledger_sequence=self.sequence)
        for attempt in range(RETRIES):
            reply = codec.decode(await self._request(self.state_subject, req, "state"), bus.StateReply)
            if not reply.HasField("error"):
                out: dict[str, Any] = restore_state(json_format.MessageToDict(reply.state))
                return out
            if reply.error.code != bus.ERROR_CODE_UNAVAILABLE or attempt + 1 == RETRIES:
                raise LiveError(f"budget.state: {reply.error.problem}")
        raise AssertionError("unreachable")


REFUSALS = frozenset({bus.ERROR_CODE_INVALID_ARGUMENT, bus.ERROR_CODE_NOT_FOUND, bus.ERROR_CODE_FAILED_PRECONDITION})
"""Reply codes that mean the core refused the command (`convert.ERROR_CODE_OF_KIND`)."""
_BATCH_ITEM = re.compile(r"^batch\.commands\[(\d+)\]\.?")
_COMMAND_PREFIX = re.compile(r"^(apply_run\.run|apply_budget\.budget)\.?")


def _scenario_message(where: str, apply_index: int | None, err: bus.Error) -> str:
    """A refusal in the words of the in-process runner (`steps[i].apply[j].path: ...`)."""
    path = err.field_path
    m = _BATCH_ITEM.match(path)
    if m:
        apply_index, path = int(m.group(1)), path[m.end():]
    path = _COMMAND_PREFIX.sub("", path)
    if apply_index is not None:
        where += f".apply[{apply_index}]"
    if path:
        return f"{where}.{path}: {err.problem}"
    return f"{where}: {err.problem}"


async def _quiet(_exc: Exception) -> None:
    """nats-py's default error callback prints every failed connection attempt's traceback."""


def _command(cmd: F.Command, command_id: str, instant: int) -> bus.Command:
    msg = convert.command_to_proto(cmd, command_id=command_id, instant=instant)
    msg.identity = "service:sim"
    return msg


def _supports_batch() -> bool:
    return "batch" in bus.Command.DESCRIPTOR.fields_by_name


async def _play(player: _Player, scenario: S.Scenario, apply_mode: str) -> dict[str, Any]:
    start = scenario.start
    if scenario.nodes:
        for i, node in enumerate(scenario.nodes):
            await player.command(_command(F.AddNode(node), f"sim:nodes[{i}]", start), f"nodes[{i}]")
    else:
        await player.command(_command(F.Tick(), "sim:start", start), "start")
    snapshots: dict[str, Any] = {}
    for step in scenario.steps:
        where = f"steps[{step.index}]"
        action = step.action
        if isinstance(action, (S.SnapshotAction, S.NoAction)):
            await player.command(_command(F.Tick(), f"sim:{where}:tick", step.at), where)
            if isinstance(action, S.SnapshotAction):
                snapshots[action.label] = await player.state()
            continue
        cmds = commands_of(action)
        if isinstance(action, S.ApplyAction):
            if apply_mode == "batch" and len(cmds) > 1:
                msg = convert.batch_to_proto(cmds, command_id=f"sim:{where}", instant=step.at)
                msg.identity = "service:sim"
                await player.command(msg, where)
            else:
                for j, cmd in enumerate(cmds):
                    await player.command(_command(cmd, f"sim:{where}.apply[{j}]", step.at), where, j)
        else:
            for j, cmd in enumerate(cmds):
                await player.command(_command(cmd, f"sim:{where}" + (f"[{j}]" if j else ""), step.at), where)
    snapshots[S.FINAL_LABEL] = await player.state()
    return {"snapshots": snapshots}


async def play_live_async(
    scenario: S.Scenario,
    url: str,
    *,
    cluster: str | None = None,
    apply_mode: str | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Play `scenario` through services started for it on the nats-server at `url`.

    `cluster` overrides the scenario's `config.cluster` on the bus (so that several scenarios
    can share one server); the calculus does not read the name, so the output is the same.
    """
    name = subjects.check_cluster(cluster or scenario.config.cluster)
    config = dataclasses.replace(scenario.config, cluster=name)
    mode = apply_mode or ("batch" if _supports_batch() else "sequential")
    if mode not in ("batch", "sequential"):
        raise ValueError(f"apply_mode must be batch or sequential, got {mode!r}")
    own_logs = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="jobtree-live-")) if log_dir is None else log_dir
    try:
        nc = await nats.connect(url, name=f"jobtree-sim-{name}", connect_timeout=5, max_reconnect_attempts=2,
                                reconnect_time_wait=0.2, error_cb=_quiet)
    except Exception as exc:  # nats.errors.NoServersError, OSError, ...
        raise LiveError(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from None
    services: list[Service] = []
    ok = False
    try:
        js = nc.jetstream()
        ledger = Ledger(js, name)
        await ledger.create()
        last = await ledger.last_sequence()
        if last:
            raise LiveError(f"cluster {name} already has a ledger at {url} ({last} batches): a scenario "
                            "starts from nothing; use a fresh nats-server or another config.cluster")
        from jobtree.bus.leader import LEADER_TTL

        with contextlib.suppress(Exception):  # exists already: the services use it as it is
            await js.create_key_value(bucket=subjects.bucket(name, "leader"), ttl=LEADER_TTL, history=1)
        services = [start_service(s, name, url, config, logs) for s in SERVICES]
        player = _Player(nc, name, services)
        await player.wait_ready()
        out = await _play(player, scenario, mode)
        ok = True
        return out
    except S.ScenarioError:
        ok = True
        raise
    finally:
        stop_services(services)
        with contextlib.suppress(Exception):
            await nc.close()
        if own_logs and (ok or not any(logs.iterdir())):  # logs are kept only when there are some
            shutil.rmtree(logs, ignore_errors=True)


def play_live(
    scenario: S.Scenario,
    url: str | None = None,
    *,
    cluster: str | None = None,
    apply_mode: str | None = None,
) -> dict[str, Any]:
    """Play `scenario` through the services; without `url`, on a nats-server of its own."""
    if url:
        return asyncio.run(play_live_async(scenario, url, cluster=cluster, apply_mode=apply_mode))
    work = Path(tempfile.mkdtemp(prefix="jobtree-live-"))
    server = NatsServer(work / "nats", sync_always=True)
    ok = False
    try:
        server.start()
        out = asyncio.run(play_live_async(scenario, server.url, cluster=cluster, apply_mode=apply_mode,
                                          log_dir=work))
        ok = True
        return out
    except S.ScenarioError:
        ok = True
        raise
    finally:
        server.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"jobtree: live: logs kept in {work}", file=sys.stderr)
