"""`jobtree sim run FILE --live` prints exactly what the in-process simulator prints, for every
scenario: the proof that the services are faithful to the core.

Each scenario is played by the real CLI in a subprocess, which starts its own nats-server and
its own admission, binder and budget processes (`jobtree serve`, virtual clock). Scenarios are
independent (each has its own server), so they are played several at a time in a background
pool started with the first test; each test waits only for its own scenario. Outputs are
compared as parsed objects (a mismatch names the first differing path) and then as text.
Scenarios the calculus rejects while playing (not at parse time) must fail the same way live.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from jobtree.bus.natsserver import NatsServer
from jobtree.sim.runner import run_scenario
from jobtree.sim.scenario import ScenarioError, load_scenario

HERE = Path(__file__).parent
OWN = HERE.parent / "scenarios"
SHARED = HERE.parents[1].parent / "shared" / "scenarios"
WORKERS = int(os.environ.get("JOBTREE_LIVE_WORKERS", "0")) or max(3, 2 * (os.cpu_count() or 1))
PLAY_TIMEOUT = 240


def _playable(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.yaml") if not p.name.endswith(".expect.yaml"))


def _scenarios() -> list[Path]:
    if not SHARED.is_dir():
        raise RuntimeError(f"the reference scenarios are missing: {SHARED} (CI puts ../shared beside the repo)")
    return [*_playable(SHARED), *_playable(OWN)]


def _rejected_while_playing() -> list[Path]:
    """Invalid scenarios that parse but that the calculus rejects at a step."""
    out = []
    for path in _playable(OWN / "invalid"):
        try:
            load_scenario(path)
        except ScenarioError:
            continue
        out.append(path)
    return out


SCENARIOS = _scenarios()
REJECTED = _rejected_while_playing()


def _id(p: Path) -> str:
    return ("shared/" if p.parent == SHARED else "") + p.stem


class Played(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def play(path: Path, *extra: str) -> Played:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "sim", "run", str(path), "--live", *extra],
                          capture_output=True, text=True, timeout=PLAY_TIMEOUT)
    return Played(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@pytest.fixture(scope="session")
def live_runs(request: pytest.FixtureRequest) -> Iterator[dict[Path, Future[Played]]]:
    """Every selected scenario played live, in the background, in test order."""
    selected = [item.callspec.params["path"] for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec")
                and "path" in item.callspec.params]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="live-sim")
    futures = {path: pool.submit(play, path) for path in dict.fromkeys(selected)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """The first path at which two JSON values differ (None when equal)."""
    if type(a) is not type(b):
        return f"{path}: {a!r} (in-process) != {b!r} (live)"
    if isinstance(a, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{path}.{key}: only {'in-process' if key in a else 'live'}"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None if len(a) == len(b) else f"{path}: {len(a)} items (in-process) != {len(b)} (live)"
    return None if a == b else f"{path}: {a!r} (in-process) != {b!r} (live)"


def _in_process(path: Path) -> tuple[dict[str, Any], str]:
    out = run_scenario(load_scenario(path))
    return out, json.dumps(out, indent=2) + "\n"


@pytest.mark.parametrize("path", SCENARIOS, ids=_id)
def test_live_equals_in_process(path: Path, live_runs: dict[Path, Future[Played]]) -> None:
    played = live_runs[path].result(timeout=PLAY_TIMEOUT + 60)
    assert played.returncode == 0, f"--live exited {played.returncode} after {played.seconds:.1f} s:\n{played.stderr}"
    expected, text = _in_process(path)
    live = json.loads(played.stdout)
    diff = first_difference(expected, live)
    assert diff is None, f"--live differs from the in-process simulator at {diff}"
    assert played.stdout == text, "same objects, different JSON text (key order or number format)"


@pytest.mark.parametrize("path", REJECTED, ids=lambda p: p.stem)
def test_live_rejects_like_in_process(path: Path, live_runs: dict[Path, Future[Played]]) -> None:
    played = live_runs[path].result(timeout=PLAY_TIMEOUT + 60)
    ref = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "sim", "run", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert ref.returncode == 2
    assert (played.returncode, played.stdout, played.stderr) == (2, "", ref.stderr)


def test_live_on_a_given_server(nats_server: NatsServer, tmp_path: Path) -> None:
    """`--live NATS_URL` plays on that server; the cluster must start from nothing there."""
    text = (SHARED / "01-fit-unfunded-refund.yaml").read_text()
    assert "config: {cluster: gpu-a" in text
    path = tmp_path / "scenario.yaml"  # a cluster name of its own on the shared server
    path.write_text(text.replace("config: {cluster: gpu-a", "config: {cluster: e2e-live-url"))
    played = play(path, nats_server.url)
    assert played.returncode == 0, played.stderr
    assert played.stdout == _in_process(SHARED / "01-fit-unfunded-refund.yaml")[1]
    again = play(path, nats_server.url)
    assert again.returncode == 1 and again.stdout == ""
    assert "cluster e2e-live-url already has a ledger" in again.stderr
