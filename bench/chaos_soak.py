"""Chaos soak (issue 9): runs submitted at RATE per second for MINUTES while a random process is
killed with SIGKILL every KILL_EVERY seconds; then everything acknowledged is checked.

What it does: `jobtree up` (system clock, 64 nodes of 8 GPUs, 8 teams), then runs of 1 GPU that
finish after RUNTIME (a simulated runtime, so GPUs free up) submitted at RATE per second by
client threads, each retried with its request id until acknowledged (`fault_up.Clients`).
Meanwhile, every KILL_EVERY seconds, one process picked at random (seeded: `--seed`; each round
of nine kills takes every role once, in a random order) from the admission leader, the
admission standby, the binder, the gateway, the readers (budget, packer, resolver, dashboard)
and the nats-server gets `kill -9`; `jobtree up` restarts it. After the
last submission and a quiet period, it checks:
- every acknowledged submission is in the ledger exactly once, at the sequence its reply named,
  and no command id is committed twice (`fault_up.check_ledger`);
- the §10 oracle holds over the replay of the whole ledger;
- the services' views equal a replay: the gateway's runs (phase of each) at the sequence its
  answer names, the budget service's usage (every envelope) at a ledger sequence that did not
  move while it answered, the packer's nodes;
- nothing acknowledged was lost (a run acknowledged is in the gateway's answer).
Prints a table of the kills (process, its role, seconds until a submission sent after it was
acknowledged) and one JSON line: commands acknowledged, kills survived, violations (must be 0),
longest unavailability. `--quick`: 40 s at 50/s, a kill every 3 s (what the e2e test runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_up
from fault_up import Clients, check_ledger, pids
from live_common import Up, admin_nats, emit_json, load_fleet, machine, progress, table

READERS = ("budget", "packer", "resolver", "dashboard")
VICTIMS = ("admission-leader", "admission-standby", "binder", "gateway", *READERS, "nats-server")


async def leader_pid(up: Up) -> int | None:
    """The pid in the admission leader lock's holder (`admission-<pid>-<random>`)."""
    from jobtree.bus import subjects

    nc = await admin_nats(up)
    try:
        kv = await nc.jetstream().key_value(subjects.bucket(up.cluster, "leader"))
        entry = await kv.get(subjects.kv_key("admission"))
        parts = (entry.value or b"").decode().split("-")
        return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
    except Exception:
        return None
    finally:
        await nc.close()


def victim_pid(up: Up, victim: str) -> int | None:
    running = pids(up)
    if victim.startswith("admission-"):
        leader = asyncio.run(leader_pid(up))
        admissions = [p for n, p in running.items() if n.startswith("admission")]
        if leader is None or leader not in admissions:
            return None
        others = [p for p in admissions if p != leader]
        return leader if victim == "admission-leader" else (others[0] if others else None)
    return running.get(victim)


def killer(up: Up, every: float, stop: threading.Event, kills: list[tuple[str, float]], seed: int) -> None:
    rng = random.Random(seed)
    order: list[str] = []
    while not stop.wait(every):
        if not order:  # each round kills every role once, in a random order
            order = list(VICTIMS)
            rng.shuffle(order)
        victim = order.pop()
        try:
            pid = victim_pid(up, victim)
            if pid is None:
                kills.append((victim, float("nan")))
                continue
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            kills.append((victim, float("nan")))
            continue
        kills.append((victim, time.monotonic()))
        progress(f"killed {victim} (pid {pid})")


