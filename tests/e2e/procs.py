"""Helpers of the decision-path and crash tests: services as real processes, a client that
retries like a real one, and the ledger checks shared by both test files.

Every service runs as its own process, `python -m jobtree.cli.main serve NAME --cluster C
--nats URL --clock virtual`, in a session of its own (a Ctrl-C for pytest is not delivered to
it twice), stdout to /dev/null and stderr (its JSON log lines) appended to one log file per
service instance, so the lines of every life of a restarted service are kept. On Linux a
child also gets SIGKILL when the test process dies, so even a killed test run leaves no
process behind; `Services.stop_all()` (called from the tests' fixtures) kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.ledger import Ledger, Record
from jobtree.bus.natsserver import orphan_safe
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.invariants import check_all, check_audit
from jobtree.core.model import Budget, ClusterConfig, Envelope, Node, labels_of

T0 = 1_767_571_200  # 2026-01-05T00:00:00Z
FLAVOR = "H100-80GB"

RETRYABLE = frozenset({bus.ERROR_CODE_UNAVAILABLE, bus.ERROR_CODE_CONFLICT, bus.ERROR_CODE_STALE_EPOCH})
"""Reply errors a client answers by sending the same command (same id) again."""


# --- processes -------------------------------------------------------------------------------

@dataclass
class Service:
    """One service instance (`tag`), restartable; every life logs to the same file."""

    name: str
    tag: str
    cluster: str
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every life, besides this process's own."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "jobtree.cli.main", "serve", self.name, "--cluster", self.cluster,
                "--nats", self.url, "--clock", "virtual", "--data-dir", str(self.log_path.parent)]

    def defaults(self) -> dict[str, str]:
        """A gateway serves plain loopback gRPC unless the test gives it TLS (tests/e2e/test_trust.py)."""
        return {"JOBTREE_GRPC_INSECURE": "1"} if self.name == "gateway" and not self.env.get("JOBTREE_POLICY") else {}

    def start(self) -> Service:
        assert not self.running, f"{self.tag} is already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                orphan_safe(self.argv()), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, env={**os.environ, **self.defaults(), **self.env},
            )
        self.pids.append(self.proc.pid)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """`kill -9`: no cleanup of any kind (the leader lock is left to lapse)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """A graceful stop (SIGTERM); SIGKILL if it is still alive after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def leader_terms(self) -> list[tuple[int, str]]:
        """(epoch, holder) of every term this instance led, in order (its `leader` log lines)."""
        return [(int(d["epoch"]), str(d["holder"])) for d in self.log_lines() if d.get("msg") == "leader"]


@dataclass
class Services:
    """The service processes of one test; `stop_all()` leaves none behind."""

    cluster: str
    url: str
    log_dir: Path
    all: dict[str, Service] = field(default_factory=dict)

    def start(self, name: str, tag: str | None = None, env: dict[str, str] | None = None) -> Service:
        tag = tag or name
        svc = self.all.get(tag)
        if svc is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            svc = self.all[tag] = Service(name, tag, self.cluster, self.url, self.log_dir / f"{tag}.log")
        if env is not None:
            svc.env = env
        return svc.start()

    def __getitem__(self, tag: str) -> Service:
        return self.all[tag]

    def stop_all(self) -> None:
        for svc in self.all.values():
            if svc.running:
                with contextlib.suppress(Exception):
                    svc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + 5.0
        for svc in self.all.values():
            if svc.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                svc.proc.wait(max(0.1, deadline - time.monotonic()))
            if svc.proc.poll() is None:
                svc.proc.kill()
                svc.proc.wait(10)

    def logs(self, tail: int = 30) -> str:
        """The tail of every service's log (for assertion messages)."""
        out = []
        for svc in self.all.values():
            lines = svc.log().splitlines()[-tail:]
            out.append(f"--- {svc.tag} (pids {svc.pids}) ---\n" + "\n".join(lines))
        return "\n".join(out)


# --- talking to the services -----------------------------------------------------------------


def command_subject(cluster: str) -> str:
    return subjects.request(cluster, "admission", "command")


def commit_subject(cluster: str) -> str:
    return subjects.request(cluster, "binder", "commit")


async def send(nc: Client, cluster: str, cmd: bus.Command, timeout: float = 10.0) -> bus.CommandReply:
    """One request to the decision loop (no retry)."""
    raw = await nc.request(command_subject(cluster), cmd.SerializeToString(), timeout=timeout)
    return bus.CommandReply.FromString(raw.data)


