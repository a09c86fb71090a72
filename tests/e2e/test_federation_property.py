"""The §9 property over random demand shifts with every fault the issue names, on real
nats-servers and processes: a partition of one cluster (its leaf connection cut at a TCP proxy),
kill -9 of the federation service, a restart of a cluster's nats-server and of the hub's, and
the cap lowered mid-run. Replaying every cluster's ledger merged by instant, the GPUs funded
under the cap — and the allowances in force — never sum above it; after healing, allowances
converge to demand."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from fedworld import World, capped_budget, funded_series, merged_peaks, run, until

from jobtree.core import facts as F

KEY = "vision/all"
CAP = ("vision", "all")


def converged(world: World, cap: int) -> bool:
    got = world.usage().caps[0]
    rows = got.clusters
    return (not got.HasField("lowering_to") and got.max_concurrency == cap
            and all(r.reachable and not r.HasField("pending") and r.allowance == r.target for r in rows)
            and all(world.allowance(r.cluster, KEY) == r.allowance for r in rows))


@pytest.mark.parametrize(("seed", "clusters", "twin"), [(7, ("a", "b"), True), (11, ("a", "b", "c"), False)])
def test_caps_hold_through_faults_and_allowances_converge(tmp_path: Path, seed: int, clusters: tuple[str, ...],
                                                         twin: bool) -> None:
    """`twin`: a second federation instance runs beside the first all along (killed and restarted
    with it): compare-and-set on the stored books keeps them from granting the same room twice."""
    rnd = random.Random(seed)
    share = 8
    cap = share * len(clusters)
    lowered = cap - 4
    world = World.start(tmp_path, clusters, [{"cap": KEY, "maxConcurrency": cap}],
                        allowances={c: {KEY: share} for c in clusters})
    try:
        for c in clusters:
            world.send(c, [capped_budget(c, "vision", "org:vision", "all", cap, cap)])
        if twin:
            world.start_federation(twin=True)
        until("the cap is booked", lambda: all(r.reachable for r in world.usage().caps[0].clusters), world=world)
        live: dict[str, list[str]] = {c: [] for c in clusters}
        cut: dict[str, int] = {}
        fed_down = 0
        did = {"cut": 0, "kill": 0, "nats": 0, "hub": 0, "lower": 0}
        for step in range(16):
            for c in [c for c, until_step in cut.items() if until_step <= step]:
                world.heal(c)
                del cut[c]
            if fed_down and fed_down <= step:
                world.start_federation()
                if twin:
                    world.start_federation(twin=True)
                fed_down = 0
            roll = rnd.random()
            if step == 8:  # the cap lowered mid-run, once
                world.set_caps([{"cap": KEY, "maxConcurrency": lowered}])
                did["lower"] += 1
            elif step == 10:  # the hub's nats-server: the federation reconnects to its books
                world.restart_hub()
                did["hub"] += 1
            elif step in (3, 11) or (roll < 0.1 and not cut):
                c = rnd.choice(clusters)
                world.cut(c)
                cut[c] = step + 2
                did["cut"] += 1
            elif step in (5, 13) or (roll < 0.2 and not fed_down):
                world.kill_federation()  # SIGKILL: whatever it was doing
                if twin:
                    world.kill_federation(twin=True)
                fed_down = step + 1
                did["kill"] += 1
            elif step in (6, 14):
                world.restart_nats(rnd.choice([c for c in clusters if c not in cut] or list(clusters)))
                did["nats"] += 1

            c = rnd.choice(clusters)  # a demand shift every step
            if live[c] and rnd.random() < 0.4:
                world.send(c, [F.DeleteRun(f"default/{live[c].pop(rnd.randrange(len(live[c])))}")])
            else:
                name = f"r{step}"
                world.send(c, [run(name, "org:vision", rnd.choice((4, 8, 8, 16)))])
                live[c].append(name)
            time.sleep(rnd.uniform(0.3, 1.5))
        assert all(did.values()), did
        for c in list(cut):
            world.heal(c)
        if fed_down:
            world.start_federation()
            if twin:
                world.start_federation(twin=True)
        until("allowances converge to demand under the lowered cap", lambda: converged(world, lowered),
              timeout=60, world=world)
        series = {c: funded_series(world.records(c), c, CAP, {KEY: share}) for c in clusters}
        for t, total, per in merged_peaks(series):
            assert total <= cap, f"at {t}: {per} funded under a cap of {cap}"
        for t in sorted({t for s in series.values() for t, _, _ in s}):
            held = {c: next((a for tt, _, a in reversed(s) if tt <= t), share) for c, s in series.items()}
            assert sum(held.values()) <= cap, f"at {t}: allowances in force {held} above the cap {cap}"
        final = {c: s[-1] for c, s in series.items()}
        assert sum(a for _, _, a in final.values()) <= lowered
        assert sum(f for _, f, _ in final.values()) <= lowered
    finally:
        world.stop()
