"""Per-cluster allowances of an aggregate cap, moved in demarcation order (CALCULUS §9).

Contract: the federation's side and a cluster's side of one cap's allowances, as pure state
machines over messages that may be lost, duplicated, delayed or reordered (a partition is all
of these at once):
- `Ledger` (the federation's book of one cap): `grant(cluster, value)` records a new allowance
  for a cluster and returns the `Grant` to send it (a version per cluster, increasing), or None
  when granting it now could break the cap; `confirmed(Confirmation)` takes a cluster's word that
  it committed a version in its own ledger. `held(cluster)` is what the federation must assume
  the cluster may be using: the largest of its confirmed allowance and every value sent to it
  since, not yet confirmed (the cluster may have applied any of them). The invariant it keeps:
  `sum(held) <= cap` at every instant, and a grant that would raise a held value is refused
  unless the cap has room for it, so a raise waits until the donor's lower is confirmed.
- `Cluster` (one cluster's side): `apply(grant)` commits a newer version (older ones and
  repeats are answered with the current state, changing nothing) and returns the
  `Confirmation` to send back. A lower below what the cluster has already consumed (GPU-hours)
  is clamped to the consumption: the confirmation says the value actually in force.
- `Ledger.set_cap(new)` lowers or raises the cap: a lower is in force once every cluster
  has confirmed allowances that fit under it (a cluster cut off may still use its old one).
- `targets(cap, demand, floors)` divides a cap by demand: integer shares that sum to the cap
  (or less when demand is lower), each at least its floor (what a cluster has consumed).
- `rebalance(ledger, targets)` sends every lower at once and every raise the cap has room for;
  called again as confirmations arrive, it completes the move.
Why it holds: a cluster's allowance in force is always one of the values in its `held` set
(its confirmed one, or one sent after it), and `held` only grows by a grant the cap has room for;
so the allowances in force sum to at most `sum(held) <= cap` whatever the network does. A
cluster cut off keeps its allowance (nothing lowers it without its confirmation), and nobody
else can be granted it: its `held` stays counted until it confirms a lower.
Not: the transport (the federation service), nor classification with an allowance as the cap
(the engine's `SetAllowance` command: a cluster applies a grant as that command, and its
confirmation is the ledger's commit of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Cluster", "Confirmation", "Grant", "Ledger", "rebalance", "targets"]


@dataclass(frozen=True, slots=True)
class Grant:
    """Federation -> cluster: from `version` on, your allowance of `cap` is `value`."""

    cap: str
    cluster: str
    version: int
    value: int


@dataclass(frozen=True, slots=True)
class Confirmation:
    """Cluster -> federation: `version` is committed in my ledger; `value` is in force."""

    cap: str
    cluster: str
    version: int
    value: int


@dataclass
class Ledger:
    """The federation's book of one cap (`name`, at most `cap` in force across `clusters`)."""

    name: str
    cap: int
    clusters: dict[str, int] = field(default_factory=dict)
    """Cluster -> its confirmed allowance (what its ledger says)."""
    confirmed_version: dict[str, int] = field(default_factory=dict)
    sent: dict[str, dict[int, int]] = field(default_factory=dict)
    """Cluster -> version -> value, for the versions sent and not yet confirmed."""
    next_version: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def start(name: str, cap: int, initial: Mapping[str, int]) -> Ledger:
        """A cap whose clusters start with `initial` allowances (as their ledgers hold them)."""
        if sum(initial.values()) > cap or any(v < 0 for v in initial.values()):
            raise ValueError(f"{name}: initial allowances {dict(initial)} exceed the cap {cap} or are negative")
        return Ledger(name, cap, dict(initial), {c: 0 for c in initial}, {c: {} for c in initial},
                      {c: 1 for c in initial})

    cap_goal: int | None = None
    """A lowered cap not yet in force: `cap` drops to it once the held allowances fit under it."""

    def held(self, cluster: str) -> int:
        return max([self.clusters[cluster], *self.sent[cluster].values()])

    def total_held(self) -> int:
        return sum(self.held(c) for c in self.clusters)

    def room(self) -> int:
        return (self.cap if self.cap_goal is None else self.cap_goal) - self.total_held()

    def set_cap(self, cap: int) -> None:
        """A new cap. A raise is in force at once; a lower only once every cluster's held
        allowance fits under it (until then no raise is granted, and `cap` stays the old one:
        clusters cut off may still be using their old allowances). GPU-hours a cluster has
        already spent above the new cap cannot be given back: once every lower is answered,
        the cap in force is what the clusters hold, and it stays the goal."""
        if cap >= self.cap:
            self.cap, self.cap_goal = cap, None
        else:
            self.cap_goal = cap
            self._settle_cap()

    def _settle_cap(self) -> None:
        if self.cap_goal is None:
            return
        if self.total_held() <= self.cap_goal:
            self.cap, self.cap_goal = self.cap_goal, None
        elif not any(self.sent.values()):  # every lower answered: GPU-hours spent are not given back
            self.cap = min(self.cap, self.total_held())

    def grant(self, cluster: str, value: int) -> Grant | None:
        """The grant of `value` to `cluster`, recorded as sent; None if the cap has no room for it
        now (a raise waits for donors to confirm their lowers)."""
        if value < 0:
            raise ValueError(f"{self.name}: an allowance is not negative, got {value}")
        if value > self.held(cluster) and value - self.held(cluster) > self.room():
            return None
        version = self.next_version[cluster]
        self.next_version[cluster] = version + 1
        self.sent[cluster][version] = value
        return Grant(self.name, cluster, version, value)

    def confirmed(self, msg: Confirmation) -> None:
        """A cluster's confirmation (stale and repeated ones change nothing)."""
        if msg.cap != self.name or msg.cluster not in self.clusters or msg.version <= self.confirmed_version[msg.cluster]:
            return
        self.clusters[msg.cluster] = msg.value
        self.confirmed_version[msg.cluster] = msg.version
        self.sent[msg.cluster] = {v: x for v, x in self.sent[msg.cluster].items() if v > msg.version}
        self._settle_cap()

    def pending(self, cluster: str) -> int | None:
        """The latest value sent to `cluster` and not yet confirmed (None: nothing in flight)."""
        sent = self.sent[cluster]
        return sent[max(sent)] if sent else None

    def resend(self) -> list[Grant]:
        """The latest unconfirmed grant of every cluster (to send again after a loss)."""
        return [Grant(self.name, c, max(s), s[max(s)]) for c, s in sorted(self.sent.items()) if s]