async def append(nc: Client, cluster: str, req: bus.AppendRequest, timeout: float = 10.0) -> bus.AppendReply:
    raw = await nc.request(commit_subject(cluster), req.SerializeToString(), timeout=timeout)
    return bus.AppendReply.FromString(raw.data)


@dataclass
class Delivery:
    reply: bus.CommandReply
    attempts: int
    seconds: float


async def deliver(nc: Client, cluster: str, cmd: bus.Command, *, attempt_timeout: float = 3.0,
                  deadline: float = 30.0, pause: float = 0.05) -> Delivery:
    """Send `cmd` until the decision loop answers it, always with the same command id, as a
    client would: a timeout, no responders or a retryable error (UNAVAILABLE, CONFLICT,
    STALE_EPOCH) means "send it again". Returns the first other reply."""
    assert cmd.command_id, "a retried command needs a command id"
    started = time.monotonic()
    attempts = 0
    last: object = None
    while time.monotonic() - started < deadline:
        attempts += 1
        try:
            reply = await send(nc, cluster, cmd, timeout=attempt_timeout)
        except nats.errors.NoRespondersError as exc:
            last = exc
            await asyncio.sleep(pause)
            continue
        except nats.errors.TimeoutError as exc:
            last = exc
            continue
        if reply.HasField("error") and reply.error.code in RETRYABLE:
            last = reply.error
            await asyncio.sleep(pause)
            continue
        return Delivery(reply, attempts, time.monotonic() - started)
    raise AssertionError(f"command {cmd.command_id} not answered within {deadline} s "
                         f"({attempts} attempts; last: {last!r})")


async def wait_admission(nc: Client, cluster: str, timeout: float = 20.0) -> None:
    """Until a decision-loop leader answers (an empty Command: rejected, nothing written)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await send(nc, cluster, bus.Command(), timeout=0.5)
            assert reply.error.code == bus.ERROR_CODE_INVALID_ARGUMENT, reply
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(f"no admission leader answered within {timeout} s") from None
            await asyncio.sleep(0.05)


async def wait_binder(nc: Client, cluster: str, timeout: float = 20.0) -> None:
    """Until the binder serves `commit` (an empty batch at epoch 0: refused, nothing written)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await append(nc, cluster, bus.AppendRequest(epoch=0, msg_id="probe"), timeout=0.5)
            assert reply.HasField("error"), reply
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise AssertionError(f"the binder did not serve commit within {timeout} s") from None
            await asyncio.sleep(0.05)


async def read_ledger(nc: Client, cluster: str) -> list[Record]:
    return await Ledger(nc.jetstream(), cluster).replay()


async def last_sequence(nc: Client, cluster: str) -> int:
    return await Ledger(nc.jetstream(), cluster).last_sequence()


async def create_ledger(nc: Client, cluster: str) -> None:
    await Ledger(nc.jetstream(), cluster).create()


# --- the cluster the tests use -----------------------------------------------------------------


def node(name: str, domain: str) -> Node:
    return Node(name, 8, labels_of({"region": "eu", "cluster": "e2e", "fabric.domain": domain,
                                    "gpu.flavor": FLAVOR}))


def nodes(domains: Sequence[str] = ("A", "B", "C"), per_domain: int = 4) -> list[Node]:
    return [node(f"{d.lower()}-{i:02d}", d) for d in domains for i in range(per_domain)]


def budget(name: str, owner: str, concurrency: int) -> Budget:
    return Budget(name, owner, envelopes=(Envelope("main", FLAVOR, labels_of({"cluster": "e2e"}), concurrency),))


# --- ledger checks ---------------------------------------------------------------------------


def entries(records: Iterable[Record]) -> list[F.JournalEntry]:
    return [convert.entry_from_proto(e) for r in records for e in r.batch.entries]


def replayed(records: Sequence[Record], cluster: str) -> Cluster:
    """The view the ledger alone gives (`Cluster.replay`, deciding nothing), as every follower
    and a restarted decision loop see it."""
    return Cluster.replay(ClusterConfig(cluster=cluster), (), 0, entries(records))


def command_ids_by_record(records: Sequence[Record]) -> dict[str, list[int]]:
    """Command id -> the sequences of the records that carry it (a record may carry several
    commands: admission commits what it decided together as one message). Entries of no
    command (the clock moving to now before a group, on the system clock) are left out."""
    out: dict[str, list[int]] = {}
    for r in records:
        for cid in dict.fromkeys(e.command_id for e in r.batch.entries if e.command_id):
            out.setdefault(cid, []).append(r.sequence)
    return out


