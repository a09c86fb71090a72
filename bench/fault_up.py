"""Fault benchmark (issue 13): submissions through `jobtree up` while every process is killed in turn.

What it does: `jobtree up` (system clock, a 64-node fleet of 8 teams), then SUBMISSIONS (2,000) runs
of 1 GPU running 10 s (simulated runtime) submitted at RATE per second by a few client threads, each retried with its request
id (2 s per attempt) until acknowledged or GIVE_UP seconds have passed (or the run's time,
SUBMISSIONS / RATE + GIVE_UP, is over); meanwhile a kill -9
every KILL_EVERY seconds, in turn, of each process `up` started: binder, admission (the leader),
budget, packer, resolver, gateway, admission-2, nats-server, and round again. Afterwards it
reads the ledger and checks: every acknowledged submission is in it exactly once with the
sequence its reply named, no command is committed twice, and the §10 oracle holds over the
replayed ledger.

Prints a table and one JSON line: submissions acknowledged / given up, kills, for each kill the
seconds until a submission sent after it was acknowledged (the unavailability), the longest,
and the violations (must be 0). `--quick` for a short run. Run it on another checkout by
putting that checkout's `libs` first on PYTHONPATH (the before/after of RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from live_common import Up, admin_nats, emit_json, load_fleet, machine, progress, table, team_owner

ORDER = ("binder", "admission", "budget", "packer", "resolver", "gateway", "admission-2", "nats-server")
GIVE_UP = 60.0
RUNTIME = "10s"
"""Each run completes after this (a simulated runtime): 20/s x 10 s = 200 GPUs of the 512, so
the queue stays short and what is measured is healing, not a growing backlog (issue 8)."""


@dataclass
class Clients:
    address: str
    rate: float
    total: int
    threads: int = 4
    acked: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    given_up: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0

    def run(self) -> None:
        self.started = time.monotonic()
        workers = [threading.Thread(target=self._worker, args=(k,), daemon=True) for k in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _worker(self, k: int) -> None:
        import grpc

        from jobtree.api import convert
        from jobtree.api.jobtree.v1 import service_pb2 as api
        from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc

        channel = grpc.insecure_channel(self.address)
        stub = api_grpc.JobtreeStub(channel)
        for i in range(k, self.total, self.threads):
            due = self.started + i / self.rate
            time.sleep(max(0.0, due - time.monotonic()))
            rid = f"fault-{i:05d}"
            run = convert.manifest_to_proto({
                "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
                "metadata": {"name": f"f{i:05d}", "namespace": "bench",
                             "annotations": {"jobtree.sim/runtime": RUNTIME}},
                "spec": {"owner": team_owner(i % 8), "resources": {"gpuType": "H100-80GB", "totalGPUs": 1}}})
            sent = time.monotonic()
            while True:
                try:
                    done = stub.SubmitRun(api.SubmitRunRequest(run=run, request_id=rid), timeout=2.0)
                    with self.lock:
                        self.acked[rid] = (done.ledger_sequence, sent, time.monotonic())
                    break
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.ABORTED):
                        self.refused.append(f"{rid}: {e.code().name}: {e.details()}")
                        break
                    if time.monotonic() - sent > GIVE_UP or time.monotonic() > self.started + self.total / self.rate + GIVE_UP:
                        self.given_up.append(rid)
                        break
                    time.sleep(0.05)
        channel.close()

    def first_ack_after(self, t: float) -> float | None:
        with self.lock:
            times = [acked for _, sent, acked in self.acked.values() if sent >= t]
        return min(times) if times else None


def pids(up: Up) -> dict[str, int]:
    state = up.state()
    return {"nats-server": int(state["nats_pid"]), **{k: int(v) for k, v in state["services"].items()}}


def killer(up: Up, clients: Clients, every: float, stop: threading.Event, kills: list[tuple[str, float]]) -> None:
    n = 0
    while not stop.wait(every):
        name = ORDER[n % len(ORDER)]
        n += 1
        try:
            pid = pids(up)[name]
            os.kill(pid, signal.SIGKILL)
        except (KeyError, ProcessLookupError, OSError):
            kills.append((name, float("nan")))  # not running (a supervisor that does not restart)
            continue
        kills.append((name, time.monotonic()))
        progress(f"killed {name} (pid {pid})")


async def check_ledger(up: Up, acked: dict[str, tuple[int, float, float]]) -> dict[str, object]:
    from jobtree.api import convert
    from jobtree.bus.ledger import Ledger
    from jobtree.core.engine import Cluster
    from jobtree.core.invariants import check_all, check_audit
    from jobtree.core.model import ClusterConfig

    nc = await admin_nats(up)
    try:
        records = await Ledger(nc.jetstream(), up.cluster).replay()
    finally:
        await nc.close()
    by_id: dict[str, list[int]] = {}
    for r in records:
        for cid in dict.fromkeys(e.command_id for e in r.batch.entries if e.command_id):
            by_id.setdefault(cid, []).append(r.sequence)
    twice = [c for c, s in by_id.items() if len(s) > 1]
    missing = [c for c in acked if c not in by_id]
    wrong = [c for c, (s, _, _) in acked.items() if c in by_id and by_id[c][0] != s]
    oracle = "ok"
    try:
        view = Cluster.replay(ClusterConfig(cluster=up.cluster), (), 0,
                              [convert.entry_from_proto(e) for r in records for e in r.batch.entries])
        check_all(view)
        check_audit(view, view.started, [])
    except AssertionError as e:
        oracle = f"violated: {' '.join(str(e).split())[:200]}"
    return {"records": len(records), "committed_twice": len(twice), "acked_missing": len(missing),
            "acked_wrong_sequence": len(wrong), "oracle": oracle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="120 submissions, a kill every 3 s")
    parser.add_argument("--submissions", type=int, default=2000, help="2,000 at 20/s: every process killed twice")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--kill-every", type=float, default=6.0)
    args = parser.parse_args()
    if args.quick:
        args.submissions, args.kill_every = 120, 3.0

    import grpc

    from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc

    with tempfile.TemporaryDirectory(prefix="jobtree-fault-") as tmp, Up(Path(tmp) / "jt") as up:
        async def fleet() -> None:
            async with grpc.aio.insecure_channel(up.grpc) as channel:
                await load_fleet(up, api_grpc.JobtreeStub(channel), 64, 8)

        asyncio.run(fleet())
        progress(f"jobtree up ready at {up.grpc}; {args.submissions} submissions at {args.rate:g}/s, "
                 f"a kill every {args.kill_every:g} s")
        clients = Clients(up.grpc, args.rate, args.submissions)
        stop = threading.Event()
        kills: list[tuple[str, float]] = []
        k = threading.Thread(target=killer, args=(up, clients, args.kill_every, stop, kills), daemon=True)
        k.start()
        clients.run()
        stop.set()
        k.join()
        rows = []
        unavailable: list[float] = []
        for name, at in kills:
            if at != at:  # nan: nothing to kill
                rows.append([name, "not running", None])
                continue
            back = clients.first_ack_after(at)
            took = (back - at) if back is not None else float("inf")
            unavailable.append(took)
            rows.append([name, "killed", took if back is not None else "never"])
        try:
            verdict: dict[str, object] = asyncio.run(check_ledger(up, clients.acked))
        except Exception as e:
            verdict = {"ledger": f"unreadable: {type(e).__name__}: {e}"}
        alive = {n: p for n, p in pids(up).items() if Path(f"/proc/{p}").exists()}
    print(table(["process", "what", "s until a submission was acknowledged again"], rows))
    result = {
        "bench": "fault_up", "submissions": args.submissions, "rate": args.rate, "kill_every_s": args.kill_every,
        "acknowledged": len(clients.acked), "given_up": len(clients.given_up), "refused": len(clients.refused),
        "kills": len(unavailable), "longest_unavailable_s": round(max(unavailable), 2) if unavailable else None,
        "resumed_within_5s": sum(1 for t in unavailable if t <= 5.0), "processes_alive_at_end": len(alive),
        **verdict, "machine": machine(),
    }
    emit_json(result)


if __name__ == "__main__":
    main()
