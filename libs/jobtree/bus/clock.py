"""Where a service's instants come from: a clock object, never a bare clock read.

Contract: `SystemClock.now()` is the wall clock in whole Unix seconds (production). On a
virtual clock (`settings.clock == "virtual"`: tests and `jobtree sim run --live`) instants
come only from the commands, so `VirtualClock.now()` is None and the reader uses the view's own
instant. `ServiceContext.clock` hands each service the one its settings name.
Not: a timer service (the resolver sends Ticks), not the core's clock (`Cluster.advance`).
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "VirtualClock", "clock_named"]


class Clock(Protocol):
    virtual: bool

    def now(self) -> int | None: ...


class SystemClock:
    """The wall clock, whole Unix seconds."""

    virtual = False

    def now(self) -> int:
        return int(time.time())


class VirtualClock:
    """Instants come from the commands; without one, none (the decision loop's own)."""

    virtual = True

    def now(self) -> int | None:
        return None


def clock_named(name: str) -> Clock:
    """The clock of `--clock NAME` (system or virtual)."""
    return VirtualClock() if name == "virtual" else SystemClock()
