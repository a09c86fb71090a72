"""Live throughput and latency of the running system (issue 3, item 9): `jobtree up` with 1,000 nodes.

What it does (every process it starts is stopped at the end, up by SIGINT like Ctrl-C):
1. `jobtree up --no-demo --grpc-port 0 --data-dir <tmp> --clock system` as a subprocess.
2. Loads the fleet: --nodes 8-GPU H100-80GB nodes as `AddNode`s in `Batch` commands of
   --node-batch nodes sent as admin straight to `jobtree.<c>.admission.command`, and --budgets team
   budgets (siblings under one owner, envelopes summing to the fleet) through gRPC `ApplyBudget`.
3. Latency phases, one per --rates R (default 50, 200, 500 runs/s offered): open-loop arrivals at
   evenly spaced instants for --rate-seconds, each a gRPC `SubmitRun` of a small run (1, 2, 4 or 8
   GPUs, owners round-robin over the budgets) sent at its instant however many are in flight
   (no coordinated omission). "Bound" is observed on one `WatchRuns` stream of the phase's
   namespace (the first event in which the run's phase is Running). Latency = bound - scheduled
   send instant. Runs not bound within --drain seconds after the last arrival count as unbound.
   Each phase also keeps its percentiles per second of arrivals (`timeline` in --json; printed
   with --timeline): a tail spread evenly is queueing, a tail in some seconds only is a stall.
4. Sustained phases, one per --concurrency N (default 16, 64): N gRPC clients in a closed loop
   submitting as fast as the gateway answers, for --sustain-seconds after --warmup seconds.
   Runs bound/s = Running events seen in the measured window / its length.
5. Batch probe, one per --batch-probe K (default none): what batching across commands would buy
   with the services as they are. `Batch` commands of K ApplyRuns are sent as admin straight to
   admission (no gateway), --probe-inflight at a time, for --probe-seconds; each is one decision,
   one ledger message and one follower update. Runs bound/s is counted on the watch as above.
In every phase the fleet is kept from saturating. With `--complete runtime` (default) runs carry
the simulator annotation `jobtree.sim/runtime` (--runtime seconds) and the resolver's `Tick`
commands complete them, every run due at an instant in one decision (so the pipeline carries
the submissions plus about one Tick a second). With `--complete grpc` the bench sends a
`CompleteRun` (a workload report: one more command per run) for the oldest running runs
whenever the GPUs they hold exceed --util of the fleet (in the sustained phases the N clients do
it, so in-flight stays N; in the latency phases a completer with up to 32 in flight).
After each phase the bench waits until the ledger stops moving (an overloaded phase leaves a
backlog in admission's queue: commands the gateway gave up on after its 5 s command timeout are
still decided), completes whatever still runs, and waits again (`settle_s`).
CPU seconds of every process (up, nats-server, each service, this client) are sampled per
phase from /proc, since the machine is shared.

Stage breakdown (--tap): `live_tap.py` runs as its own process, listening as admin to the
commands, the admission->binder appends, the binder's ledger and KV publishes and the replies
to the services' inboxes, and pairs requests with replies. Each phase then carries `stages`:
admission round trip and service time (it decides one command at a time), binder commit time,
the ledger append's JetStream ack (fsync) and the KV mirror puts, resent appends, and consumer
creations per service (a service replaying the ledger).

Profiling (--profile admission,binder,gateway,budget --profile-dir D): after the fleet is loaded, each
named service is replaced by a copy started by hand under cProfile
(`python -m cProfile -o D/NAME.prof -m jobtree.cli.main serve NAME ...`, same user and
cluster): the admission copy starts as a standby and up's admission is stopped (SIGTERM) so the
copy takes the leader lock; up's binder is stopped before its copy starts (admission resends
the same append meanwhile); a second gateway is started on a free port and the bench talks to
it (up's gateway is stopped); up's budget is stopped before its copy starts. The copies are stopped with SIGINT so cProfile writes its dump.

Targets (issue 3): >= 1,000 runs bound/s sustained; p99 submit->bound <= 50 ms at 200 runs/s.

    .venv/bin/python bench/live_throughput.py [--quick] [--json] [--tap] [--rates 50 200 500]
        [--concurrency 16 64] [--complete runtime|grpc] [--batch-probe 1 10 100]
        [--profile admission,binder,gateway --profile-dir D] [--keep --data-dir D] [--timeline]
To measure one fixed version of the code while others edit the tree, put a `git archive` of it
first on the path: `git archive C libs services | tar -x -C /tmp/jt-C` and
`PYTHONPATH=/tmp/jt-C/libs` (`jobtree up` hands its own package root to the services).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from jobtree.api import convert
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import natsserver
from jobtree.core.model import Run, RunSpec
from live_common import (
    FLAVOR,
    GPUS_PER_NODE,
    REPO,
    Up,
    cpu_delta,
    emit_json,
    load_fleet,
    machine,
    percentile,
    progress,
    self_cpu,
    table,
    team_owner,
)

TARGET_BOUND_PER_S = 1_000.0
TARGET_P99_MS = 50.0
TARGET_P99_RATE = 200
SIZES = (1, 2, 4, 8)
RPC_TIMEOUT = 30.0


# --- one phase's bookkeeping -----------------------------------------------------------------


@dataclass
class Phase:
    """The runs of one phase (a namespace of their own) and what the watch saw of them."""

    namespace: str
    fleet_gpus: int
    util: float
    gpus: dict[str, int] = field(default_factory=dict)
    bound_at: dict[str, float] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    running: collections.OrderedDict[str, int] = field(default_factory=collections.OrderedDict)
    """Runs seen Running and not yet sent a CompleteRun, oldest first, with their GPUs."""
    held: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    max_seq: int = 0
    events: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def over(self) -> bool:
        return self.held > self.util * self.fleet_gpus and bool(self.running)

    def pop_oldest(self) -> str:
        key, gpus = self.running.popitem(last=False)
        self.held -= gpus
        return key


def make_run(namespace: str, name: str, i: int, n_budgets: int, runtime: int | None) -> tuple[pb.Run, int]:
    gpus = SIZES[i % len(SIZES)]
    spec = RunSpec(team_owner(i % n_budgets), FLAVOR, gpus, runtime=runtime)
    return convert.run_to_proto(Run(namespace, name, spec)), gpus


async def watch(stub: Any, ph: Phase, ready: asyncio.Event) -> None:
    """One WatchRuns stream of the phase's namespace: note when each run is first Running."""
    call = stub.WatchRuns(api.WatchRunsRequest(namespace=ph.namespace, send_initial=True))
    ready.set()
    try:
        async for ev in call:
            now = time.perf_counter()
            ph.events += 1
            key = f"{ev.run.metadata.namespace}/{ev.run.metadata.name}"
            phase = ev.run.status.phase
            ph.max_seq = max(ph.max_seq, ev.ledger_sequence)
            if phase == "Running":
                if key not in ph.bound_at:
                    ph.bound_at[key] = now
                    if key not in ph.ended:
                        gpus = ph.gpus.get(key, 0)
                        ph.running[key] = gpus
                        ph.held += gpus
                        ph.changed.set()
            elif phase in ("Completed", "Failed") or ev.type == api.RunEvent.TYPE_DELETED:
                ph.ended.add(key)
                if key in ph.running:
                    ph.held -= ph.running.pop(key)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            progress(f"watch {ph.namespace} ended: {err.code().name} {err.details()}")


