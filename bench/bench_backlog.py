"""A deep queue on a big fleet, through the simulator (issue 8, item 4, first target).

A 2,000-node fleet (8 GPUs a node, 10 fabric domains, one flavor), 100 owners in 10
departments (each team an envelope, each department a shared pool), and four waves of 1,000
runs each, 1-64 GPUs (groups of 8 above 8), every run with a `jobtree.sim/runtime` so the fleet
saturates, drains and fills again. The scenario is built here as a document (`scenario(...)`)
and played with `jobtree.sim.runner.run_scenario` — what `jobtree sim run FILE` does — timed
in CPU and wall seconds, with the engine's own counters (admission attempts, cut worlds built).

    .venv/bin/python bench/bench_backlog.py [--nodes 2000] [--runs 4000] [--quick] [--profile FILE] [--json]
    .venv/bin/python bench/bench_backlog.py --write FILE      # the scenario as YAML, for `jobtree sim run`

Target (issue 8): the 2,000-node / 4,000-run scenario in <= 5 s.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _world import emit_json, machine, progress, table
from jobtree.core import engine
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import scenario_from_doc

SEED = 20261206
FLAVOR = "H100-80GB"
DOMAINS = 10
WAVES = 4
WAVE_EVERY = 2 * 3600
SIZES = (1, 2, 4, 8, 8, 16, 16, 32, 64)
TARGET_S = 5.0


def scenario(nodes: int, runs: int, seed: int = SEED) -> dict[str, Any]:
    rnd = random.Random(seed)
    per = nodes // DOMAINS
    node_docs = [{"generate": {"prefix": f"d{d}-", "count": per, "gpus": 8,
                               "labels": {"region": "us", "cluster": "big", "fabric.domain": f"d{d}",
                                          "gpu.flavor": FLAVOR}}} for d in range(DOMAINS)]
    gpus = per * DOMAINS * 8
    budgets = []
    for dept in range(10):
        budgets.append({"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": f"dept{dept}"},
                        "spec": {"owner": f"org:d{dept}", "envelopes": [
                            {"name": "pool", "flavor": FLAVOR, "concurrency": gpus // 40}]}})
        for team in range(10):
            budgets.append({"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget",
                            "metadata": {"name": f"d{dept}-t{team}"},
                            "spec": {"owner": f"org:d{dept}:t{team}", "parents": [f"org:d{dept}"],
                                     "envelopes": [{"name": "main", "flavor": FLAVOR,
                                                    "concurrency": gpus // 200}]}})
    steps: list[dict[str, Any]] = [{"at": "0s", "apply": budgets}]
    per_wave = runs // WAVES
    for wave in range(WAVES):
        docs = []
        for i in range(per_wave):
            size = rnd.choice(SIZES)
            dept, team = rnd.randrange(10), rnd.randrange(10)
            spec: dict[str, Any] = {"owner": f"org:d{dept}:t{team}",
                                    "resources": {"gpuType": FLAVOR, "totalGPUs": size}}
            if size > 8:
                spec["locality"] = {"groupGPUs": 8}
            runtime = rnd.randrange(1, 12) * 1800
            docs.append({"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
                         "metadata": {"name": f"w{wave}-r{i}", "namespace": f"d{dept}-t{team}",
                                      "annotations": {"jobtree.sim/runtime": f"{runtime}s"}},
                         "spec": spec})
        steps.append({"at": f"{wave * WAVE_EVERY + 60}s", "apply": docs})
    steps.append({"at": f"{WAVES * WAVE_EVERY + 24 * 3600}s", "snapshot": "end"})
    return {"start": "2026-01-05T00:00:00Z", "config": {"cluster": "big"}, "nodes": node_docs, "steps": steps}


class Counting:
    """Counts the engine's admission attempts and cut worlds while a scenario plays."""

    def __init__(self) -> None:
        self.attempts = 0
        self.cut_worlds = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> Counting:
        cls = engine.Cluster
        self._saved = {"_try_admit": cls._try_admit, "_cut_world": cls._cut_world}
        counter = self

        def try_admit(this: Any, key: str) -> bool:
            counter.attempts += 1
            return bool(self._saved["_try_admit"](this, key))

        def cut_world(this: Any, *a: Any, **kw: Any) -> Any:
            counter.cut_worlds += 1
            return self._saved["_cut_world"](this, *a, **kw)

        cls._try_admit = try_admit  # type: ignore[method-assign]
        cls._cut_world = cut_world  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(engine.Cluster, name, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--runs", type=int, default=4000)
    p.add_argument("--profile", metavar="FILE", help="write a cProfile of the play to FILE")
    p.add_argument("--write", metavar="FILE", help="write the scenario as YAML and stop")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke-test size: 100 nodes, 200 runs")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.runs = 100, 200
    doc = scenario(args.nodes, args.runs)
    if args.write:
        import yaml

        Path(args.write).write_text(yaml.safe_dump(doc, sort_keys=False))
        return 0
    progress(f"building the scenario: {args.nodes} nodes, {args.runs} runs in {WAVES} waves")
    sc = scenario_from_doc(doc)
    progress("playing it")
    profiler = cProfile.Profile() if args.profile else None
    with Counting() as counts:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        out = run_scenario(sc)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if profiler:
        profiler.dump_stats(args.profile)
    end = out["snapshots"]["end"] if "snapshots" in out else out
    phases: dict[str, int] = {}
    for r in end.get("runs", []):
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    target = args.nodes == 2000 and args.runs == 4000  # the target is for this size only
    verdict = ("MET" if wall <= TARGET_S else "MISSED") if target else "-"
    print(table(["nodes", "runs", "wall s", "CPU s", "admission attempts", "cut worlds", "target", "verdict"],
                [[args.nodes, args.runs, f"{wall:.2f}", f"{cpu:.2f}", counts.attempts, counts.cut_worlds,
                  f"<= {TARGET_S:g} s" if target else "-", verdict]]))
    digest = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    print("final phases: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())))
    print(f"decisions digest: {digest} (sha256 of the scenario's JSON output: equal before and after a change)")
    if args.json:
        emit_json({"bench": "backlog", "nodes": args.nodes, "runs": args.runs, "wall_s": round(wall, 3),
                   "cpu_s": round(cpu, 3), "attempts": counts.attempts, "cut_worlds": counts.cut_worlds,
                   "phases": phases, "digest": digest, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
