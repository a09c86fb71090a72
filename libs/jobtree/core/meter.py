"""Metering: funded GPU-hours charged to envelopes, unfunded GPU-hours per owner (CALCULUS §2).

Contract: integrates the current classification over time in whole seconds. Consumption of a
bound with a GPU-hour cap is clamped at the cap (so funded hours never exceed B; the timer for
exhaustion fires on the second the cap is reached). An envelope's consumption counts inside
its window only and restarts when its window changes. Deterministic: replaying the same ledger
and budgets through the same instants reproduces every figure (the audit property).
Not: a classifier; it is told the funded width of every bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from jobtree.core.funding_rules import Bound

GPU_SECONDS_PER_HOUR = 3600


def cap_seconds(hours: float) -> int:
    return int(hours * GPU_SECONDS_PER_HOUR + 1e-9)


class Meter:
    def __init__(self) -> None:
        self.consumed: dict[Bound, int] = {}
        """GPU-seconds funded per bound (envelope, lending, aggregate cap)."""
        self.unfunded: dict[str, int] = {}
        """GPU-seconds of unfunded work per run owner."""
        self.window_start: dict[Bound, int | None] = {}
        self.floor: dict[Bound, int] = {}
        """GPU-seconds a bound had consumed when its cap was lowered below them (funded earlier,
        under the old cap); consumption never exceeds max(cap, floor)."""

    def note_caps(self, hour_caps: Mapping[Bound, float]) -> None:
        """A budget was applied: remember consumption already above a lowered cap."""
        for b, cap in hour_caps.items():
            used = self.consumed.get(b, 0)
            if used > cap_seconds(cap):
                self.floor[b] = max(self.floor.get(b, 0), used)

    def reset_window(self, bound: Bound, start: int | None) -> None:
        """Start counting an envelope afresh when a new window begins (its `start` changes);
        moving only the end of the window keeps what it consumed."""
        if bound in self.window_start and self.window_start[bound] != start:
            self.consumed.pop(bound, None)
            self.floor.pop(bound, None)
        self.window_start[bound] = start

    def charge(self, dt: int, funded: Mapping[Bound, int], hour_caps: Mapping[Bound, float],
               unfunded_by_owner: Iterable[tuple[str, int]]) -> None:
        """Charge `dt` seconds at the given funded widths."""
        if dt <= 0:
            return
        for b, width in funded.items():
            if width <= 0 or b[0] == "borrow":
                continue
            before = self.consumed.get(b, 0)
            total = before + width * dt
            cap = hour_caps.get(b)
            self.consumed[b] = max(before, min(total, cap_seconds(cap))) if cap is not None else total
        for owner, gpus in unfunded_by_owner:
            if gpus:
                self.unfunded[owner] = self.unfunded.get(owner, 0) + gpus * dt

    def spent(self, hour_caps: Mapping[Bound, float]) -> frozenset[Bound]:
        return frozenset(b for b, cap in hour_caps.items() if self.consumed.get(b, 0) >= cap_seconds(cap))

    def remaining(self, bound: Bound, hour_caps: Mapping[Bound, float]) -> int | None:
        """GPU-seconds left under the bound's hour cap, or None when it has none."""
        cap = hour_caps.get(bound)
        if cap is None:
            return None
        return max(0, cap_seconds(cap) - self.consumed.get(bound, 0))

    def next_exhaustion(self, now: int, funded: Mapping[Bound, int],
                        hour_caps: Mapping[Bound, float]) -> int | None:
        """The first instant a capped bound runs dry at the current widths."""
        best: int | None = None
        for b, cap in hour_caps.items():
            width = funded.get(b, 0)
            left = cap_seconds(cap) - self.consumed.get(b, 0)
            if width > 0 and left > 0:
                t = now + -(-left // width)
                best = t if best is None or t < best else best
        return best

    def hours(self, bound: Bound) -> float:
        return self.consumed.get(bound, 0) / GPU_SECONDS_PER_HOUR