async def start_watch(stub: Any, ph: Phase, canary: pb.Run) -> asyncio.Task[None]:
    """Start the phase's watch and make sure it is registered (a canary run must show up)."""
    ready = asyncio.Event()
    task = asyncio.ensure_future(watch(stub, ph, ready))
    await ready.wait()
    ph.gpus[f"{ph.namespace}/{canary.metadata.name}"] = canary.spec.resources.total_gpus
    for attempt in range(10):
        try:
            await stub.SubmitRun(api.SubmitRunRequest(run=canary, request_id=f"{ph.namespace}-canary"),
                                 timeout=RPC_TIMEOUT)
            break
        except grpc.aio.AioRpcError as err:
            if attempt == 9 or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
    deadline = time.perf_counter() + 60
    key = f"{ph.namespace}/{canary.metadata.name}"
    while key not in ph.bound_at:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the watch of {ph.namespace} did not see the canary run bind")
        await asyncio.sleep(0.01)
    return task


async def complete(stub: Any, ph: Phase, key: str) -> None:
    ns, _, name = key.partition("/")
    try:
        await stub.CompleteRun(api.CompleteRunRequest(run=pb.RunRef(namespace=ns, name=name)), timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        ph.errors[f"CompleteRun {err.code().name}"] += 1


async def completer(stub: Any, ph: Phase, stop: asyncio.Event, max_in_flight: int = 32) -> int:
    """Complete the oldest running runs while they hold more than `util` of the fleet."""
    in_flight: set[asyncio.Task[None]] = set()
    sent = 0
    while not stop.is_set():
        while ph.over() and len(in_flight) < max_in_flight:
            t = asyncio.ensure_future(complete(stub, ph, ph.pop_oldest()))
            in_flight.add(t)
            t.add_done_callback(in_flight.discard)
            sent += 1
        ph.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ph.changed.wait(), 0.01)
    if in_flight:
        await asyncio.gather(*in_flight)
    return sent