def check_ledger(records: Sequence[Record], cluster: str, acked: dict[str, int]) -> Cluster:
    """No command decided twice or lost, no lease lost or duplicated, every §10 property of
    the replayed view. `acked` maps every acknowledged command id to the sequence its reply
    named. Returns the replayed view."""
    seqs = [r.sequence for r in records]
    assert seqs == list(range(1, len(records) + 1)), f"ledger sequences have gaps: {seqs}"
    by_id = command_ids_by_record(records)
    twice = {c: s for c, s in by_id.items() if len(s) > 1}
    assert not twice, f"commands committed more than once: {twice}"
    missing = sorted(set(acked) - set(by_id))
    assert not missing, f"acknowledged commands missing from the ledger: {missing}"
    unknown = sorted(set(by_id) - set(acked))
    assert not unknown, f"ledger records of commands nobody acknowledged: {unknown}"
    wrong = {c: (s, by_id[c][0]) for c, s in acked.items() if by_id[c][0] != s}
    assert not wrong, f"replies named other sequences than the ledger holds (reply, ledger): {wrong}"
    minted: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    for r in records:
        for e in r.batch.entries:
            which = e.WhichOneof("fact")
            if which == "lease_minted":
                name = e.lease_minted.lease.metadata.name
                assert closed[name] == 0, f"lease {name} minted after it was closed (record {r.sequence})"
                minted[name] += 1
            elif which == "lease_closed":
                name = e.lease_closed.name
                assert minted[name] == 1, f"lease {name} closed but never minted (record {r.sequence})"
                closed[name] += 1
    assert all(n == 1 for n in minted.values()), f"leases minted twice: {[k for k, n in minted.items() if n > 1]}"
    assert all(n <= 1 for n in closed.values()), f"leases closed twice: {[k for k, n in closed.items() if n > 1]}"
    epochs = [max(e.epoch for e in r.batch.entries) for r in records]
    assert epochs == sorted(epochs), f"fencing epochs go backwards in the ledger: {epochs}"
    view = replayed(records, cluster)
    check_all(view)
    check_audit(view, view.started, [])
    return view


@dataclass
class Reference:
    """The same commands played in-process: what the services must have decided."""

    cluster: str
    view: Cluster = field(init=False)

    def __post_init__(self) -> None:
        self.view = Cluster(ClusterConfig(cluster=self.cluster), (), 0)

    def play(self, cmd: bus.Command) -> None:
        self.view.advance(int(cmd.instant.seconds))
        self.view.submit(*convert.commands_from_proto(cmd))


def assert_same_view(live: Cluster, ref: Cluster) -> None:
    """The replayed ledger and the in-process play hold the same decisions."""
    assert set(live.leases) == set(ref.leases), (
        f"leases differ: only live {sorted(set(live.leases) - set(ref.leases))[:10]}, "
        f"only in-process {sorted(set(ref.leases) - set(live.leases))[:10]}")
    diff = [n for n in ref.leases if live.leases[n] != ref.leases[n]]
    assert not diff, f"leases differ: {[(live.leases[n], ref.leases[n]) for n in diff[:3]]}"
    phases = {k: s.phase for k, s in live.status.items()}
    ref_phases = {k: s.phase for k, s in ref.status.items()}
    assert phases == ref_phases, "run phases differ: " + str(
        {k: (phases.get(k), ref_phases.get(k)) for k in set(phases) | set(ref_phases)
         if phases.get(k) != ref_phases.get(k)})
    assert live.status == ref.status
    assert live.reservations == ref.reservations
    assert live.runs == ref.runs
    assert live.now == ref.now
    assert live.meter.consumed == ref.meter.consumed
    assert live.journal == ref.journal, "the ledger is not the in-process journal, entry for entry"


T = TypeVar("T")


def play(url: str, scenario: Callable[[Client], Awaitable[T]]) -> T:
    """Run `scenario` with a NATS connection of its own (closed afterwards)."""
    async def main() -> T:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            return await scenario(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


async def bring_up(services: Services, nc: Client, *admissions: str) -> None:
    """The ledger stream, then the binder and the admission instances `admissions` (tags; one
    called `admission` when none is named), started together, both answering."""
    await create_ledger(nc, services.cluster)
    services.start("binder")
    for tag in admissions or ("admission",):
        services.start("admission", tag)
    await wait_binder(nc, services.cluster)
    await wait_admission(nc, services.cluster)


def epochs(records: Sequence[Record]) -> list[int]:
    """The fencing epoch of each ledger record."""
    return [max(e.epoch for e in r.batch.entries) for r in records]
