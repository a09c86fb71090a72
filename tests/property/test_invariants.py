"""Property tests: the §10 invariants hold after every command and every timer, for random worlds.

Each example plays a random world (strategies.worlds) and, after every decision instant (every
command, every timer due on the way, every advance), checks:
- the project's oracle `check_all` (exclusivity, no overdraft, derivation, gang);
- the ledger: lease names unique, numbered 0, 1, ... per run; a lease is never edited except to
  be closed once (closed leases never change; open leases change only end/closureReason);
- funding, independently of the engine's caches: funded widths within every envelope, lending,
  aggregate cap and maxBorrowGPUs; funded GPU-hours (integrated here from the classified leases)
  within maxGPUHours; the meter equals that integration; classes equal an independent reading of
  §2; growth is never unfunded;
- gang: a Running run has allocated >= min width (from `state_json`);
- placement: flavor, selectors, groups in one domain, nothing on fenced nodes;
and at the end the audit: replaying the journal reproduces the meter (`check_audit`), and
replaying it prefix by prefix reproduces the meter and the whole STATE at every instant seen.

A failing example is printed with a replayable scenario file (see harness.report).
"""

from __future__ import annotations

import json

from harness import Checker, noting, play, prop_settings
from hypothesis import given
from strategies import World, worlds

from jobtree.core.engine import Cluster
from jobtree.core.facts import LeaseClosed, LeaseMinted, ReservationPut, RunStatusPut
from jobtree.core.invariants import check_audit
from jobtree.core.views import state_json


@prop_settings(300)
@given(worlds())
def test_invariants_hold_after_every_decision(world: World) -> None:
    def run() -> None:
        checker = Checker(world)
        played = play(world, checker)
        assert checker.observations >= 2
        check_audit(played.cluster, world.start)

    noting(world, run)


@prop_settings(100)
@given(worlds())
def test_replaying_the_journal_reproduces_every_past_state(world: World) -> None:
    """§10.6 audit at every instant: the journal alone, replayed up to any point seen during the
    play, rebuilds the same STATE (leases, classes, reservations, runs, usage figures)."""
    marks: list[tuple[int, int, str]] = []

    def observe(cl: Cluster, _label: str) -> None:
        marks.append((len(cl.journal), cl.now, json.dumps(state_json(cl), sort_keys=True)))

    def run() -> None:
        played = play(world, observe)
        journal = played.cluster.journal
        again = Cluster(world.config, world.nodes, world.start)
        done = 0
        for upto, now, want in marks:
            for t, item in journal[done:upto]:
                again._move_clock(t)
                if isinstance(item, (LeaseMinted, LeaseClosed, ReservationPut, RunStatusPut)):
                    again.apply(item)
                else:
                    again.change_spec(item)
            done = upto
            again._move_clock(now)
            got = json.dumps(state_json(again), sort_keys=True)
            assert got == want, f"replaying {upto} journal entries to {now} does not reproduce the state"

    noting(world, run)