async def drain(stub: Any, ph: Phase, runtime_mode: bool, timeout: float = 60.0) -> None:
    """Complete every run of the phase still running (or wait for the resolver to)."""
    deadline = time.perf_counter() + timeout
    if not runtime_mode:
        while ph.running and time.perf_counter() < deadline:
            keys = [ph.pop_oldest() for _ in range(min(64, len(ph.running)))]
            await asyncio.gather(*(complete(stub, ph, k) for k in keys))
    while time.perf_counter() < deadline:
        live = [k for k in ph.bound_at if k not in ph.ended]
        if not live:
            return
        await asyncio.sleep(0.1)
    progress(f"drain of {ph.namespace}: {sum(1 for k in ph.bound_at if k not in ph.ended)} runs still running")


async def quiesce(stub: Any, ph: Phase, stable: float, timeout: float) -> float:
    """Wait until the gateway's view stops moving for `stable` seconds (the pipeline has worked
    off its backlog); returns the seconds waited."""
    ref = pb.RunRef(namespace=ph.namespace, name="canary")
    t0 = time.perf_counter()
    last, since = -1, time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            seq = (await stub.GetRun(api.GetRunRequest(run=ref), timeout=10)).ledger_sequence
        except grpc.aio.AioRpcError:
            seq = -2
        if seq != last:
            last, since = seq, time.perf_counter()
        elif time.perf_counter() - since >= stable:
            return time.perf_counter() - t0
        await asyncio.sleep(0.25)
    progress(f"{ph.namespace}: the ledger still moves after {timeout:.0f}s")
    return time.perf_counter() - t0


async def settle(stub: Any, ph: Phase, args: argparse.Namespace) -> float:
    """After a phase: let the backlog drain, complete what still runs, let that commit too."""
    stable = max(2.0, args.runtime + 1.5) if args.complete == "runtime" else 2.0
    waited = await quiesce(stub, ph, stable, args.quiesce)
    await drain(stub, ph, args.complete == "runtime")
    waited += await quiesce(stub, ph, stable, args.quiesce)
    return waited


# --- the phases ----------------------------------------------------------------------------------


class Cpu:
    """CPU seconds of up's processes and of this client over a window."""

    def __init__(self, up: Up, extra: dict[str, int]) -> None:
        self.up = up
        self.extra = extra

    def sample(self) -> dict[str, float]:
        from live_common import proc_cpu

        out = self.up.cpu()
        for name, pid in self.extra.items():
            c = proc_cpu(pid)
            if c is not None:
                out[name] = c
        out["bench-client"] = self_cpu()
        return out


