"""Peak memory of the core (issue 2, item 5): 80,000 GPUs (10,000 nodes) and 100,000 runs.

World: the fleet, budgets and run mix of `_world` (10,000 8-GPU H100 nodes, 100 owners, 105
envelopes); runs are submitted in chunks (default 500, one simulated second apart) with no
completions: the first ~5,700 bind until the fleet is full, the rest queue Pending or Reserved —
the state a busy cluster holds (runs, statuses, leases, reservations, the funding view, the
journal of facts).

Each measurement runs in a fresh subprocess (so nothing else is on the heap):
- `ru_maxrss`: resource.getrusage(RUSAGE_SELF).ru_maxrss of a child that builds the world and
  submits the runs (no tracing) — the whole process, interpreter included; a baseline child that
  only imports jobtree is reported alongside;
- `tracemalloc`: the peak of Python allocations traced from before the world is built to after the
  last submit, in a second child (tracing slows Python ~3-6x, so it is a separate run).

Extrapolation: with the current engine every queued run costs ~0.1 s of admission work per
submit at 10,000 nodes (each is re-tried, and each new one builds a cut-order snapshot of every
open lease), so 100,000 runs would take hours. By default the children submit --measure-runs
(7,000: the fleet full plus ~1,300 queued), and the figure at --runs (100,000) is the measured
value plus (--runs - --measure-runs) x the bytes per queued run, the slope of current RSS /
traced memory over the chunks after the fleet is full. Pass --measure-runs 100000 to measure
without extrapolating.
Target (issue 2): <= 1 GiB for 80,000 GPUs and 100,000 runs.

    .venv/bin/python bench/bench_memory.py [--nodes 10000] [--runs 100000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from _world import (
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

GIB = 1 << 30
TARGET_BYTES = GIB


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _rss_now_bytes() -> int | None:
    """Current resident set size (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def child(nodes: int, runs: int, chunk: int, trace: bool, seed: int, quiet: bool) -> dict[str, object]:
    """Build and fill the world in this process; report what it cost, after every chunk."""
    from jobtree.core.engine import Cluster
    from jobtree.core.facts import ApplyBudget, ApplyRun
    from jobtree.core.model import ClusterConfig, Phase

    rss_before = _maxrss_bytes()
    if trace:
        tracemalloc.start()
    s = time.perf_counter()
    fleet = nodes * GPUS_PER_NODE
    cl = Cluster(ClusterConfig(cluster="bench"), make_nodes(nodes), T0)
    cl.submit(*(ApplyBudget(b) for b in make_budgets(fleet, seed)))
    arrivals = make_runs(runs, 3600.0, seed)
    series: list[dict[str, object]] = []
    t = T0
    for i in range(0, runs, max(1, chunk)):
        batch = arrivals[i:i + chunk]
        t += 1
        cl.advance(t)
        cl.submit(*(ApplyRun(a.run) for a in batch))
        running = sum(1 for st in cl.status.values() if st.phase is Phase.RUNNING)
        point: dict[str, object] = {"runs": i + len(batch), "running": running,
                                    "open_leases": sum(len(x) for x in cl.open_by_run.values()),
                                    "maxrss_bytes": _maxrss_bytes(), "rss_bytes": _rss_now_bytes(),
                                    "seconds": round(time.perf_counter() - s, 2)}
        if trace:
            point["traced_current_bytes"], point["traced_peak_bytes"] = tracemalloc.get_traced_memory()
        series.append(point)
        if not quiet:
            progress(f"memory{' (traced)' if trace else ''}: {nodes:,} nodes, submitted {point['runs']:,} runs, "
                     f"running {running:,}, open leases {point['open_leases']:,}, "
                     f"maxrss {_maxrss_bytes() / (1 << 20):.0f} MiB, {point['seconds']}s")
    out: dict[str, object] = {"nodes": nodes, "gpus": fleet, "runs": runs, "chunk": chunk,
                              "seconds": round(time.perf_counter() - s, 2)}
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.update(traced_current_bytes=current, traced_peak_bytes=peak)
    phases = Counter(st.phase.value for st in cl.status.values())
    out.update(
        maxrss_bytes=_maxrss_bytes(),
        maxrss_before_bytes=rss_before,
        phases=dict(phases),
        open_leases=sum(len(x) for x in cl.open_by_run.values()),
        leases=len(cl.leases),
        reservations=len(cl.reservations),
        facts=len(cl.facts),
        journal=len(cl.journal),
        gpus_held=sum(x.gpus for ls in cl.open_by_run.values() for x in ls.values()),
        series=series,
    )
    return out


def history_child(nodes: int, runs: int, rate: int, util: float, seed: int, quiet: bool) -> dict[str, object]:
    """--history: `runs` runs arrive, `rate` per simulated second, and complete after their
    durations (the fleet about `util` busy), on `nodes` nodes; the view forgets its journal after
    every second as a service does (the ledger holds it). Measured at the end: the view holds
    every run, every lease, every status — a cluster's history, not extrapolated."""
    import heapq

    from jobtree.core.engine import Cluster
    from jobtree.core.facts import ApplyBudget, ApplyRun, CompleteRun, RunStatusPut
    from jobtree.core.model import ClusterConfig, Phase

    s = time.perf_counter()
    fleet = nodes * GPUS_PER_NODE
    mean_duration = max(1.0, util * fleet / (rate * mean_demand()))
    cl = Cluster(ClusterConfig(cluster="bench"), make_nodes(nodes), T0)
    cl.submit(*(ApplyBudget(b) for b in make_budgets(fleet, seed)))
    arrivals = make_runs(runs, mean_duration, seed)
    duration = {a.run.key: a.duration for a in arrivals}
    due: list[tuple[int, str]] = []
    running: set[str] = set()
    t = T0
    i = 0
    while i < runs or due:
        t += 1
        facts = cl.advance(t)
        cmds: list[object] = []
        while due and due[0][0] <= t:
            _, key = heapq.heappop(due)
            if key in running:
                running.discard(key)
                cmds.append(CompleteRun(key))
        cmds += [ApplyRun(a.run) for a in arrivals[i:i + rate]]
        i += rate
        if cmds:
            facts += cl.submit(*cmds)  # type: ignore[arg-type]
        for f in facts:
            if isinstance(f, RunStatusPut) and f.status.phase is Phase.RUNNING and f.run not in running:
                running.add(f.run)
                heapq.heappush(due, (t + duration[f.run], f.run))
        cl.forget_history()
        if not quiet and (t - T0) % 100 == 0:
            progress(f"memory (history): t+{t - T0}s submitted {min(i, runs):,} running {len(running):,} "
                     f"maxrss {_maxrss_bytes() / (1 << 20):.0f} MiB, {time.perf_counter() - s:.0f}s")
        if i >= runs and t - T0 > 100_000:
            break
    phases = Counter(st.phase.value for st in cl.status.values())
    return {"nodes": nodes, "gpus": fleet, "runs": runs, "rate": rate, "seconds": round(time.perf_counter() - s, 2),
            "maxrss_bytes": _maxrss_bytes(), "phases": dict(phases), "leases": len(cl.leases),
            "open_leases": sum(len(x) for x in cl.open_by_run.values()), "simulated_seconds": t - T0}


def _spawn(args: list[str]) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def per_run_slope(series: list[dict[str, object]], key: str) -> float | None:
    """Bytes per extra submitted run once the fleet is full (open leases within 1% of their final
    count, so only queued runs are added), from the first such point to the last."""
    pts = [(int(p["runs"]), int(p[key]), int(p["open_leases"]))  # type: ignore[call-overload]
           for p in series if p.get(key) is not None]
    if len(pts) < 2:
        return None
    full = [p for p in pts if p[2] >= 0.99 * pts[-1][2]]
    if len(full) < 2:
        full = pts[-2:]
    (r0, m0, _), (r1, m1, _) = full[0], full[-1]
    return (m1 - m0) / (r1 - r0) if r1 > r0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=100_000, help="the size the target is stated for")
    ap.add_argument("--measure-runs", type=int, default=7_000,
                    help="runs actually submitted; above it, memory is extrapolated linearly per queued run "
                         "(the current engine spends ~0.1 s per queued run at 10,000 nodes)")
    ap.add_argument("--chunk", type=int, default=500, help="runs per submit (one simulated second apart)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-trace", action="store_true", help="skip the (slow) tracemalloc child")
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (64 nodes, 150 runs)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--history", action="store_true",
                    help="measure a cluster's history instead: --runs runs arrive --rate per second and complete "
                         "(nothing extrapolated)")
    ap.add_argument("--rate", type=int, default=100, help="--history: arrivals per simulated second")
    ap.add_argument("--util", type=float, default=0.75, help="--history: the busy share of the fleet")
    args = ap.parse_args()
    watch = CoreWatch()
    if args.quick:
        args.nodes, args.runs, args.measure_runs, args.chunk = 64, 150, 150, 50
    if args.child and args.history:
        emit_json(history_child(args.nodes, args.runs, args.rate, args.util, args.seed, args.quick))
        return
    if args.child:
        emit_json(child(args.nodes, args.runs, args.chunk, args.trace, args.seed, args.quick))
        return
    if args.history:
        base = _spawn(["--nodes", "0", "--runs", "0", "--chunk", "1"])
        got = _spawn(["--history", "--nodes", str(args.nodes), "--runs", str(args.runs), "--rate", str(args.rate),
                      "--util", str(args.util), "--seed", str(args.seed), *(["--quick"] if args.quick else [])])
        mib = 1 << 20
        rss = int(got["maxrss_bytes"])  # type: ignore[call-overload]
        print(f"Peak memory (history): {args.nodes:,} nodes ({args.nodes * GPUS_PER_NODE:,} GPUs), {args.runs:,} runs "
              f"arrived {args.rate}/s and ran (util {args.util}), measured at the end")
        print(table(["measure", "MiB", "build+play s"],
                    [["ru_maxrss (whole process)", rss / mib, got["seconds"]],
                     ["ru_maxrss of a bare import (baseline)", int(base["maxrss_bytes"]) / mib, "-"]]))  # type: ignore[call-overload]
        print(f"state: phases {dict(sorted(got['phases'].items()))}, leases {got['leases']:,} "  # type: ignore[attr-defined]
              f"(open {got['open_leases']:,}), simulated {got['simulated_seconds']:,} s")
        met = rss <= TARGET_BYTES
        print(f"target <= 1 GiB at {args.runs:,} runs: {'MET' if met else 'MISSED'} (measured: {rss / (1 << 30):.3f} GiB)")
        if args.json:
            emit_json({"bench": "memory_history", "machine": machine(), "result": got, "baseline": base,
                       "target_met": met})
        return
    measured = min(args.runs, args.measure_runs)
    common = ["--nodes", str(args.nodes), "--runs", str(measured), "--chunk", str(args.chunk),
              "--seed", str(args.seed), *(["--quick"] if args.quick else [])]
    base = _spawn(["--nodes", "0", "--runs", "0", "--chunk", "1"])
    plain = _spawn(common)
    traced = None if args.no_trace else _spawn([*common, "--trace"])
    rss = int(plain["maxrss_bytes"])  # type: ignore[call-overload]
    peak = int(traced["traced_peak_bytes"]) if traced else None  # type: ignore[call-overload]
    extra = args.runs - measured
    # The slope of the current RSS (ru_maxrss is a high-water mark: transient peaks make it jumpy);
    # the extrapolation adds it to the measured ru_maxrss, so the transient margin is kept.
    rss_slope = per_run_slope(plain["series"], "rss_bytes") or per_run_slope(plain["series"], "maxrss_bytes")  # type: ignore[arg-type]
    trace_slope = per_run_slope(traced["series"], "traced_current_bytes") if traced else None  # type: ignore[arg-type]
    rss_at = rss + max(0.0, rss_slope or 0.0) * extra if extra else float(rss)
    peak_at = (peak + max(0.0, trace_slope or 0.0) * extra if extra else float(peak)) if peak is not None else None
    mib = 1 << 20
    print(f"Peak memory: {args.nodes:,} nodes ({args.nodes * GPUS_PER_NODE:,} GPUs), {measured:,} runs submitted "
          f"in chunks of {args.chunk}" + (f"; extrapolated to {args.runs:,} runs" if extra else ""))
    phases: dict[str, int] = plain["phases"]  # type: ignore[assignment]

    def slope_txt(x: float | None) -> str:
        return f"{x:,.0f}" if x is not None else "-"

    rows = [
        ["ru_maxrss (whole process)", rss / mib, slope_txt(rss_slope), rss_at / mib, plain["seconds"]],
        ["ru_maxrss of a bare import (baseline)", int(base["maxrss_bytes"]) / mib, "-", "-", "-"],  # type: ignore[call-overload]
        ["tracemalloc peak (Python heap)", peak / mib if peak is not None else "skipped", slope_txt(trace_slope),
         peak_at / mib if peak_at is not None else "-", traced["seconds"] if traced else "-"],
    ]
    print(table(["measure", f"MiB @ {measured:,} runs", "bytes/queued run", f"MiB @ {args.runs:,} runs",
                 "build+submit s"], rows))
    print(f"state at {measured:,} runs: phases {dict(sorted(phases.items()))}, open leases {plain['open_leases']:,}, "
          f"GPUs held {plain['gpus_held']:,}, reservations {plain['reservations']:,}, facts {plain['facts']:,}")
    worst = max(rss_at, peak_at or 0.0)
    met = worst <= TARGET_BYTES
    print(f"target <= 1 GiB at {args.runs:,} runs: {'MET' if met else 'MISSED'} "
          f"({'extrapolated' if extra else 'measured'}: maxrss {rss_at / GIB:.3f} GiB"
          + (f", traced peak {peak_at / GIB:.3f} GiB)" if peak_at is not None else ")"))
    changed = watch.changed()
    if args.json:
        emit_json({"bench": "memory", "machine": machine(), "core_before": watch.before, "core_changed": changed,
                   "baseline": base, "plain": plain, "traced": traced,
                   "measured_runs": measured, "target_runs": args.runs, "extrapolated": bool(extra),
                   "maxrss_bytes": rss, "traced_peak_bytes": peak,
                   "bytes_per_queued_run": {"maxrss": rss_slope, "traced": trace_slope},
                   "maxrss_bytes_at_target": round(rss_at), "traced_peak_bytes_at_target":
                   round(peak_at) if peak_at is not None else None,
                   "target": {"bytes": TARGET_BYTES, "met": met}})


if __name__ == "__main__":
    main()
