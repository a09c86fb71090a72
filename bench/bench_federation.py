"""Federation benchmarks (issue 11): how fast an allowance follows demand, and what moving
allowances buys over a static split.

1. `--live`: `jobtree up --clusters a,b --insecure` (real nats-servers, leaf nodes, every service,
   the federation with its default 1 s round). Demand shifts back and forth: a 24-GPU run of the
   demo's `vision` team is submitted in one cluster and the one in the other cluster deleted;
   the time from the submit's commit to the cluster's own ledger holding the raised allowance
   (its budget service's `caps`, polled every 20 ms) is one sample.
2. `--model`: the federation's own book and targets (`services/federation/book.py`,
   `allowances.targets`) against demand traces that shift between two clusters (opposite
   phases, noise), one decision round per step: funded use is min(demand, allowance), the
   federation sees the demand of the previous round, a lower commits within the round and the
   raise it makes room for follows. Reported: the cap's funded utilisation (funded / min(cap,
   demand)) with moving allowances against a static even split, with and without a partition
   of one cluster for a fifth of the time, and the largest sum of allowances seen (never above
   the cap).
Prints tables, and one JSON line with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_common import REPO, emit_json, machine, progress, table

CAP = 32


# --- 1. live ------------------------------------------------------------------------------


def live(shifts: int) -> dict[str, Any]:
    import nats

    from jobtree.api import convert
    from jobtree.api.jobtree.v1 import bus_pb2 as bus
    from jobtree.api.jobtree.v1 import service_pb2 as svc
    from jobtree.bus import codec, subjects
    from jobtree.bus.security import Secrets
    from jobtree.core import facts
    from jobtree.core.manifest import parse_run

    tmp = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    err = (tmp / "up.err").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jobtree.cli.main", "up", "--clusters", "a,b", "--insecure",
                             "--grpc-port", "0", "--data-dir", str(tmp / "d")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("federation:"):
                break
        else:
            raise SystemExit(f"jobtree up --clusters did not start:\n{(tmp / 'up.err').read_text()}")
        state = json.loads((tmp / "d" / "up.json").read_text())
        progress("federation up; shifting demand")

        async def go() -> list[float]:
            conns = {c: await nats.connect(state["clusters"][c]["nats"],
                                           **Secrets.load(tmp / "d" / c / "secrets.json").connect_options("admin"))
                     for c in ("a", "b")}

            async def send(c: str, cmd: Any, cid: str) -> None:
                msg = convert.command_to_proto(cmd, command_id=cid)
                raw = await conns[c].request(subjects.request(c, "admission", "command"), codec.encode(msg),
                                             timeout=10, headers=codec.headers(msg))
                reply = codec.decode(raw.data, bus.CommandReply)
                assert reply.error.code == bus.ERROR_CODE_UNSPECIFIED, reply

            async def allowance(c: str) -> int:
                raw = await conns[c].request(subjects.request(c, "budget", "caps"),
                                             svc.ClusterCapsRequest().SerializeToString(), timeout=5)
                caps = svc.ClusterCapsResponse.FromString(raw.data).caps
                return next(u.allowance for u in caps if u.cap == "vision/all")

            samples = []
            for i in range(shifts):
                here, there = ("a", "b") if i % 2 == 0 else ("b", "a")
                doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": f"s{i}"},
                       "spec": {"owner": "org:ml:vision", "resources": {"gpuType": "H100-80GB", "totalGPUs": 24}}}
                if i:
                    await send(there, facts.DeleteRun(f"default/s{i - 1}"), f"bench-del-{i}")
                await asyncio.sleep(1.5)  # the federation sees the other side's demand gone
                await send(here, facts.ApplyRun(parse_run(doc, "run")), f"bench-run-{i}")
                started = time.perf_counter()
                while await allowance(here) < 24:
                    if time.perf_counter() - started > 30:
                        raise SystemExit(f"the allowance of {here} did not rise within 30 s")
                    await asyncio.sleep(0.02)
                samples.append(time.perf_counter() - started)
                progress(f"shift {i + 1}/{shifts}: {here} funded its 24 GPUs after {samples[-1]:.2f} s")
            for nc in conns.values():
                await nc.close()
            return samples

        samples = asyncio.run(go())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        err.close()
    return {"shifts": len(samples), "p50_s": statistics.median(samples), "max_s": max(samples),
            "min_s": min(samples), "samples_s": [round(s, 3) for s in samples]}


# --- 2. model -----------------------------------------------------------------------------


def demand_trace(rounds: int, seed: int) -> list[dict[str, int]]:
    """Two clusters whose demand shifts in opposite phases (a period of 120 rounds) with noise."""
    rnd = random.Random(seed)
    out = []
    for t in range(rounds):
        wave = (1 + math.sin(2 * math.pi * t / 120)) / 2
        out.append({"a": max(0, round(28 * wave + rnd.gauss(0, 3))),
                    "b": max(0, round(28 * (1 - wave) + rnd.gauss(0, 3)))})
    return out


def model(rounds: int, seed: int, partition: bool) -> dict[str, Any]:
    from jobtree.core.allowances import targets
    from jobtree.services.federation.book import Book

    trace = demand_trace(rounds, seed)
    book = Book.start("vision/all", CAP, None, {"a": (CAP // 2, None, 0), "b": (CAP // 2, None, 0)})
    in_force = {"a": CAP // 2, "b": CAP // 2}
    funded_moving = funded_static = wanted = 0
    peak = 0
    seen = trace[0]
    for t, demand in enumerate(trace):
        cut = partition and (rounds * 2 // 5) <= t < (rounds * 3 // 5)  # b cut off for a fifth of the time
        reachable = {"a": True, "b": not cut}
        for _ in range(2):  # lowers commit within the round; the raises they make room for follow
            for g in book.plan({c: (v, None) for c, v in targets(CAP, seen).items()}):
                if reachable[g.cluster]:
                    in_force[g.cluster] = g.gpus
                    book.confirm(g.cluster, g.version, g.gpus, None)
        peak = max(peak, sum(in_force.values()))
        assert sum(in_force.values()) <= CAP
        funded_moving += sum(min(demand[c], in_force[c]) for c in demand)
        funded_static += sum(min(demand[c], CAP // 2) for c in demand)
        wanted += min(CAP, sum(demand.values()))
        seen = {c: demand[c] if reachable[c] else seen[c] for c in demand}  # reported for the next round
    return {"rounds": rounds, "partition": partition, "utilisation_moving": funded_moving / wanted,
            "utilisation_static": funded_static / wanted, "peak_allowances": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--live", action="store_true", help="only the live benchmark")
    ap.add_argument("--model", action="store_true", help="only the model")
    ap.add_argument("--shifts", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    both = not args.live and not args.model
    out: dict[str, Any] = {"machine": machine()}
    if args.model or both:
        rows = []
        for partition in (False, True):
            got = model(args.rounds, 1, partition)
            out[f"model{'_partition' if partition else ''}"] = got
            rows.append(["b cut off 1/5 of the time" if partition else "no partition", args.rounds,
                         f"{100 * got['utilisation_moving']:.1f} %", f"{100 * got['utilisation_static']:.1f} %",
                         f"{got['peak_allowances']} / {CAP}"])
        print("Funded utilisation of a 32-GPU cap under demand shifting between two clusters")
        print(table(["case", "rounds", "moving allowances", "static even split", "peak sum of allowances"], rows))
    if args.live or both:
        got = live(args.shifts)
        out["live"] = got
        print("\nTime from a demand shift to the allowance moving (jobtree up --clusters a,b, 1 s rounds)")
        print(table(["shifts", "p50 (s)", "min (s)", "max (s)"], [[got["shifts"], got["p50_s"], got["min_s"], got["max_s"]]]))
    if args.json:
        emit_json(out)


if __name__ == "__main__":
    main()