async def latency_phase(stub: Any, up: Up, cpu: Cpu, rate: int, seconds: float, args: argparse.Namespace,
                        fleet_gpus: int) -> dict[str, Any]:
    ns = f"lat{rate}"
    ph = Phase(ns, fleet_gpus, args.util)
    runtime = args.runtime if args.complete == "runtime" else None
    n = int(rate * seconds)
    runs = [make_run(ns, f"r{i:06d}", i, args.budgets, runtime) for i in range(n)]
    for msg, gpus in runs:
        ph.gpus[f"{ns}/{msg.metadata.name}"] = gpus
    canary, _ = make_run(ns, "canary", 0, args.budgets, runtime)
    wtask = await start_watch(stub, ph, canary)
    stop = asyncio.Event()
    ctask = asyncio.ensure_future(completer(stub, ph, stop)) if args.complete == "grpc" else None
    scheduled: dict[str, float] = {}
    replied: dict[str, float] = {}
    reply_phase: collections.Counter[str] = collections.Counter()
    in_flight = 0
    shed = 0
    max_in_flight = 0

    async def submit(msg: pb.Run, key: str) -> None:
        nonlocal in_flight
        try:
            resp = await stub.SubmitRun(api.SubmitRunRequest(run=msg), timeout=RPC_TIMEOUT)
            replied[key] = time.perf_counter()
            reply_phase[resp.run.status.phase or "?"] += 1
        except grpc.aio.AioRpcError as err:
            ph.errors[f"SubmitRun {err.code().name}"] += 1
        finally:
            in_flight -= 1

    progress(f"latency {rate}/s: {n} arrivals over {seconds:.0f}s")
    tasks = []
    c0 = cpu.sample()
    t0 = time.perf_counter() + 0.2
    wall0 = time.time() + 0.2
    last_report = t0
    for i, (msg, _) in enumerate(runs):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"{ns}/{msg.metadata.name}"
        if in_flight >= args.max_in_flight:
            shed += 1
            continue
        scheduled[key] = at
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        tasks.append(asyncio.ensure_future(submit(msg, key)))
        now = time.perf_counter()
        if now - last_report >= 5:
            last_report = now
            progress(f"latency {rate}/s: t+{now - t0:.0f}s sent {len(scheduled)} bound {len(ph.bound_at) - 1} "
                     f"in flight {in_flight} held {ph.held} GPUs")
    t_end = t0 + n / rate
    wall1 = wall0 + n / rate
    c1 = cpu.sample()
    # let the stragglers bind
    deadline = time.perf_counter() + args.drain
    while time.perf_counter() < deadline and any(k not in ph.bound_at for k in scheduled):
        await asyncio.sleep(0.05)
    stop.set()
    completes = await ctask if ctask is not None else 0
    lat = [(ph.bound_at[k] - at) * 1e3 for k, at in scheduled.items() if k in ph.bound_at]
    rpc = [(replied[k] - at) * 1e3 for k, at in scheduled.items() if k in replied]
    # Where the tail sits in time: per second of arrivals, the latency percentiles (a tail
    # spread evenly is queueing; one bad second is a stall somewhere).
    per_second: dict[int, list[float]] = collections.defaultdict(list)
    for k, at in scheduled.items():
        if k in ph.bound_at:
            per_second[int(at - t0)].append((ph.bound_at[k] - at) * 1e3)
    timeline = [{"second": s_, "bound": len(v), "p50_ms": round(percentile(v, 50), 1),
                 "p99_ms": round(percentile(v, 99), 1), "max_ms": round(max(v), 1)}
                for s_, v in sorted(per_second.items())]
    if args.timeline:
        for row in timeline:
            progress(f"latency {rate}/s: second {row['second']:3d}: bound {row['bound']:4d} p50 {row['p50_ms']:7.1f} ms "
                     f"p99 {row['p99_ms']:7.1f} ms max {row['max_ms']:7.1f} ms")
    in_window = sum(1 for k, at in scheduled.items() if k in ph.bound_at and ph.bound_at[k] <= t_end)
    errors = dict(ph.errors)
    await asyncio.gather(*tasks)
    settle_s = await settle(stub, ph, args)
    wtask.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await wtask
    out = {
        "phase": "latency", "timeline": timeline, "offered_per_s": rate, "seconds": seconds, "arrivals": n, "sent": len(scheduled),
        "shed": shed, "bound": len(lat), "unbound": len(scheduled) - len(lat),
        "bound_per_s_in_window": round(in_window / (n / rate), 1),
        "p50_ms": round(percentile(lat, 50), 2), "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2), "max_ms": round(max(lat), 2) if lat else None,
        "submit_rpc_p50_ms": round(percentile(rpc, 50), 2), "submit_rpc_p99_ms": round(percentile(rpc, 99), 2),
        "reply_phase": dict(reply_phase), "completes_sent": completes, "max_in_flight": max_in_flight,
        "errors": errors, "watch_events": ph.events, "ledger_sequence": ph.max_seq,
        "bound_later": len(ph.bound_at) - 1 - len(lat), "settle_s": round(settle_s, 1),
        "window_wall": [wall0, wall1],
        "cpu_s": cpu_delta(c0, c1),
    }
    progress(f"latency {rate}/s: p50 {out['p50_ms']} ms p99 {out['p99_ms']} ms bound {len(lat)}/{len(scheduled)} "
             f"shed {shed} completes {completes} errors {errors}; backlog worked off in {settle_s:.0f}s")
    return out


