"""Fixtures of the bad-input catalogue: the e2e fixtures (a real nats-server) and its helpers.

The catalogue's tests drive real processes, as the e2e tests do; they share the e2e helpers
(`tests/e2e/`), which are put on the import path here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

_spec = importlib.util.spec_from_file_location("e2e_fixtures", E2E / "conftest.py")
assert _spec is not None and _spec.loader is not None
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)

nats_binary = _e2e.nats_binary
nats_server = _e2e.nats_server
cluster = _e2e.cluster
services = _e2e.services


@pytest.fixture(scope="module")
def system(nats_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real system (binder, admission, budget, packer, gateway) for one module of cases. After
    them: every process still up, a clean stop, and no traceback in any log."""
    from test_gateway import start_system

    sys_ = start_system(nats_server, tmp_path_factory.mktemp("badinput"))  # type: ignore[arg-type]
    yield sys_
    alive = {name: sp.running for name, sp in sys_.supervisor.processes.items()}
    logs = {name: sp.log_path.read_text() for name, sp in sys_.supervisor.processes.items()}
    statuses = sys_.stop()
    assert all(alive.values()), (alive, sys_.logs())
    assert all(code == 0 for code in statuses.values()), (statuses, sys_.logs())
    for name, log in logs.items():
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"
