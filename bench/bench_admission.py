"""Admission throughput of the core (issue 2, item 5): gang admissions per second of wall time.

World (built outside the timed region): N nodes of 8 H100-80GB GPUs in fabric domains of 32
nodes; 100 owners (10 departments, 90 teams) with 100 budgets / 105 envelopes whose concurrency
sums to about the fleet (family sharing, 5 aggregate caps, 5 GPU-hour caps); a seeded mix of runs
(70% 1-8 GPU ungrouped, 25% 16-64 GPU with groupGPUs 8, 5% malleable 16->64 step 8).

Loop, on a virtual clock: every simulated second, `advance(t)`, then one `submit(...)` carrying
the CompleteRun of every bound run whose (exponential) duration has elapsed and the next batch of
arrivals (default 100). Durations are scaled so the fleet runs at about --util (default 0.75)
of its GPUs: busy, not saturated. Only the time inside `advance` and `submit` is counted.

Gang admissions/s = runs bound (Pending -> Running transitions, rebinds included) / that time
(wall, time.perf_counter); also per second of this process's CPU time (time.process_time) inside
the same calls, which is the fairer "one core" figure when the machine is shared.
Target (issue 2): >= 5,000 gang admissions/s at 10,000 nodes on one core.

    .venv/bin/python bench/bench_admission.py [--nodes 1000 10000] [--runs 20000] [--backlog 0 1000 10000]
        [--quick] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import time
from collections import Counter

from _world import (
    FLAVOR,
    GPUS_PER_NODE,
    SEED,
    T0,
    CoreWatch,
    emit_json,
    machine,
    make_budgets,
    make_nodes,
    make_runs,
    mean_demand,
    progress,
    table,
)
from jobtree.core.engine import Cluster
from jobtree.core.facts import ApplyBudget, ApplyRun, CompleteRun, LeaseClosed, LeaseMinted, RunStatusPut
from jobtree.core.model import ClusterConfig, FundingClass, Locality, Phase, Run, RunSpec

TARGET_NODES = 10_000
TARGET_RATE = 5_000.0


def backlog_runs(n: int, fleet: int) -> list[Run]:
    """`n` runs that wait for ever: each asks for more GPUs than the fleet has, for an owner no
    budget funds, so admission retries and parks them whenever anything changes (a deep queue)."""
    spec = RunSpec("org:backlog", FLAVOR, fleet + 8, locality=Locality(group_gpus=8))
    return [Run("backlog", f"b{j:06d}", spec) for j in range(n)]


def run_size(nodes: int, runs: int, rate: int, util: float, max_seconds: float, seed: int,
             quiet: bool = False, backlog: int = 0) -> dict[str, object]:
    fleet = nodes * GPUS_PER_NODE
    mean_duration = max(1.0, util * fleet / (rate * mean_demand()))
    cl = Cluster(ClusterConfig(cluster="bench"), make_nodes(nodes), T0)
    cl.submit(*(ApplyBudget(b) for b in make_budgets(fleet, seed)))
    if backlog:
        cl.submit(*(ApplyRun(r) for r in backlog_runs(backlog, fleet)))
    arrivals = make_runs(runs, mean_duration, seed)
    duration = {a.run.key: a.duration for a in arrivals}
    kinds = Counter(a.kind for a in arrivals)

    timed = 0.0
    cpu = 0.0  # process CPU time inside the same calls: robust when the machine is shared
    bound = 0
    bound_runs: set[str] = set()
    completions = 0
    facts_by_kind: Counter[str] = Counter()
    running: set[str] = set()
    due: list[tuple[int, str, int]] = []  # (finish instant, run, bind serial)
    serial: dict[str, int] = {}
    held = 0  # GPUs in open leases
    util_samples: list[float] = []
    max_queue = 0  # runs submitted and neither running nor completed (pending, reserved)
    submitted = 0
    truncated = False
    t = T0
    wall0 = time.perf_counter()

    def digest(facts: list) -> None:
        nonlocal bound, held
        for f in facts:
            kind = type(f).__name__
            facts_by_kind[kind] += 1
            if isinstance(f, LeaseMinted):
                held += f.lease.gpus
            elif isinstance(f, LeaseClosed):
                held -= cl.leases[f.name].gpus
            elif isinstance(f, RunStatusPut):
                key, phase = f.run, f.status.phase
                if phase is Phase.RUNNING and key not in running:
                    running.add(key)
                    bound += 1
                    bound_runs.add(key)
                    serial[key] = serial.get(key, 0) + 1
                    heapq.heappush(due, (cl.now + duration[key], key, serial[key]))
                elif phase is not Phase.RUNNING and key in running:
                    running.discard(key)

    batches = -(-runs // rate)
    for b in range(batches):
        t += 1
        s, c = time.perf_counter(), time.process_time()
        facts = cl.advance(t)
        timed += time.perf_counter() - s
        cpu += time.process_time() - c
        digest(facts)
        cmds: list[CompleteRun | ApplyRun] = []
        while due and due[0][0] <= t:
            _, key, n = heapq.heappop(due)
            if key in running and serial[key] == n:
                cmds.append(CompleteRun(key))
        completions += len(cmds)
        batch = arrivals[b * rate:(b + 1) * rate]
        cmds.extend(ApplyRun(a.run) for a in batch)
        submitted += len(batch)
        s, c = time.perf_counter(), time.process_time()
        facts = cl.submit(*cmds)
        timed += time.perf_counter() - s
        cpu += time.process_time() - c
        digest(facts)
        util_samples.append(held / fleet)
        max_queue = max(max_queue, submitted - len(running) - completions)
        if not quiet and (b % 20 == 19 or b == batches - 1):
            progress(f"admission {nodes} nodes: t+{b + 1}s submitted {submitted:,} bound {bound:,} "
                     f"running {len(running):,} util {held / fleet:.0%} core time {timed:.1f}s "
                     f"({bound / timed if timed else 0:,.0f} adm/s)")
        if timed > max_seconds and b < batches - 1:
            truncated = True
            if not quiet:
                progress(f"admission {nodes} nodes: stopping after {timed:.0f}s of core time (--max-seconds)")
            break
    wall = time.perf_counter() - wall0

    phases = Counter(st.phase.value for key, st in cl.status.items())
    cl.funding.refresh()
    classes: Counter[str] = Counter()
    for ls in cl.open_by_run.values():
        for lease in ls.values():
            classes[cl.funding.class_of(lease.name).value] += lease.gpus
    decisions = sum(facts_by_kind.values())
    steady = util_samples[len(util_samples) // 2:] or [0.0]
    return {
        "nodes": nodes,
        "backlog": backlog,
        "us_per_decision": round(1e6 * timed / decisions, 1) if decisions else None,
        "gpus": fleet,
        "runs_planned": runs,
        "runs_submitted": submitted,
        "mix": dict(kinds),
        "batch_per_second": rate,
        "simulated_seconds": t - T0,
        "mean_duration_s": round(mean_duration, 2),
        "core_seconds": round(timed, 4),
        "core_cpu_seconds": round(cpu, 4),
        "admissions_per_cpu_s": round(bound / cpu, 1) if cpu else None,
        "loop_seconds": round(wall, 4),
        "gang_admissions": bound,
        "distinct_runs_bound": len(bound_runs),
        "admissions_per_s": round(bound / timed, 1) if timed else None,
        "decisions": decisions,
        "decisions_per_s": round(decisions / timed, 1) if timed else None,
        "facts": dict(facts_by_kind),
        "completions": completions,
        "phases_at_end": dict(phases),
        "running_at_end": phases.get(Phase.RUNNING.value, 0),
        "pending_at_end": phases.get(Phase.PENDING.value, 0) + phases.get(Phase.RESERVED.value, 0),
        "max_queue": max_queue,
        "open_gpus_by_class_at_end": {c.value: classes.get(c.value, 0) for c in FundingClass},
        "mean_util_second_half": round(sum(steady) / len(steady), 3),
        "truncated": truncated,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--runs", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=100, help="arrivals per simulated second")
    ap.add_argument("--util", type=float, default=0.75, help="target fraction of GPUs busy")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="stop feeding arrivals once this much core time is spent (per size)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--backlog", type=int, nargs="+", default=[0], metavar="N",
                    help="runs that wait for ever, queued before the arrivals (one result per N): "
                         "the cost per decision should stay flat as N grows (issue 8)")
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (100 nodes, 1,000 runs)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    watch = CoreWatch()
    if args.quick:
        args.nodes, args.runs, args.rate = [100], 1_000, 10
    results = []
    for n in args.nodes:
        for depth in args.backlog:
            results.append(run_size(n, args.runs, args.rate, args.util, args.max_seconds, args.seed,
                                    quiet=args.quick, backlog=depth))
    print("Admission throughput (core only: wall time inside Cluster.advance/submit)")
    rows = []
    for r in results:
        rows.append([r["nodes"], r["backlog"], r["us_per_decision"], r["gpus"], r["runs_submitted"], r["core_seconds"], r["core_cpu_seconds"],
                     r["gang_admissions"], r["admissions_per_s"], r["admissions_per_cpu_s"], r["decisions"],
                     r["decisions_per_s"], r["completions"],
                     r["running_at_end"], r["pending_at_end"], r["max_queue"], r["mean_util_second_half"],
                     "yes" if r["truncated"] else "no"])
    print(table(["nodes", "backlog", "µs/decision", "GPUs", "runs in", "core s", "cpu s", "bound", "adm/s", "adm/cpu-s", "decisions", "dec/s",
                 "completed", "running", "pending", "max queue", "util", "truncated"], rows))
    verdict = None
    for r in results:
        if r["nodes"] == TARGET_NODES and not r["backlog"]:
            rate = r["admissions_per_s"] or 0.0
            cpu_rate = r["admissions_per_cpu_s"] or 0.0
            verdict = max(rate, cpu_rate) >= TARGET_RATE
            print(f"target >= {TARGET_RATE:,.0f} gang admissions/s at {TARGET_NODES:,} nodes: "
                  f"{'MET' if verdict else 'MISSED'} ({rate:,.1f}/s wall, {cpu_rate:,.1f}/s of CPU time)")
    changed = watch.changed()
    if args.json:
        emit_json({"bench": "admission", "machine": machine(), "core_before": watch.before, "core_changed": changed,
                   "results": results,
                   "target": {"nodes": TARGET_NODES, "admissions_per_s": TARGET_RATE, "met": verdict}})


if __name__ == "__main__":
    main()