async def sustained_phase(stub: Any, up: Up, cpu: Cpu, conc: int, args: argparse.Namespace,
                          fleet_gpus: int) -> dict[str, Any]:
    ns = f"sus{conc}"
    ph = Phase(ns, fleet_gpus, args.util)
    runtime = args.runtime if args.complete == "runtime" else None
    canary, _ = make_run(ns, "canary", 0, args.budgets, runtime)
    wtask = await start_watch(stub, ph, canary)
    counter = 0
    submitted: list[float] = []
    completed: list[float] = []
    rpc_ms: list[float] = []
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup
    t_stop = t_measure + args.sustain_seconds
    progress(f"sustained, {conc} clients: {args.warmup:.0f}s warm-up + {args.sustain_seconds:.0f}s measured")

    async def client() -> None:
        nonlocal counter
        while time.perf_counter() < t_stop:
            if args.complete == "grpc" and ph.over():
                await complete(stub, ph, ph.pop_oldest())
                completed.append(time.perf_counter())
                continue
            i = counter
            counter += 1
            msg, gpus = make_run(ns, f"r{i:07d}", i, args.budgets, runtime)
            ph.gpus[f"{ns}/{msg.metadata.name}"] = gpus
            s = time.perf_counter()
            try:
                await stub.SubmitRun(api.SubmitRunRequest(run=msg), timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                ph.errors[f"SubmitRun {err.code().name}"] += 1
                continue
            e = time.perf_counter()
            submitted.append(e)
            if e >= t_measure:
                rpc_ms.append((e - s) * 1e3)

    async def reporter() -> None:
        while time.perf_counter() < t_stop:
            await asyncio.sleep(5)
            el = time.perf_counter() - t_start
            progress(f"sustained {conc}: t+{el:.0f}s submitted {len(submitted)} bound {len(ph.bound_at)} "
                     f"completes {len(completed)} held {ph.held} GPUs")

    rep = asyncio.ensure_future(reporter())
    clients = [asyncio.ensure_future(client()) for _ in range(conc)]
    await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
    c0 = cpu.sample()
    wall0 = time.time()
    seq0 = ph.max_seq
    await asyncio.gather(*clients)
    c1 = cpu.sample()
    wall1 = wall0 + (t_stop - t_measure)
    rep.cancel()
    await asyncio.sleep(0.5)  # the last watch events
    window = t_stop - t_measure
    bound = sum(1 for t in ph.bound_at.values() if t_measure <= t < t_stop)
    subs = sum(1 for t in submitted if t_measure <= t < t_stop)
    comps = sum(1 for t in completed if t_measure <= t < t_stop)
    out = {
        "phase": "sustained", "clients": conc, "seconds": round(window, 2), "bound": bound,
        "bound_per_s": round(bound / window, 1), "submits_per_s": round(subs / window, 1),
        "completes_per_s": round(comps / window, 1), "commands_per_s": round((subs + comps) / window, 1),
        "submit_rpc_p50_ms": round(percentile(rpc_ms, 50), 2), "submit_rpc_p99_ms": round(percentile(rpc_ms, 99), 2),
        "errors": dict(ph.errors), "ledger_messages": ph.max_seq - seq0, "ledger_sequence": ph.max_seq,
        "window_wall": [wall0, wall1], "cpu_s": cpu_delta(c0, c1),
    }
    progress(f"sustained {conc}: {out['bound_per_s']} bound/s, {out['commands_per_s']} commands/s, "
             f"submit p50 {out['submit_rpc_p50_ms']} ms p99 {out['submit_rpc_p99_ms']} ms")
    out["settle_s"] = round(await settle(stub, ph, args), 1)
    wtask.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await wtask
    return out


async def batch_probe(stub: Any, up: Up, cpu: Cpu, k: int, args: argparse.Namespace,
                      fleet_gpus: int) -> dict[str, Any]:
    """What batching across commands would buy, with the services as they are: `Batch` commands
    of `k` ApplyRuns sent as admin straight to admission (no gateway), --probe-inflight at a
    time, for --probe-seconds; one decision, one ledger message and one follower update per
    batch. Runs carry a 1 s runtime (the resolver completes them)."""
    from jobtree.api.jobtree.v1 import bus_pb2 as bus
    from jobtree.bus import subjects
    from jobtree.core import facts
    from live_common import admin_nats

    ns = f"batch{k}"
    ph = Phase(ns, fleet_gpus, args.util)
    canary, _ = make_run(ns, "canary", 0, args.budgets, 1)
    wtask = await start_watch(stub, ph, canary)
    nc = await admin_nats(up)
    subject = subjects.request(up.cluster, "admission", "command")
    counter = 0
    sent_runs = 0
    lat: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    t_start = time.perf_counter()
    t_measure = t_start + 2.0
    t_stop = t_measure + args.probe_seconds

    async def sender() -> None:
        nonlocal counter, sent_runs
        while time.perf_counter() < t_stop:
            cmds = []
            for _ in range(k):
                i = counter
                counter += 1
                gpus = SIZES[i % len(SIZES)]
                run = Run(ns, f"r{i:07d}", RunSpec(team_owner(i % args.budgets), FLAVOR, gpus, runtime=1))
                ph.gpus[run.key] = gpus
                cmds.append(facts.ApplyRun(run))
            msg = convert.batch_to_proto(cmds, command_id=f"{ns}-{counter}", instant=int(time.time()))
            s = time.perf_counter()
            try:
                raw = await nc.request(subject, msg.SerializeToString(), timeout=30.0)
                reply = bus.CommandReply.FromString(raw.data)
                if reply.error.code:
                    errors[bus.ErrorCode.Name(reply.error.code)] += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
                continue
            e = time.perf_counter()
            if e >= t_measure:
                lat.append((e - s) * 1e3)
                sent_runs += k

    progress(f"batch probe, {k} runs per Batch command, {args.probe_inflight} in flight: {args.probe_seconds:.0f}s")
    senders = [asyncio.ensure_future(sender()) for _ in range(args.probe_inflight)]
    await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
    c0 = cpu.sample()
    wall0 = time.time()
    await asyncio.gather(*senders)
    c1 = cpu.sample()
    await nc.close()
    await asyncio.sleep(0.5)
    window = t_stop - t_measure
    bound = sum(1 for t in ph.bound_at.values() if t_measure <= t < t_stop)
    out = {"phase": "batch", "runs_per_command": k, "in_flight": args.probe_inflight, "seconds": round(window, 2),
           "bound": bound, "bound_per_s": round(bound / window, 1), "runs_committed_per_s": round(sent_runs / window, 1),
           "commands_per_s": round(len(lat) / window, 1), "command_p50_ms": round(percentile(lat, 50), 2),
           "command_p99_ms": round(percentile(lat, 99), 2), "errors": dict(errors),
           "window_wall": [wall0, wall0 + window], "cpu_s": cpu_delta(c0, c1)}
    progress(f"batch probe {k}: {out['bound_per_s']} bound/s, {out['commands_per_s']} commands/s, "
             f"command p50 {out['command_p50_ms']} ms")
    out["settle_s"] = round(await settle(stub, ph, args), 1)
    wtask.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await wtask
    return out


# --- profiling copies of services ------------------------------------------------------------------


class Profiled:
    """Services of a running up replaced by copies under cProfile (see the module docstring)."""

    def __init__(self, up: Up, names: list[str], out_dir: Path) -> None:
        self.up = up
        self.names = names
        self.out_dir = out_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.grpc = ""

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        data = self.up.data_dir / "services" / f"{name}-profiled"
        data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.up.secrets().env(name), "PYTHONUNBUFFERED": "1"}
        if name == "gateway":
            env["JOBTREE_GRPC_PORT"] = "0"
            env.setdefault("JOBTREE_GRPC_INSECURE", "1")  # as up serves it without --tls: plain, on loopback
        log = (self.out_dir / f"{name}.log").open("ab")
        argv = [sys.executable, "-m", "cProfile", "-o", str(self.out_dir / f"{name}.prof"), "-m", "jobtree.cli.main",
                "serve", name, "--cluster", self.up.cluster, "--nats", self.up.nats, "--data-dir", str(data),
                "--clock", self.up.clock]
        orphan_safe = getattr(natsserver, "orphan_safe", None)  # SIGTERM when this bench dies
        if orphan_safe is not None:
            argv = orphan_safe(argv)
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _wait_log(self, name: str, needle: str, timeout: float = 30.0) -> None:
        path = self.out_dir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"profiled {name} exited: {path.read_text()[-2000:]}")
            if needle in path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"profiled {name}: no {needle!r} in its log within {timeout:.0f}s")

    def _stop_ups(self, name: str) -> None:
        pid = self.up.pids()[name]
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z":
                return
            time.sleep(0.05)

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            if name == "admission":
                self._spawn(name)
                self._wait_log(name, '"started"')
                self._stop_ups(name)
                self._wait_log(name, '"leader"')
            elif name == "binder":
                self._stop_ups(name)
                self._spawn(name)
                self._wait_log(name, '"started"')
                time.sleep(1.0)  # reconcile
            elif name == "gateway":
                self._spawn(name)
                self._wait_log(name, "view ready")
                port = int((self.up.data_dir / "services" / "gateway-profiled" / "gateway.port").read_text())
                self.grpc = f"127.0.0.1:{port}"
                self._stop_ups(name)
            elif name == "budget":
                self._stop_ups(name)
                self._spawn(name)
                self._wait_log(name, "following the ledger")
            else:
                raise SystemExit(f"--profile: {name} is not supported (admission, binder, gateway, budget)")
            progress(f"profiling {name}: pid {self.procs[name].pid} -> {self.out_dir / (name + '.prof')}")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for name, p in self.procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                progress(f"profiled {name} did not stop: SIGKILL (no profile written)")
                p.kill()
                p.wait()


