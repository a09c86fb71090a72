"""Every service exposes Prometheus metrics (`--metrics-port`): requests and their latency, the
collector's pauses, admission's reads of the ledger; on the port asked for, or on one it takes
while binding (`auto`), and it says which in `<data-dir>/metrics.port`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.ledger import Ledger
from jobtree.bus.natsserver import NatsServer, orphan_safe
from jobtree.core import facts as F
from jobtree.core.model import Node, labels_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_services_count_and_time_their_requests(nats_server: NatsServer, cluster: str, tmp_path: Path) -> None:
    async def setup() -> None:
        nc = await nats.connect(nats_server.url)
        await Ledger(nc.jetstream(), cluster).create()
        await nc.close()

    asyncio.run(setup())
    ports = {"binder": 0, "admission": _free_port()}  # 0: auto
    loops = {"binder": {}, "admission": {"JOBTREE_EVENT_LOOP": "asyncio"}}  # uvloop unless told otherwise
    procs = [
        subprocess.Popen(orphan_safe([sys.executable, "-m", "jobtree.cli.main", "serve", name, "--cluster", cluster,
                                      "--nats", nats_server.url, "--clock", "virtual",
                                      "--metrics-port", str(port or "auto"), "--data-dir", str(tmp_path / name)]),
                         stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{name}.log").open("wb"),
                         start_new_session=True, env={**os.environ, **loops[name]})
        for name, port in ports.items()
    ]
    try:
        node = Node("a-00", 8, labels_of({"region": "r", "cluster": "c", "fabric.domain": "A", "gpu.flavor": "H100"}))

        async def drive() -> bus.CommandReply:
            nc = await nats.connect(nats_server.url)
            subject = subjects.request(cluster, "admission", "command")
            msg = convert.command_to_proto(F.AddNode(node), command_id="m-1", instant=1_767_571_200)
            for _ in range(100):  # until admission leads
                try:
                    raw = await nc.request(subject, msg.SerializeToString(), timeout=2)
                    await nc.close()
                    return bus.CommandReply.FromString(raw.data)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.2)
            raise AssertionError("admission never answered")

        reply = asyncio.run(drive())
        assert reply.ledger_sequence == 1 and not reply.HasField("error")
        deadline = time.monotonic() + 20
        while not (tmp_path / "binder" / "metrics.port").exists():
            assert time.monotonic() < deadline, "the binder never said its metrics port"
            time.sleep(0.1)
        ports["binder"] = int((tmp_path / "binder" / "metrics.port").read_text())
        assert ports["binder"] > 0 and int((tmp_path / "admission" / "metrics.port").read_text()) == ports["admission"]
        admission = _scrape(ports["admission"], deadline)
        binder = _scrape(ports["binder"], deadline)
        assert 'jobtree_requests_total{outcome="ok",service="admission",verb="command"} 1.0' in admission
        assert 'jobtree_request_seconds_count{service="admission",verb="command"} 1.0' in admission
        assert 'jobtree_requests_total{outcome="ok",service="binder",verb="commit"} 1.0' in binder
        # one leader term, begun by reading the ledger's tail; and the collector's pauses are timed
        assert 'jobtree_admission_rebuilds_total{why="take over"} 1.0' in admission
        started = {name: [json.loads(line)["event_loop"] for line in (tmp_path / f"{name}.log").read_text().splitlines()
                          if '"started"' in line] for name in ports}
        assert started == {"binder": ["uvloop"], "admission": ["asyncio.unix_events"]}, started
        for text in (admission, binder):
            assert re.search(r"^jobtree_gc_pause_seconds_count\{generation=\"[012]\"\} [1-9]", text, re.M), [
                line for line in text.splitlines() if "gc_pause" in line]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
