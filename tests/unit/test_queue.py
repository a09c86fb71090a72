"""The admission queue index (jobtree.core.queue): order kept as runs come and go, sleepers woken
exactly when their capacity or hold-down condition stops holding."""

from __future__ import annotations

from builders import START

from jobtree.core.engine import Cluster
from jobtree.core.facts import ApplyBudget, ApplyRun, CompleteRun, Tick
from jobtree.core.model import ClusterConfig, Phase
from jobtree.core.queue import AdmissionQueue


def queue(*keys: tuple[int, str]) -> AdmissionQueue:
    q = AdmissionQueue()
    for admitted, key in keys:
        q.place(key, (admitted, key))
    return q


def test_order_is_admission_time_then_key_whatever_the_arrival() -> None:
    q = queue((5, "b"), (3, "z"), (5, "a"), (1, "m"))
    assert q.awake() == q.order() == ["m", "z", "a", "b"]
    q.place("z", None)
    q.place("b", (0, "b"))
    assert q.order() == ["b", "m", "a"] and "z" not in q and len(q) == 3


def test_a_sleeper_leaves_the_awake_order_and_keeps_its_place() -> None:
    q = queue((1, "a"), (2, "b"), (3, "c"))
    q.sleep("b", "H100", 16, 0, None)
    assert q.awake() == ["a", "c"] and q.order() == ["a", "b", "c"] and q.asleep("b")
    assert q.wake_due(0, lambda f: 15, lambda f: 15) == []
    assert q.wake_due(0, lambda f: 16, lambda f: 16) == [(2, "b")]
    assert q.awake() == ["a", "b", "c"] and q.sleepers() == 0


def test_capacity_wakes_by_flavor_and_by_what_one_domain_holds() -> None:
    q = queue((1, "big"), (2, "gang"), (3, "other"))
    q.sleep("big", "H100", 64, 0, None)
    q.sleep("gang", "H100", 16, 8, None)
    q.sleep("other", "A100", 8, 0, None)
    free = {"H100": 32, "A100": 4}
    assert q.wake_due(0, free.__getitem__, lambda f: 4) == []  # gang: 32 free but no domain holds 8
    assert q.wake_due(0, free.__getitem__, lambda f: 8) == [(2, "gang")]
    free["A100"] = 8
    assert q.wake_due(0, free.__getitem__, lambda f: 8) == [(3, "other")]
    assert q.asleep("big")


def test_a_hold_down_wakes_at_its_end_and_a_place_wakes_at_once() -> None:
    q = queue((1, "a"), (2, "b"))
    q.sleep("a", "H100", 64, 0, 100)
    q.sleep("b", "H100", 64, 0, None)
    assert q.wake_due(99, lambda f: 0, lambda f: 0) == []
    assert q.wake_due(100, lambda f: 0, lambda f: 0) == [(1, "a")]
    q.sleep("a", "H100", 64, 0, 200)
    q.place("a", (1, "a"))  # its status or spec changed
    assert not q.asleep("a") and q.wake_due(300, lambda f: 0, lambda f: 0) == []  # the stale hold is skipped
    q.wake_all()
    assert q.awake() == ["a", "b"] and q.sleepers() == 0


# --- the engine's sleepers ----------------------------------------------------------------------

def _two_nodes() -> Cluster:
    from builders import budget, envelope, node

    cl = Cluster(ClusterConfig(cluster="gpu-a"), [node("a-0", domain="A"), node("a-1", domain="B")], START)
    cl.submit(ApplyBudget(budget("b", "org:b", envelope("e", 8))))
    return cl