class Tap:
    """`live_tap.py` as its own process on up's bus (admin)."""

    def __init__(self, up: Up, out: Path) -> None:
        self.out = out
        argv = [sys.executable, str(Path(__file__).resolve().parent / "live_tap.py"), "--nats", up.nats,
                "--secrets", str(up.data_dir / "secrets.json"), "--cluster", up.cluster, "--out", str(out)]
        orphan_safe = getattr(natsserver, "orphan_safe", None)
        self.proc = subprocess.Popen(orphan_safe(argv) if orphan_safe else argv, cwd=REPO,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        ready = out.with_suffix(".ready")
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the bus tap did not start")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any] | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            doc: dict[str, Any] = json.loads(self.out.read_text())
            return doc
        except (OSError, ValueError):
            return None


# --- main -------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    fleet_gpus = args.nodes * GPUS_PER_NODE
    up = Up(data_dir, clock="system")
    if args.profile:  # the profiled admission copy must be the only standby to take the lock
        up.extra_args = ["--admission-replicas", "1"]
    progress(f"starting jobtree up on {data_dir}")
    up.start()
    profiled: Profiled | None = None
    tap: Tap | None = None
    try:
        progress(f"up ready in {up.started_s:.1f}s: grpc {up.grpc}, nats {up.nats}")
        channel = grpc.aio.insecure_channel(up.grpc)
        stub = api_grpc.JobtreeStub(channel)
        c0 = up.cpu()
        t0 = time.perf_counter()
        load = await load_fleet(up, stub, args.nodes, args.budgets, batch=args.node_batch)
        load["total_s"] = round(time.perf_counter() - t0, 3)
        load["cpu_s"] = cpu_delta(c0, up.cpu())
        progress(f"fleet loaded: {args.nodes} nodes ({fleet_gpus} GPUs) in {load['nodes_s']}s, "
                 f"{args.budgets} budgets in {load['budgets_s']}s")
        if args.profile:
            profiled = Profiled(up, args.profile, args.profile_dir)
            profiled.start()
            if profiled.grpc:
                await channel.close()
                channel = grpc.aio.insecure_channel(profiled.grpc)
                stub = api_grpc.JobtreeStub(channel)
        extra = profiled.pids() if profiled else {}
        if args.tap:
            tap = Tap(up, data_dir.parent / f"{data_dir.name}.tap.json")
            extra["tap"] = tap.proc.pid
        cpu = Cpu(up, extra)
        results = []
        for rate in args.rates:
            try:
                results.append(await latency_phase(stub, up, cpu, rate, args.rate_seconds, args, fleet_gpus))
            except Exception as exc:
                progress(f"latency {rate}/s failed: {exc!r}")
                results.append({"phase": "latency-failed", "offered_per_s": rate, "error": repr(exc)})
        for conc in args.concurrency:
            try:
                results.append(await sustained_phase(stub, up, cpu, conc, args, fleet_gpus))
            except Exception as exc:
                progress(f"sustained {conc} failed: {exc!r}")
                results.append({"phase": "sustained-failed", "clients": conc, "error": repr(exc)})
        for k in args.batch_probe:
            try:
                results.append(await batch_probe(stub, up, cpu, k, args, fleet_gpus))
            except Exception as exc:
                progress(f"batch probe {k} failed: {exc!r}")
                results.append({"phase": "batch-failed", "runs_per_command": k, "error": repr(exc)})
        await channel.close()
        if tap is not None:
            doc = tap.stop()
            tap = None
            if doc is not None:
                from live_tap import summarize

                for r in results:
                    if "window_wall" in r:
                        r["stages"] = summarize(doc, *r["window_wall"])
        return {"up_ready_s": round(up.started_s, 2), "load": load, "results": results}
    finally:
        if tap is not None:
            tap.stop()
        if profiled is not None:
            profiled.stop()
        code = up.stop()
        progress(f"jobtree up stopped (exit {code})")


READERS = ("packer", "resolver", "dashboard")
"""The read services that answer now and then (`docs/design/read-views.md`): one CPU column."""


def report(args: argparse.Namespace, got: dict[str, Any]) -> dict[str, Any]:
    lat = [r for r in got["results"] if r["phase"] == "latency"]
    sus = [r for r in got["results"] if r["phase"] == "sustained"]

    def cpu_cols(r: dict[str, Any]) -> list[object]:
        c = r["cpu_s"]
        return [c.get("gateway"), c.get("admission"), c.get("admission-2"), c.get("binder"), c.get("nats-server"),
                c.get("budget"), round(sum(c.get(k, 0.0) for k in READERS), 2), c.get("bench-client")]

    cpu_h = ["gw cpu", "adm cpu", "standby cpu", "bind cpu", "nats cpu", "budget cpu", "readers cpu", "client cpu"]
    print(f"Live system: jobtree up, {args.nodes} nodes x {GPUS_PER_NODE} GPUs, {args.budgets} budgets, "
          f"completion by {args.complete}")
    if lat:
        print("\nSubmit -> bound latency (open loop; bound = first Running on one WatchRuns stream)")
        print(table(["offered/s", "sent", "bound", "unbound", "shed", "bound/s", "p50 ms", "p90 ms", "p99 ms",
                     "max ms", "rpc p50", "rpc p99", "completes", *cpu_h],
                    [[r["offered_per_s"], r["sent"], r["bound"], r["unbound"], r["shed"], r["bound_per_s_in_window"],
                      r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"], r["submit_rpc_p50_ms"],
                      r["submit_rpc_p99_ms"], r["completes_sent"], *cpu_cols(r)] for r in lat]))
    if sus:
        print("\nSustained runs bound per second (closed loop, N gRPC clients)")
        print(table(["clients", "seconds", "bound", "bound/s", "submits/s", "completes/s", "commands/s",
                     "rpc p50 ms", "rpc p99 ms", *cpu_h],
                    [[r["clients"], r["seconds"], r["bound"], r["bound_per_s"], r["submits_per_s"],
                      r["completes_per_s"], r["commands_per_s"], r["submit_rpc_p50_ms"], r["submit_rpc_p99_ms"],
                      *cpu_cols(r)] for r in sus]))
    bat = [r for r in got["results"] if r["phase"] == "batch"]
    if bat:
        print("\nBatch probe: Batch commands of K ApplyRuns as admin straight to admission (no gateway)")
        print(table(["K", "in flight", "bound", "bound/s", "commands/s", "cmd p50 ms", "cmd p99 ms", *cpu_h],
                    [[r["runs_per_command"], r["in_flight"], r["bound"], r["bound_per_s"], r["commands_per_s"],
                      r["command_p50_ms"], r["command_p99_ms"], *cpu_cols(r)] for r in bat]))
    best = max((r["bound_per_s"] for r in sus), default=None)
    at200 = next((r for r in lat if r["offered_per_s"] == TARGET_P99_RATE), None)
    verdicts = {}
    if best is not None:
        verdicts["bound_per_s"] = {"value": best, "target": TARGET_BOUND_PER_S, "met": best >= TARGET_BOUND_PER_S}
        print(f"\ntarget >= {TARGET_BOUND_PER_S:,.0f} runs bound/s: {'MET' if best >= TARGET_BOUND_PER_S else 'MISSED'} "
              f"(best {best:,.1f}/s)")
    if at200 is not None:
        ok = at200["unbound"] == 0 and at200["p99_ms"] <= TARGET_P99_MS
        verdicts["p99_at_200"] = {"value": at200["p99_ms"], "target": TARGET_P99_MS, "met": ok}
        print(f"target p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_P99_RATE} runs/s: {'MET' if ok else 'MISSED'} "
              f"(p99 {at200['p99_ms']} ms, {at200['unbound']} unbound)")
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--budgets", type=int, default=20)
    ap.add_argument("--node-batch", type=int, default=100, help="AddNode commands per Batch command")
    ap.add_argument("--rates", type=int, nargs="*", default=[50, 200, 500], help="offered runs/s, one phase each")
    ap.add_argument("--rate-seconds", type=float, default=20.0)
    ap.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers after the arrivals")
    ap.add_argument("--max-in-flight", type=int, default=5_000, help="open loop: arrivals beyond this are shed")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[16, 64], help="clients, one sustained phase each")
    ap.add_argument("--sustain-seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--quiesce", type=float, default=240.0,
                    help="after a phase, wait up to this long for the pipeline to work off its backlog")
    ap.add_argument("--batch-probe", type=int, nargs="*", default=[],
                    help="after the other phases: Batch commands of K ApplyRuns straight to admission, one phase per K")
    ap.add_argument("--probe-seconds", type=float, default=10.0)
    ap.add_argument("--probe-inflight", type=int, default=2)
    ap.add_argument("--util", type=float, default=0.5, help="complete runs beyond this fraction of the fleet held")
    ap.add_argument("--complete", choices=("grpc", "runtime"), default="runtime")
    ap.add_argument("--runtime", type=int, default=2, help="--complete runtime: seconds a run runs")
    ap.add_argument("--profile", type=lambda s: [x for x in s.split(",") if x], default=[])
    ap.add_argument("--profile-dir", type=Path, default=Path("/tmp/jobtree-live-prof"))
    ap.add_argument("--tap", action="store_true",
                    help="time every stage on the bus with a passive tap process (bench/live_tap.py)")
    ap.add_argument("--timeline", action="store_true",
                    help="print each latency phase's percentiles per second of arrivals (always in --json)")
    ap.add_argument("--data-dir", type=Path, help="default: a fresh temporary directory (removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--quick", action="store_true", help="smoke test: 100 nodes, short phases")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.rates, args.rate_seconds, args.concurrency = 100, [20], 3.0, [8]
        args.sustain_seconds, args.warmup, args.drain = 3.0, 1.0, 5.0
    args.profile_dir = args.profile_dir.resolve()
    tmp = None
    if args.data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="jobtree-live-"))
        data_dir = tmp / "up"
    else:
        data_dir = args.data_dir.resolve()
    info = machine()
    try:
        got = asyncio.run(bench(args, data_dir))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    verdicts = report(args, got)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        emit_json({"bench": "live_throughput", "machine": info, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                   "argv": sys.argv[1:], "settings": settings, **got, "targets": verdicts})


if __name__ == "__main__":
    main()
