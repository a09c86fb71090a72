"""Fixtures of the bad-input catalogue: the e2e fixtures (a real nats-server) and its helpers.

The catalogue's tests drive real processes, as the e2e tests do; they share the e2e helpers
(`tests/e2e/`), which are put on the import path here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
