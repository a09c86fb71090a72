"""The admission queue as an index: its order kept as runs come and go, and the runs that wait
for capacity asleep until there is some (docs/design/requeue.md).

Contract: `AdmissionQueue` holds the keys of the queued runs (Pending and Reserved) at their
positions `(admitted, key)` — the order admission considers them in (§5). Each key is awake
or asleep:
- `awake()` lists the awake keys in order; `place(key, pos)` puts a key in (awake) or, with
  `pos=None`, takes it out; either way it wakes it.
- `sleep(key, flavor, need, group_need, hold_until)` sets an awake key asleep: the engine
  proved that retrying it changes nothing until `flavor` has at least `need` GPUs free and a
  domain with `group_need` free, the hold-down ending at `hold_until` (if any) is over, or
  budgets or nodes change (the engine then calls `wake_all`). `wake_due(now, free,
  domain_free)` wakes, and returns in order, the sleepers whose capacity or hold-down
  condition no longer holds; it is cheap when none does (a look at the smallest need per
  flavor and the earliest hold-down end). A sleeper may also `watch` funding components: it
  wakes when `wake_due` is handed a `touched` set holding one of them (its cover may now be
  funded).
Not: a decider — it never says whether a run is admitted, only which runs need a look.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from sortedcontainers import SortedList

Position = tuple[int, str]
"""(admitted, key): the queue order."""


class AdmissionQueue:
    def __init__(self) -> None:
        self._awake: SortedList = SortedList()
        self._pos: dict[str, Position] = {}
        self._asleep: dict[str, tuple[str, int, int]] = {}
        """Sleeping key -> (flavor, GPUs it needs free, GPUs it needs free in one domain)."""
        self._by_flavor: dict[str, SortedList] = {}
        """Flavor -> SortedList of (need, key) of its sleepers."""
        self._holds: list[tuple[int, str]] = []
        """Heap of (hold-down end, key) of sleepers in hold-down (stale entries skipped)."""
        self._hold_of: dict[str, int] = {}
        self._watchers: dict[str, set[str]] = {}
        """Funding component id -> sleeping keys that wake when it changes."""
        self._watch_of: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def asleep(self, key: str) -> bool:
        return key in self._asleep

    def sleepers(self) -> int:
        return len(self._asleep)

    def order(self) -> list[str]:
        """Every queued key, asleep or not, in order."""
        return [key for _, key in sorted(self._pos.values())]

    def awake_positions(self) -> list[Position]:
        """The awake keys' positions, in order."""
        return list(self._awake)

    def awake(self) -> list[str]:
        return [key for _, key in self._awake]

    def place(self, key: str, pos: Position | None) -> None:
        """Put `key` in the queue at `pos`, awake (None: take it out)."""
        self.wake(key)
        old = self._pos.pop(key, None)
        if old is not None:
            self._awake.discard(old)
        if pos is not None:
            self._pos[key] = pos
            self._awake.add(pos)

    def sleep(self, key: str, flavor: str, need: int, group_need: int, hold_until: int | None,
              watch: tuple[str, ...] = ()) -> None:
        pos = self._pos[key]
        if key in self._asleep:
            return
        self._awake.discard(pos)
        self._asleep[key] = (flavor, need, group_need)
        self._by_flavor.setdefault(flavor, SortedList()).add((need, key))
        if hold_until is not None:
            self._hold_of[key] = hold_until
            heapq.heappush(self._holds, (hold_until, key))
        if watch:
            self._watch_of[key] = watch
            for cid in watch:
                self._watchers.setdefault(cid, set()).add(key)

    def wake(self, key: str) -> bool:
        got = self._asleep.pop(key, None)
        if got is None:
            return False
        flavor, need, _ = got
        index = self._by_flavor[flavor]
        index.discard((need, key))
        if not index:
            del self._by_flavor[flavor]
        self._hold_of.pop(key, None)
        for cid in self._watch_of.pop(key, ()):
            watchers = self._watchers[cid]
            watchers.discard(key)
            if not watchers:
                del self._watchers[cid]
        self._awake.add(self._pos[key])
        return True

    def wake_all(self) -> None:
        for key in list(self._asleep):
            self.wake(key)
        self._holds.clear()

    def wake_due(self, now: int, free: Callable[[str], int], domain_free: Callable[[str], int],
                 touched: set[str] | None = None) -> list[Position]:
        """Wake the sleepers whose flavor has their need free (in all and in one domain), whose
        hold-down is over, or that watch a component in `touched` (emptied here); their
        positions, in order."""
        woken: list[str] = []
        if touched:
            for cid in touched:
                woken.extend(self._watchers.get(cid, ()))
            touched.clear()
        holds = self._holds
        while holds and holds[0][0] <= now:
            until, key = heapq.heappop(holds)
            if self._hold_of.get(key) == until:
                woken.append(key)
        for flavor, index in self._by_flavor.items():
            have = free(flavor)
            if index[0][0] <= have:
                most = domain_free(flavor)
                woken += [key for _, key in index.irange(maximum=(have, "\U0010ffff"))
                          if self._asleep[key][2] <= most]
        out = []
        for key in woken:
            if self.wake(key):
                out.append(self._pos[key])
        out.sort()
        return out