async def views_match(up: Up, acked: dict[str, tuple[int, float, float]]) -> dict[str, object]:
    """The services' views against a replay of the ledger at the sequence each answered at."""
    import grpc

    from jobtree.api import convert
    from jobtree.api.jobtree.v1 import service_pb2 as api
    from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
    from jobtree.bus.ledger import Ledger
    from jobtree.core.engine import Cluster
    from jobtree.core.model import ClusterConfig
    from jobtree.services.budget import usage
    from jobtree.services.packer import nodes as packer_nodes

    async def read_ledger() -> list[Any]:
        nc = await admin_nats(up)
        try:
            return await Ledger(nc.jetstream(), up.cluster).replay()
        finally:
            await nc.close()

    records = await read_ledger()
    last = records[-1].sequence if records else 0

    def replay(upto: int) -> Cluster:
        entries = [convert.entry_from_proto(e) for r in records if r.sequence <= upto for e in r.batch.entries]
        return Cluster.replay(ClusterConfig(cluster=up.cluster), (), 0, entries)

    out: dict[str, object] = {}
    big = [("grpc.max_receive_message_length", 1 << 30)]  # every run of the soak in one answer
    async with grpc.aio.insecure_channel(up.grpc, options=big) as channel:
        stub = api_grpc.JobtreeStub(channel)
        runs = await stub.ListRuns(api.ListRunsRequest(min_ledger_sequence=last), timeout=30)
        nodes = await stub.ListNodes(api.ListNodesRequest(), timeout=30)
        # The budget service's usage converges on the replay's at a quiet ledger (the resolver
        # still ticks): compare at a sequence that did not move while it answered.
        out["budget_view"] = "differs"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            records = await read_ledger()
            before = records[-1].sequence if records else 0
            got = await stub.Usage(api.UsageRequest(), timeout=30)
            records = await read_ledger()
            if (records[-1].sequence if records else 0) == before:
                want = usage(replay(before), api.UsageRequest())
                if got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True):
                    out["budget_view"] = "equal"
                    break
            await asyncio.sleep(0.5)
    at_runs = replay(runs.ledger_sequence)
    gateway = {f"{r.metadata.namespace}/{r.metadata.name}": r.status.phase for r in runs.runs}
    want = {key: st.phase.value for key, st in at_runs.status.items() if key in at_runs.runs}
    diff = {k for k in set(want) | set(gateway) if want.get(k) != gateway.get(k)}
    out["gateway_view"] = "equal" if not diff else f"{len(diff)} runs differ, e.g. {sorted(diff)[:3]}"
    whole = replay(records[-1].sequence if records else 0)
    same = nodes.SerializeToString(deterministic=True) == packer_nodes(whole).SerializeToString(deterministic=True)
    out["packer_view"] = "equal" if same else "differs"
    names = {f"bench/f{int(rid.split('-')[1]):05d}" for rid in acked}
    out["acked_lost"] = len(names - set(gateway))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="40 s at 50 runs/s, a kill every 3 s")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--runtime", default="2s", help="each run's simulated runtime (GPUs free up)")
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.rate, args.kill_every = 40 / 60, 50.0, 3.0
    total = int(args.minutes * 60 * args.rate)
    fault_up.RUNTIME = args.runtime

    import grpc

    from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc

    with tempfile.TemporaryDirectory(prefix="jobtree-chaos-") as tmp, Up(Path(tmp) / "jt") as up:
        async def fleet() -> None:
            async with grpc.aio.insecure_channel(up.grpc) as channel:
                await load_fleet(up, api_grpc.JobtreeStub(channel), 64, 8)

        asyncio.run(fleet())
        progress(f"jobtree up ready at {up.grpc}; {total} submissions at {args.rate:g}/s over "
                 f"{args.minutes:g} min, a random kill every {args.kill_every:g} s (seed {args.seed})")
        clients = Clients(up.grpc, args.rate, total, threads=16)
        stop = threading.Event()
        kills: list[tuple[str, float]] = []
        k = threading.Thread(target=killer, args=(up, args.kill_every, stop, kills, args.seed), daemon=True)
        k.start()
        started = time.monotonic()
        clients.run()
        stop.set()
        k.join()
        soak_s = time.monotonic() - started
        progress("soak over; letting the system settle, then checking")
        time.sleep(3.0)
        rows: list[list[Any]] = []
        unavailable: list[float] = []
        for name, at in kills:
            if at != at:
                rows.append([name, "not found", None])
                continue
            back = clients.first_ack_after(at)
            took = (back - at) if back is not None else float("inf")
            unavailable.append(took)
            rows.append([name, "killed", round(took, 2) if back is not None else "never"])
        verdict: dict[str, object] = {}
        for name, check in (("ledger", check_ledger), ("views", views_match)):
            try:
                verdict.update(asyncio.run(check(up, clients.acked)))
            except Exception as e:
                verdict[f"{name}_check"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        alive = {n: p for n, p in pids(up).items() if Path(f"/proc/{p}").exists()}
    violations = [k for k, v in verdict.items()
                  if (k in ("committed_twice", "acked_missing", "acked_wrong_sequence", "acked_lost") and v)
                  or (k in ("oracle",) and v != "ok") or (k.endswith("_view") and v != "equal") or k.endswith("_check")]
    violations += [f"refused: {r}" for r in clients.refused[:3]]
    print(table(["process", "what", "s until a submission was acknowledged again"], rows))
    result = {
        "bench": "chaos_soak", "minutes": round(soak_s / 60, 2), "rate": args.rate, "kill_every_s": args.kill_every,
        "seed": args.seed, "submissions": total, "acknowledged": len(clients.acked),
        "given_up": len(clients.given_up), "refused": len(clients.refused),
        "kills": len(unavailable), "kills_by_role": {v: sum(1 for n, t in kills if n == v and t == t) for v in VICTIMS},
        "longest_unavailable_s": round(max(unavailable), 2) if unavailable else None,
        "processes_alive_at_end": len(alive), **verdict, "violations": violations, "machine": machine(),
    }
    emit_json(result)
    return 1 if violations or clients.given_up else 0


if __name__ == "__main__":
    sys.exit(main())
