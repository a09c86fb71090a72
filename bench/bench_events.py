"""What deriving domain events costs a follower (issue 10): the budget service applies each ledger
message to its view and then derives that message's events (`jobtree.api.events.Deriver`), and
the kube-bridge compares every run's funding split after each message.

Generated (not timed): a world of `_world` (8-GPU nodes in domains of 32, 100 owners, capped
envelopes), runs arriving one decision per simulated second with exponential durations, played
through the core `Cluster` as admission plays it; each decision's journal entries are one
ledger message. Timed, over the same messages: (a) replay only (`replay_entry`, what every
follower does), (b) replay + `Deriver.derive` after each message. Reported: microseconds per
message for each, the derive overhead, events per message.

    .venv/bin/python bench/bench_events.py [--nodes 1000] [--runs 4000] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _world import T0, emit_json, machine, make_budgets, make_nodes, make_runs, progress, table
from jobtree.api.events import Deriver
from jobtree.core import facts as F
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig


def generate(nodes: int, runs: int) -> tuple[list, list[list]]:
    fleet = make_nodes(nodes)
    cl = Cluster(ClusterConfig(cluster="bench"), fleet, T0)
    cl.submit(*(F.ApplyBudget(b) for b in make_budgets(nodes * 8)))
    arrivals = make_runs(runs, mean_duration=3600)
    messages: list[list] = []
    mark = len(cl.journal)
    ends: dict[int, list[str]] = {}
    t = T0
    for i, a in enumerate(arrivals):
        t += 2
        due = [k for when in sorted(w for w in ends if w <= t) for k in ends.pop(when)]
        cl.advance(t)
        cmds = [F.CompleteRun(k) for k in due if k in cl.status and cl.status[k].phase.value == "Running"]
        cl.submit(*cmds, F.ApplyRun(a.run))
        ends.setdefault(t + a.duration, []).append(a.run.key)
        messages.append(cl.journal[mark:])
        mark = len(cl.journal)
        if i % 1000 == 999:
            progress(f"generated {i + 1} decisions")
    return fleet, messages


def replay(fleet: list, messages: list[list], derive: bool) -> tuple[float, int]:
    cl = Cluster(ClusterConfig(cluster="bench"), fleet, T0)
    deriver = Deriver("bench")
    events = 0
    started = time.perf_counter()
    for seq, entries in enumerate(messages, 1):
        for t, item in entries:
            cl.replay_entry(t, item)
        if derive:
            events += len(deriver.derive(cl, seq, entries))
    return time.perf_counter() - started, events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--runs", type=int, default=4000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    fleet, messages = generate(args.nodes, args.runs)
    progress(f"{len(messages)} messages, {sum(len(m) for m in messages)} entries")
    base, _ = replay(fleet, messages, derive=False)
    full, events = replay(fleet, messages, derive=True)
    n = len(messages)
    rows = [["replay only", f"{1e6 * base / n:.0f}", "-"],
            ["replay + derive", f"{1e6 * full / n:.0f}", f"{events / n:.2f}"],
            ["derive overhead", f"{1e6 * (full - base) / n:.0f}", f"{100 * (full - base) / base:.0f} %"]]
    print(table(["per ledger message", "µs", "events/msg"], rows))
    if args.json:
        emit_json({"bench": "events", "nodes": args.nodes, "runs": args.runs, "messages": n, "events": events,
                   "replay_us": 1e6 * base / n, "derive_us": 1e6 * (full - base) / n, "machine": machine()})


if __name__ == "__main__":
    main()
