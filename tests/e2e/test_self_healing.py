"""Self-healing (issue 13): the services ride out a NATS outage, and `jobtree up` restarts every
process it started — the nats-server included — so a kill -9 of any of them is a pause, not an
outage. Real processes throughout: nats-server, `jobtree serve`, `jobtree up`, gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import nats
import pytest
from test_gateway import run_msg, start_system
from test_up import Up, alive, poll_until, run_manifest, violations

from jobtree.api import convert
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus.ledger import Ledger
from jobtree.bus.natsserver import NatsServer
from jobtree.cli.up_cmd import process_names
from jobtree.core.engine import Cluster
from jobtree.core.invariants import check_all, check_audit
from jobtree.core.model import ClusterConfig

STALE = "jobtree-stale"
RESUME_WITHIN = 5.0
"""Seconds within which a submission must be acknowledged again after any one kill."""


def test_services_ride_out_a_nats_outage(nats_binary: Path, tmp_path: Path) -> None:
    """kill -9 of the nats-server for 8 s: no service exits (admission used to, within 2-7 s);
    reads are answered from the gateway's view and say they are stale; writes fail UNAVAILABLE
    naming NATS; once the server is back on its port, writes are accepted within seconds, the
    followers re-attach (a read of the new write's sequence is answered) and nothing is lost."""
    server = NatsServer(tmp_path / "nats", binary=nats_binary).start()
    system = None
    try:
        system = start_system(server, tmp_path / "sys")
        stub = system.stub()
        first = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("before", 8), request_id="before"), timeout=10)
        server.port = urlsplit(server.url).port or -1
        server.kill()
        down = time.monotonic()

        time.sleep(1.0)
        got, call = stub.GetRun.with_call(api.GetRunRequest(run=pb.RunRef(namespace="default", name="before")),
                                          timeout=5)
        assert got.run.status.phase == "Running"
        stale = dict(call.trailing_metadata() or ())
        assert STALE in stale and "NATS is unreachable" in stale[STALE], stale
        assert f"ledger sequence {first.ledger_sequence}" in stale[STALE]
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitRun(api.SubmitRunRequest(run=run_msg("during", 8), request_id="during"), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "NATS is unreachable" in err.value.details() and "admission" in err.value.details()
        assert "retry with the same request id" in err.value.details()

        time.sleep(max(0.0, 8.0 - (time.monotonic() - down)))
        assert system.supervisor.exited() == {}, system.logs()
        server.start()
        back = time.monotonic()
        while True:  # a client retrying with its request id
            try:
                during = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("during", 8), request_id="during"),
                                        timeout=3)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert time.monotonic() - back < 15, f"no write accepted 15 s after NATS came back: {e}"
        resumed = time.monotonic() - back
        assert resumed < RESUME_WITHIN, resumed
        got, call = stub.GetRun.with_call(api.GetRunRequest(run=pb.RunRef(namespace="default", name="during"),
                                                            min_ledger_sequence=during.ledger_sequence), timeout=10)
        assert got.run.status.phase == "Running" and STALE not in dict(call.trailing_metadata() or ())
        listed = stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=during.ledger_sequence), timeout=10)
        assert sorted(r.metadata.name for r in listed.runs) == ["before", "during"]
        assert system.supervisor.exited() == {}, system.logs()
        deadline = time.monotonic() + 10  # a busy machine may log "back" a moment after the writes resume
        for name, sp in system.supervisor.processes.items():
            log = sp.log_path.read_text()
            while name != "binder" and "NATS is back" not in log and time.monotonic() < deadline:
                time.sleep(0.1)
                log = sp.log_path.read_text()
            assert "service failed" not in log and "Traceback" not in log, (name, log[-2000:])
            if name != "binder":  # every process saw the outage and came back
                assert "lost NATS" in log and "NATS is back" in log, (name, log[-2000:])
    finally:
        if system is not None:
            system.stop()
        server.stop()


# --- the fault test through `jobtree up` -----------------------------------------------------------


@dataclass
class Stream:
    """Submissions at a steady pace, each retried with its request id until acknowledged."""

    address: str
    pace: float = 0.2
    acked: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    """request id -> (ledger sequence, sent at, acknowledged at)."""
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = api_grpc.JobtreeStub(channel)
        i = 0
        try:
            while not self.stop.is_set():
                rid = f"fault-{i:04d}"
                sent = time.monotonic()
                request = api.SubmitRunRequest(run=run_manifest(f"f{i:04d}", 1), request_id=rid)
                while True:
                    try:
                        done = stub.SubmitRun(request, timeout=2.0)
                        with self.lock:
                            self.acked[rid] = (done.ledger_sequence, sent, time.monotonic())
                        break
                    except grpc.RpcError as e:
                        if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                            grpc.StatusCode.ABORTED):
                            self.failures.append(f"{rid}: {e.code().name}: {e.details()}")
                            break
                        if time.monotonic() - sent > 60:
                            self.failures.append(f"{rid}: not acknowledged in 60 s: {e.details()}")
                            break
                        time.sleep(0.05)
                i += 1
                time.sleep(self.pace)
        finally:
            channel.close()

    def first_ack_after(self, t: float) -> float | None:
        with self.lock:
            times = [acked for _, sent, acked in self.acked.values() if sent >= t]
        return min(times) if times else None


def pids(up: Up) -> dict[str, int]:
    state = up.state()
    return {"nats-server": int(state["nats_pid"]), **{k: int(v) for k, v in state["services"].items()}}


