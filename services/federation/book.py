"""The federation's book of one cap: concurrency and GPU-hours allowances moved in lockstep.

Part of the federation service (see its package docstring). A `Book` holds two demarcation
ledgers of `jobtree.core.allowances` — GPUs, and GPU-hours in thousandths (`MILLI`) when the
cap bounds them — whose versions move together: every grant carries both values under one
version, as the cluster's `SetAllowance` command does, and is sent only if *both* ledgers have
room for it (rule 2 of `docs/design/federation.md`). `plan(goal)` gives the grants that move
toward a goal now: lowers first (always allowed), then raises as far as the cap has room
(partial raises, so a cluster cut off holding more than its target does not stall the rest).
`to_json` / `from_json` is what the federation stores in its KV bucket *before* a grant is sent:
a restarted federation must remember every grant in flight, or it would undercount `held`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobtree.core.allowances import Ledger

MILLI = 1000
"""GPU-hours are booked in thousandths of a GPU-hour (integers, as the ledgers need)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Federation -> cluster: from `version` on, `gpus` (and `milli_hours`) of `cap`."""

    cap: str
    cluster: str
    version: int
    gpus: int
    milli_hours: int | None


@dataclass
class Book:
    cap: str
    gpus: Ledger
    hours: Ledger | None = None
    last_rebalance: int = 0
    """When a grant was last sent (seconds)."""
    rounds: int = 0
    """Rebalances that sent grants: with the cap, the cut seed published (`cut_seed`)."""
    goal: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    """The last target per cluster."""

    @staticmethod
    def start(cap: str, gpus: int, milli_hours: int | None,
              reported: Mapping[str, tuple[int, int | None, int]]) -> Book:
        """A new book from every cluster's report: (allowance in force, GPU-hours allowance in
        force, its version). Clusters configured above the cap are booked as they are (over the
        cap until their lowers commit: no raise is granted meanwhile)."""
        def ledger(values: dict[str, int], cap_value: int) -> Ledger:
            return Ledger(cap, cap_value, dict(values), {c: v for c, (_, _, v) in reported.items()},
                          {c: {} for c in reported}, {c: v + 1 for c, (_, _, v) in reported.items()})

        book = Book(cap, ledger({c: g for c, (g, _, _) in reported.items()}, gpus))
        if milli_hours is not None:
            book.hours = ledger({c: milli_hours if h is None else h for c, (_, h, _) in reported.items()}, milli_hours)
        return book

    @property
    def clusters(self) -> list[str]:
        return sorted(self.gpus.clusters)

    def cut_seed(self) -> str:
        return f"{self.cap}#{self.rounds}"

    def _ledgers(self) -> list[Ledger]:
        return [self.gpus] if self.hours is None else [self.gpus, self.hours]

    def set_cap(self, gpus: int, milli_hours: int | None) -> None:
        goal = self.gpus.cap if self.gpus.cap_goal is None else self.gpus.cap_goal
        if gpus != goal:
            self.gpus.set_cap(gpus)
        if milli_hours is not None and self.hours is not None:
            goal = self.hours.cap if self.hours.cap_goal is None else self.hours.cap_goal
            if milli_hours != goal:
                self.hours.set_cap(milli_hours)

    def confirm(self, cluster: str, version: int, gpus: int, milli_hours: int | None) -> None:
        """A cluster's ledger holds `version` with these values (stale reports change nothing)."""
        from jobtree.core.allowances import Confirmation

        if cluster not in self.gpus.clusters or version >= self.gpus.next_version[cluster]:
            return  # not a member, or a version never granted: nothing this book can vouch for
        self.gpus.confirmed(Confirmation(self.cap, cluster, version, gpus))
        if self.hours is not None:
            value = self.hours.clusters[cluster] if milli_hours is None else milli_hours
            self.hours.confirmed(Confirmation(self.cap, cluster, version, value))

    def current(self, cluster: str) -> tuple[int, int | None]:
        """The latest value of each bound sent to (or else confirmed by) `cluster`."""
        def latest(ledger: Ledger) -> int:
            pending = ledger.pending(cluster)
            return ledger.clusters[cluster] if pending is None else pending

        return latest(self.gpus), None if self.hours is None else latest(self.hours)

    def _ceiling(self, ledger: Ledger, cluster: str) -> int:
        """The highest value `cluster` may be granted now (rule 2)."""
        return ledger.held(cluster) + max(0, ledger.room())

    def _grant(self, cluster: str, gpus: int, hours: int | None) -> Grant:
        got = self.gpus.grant(cluster, gpus)
        assert got is not None, "checked against the ceiling first"
        if self.hours is not None and hours is not None:
            other = self.hours.grant(cluster, hours)
            assert other is not None and other.version == got.version, "the two ledgers move in lockstep"
        return Grant(self.cap, cluster, got.version, gpus, hours)

    def plan(self, goal: Mapping[str, tuple[int, int | None]]) -> list[Grant]:
        """The grants toward `goal` now (recorded as sent): every lower, then every raise as far
        as the cap has room, smallest need first."""
        self.goal = dict(goal)
        out: list[Grant] = []
        for c in sorted(goal):  # lowers: any bound going down, none going up
            g, h = self.current(c)
            want_g, want_h = goal[c]
            new = (min(g, want_g), None if h is None or want_h is None else min(h, want_h))
            if new != (g, h):
                out.append(self._grant(c, *new))
        for c in sorted(goal, key=lambda c: (goal[c][0] - self.gpus.held(c), c)):
            g, h = self.current(c)
            want_g, want_h = goal[c]
            new_g = max(g, min(want_g, self._ceiling(self.gpus, c)))
            new_h = h
            if self.hours is not None and h is not None and want_h is not None:
                new_h = max(h, min(want_h, self._ceiling(self.hours, c)))
            if (new_g, new_h) != (g, h):
                out.append(self._grant(c, new_g, new_h))
        return out

    def resend(self) -> list[Grant]:
        """The latest unconfirmed grant of every cluster (same version: applying it twice is a no-op)."""
        out = []
        for c in self.clusters:
            sent = self.gpus.sent[c]
            if sent:
                v = max(sent)
                hours = None if self.hours is None else self.hours.sent[c].get(v)
                out.append(Grant(self.cap, c, v, sent[v], hours))
        return out

    # -- storage ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def dump(ledger: Ledger) -> dict[str, Any]:
            return {"cap": ledger.cap, "capGoal": ledger.cap_goal, "confirmed": ledger.clusters,
                    "versions": ledger.confirmed_version,
                    "sent": {c: {str(v): x for v, x in s.items()} for c, s in ledger.sent.items()},
                    "next": ledger.next_version}

        return {"cap": self.cap, "gpus": dump(self.gpus), "hours": None if self.hours is None else dump(self.hours),
                "lastRebalance": self.last_rebalance, "rounds": self.rounds}

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Book:
        def load(d: dict[str, Any]) -> Ledger:
            ledger = Ledger(doc["cap"], d["cap"], dict(d["confirmed"]), dict(d["versions"]),
                            {c: {int(v): x for v, x in s.items()} for c, s in d["sent"].items()}, dict(d["next"]))
            ledger.cap_goal = d["capGoal"]
            return ledger

        return Book(doc["cap"], load(doc["gpus"]), None if doc["hours"] is None else load(doc["hours"]),
                    doc["lastRebalance"], doc["rounds"])
