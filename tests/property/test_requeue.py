"""Property test: no run is forgotten in the queue (docs/design/requeue.md).

Admission retries a waiting run only when something it waits for may have changed: the retry
memo keys each failed attempt by the world's version (`Cluster._world`: spec, node and lease
changes, and every funding change that may move another claim's class), and shortcuts park a
run without computing its cover when a cheap necessary condition fails. The property: after
every decision instant of a random world, a copy of the view with every memo and cache
dropped and every sleeper woken, settled again at the same instant, decides nothing — a run
that could be admitted (or reserved, activated, grown) then was admitted then.
"""

from __future__ import annotations

import copy

from harness import noting, play, prop_settings
from hypothesis import given
from strategies import World, worlds

from jobtree.core.engine import Cluster
from jobtree.core.facts import Tick


def settled_again(cl: Cluster) -> list[object]:
    """What a memo-less settle at the view's instant decides (nothing, if no run was forgotten)."""
    probe = copy.deepcopy(cl)
    probe._tried.clear()
    probe._act_tried.clear()
    probe._grow_tried.clear()
    probe._cand_cache.clear()
    probe._terms_cache.clear()
    probe._cand_epoch = -1
    probe._queue_index.wake_all()  # every sleeper is tried again too
    probe.funding.invalidate()
    return probe.submit(Tick())


@prop_settings(120)
@given(worlds())
def test_a_run_that_could_be_admitted_is_admitted(world: World) -> None:
    checked = 0

    def observe(cl: Cluster, label: str) -> None:
        nonlocal checked
        decided = settled_again(cl)
        assert not decided, f"after {label}: a fresh retry of the queue decides {decided[:3]}"
        checked += 1

    noting(world, lambda: play(world, observe))
    assert checked >= 2