def test_up_heals_every_kill(tmp_path: Path) -> None:
    """kill -9 of each process `up` started, in turn, the nats-server included, during a stream of
    submissions retried by request id: every acknowledged submission is in the ledger once, a
    submission is acknowledged again within 5 s of each kill, no process is left dead, and the
    ledger satisfies the §10 oracle. Prints the figures bench/RESULTS.md records."""
    data = tmp_path / "jt"
    up = Up(data, "--clock", "system").wait_ready()
    stream = Stream(up.grpc)
    worker = threading.Thread(target=stream.run, daemon=True)
    figures: list[tuple[str, float]] = []
    try:
        worker.start()
        poll_until("the first acknowledged submission", lambda: stream.acked, timeout=10)
        victims = [*process_names(2), "nats-server"]
        for name in victims:
            old = pids(up)[name]
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            resumed = poll_until(f"a submission acknowledged after killing {name}",
                                 lambda k=killed: stream.first_ack_after(k), timeout=15)
            figures.append((name, resumed - killed))
            poll_until(f"{name} restarted by up",
                       lambda n=name, o=old: pids(up)[n] != o and alive(pids(up)[n]), timeout=15)
            time.sleep(1.0)
        stream.stop.set()
        worker.join(30)
        assert not worker.is_alive()
        assert not stream.failures, stream.failures

        now = pids(up)
        dead = [n for n, pid in now.items() if not alive(pid)]
        assert not dead, f"left dead: {dead}\n{up.stderr}"
        records = asyncio.run(_ledger(up))
        by_id: dict[str, list[int]] = {}
        for r in records:
            for cid in dict.fromkeys(e.command_id for e in r.batch.entries if e.command_id):
                by_id.setdefault(cid, []).append(r.sequence)
        twice = {c: s for c, s in by_id.items() if len(s) > 1}
        assert not twice, f"committed more than once: {twice}"
        missing = sorted(set(stream.acked) - set(by_id))
        assert not missing, f"acknowledged but not in the ledger: {missing}"
        wrong = {c: (s, by_id[c][0]) for c, (s, _, _) in stream.acked.items() if by_id[c][0] != s}
        assert not wrong, f"acknowledged with another sequence than the ledger's: {wrong}"
        view = Cluster.replay(ClusterConfig(cluster="demo"), (), 0,
                              [convert.entry_from_proto(e) for r in records for e in r.batch.entries])
        check_all(view)
        check_audit(view, view.started, [])

        longest = max(took for _, took in figures)
        print("\nfault test through jobtree up: " + json.dumps({
            "kills": len(figures), "acknowledged": len(stream.acked), "ledger_records": len(records),
            "resume_seconds": {name: round(took, 2) for name, took in figures}, "longest": round(longest, 2)}))
        slow = {name: round(took, 2) for name, took in figures if took > RESUME_WITHIN}
        assert not slow, f"service resumed later than {RESUME_WITHIN} s after: {slow}\n{up.stderr}"
        assert up.state()["restarts"] == dict.fromkeys(victims, 1), up.state()["restarts"]
        for name in victims:
            assert f"jobtree up: {name} died (signal 9); restarting it" in up.stderr, up.stderr
            assert f"jobtree up: {name} restarted (pid " in up.stderr, up.stderr
        assert up.interrupt() == 0, up.stderr
    finally:
        stream.stop.set()
        up.stop()
    assert "Traceback" not in up.stderr and "jobtree up: stopped" in up.stderr
    assert violations(data) == []


async def _ledger(up: Up) -> list:  # type: ignore[type-arg]
    nc = await nats.connect(up.nats, **up.admin_auth(), connect_timeout=2,
                            allow_reconnect=False)
    try:
        return await Ledger(nc.jetstream(), "demo").replay()
    finally:
        await nc.close()


def test_an_error_on_a_live_connection_is_not_an_outage(nats_binary: Path, tmp_path: Path) -> None:
    """nats.py reports every asynchronous error through one callback: a permissions violation on a
    live connection must not mark the bus down (the gateway would refuse writes naming NATS); a
    server that is gone must, and its return must clear it."""
    from jobtree.bus import subjects
    from jobtree.bus.runtime import BusState, ServiceSettings, connect
    from jobtree.bus.security import Secrets, server_users

    secrets = Secrets.generate("live")
    server = NatsServer(tmp_path / "nats", binary=nats_binary, users=server_users("live", secrets)).start()
    settings = ServiceSettings(name="budget", cluster="live", nats_url=server.url, user="budget",
                               nkey_seed=secrets.seeds["budget"])

    async def go() -> None:
        bus = BusState()
        nc = await connect(settings, bus)
        try:
            await nc.publish(subjects.ledger_subject("live"), b"forged")  # budget may not: an async -ERR
            await nc.flush()
            await asyncio.sleep(0.5)
            assert bus.up and bus.down_since is None and bus.outages == 0
            server.port = urlsplit(server.url).port or -1
            server.kill()
            await asyncio.sleep(1.5)
            assert not bus.up and bus.down_since is not None and bus.outages == 1
            server.start()
            for _ in range(100):
                if bus.up:
                    break
                await asyncio.sleep(0.1)
            assert bus.up and bus.down_since is None
        finally:
            await nc.close()

    try:
        asyncio.run(go())
        assert "Publish Violation" in server.log_path.read_text()
    finally:
        server.stop()
