"""Where the gateway's instants come from: the service's clock (`jobtree.bus.clock`), and on a
virtual clock the request's metadata.

Contract: `SystemClock.now()` is the wall clock in whole Unix seconds (production). On a virtual
clock (`settings.clock == "virtual"`, tests and `jobtree sim run --live`) the caller says when
a command happens: the gRPC request carries the instant in the metadata key `jobtree-instant`
(Unix seconds or RFC3339), so nothing is added to the public proto for it; without it the
command carries no instant and happens at the decision loop's own instant (`now()` is None).
`instant_from_metadata` parses that value (ValidationError naming the key when malformed).
Not: a timer service (the resolver sends Ticks), not the core's clock (`Cluster.advance`).
"""

from __future__ import annotations

from jobtree.bus.clock import Clock, SystemClock, VirtualClock
from jobtree.core.errors import ValidationError
from jobtree.core.timefmt import parse_time

INSTANT_METADATA = "jobtree-instant"
"""gRPC metadata key: the instant of a write on a virtual clock (Unix seconds or RFC3339)."""

__all__ = ["INSTANT_METADATA", "Clock", "SystemClock", "VirtualClock", "instant_from_metadata"]


def instant_from_metadata(value: str) -> int:
    """The instant of `jobtree-instant: VALUE`: Unix seconds or an RFC3339 time."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        return parse_time(text, INSTANT_METADATA)
    except ValidationError:
        raise ValidationError(
            INSTANT_METADATA, f"must be Unix seconds or an RFC3339 time such as 2026-01-05T00:00:00Z, got {value!r}"
        ) from None
