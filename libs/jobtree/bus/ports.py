"""The ports a service listens on, said in a file once bound.

Contract: a listener asked for port 0 takes one the kernel picks while binding, so no other
process can take it in between (as it can a port picked beforehand and handed over). The
service then `write`s the port it took to a file in its data directory (atomically); `jobtree
up` `read`s it, waits until the port accepts connections, prints it, and hands the same port
to a restart. The file names are here, one home for the services that write them and `up`
that reads them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

ANY = -1
"""A metrics port meaning "a free one, chosen while binding" (`--metrics-port auto`)."""
METRICS_FILE = "metrics.port"
GATEWAY_FILE = "gateway.port"
DASHBOARD_FILE = "dashboard.port"


def write(path: Path, port: int) -> None:
    """Say which port a listener took."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n", encoding="utf-8")
    tmp.replace(path)


def read(path: Path) -> int:
    """The port `write` said (0 while there is none)."""
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text(encoding="utf-8"))
    return 0
