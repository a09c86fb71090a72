"""Examples found by the property suite, pinned as plain tests (hand-minimised).

Each builds a tiny `World` and plays it through the same harness and checker as the properties,
so the example stays meaningful however the generators change.
"""

from __future__ import annotations

from dataclasses import replace

from harness import Checker, play
from strategies import CLUSTER, HOUR, MINUTE, REGION, START, World

from jobtree.core.invariants import check_all
from jobtree.core.meter import cap_seconds
from jobtree.core.model import (
    Budget,
    ClusterConfig,
    Envelope,
    Node,
    Phase,
    PreActivation,
    Run,
    RunSpec,
    labels_of,
)

NODE = Node("a-00", 8, labels_of({"region": REGION, "cluster": CLUSTER, "fabric.domain": "A", "gpu.flavor": "H100"}))


def _world(envelope: Envelope, gpus: int, timeline: tuple[tuple, ...], updates: tuple[Budget, ...] = ()) -> World:
    budget = Budget("b0", "org:root", envelopes=(envelope,))
    run = Run("default", "j0", RunSpec(owner="org:root", gpu_type="H100", total_gpus=gpus))
    return World(ClusterConfig(cluster=CLUSTER), (NODE,), (budget,), (run,), (0,), timeline, updates, START)


def test_a_budget_cut_below_consumption_keeps_check_all_true() -> None:
    """Found by test_invariants_hold_after_every_decision (fixed in 4b58899: the oracle now allows
    consumption above a lowered cap).

    j0 runs 1 GPU funded for 60 s (60 GPU-s), then the budget is re-applied with maxGPUHours 0.01
    (36 GPU-s). docs/design/decisions.md: "a cut B spends at once" — j0 turns unfunded, nothing more
    is charged, consumption stays 60 GPU-s. `invariants.check_no_overdraft` then reported
    "consumed more than 0.01 GPU-hours" although no GPU was funded after the cut: it compared
    past consumption with the *current* cap. A budget cut is valid input, so check_all must hold
    (the checker runs check_all after every decision).
    """
    env = Envelope("e0", "H100", (), concurrency=1)
    world = _world(env, 1, (("advance", 60), ("budget", 0)),
                   updates=(Budget("b0", "org:root", envelopes=(replace(env, max_gpu_hours=0.01),)),))
    played = play(world, Checker(world))
    check_all(played.cluster)


def test_an_envelope_with_zero_gpu_hours_never_funds() -> None:
    """maxGPUHours 0: "funded fewer than B GPU-hours so far" is false from the start, so nothing is
    ever funded — including at the instant the budget is first applied (an early engine let the
    first instant's leases be funded until the clock moved; the meter's clamp hid it)."""
    world = _world(Envelope("e0", "H100", (), concurrency=4, max_gpu_hours=0.0), 2, (("advance", 2 * HOUR),))
    played = play(world, Checker(world))
    assert all(lease.paid_by == ("b0", "e0") for lease in played.cluster.leases.values())
    assert played.cluster.meter.unfunded == {"org:root": 2 * (2 * HOUR + 4 * HOUR)}


def test_gpu_hour_exhaustion_overshoots_by_less_than_one_second_of_width() -> None:
    """Whole-second time: 7 GPUs against B = 0.3 GPU-h (1080 GPU-s) run dry after 1080/7 = 154.3 s;
    the exhaustion timer fires at 155 s, so the ledger funded 1085 GPU-s, 5 more than B (less than
    one second of the width); the meter charges exactly B. Pinned so that a larger overshoot (a
    late timer) fails."""
    world = _world(Envelope("e0", "H100", (), concurrency=8, max_gpu_hours=0.3), 7, (("advance", HOUR),))
    checker = Checker(world)
    played = play(world, checker)
    bound = ("env", "b0", "e0")
    assert played.cluster.meter.consumed[bound] == cap_seconds(0.3) == 1080
    assert checker.consumed[bound] == 7 * 155
    assert checker.consumed[bound] - cap_seconds(0.3) < 7


def test_a_preempted_run_does_not_reserve_for_a_window_during_its_hold_down() -> None:
    """§5 no thrash: a run that lost its GPUs to a cut "does not reserve — and so cannot cut
    anyone — until preemptionHoldDown has passed".

    One 4-GPU node. v (org:b) runs on bb/now, whose window ends at 10m; a (org:a, funded by ba)
    arrives at 1s, finds no room and reserves; at 15m01s its reservation activates and reclaims v
    (unfunded since 10m): v is Pending/Preempted with hold-down until 1h15m01s. In the same
    instant v — whose only other funding, bb/later, opens at 20m with allowReservations — takes
    the window-only path and reserves (AwaitingWindow) inside its hold-down; at 20m that
    reservation activates and the lottery preempts a, which had run for under 5 minutes.
    Cause (fixed in 4b58899): engine.py `Cluster._try_admit` took the `_window_opening` ->
    `_reserve(window_only=True)` branch without the `_in_hold_down` check that guards the other
    reserve path.
    """
    node = Node("a-00", 4, labels_of({"region": REGION, "cluster": CLUSTER, "fabric.domain": "A", "gpu.flavor": "H100"}))
    ba = Budget("ba", "org:a", envelopes=(Envelope("e", "H100", (), 4),))
    bb = Budget("bb", "org:b", envelopes=(
        Envelope("now", "H100", (), 4, end=START + 10 * MINUTE),
        Envelope("later", "H100", (), 4, start=START + 20 * MINUTE,
                 pre_activation=PreActivation(allow_reservations=True)),
    ))
    v = Run("default", "v", RunSpec(owner="org:b", gpu_type="H100", total_gpus=4))
    a = Run("default", "a", RunSpec(owner="org:a", gpu_type="H100", total_gpus=4))
    world = World(ClusterConfig(cluster=CLUSTER), (node,), (ba, bb), (v, a), (0,),
                  (("advance", 1), ("submit", 1), ("advance", HOUR)))
    # Stop at 1h00m01s, inside v's hold-down (after it both runs fight over the node, each
    # reserving and winning the lottery in turn: allowed, since neither outranks the other).
    cl = play(world, Checker(world), drain=False).cluster
    assert cl.status["default/a"].phase is Phase.RUNNING
    assert cl.status["default/v"].phase is Phase.PENDING
    assert cl.leases["default.a.00000"].open
