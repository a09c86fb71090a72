"""Every service stops when told (SIGTERM) even while its nats-server is gone: nothing is left
behind waiting for a bus that will not come back (a gateway once outlived a failed test that
way). Real processes: a private nats-server, killed -9, then SIGTERM to each service."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from test_gateway import SERVICES, start_system

from jobtree.bus.natsserver import NatsServer
from jobtree.bus.runtime import HARD_STOP_SECONDS


def test_services_stop_on_sigterm_while_nats_is_gone(nats_binary: Path, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", binary=nats_binary).start()
    system = start_system(server, tmp_path / "sys")
    try:
        system.stub()  # connected and serving
        server.kill()
        time.sleep(1.0)  # every service has noticed
        procs = {name: system.supervisor.processes[name].proc for name in SERVICES}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + HARD_STOP_SECONDS + 5
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.1)
        left = [name for name, p in procs.items() if p.poll() is None]
        assert not left, f"still running {HARD_STOP_SECONDS + 5:g} s after SIGTERM: {left}\n{system.logs()}"
    finally:
        system.stop()
        server.stop()


STUCK = """
import asyncio, sys
from pathlib import Path
from jobtree.bus.runtime import ServiceSettings, run

async def main(ctx):
    while True:  # a service that swallows its cancellation: its stop never finishes
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue

sys.exit(asyncio.run(run(main, ServiceSettings(name="packer", cluster="stuck", nats_url=sys.argv[1]))))
"""


def test_a_service_whose_stop_hangs_is_cut_short(nats_server: NatsServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    proc = subprocess.Popen([sys.executable, str(script), nats_server.url], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        assert proc.stderr is not None
        while '"msg": "started"' not in (line := proc.stderr.readline()):
            assert line and time.monotonic() < deadline, "the stuck service did not start"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(HARD_STOP_SECONDS + 10)
        took = time.monotonic() - sent
        assert code == 1 and HARD_STOP_SECONDS - 1 <= took <= HARD_STOP_SECONDS + 5, (code, took)
        assert "did not stop in time; exiting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