def test_a_run_nothing_pays_for_sleeps_and_starts_the_instant_its_gpus_are_free() -> None:
    from builders import run

    cl = _two_nodes()
    cl.submit(ApplyRun(run("funded", "org:b", 8)))
    cl.submit(ApplyRun(run("stray", "org:nobody", 16)))  # no envelope pays org:nobody: only a plain fit
    assert cl.status["default/stray"].phase is Phase.PENDING
    assert cl._queue_index.asleep("default/stray")
    cl.advance(START + 10)
    cl.submit(Tick())
    assert cl._queue_index.asleep("default/stray"), "nothing it waits for changed: it stays asleep"
    cl.submit(CompleteRun("default/funded"))  # 16 free now, exactly its need
    assert cl.status["default/stray"].phase is Phase.RUNNING
    assert not cl._queue_index.asleep("default/stray") and "default/stray" not in cl._queue_index


def test_a_sleeper_in_a_domain_short_run_waits_for_a_whole_group() -> None:
    from builders import run

    cl = _two_nodes()
    cl.submit(ApplyRun(run("left", "org:b", 4)))  # 4 of domain A
    cl.submit(ApplyRun(run("right", "org:b", 4)))  # 4 of domain B: 8 free, but no domain has 8
    cl.submit(ApplyRun(run("gang", "org:nobody", 8, group=8)))
    placed = {lease.node for lease in cl.leases.values()}
    assert len(placed) == 2, placed  # the two small runs took one node each
    assert cl._queue_index.asleep("default/gang")
    cl.submit(CompleteRun("default/left"))
    assert cl.status["default/gang"].phase is Phase.RUNNING


def test_a_run_its_envelope_cannot_pay_now_sleeps_until_that_envelope_has_room() -> None:
    """Nothing funds `waiting` while `first` holds its envelope, and the idle GPUs are too few:
    it sleeps watching its envelope. `first` ending frees 8 GPUs (fewer than it needs: no
    capacity wake) and 8 GPUs of headroom: that wakes it, and with part of it funded it
    reclaims the unfunded `stray` and starts in the same instant."""
    from builders import budget, envelope, node, run

    cl = Cluster(ClusterConfig(cluster="gpu-a"), [node(f"a-{i}", domain="A") for i in range(3)], START)
    cl.submit(ApplyBudget(budget("b", "org:b", envelope("e", 8))))
    cl.submit(ApplyRun(run("first", "org:b", 8)))
    cl.submit(ApplyRun(run("stray", "org:nobody", 16)))  # unfunded, on the idle GPUs
    cl.submit(ApplyRun(run("waiting", "org:b", 16)))
    assert cl.status["default/waiting"].phase is Phase.PENDING
    assert cl._queue_index.asleep("default/waiting")
    cl.advance(START + 10)
    cl.submit(Tick())
    assert cl._queue_index.asleep("default/waiting"), "nothing it waits for changed: it stays asleep"
    cl.submit(CompleteRun("default/first"))
    assert cl.status["default/waiting"].phase is Phase.RUNNING
    assert cl.status["default/stray"].phase is Phase.PENDING  # reclaimed: §5.3


def test_a_run_waiting_for_its_envelope_window_sleeps_until_it_opens() -> None:
    """Its only envelope opens at +100 s and may not reserve before: until then nothing can pay
    for `waiting` and the idle GPUs are gone, so it sleeps until that instant; then it reclaims
    the unfunded `stray` and starts."""
    from builders import budget, envelope, node, run

    cl = Cluster(ClusterConfig(cluster="gpu-a"), [node(f"a-{i}", domain="A") for i in range(2)], START)
    cl.submit(ApplyBudget(budget("b", "org:b", envelope("e", 8, start=START + 100))))
    cl.submit(ApplyRun(run("stray", "org:nobody", 16)))
    cl.submit(ApplyRun(run("waiting", "org:b", 8)))
    assert cl._queue_index.asleep("default/waiting")
    cl.advance(START + 99)
    assert cl._queue_index.asleep("default/waiting") and cl.status["default/waiting"].phase is Phase.PENDING
    cl.advance(START + 100)
    assert cl.status["default/waiting"].phase is Phase.RUNNING
    assert cl.status["default/stray"].phase is Phase.PENDING