@dataclass
class Cluster:
    """One cluster's side of one cap: the allowance its ledger holds, and what it has consumed
    (GPU-hours debited; 0 for concurrency)."""

    name: str
    cap: str
    value: int
    version: int = 0
    consumed: int = 0

    def apply(self, msg: Grant) -> Confirmation:
        """Commit a newer grant (clamped to the consumption); the confirmation of the state in force."""
        if msg.cap == self.cap and msg.cluster == self.name and msg.version > self.version:
            self.value, self.version = max(msg.value, self.consumed), msg.version
        return Confirmation(self.cap, self.name, self.version, self.value)

    def consume(self, amount: int) -> int:
        """Debit up to `amount` within the allowance; what was debited."""
        took = max(0, min(amount, self.value - self.consumed))
        self.consumed += took
        return took


def targets(cap: int, demand: Mapping[str, int], floors: Mapping[str, int] | None = None) -> dict[str, int]:
    """Integer allowances by demand: each cluster at least its floor, then the rest of the cap
    shared in proportion to the demand above the floor (largest remainders first, names
    breaking ties); a cluster never gets more than its demand while another wants more; what no
    demand claims is shared evenly, so a new demand anywhere finds some allowance at once."""
    floors = {c: (floors or {}).get(c, 0) for c in demand}
    out = dict(floors)
    left = cap - sum(out.values())
    if left < 0:
        raise ValueError(f"floors {floors} exceed the cap {cap}")
    want = {c: max(0, demand[c] - out[c]) for c in demand}
    total = sum(want.values())
    if total and left:
        if total <= left:
            for c in want:
                out[c] += want[c]
            left -= total
        else:
            shares = {c: left * want[c] / total for c in want}
            for c in want:
                out[c] += int(shares[c])
            rest = left - sum(int(s) for s in shares.values())
            for c in sorted(want, key=lambda c: (-(shares[c] - int(shares[c])), c))[:rest]:
                out[c] += 1
            left = 0
    names = sorted(demand)
    for i, c in enumerate(names):  # the unclaimed part, evenly (first ones get the remainder)
        out[c] += left // len(names) + (1 if i < left % len(names) else 0)
    return out


def rebalance(ledger: Ledger, goal: Mapping[str, int]) -> list[Grant]:
    """The grants that move `ledger` toward `goal` now: every lower, then each raise the cap has
    room for (smallest first, so more clusters get theirs). Call again as confirmations arrive."""
    out: list[Grant] = []
    for c in sorted(goal):
        current = ledger.pending(c)
        current = ledger.clusters[c] if current is None else current
        if goal[c] < current:
            grant = ledger.grant(c, goal[c])
            if grant is not None:
                out.append(grant)
    for c in sorted(goal, key=lambda c: (goal[c] - ledger.held(c), c)):
        current = ledger.pending(c)
        current = ledger.clusters[c] if current is None else current
        if goal[c] > current:
            grant = ledger.grant(c, goal[c])
            if grant is not None:
                out.append(grant)
    return out
