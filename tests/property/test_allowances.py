"""Allowances of an aggregate cap under an adversarial network (CALCULUS §9, `core.allowances`).

Random histories over 2-3 clusters: demand shifts (each followed by a rebalance), messages
delivered, duplicated, delayed (delivered out of order) or dropped — a partition is a run of
drops —, grants resent, GPU-hours consumed, the cap lowered or raised. After every step:
- the allowances in force (what each cluster's ledger holds) sum to at most the cap in force,
  and each is at most what the federation holds for that cluster;
- the federation's held allowances sum to at most the cap in force;
- no cluster has consumed more than its allowance.
After every history, healing the network (everything delivered, grants resent, rebalanced
until quiet) brings every allowance to its target.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jobtree.core.allowances import Cluster, Confirmation, Grant, Ledger, rebalance, targets

Msg = Grant | Confirmation

OPS = st.one_of(
    st.tuples(st.just("demand"), st.integers(0, 2), st.integers(0, 40)),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans()),  # (index, keep a duplicate)
    st.tuples(st.just("drop"), st.integers(0, 50), st.just(False)),
    st.tuples(st.just("resend"), st.just(0), st.just(0)),
    st.tuples(st.just("consume"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("cap"), st.integers(0, 40), st.just(0)),
)


class World:
    def __init__(self, n: int, cap: int) -> None:
        self.names = [f"c{i}" for i in range(n)]
        start = targets(cap, {c: 0 for c in self.names})
        self.ledger = Ledger.start("vision", cap, start)
        self.clusters = {c: Cluster(c, "vision", start[c]) for c in self.names}
        self.demand = {c: 0 for c in self.names}
        self.network: list[Msg] = []

    def goal(self) -> dict[str, int]:
        cap = self.ledger.cap if self.ledger.cap_goal is None else self.ledger.cap_goal
        floors = {c: k.consumed for c, k in self.clusters.items()}
        if sum(floors.values()) >= cap:  # spent all of a (lowered) cap: nothing more anywhere
            return floors
        return targets(cap, self.demand, floors)

    def send_rebalance(self) -> None:
        self.network += rebalance(self.ledger, self.goal())

    def deliver(self, i: int, keep: bool) -> None:
        if not self.network:
            return
        msg = self.network[i % len(self.network)]
        if not keep:
            self.network.remove(msg)
        if isinstance(msg, Grant):
            self.network.append(self.clusters[msg.cluster].apply(msg))
        else:
            self.ledger.confirmed(msg)

    def step(self, op: tuple[str, int, int | bool]) -> None:
        kind, a, b = op
        if kind == "demand":
            self.demand[self.names[a % len(self.names)]] = int(b)
            self.send_rebalance()
        elif kind == "deliver":
            self.deliver(a, bool(b))
        elif kind == "drop" and self.network:
            self.network.pop(a % len(self.network))
        elif kind == "resend":
            self.network += self.ledger.resend()
        elif kind == "consume":
            self.clusters[self.names[a % len(self.names)]].consume(int(b))
        elif kind == "cap":
            self.ledger.set_cap(a)
            self.send_rebalance()

    def check(self) -> None:
        in_force = {c: k.value for c, k in self.clusters.items()}
        assert sum(in_force.values()) <= self.ledger.cap, (in_force, self.ledger)
        assert self.ledger.total_held() <= self.ledger.cap, self.ledger
        for c, k in self.clusters.items():
            assert k.value <= self.ledger.held(c), (c, k, self.ledger)
            assert k.consumed <= k.value, k

    def heal(self) -> None:
        for _ in range(20):
            while self.network:
                self.deliver(0, False)
                self.check()
            self.network += self.ledger.resend()
            self.send_rebalance()
            if not self.network:
                return
        raise AssertionError(f"no quiet after healing: {self.ledger}")


@settings(max_examples=400, deadline=None)
@given(n=st.integers(2, 3), cap=st.integers(0, 40), ops=st.lists(OPS, max_size=60))
def test_allowances_in_force_never_sum_above_the_cap(n: int, cap: int, ops: list[tuple[str, int, int]]) -> None:
    world = World(n, cap)
    world.check()
    for op in ops:
        world.step(op)
        world.check()
    world.heal()
    goal = world.goal()
    assert {c: k.value for c, k in world.clusters.items()} == goal, (goal, world.ledger)
    lowered = world.ledger.cap_goal
    assert lowered is None or world.ledger.total_held() == sum(k.consumed for k in world.clusters.values()) > lowered, \
        "a lowered cap is in force once every cluster confirmed, unless more was spent than it allows"


def test_a_raise_waits_for_the_donors_lower_to_be_confirmed() -> None:
    ledger = Ledger.start("vision", 10, {"a": 6, "b": 4})
    a, b = Cluster("a", "vision", 6), Cluster("b", "vision", 4)
    grants = rebalance(ledger, {"a": 2, "b": 8})
    assert [(g.cluster, g.value) for g in grants] == [("a", 2)], "the raise must wait: a may still use 6"
    assert ledger.held("a") == 6 and ledger.room() == 0
    ledger.confirmed(a.apply(grants[0]))
    grants = rebalance(ledger, {"a": 2, "b": 8})
    assert [(g.cluster, g.value) for g in grants] == [("b", 8)]
    b.apply(grants[0])
    assert a.value + b.value == 10


def test_a_cut_off_cluster_keeps_its_allowance_and_nobody_gets_it() -> None:
    ledger = Ledger.start("vision", 10, {"a": 5, "b": 5})
    lower = ledger.grant("a", 1)
    assert lower is not None  # sent, but the partition drops it: a keeps 5
    assert ledger.grant("b", 9) is None and ledger.held("a") == 5
    assert ledger.resend() == [lower]


def test_consumed_gpu_hours_are_not_taken_back() -> None:
    ledger = Ledger.start("hours", 100, {"a": 50, "b": 50})
    a = Cluster("a", "hours", 50)
    assert a.consume(30) == 30 and a.consume(30) == 20  # debits stop at the allowance
    lower = ledger.grant("a", 10)
    assert lower is not None
    conf = a.apply(lower)
    assert (conf.value, a.value) == (50, 50), "a lower below the consumption is clamped to it"
    ledger.confirmed(conf)
    assert ledger.held("a") == 50


def test_targets_share_the_cap_by_demand() -> None:
    assert targets(10, {"a": 0, "b": 0}) == {"a": 5, "b": 5}
    assert targets(10, {"a": 8, "b": 8}) == {"a": 5, "b": 5}
    assert targets(10, {"a": 9, "b": 1}) == {"a": 9, "b": 1}
    assert targets(10, {"a": 30, "b": 10}) == {"a": 8, "b": 2}  # 7.5 / 2.5: the larger remainder first, names break ties
    # floors first, then demand (a: 3), then what nobody claims evenly (3: a 2, b 1)
    assert targets(10, {"a": 3, "b": 1}, {"a": 0, "b": 4}) == {"a": 5, "b": 5}
    assert sum(targets(7, {"a": 5, "b": 5, "c": 5}).values()) == 7
