"""`jobtree up --clusters a,b`: a federation on this machine — a hub, a nats-server and every
service per cluster, the federation service, and a demo cap that spans the clusters; allowances
move as demand moves; what dies is restarted; Ctrl-C stops everything."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_up import alive, jobtree

from jobtree.cli.runs import main as runs
from jobtree.cli.up_processes import accepts

READY = 120.0


@pytest.mark.parametrize(("args", "problem"), [
    (("--clusters", "a"), "--clusters: a federation needs at least two clusters, got 'a'"),
    (("--clusters", "a,a"), "--clusters: a cluster is named twice in 'a,a'"),
    (("--clusters", "a,Bad"), "--clusters: cluster must be a DNS label"),
    (("--clusters", "a,fed"), "--clusters: 'fed' is the federation hub's own name; pick another"),
    (("--clusters", "a,b", "--kubeconfig", "k"), "--clusters: --kubeconfig is per cluster; it cannot be given"),
    (("--clusters", "a,b", "--insecure", "--client-certs"), "--client-certs needs TLS: leave out --insecure"),
])
def test_up_clusters_refuses_bad_options_in_one_line(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    proc = jobtree("up", "--data-dir", str(tmp_path / "d"), *args, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and problem in err, err
    assert out == ""
    assert not (tmp_path / "d" / "hub").exists(), "nothing was started"


def test_up_clusters_moves_the_demo_cap_with_demand_and_heals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "fed"
    err_path = tmp_path / "up.err"
    with err_path.open("w") as err:
        proc = jobtree("up", "--clusters", "a,b", "--insecure", "--grpc-port", "0", "--data-dir", str(data), stderr=err)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    printed: dict[str, str] = {}
    try:
        deadline = time.monotonic() + READY
        while "federation" not in printed:
            try:
                key, _, value = lines.get(timeout=0.5).partition(": ")
                printed[key] = value
            except queue.Empty:
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
        assert list(printed) == ["nats hub", "grpc a", "grpc b", "federation"], printed
        server = ["--server", printed["grpc a"]]

        def usage() -> dict[str, Any]:
            capsys.readouterr()
            assert runs(["global", "usage", "-o", "json", "--timeout", "3", *server]) == 0
            return dict(json.loads(capsys.readouterr().out)["caps"][0])

        def wait(what: str, ok: Any, timeout: float = 40.0) -> dict[str, Any]:
            end = time.monotonic() + timeout
            while True:
                try:
                    got = usage()
                    if ok(got):
                        return got
                except (AssertionError, KeyError, IndexError, ValueError):
                    got = {}
                assert time.monotonic() < end, f"not within {timeout} s: {what}: {got}\n{err_path.read_text()}"
                time.sleep(0.5)

        def allowances(cap: dict[str, Any]) -> dict[str, int]:
            return {c["cluster"]: c.get("allowance", 0) for c in cap["clusters"]}

        served = [address for c in ("a", "b") for address in json.loads((data / c / "up.json").read_text())["metrics"].values()]
        assert len(served) == len(set(served)) == 2 * len(json.loads((data / "a" / "up.json").read_text())["metrics"]) > 0
        for address in served:  # each taken by its own process while binding, not handed over
            host, _, port = address.rpartition(":")
            assert accepts(int(port), host), address
        first = wait("the demo cap is booked evenly", lambda cap: allowances(cap) == {"a": 16, "b": 16})
        assert first["cap"] == "vision/all" and first["maxConcurrency"] == 32
        manifest = tmp_path / "run.yaml"
        manifest.write_text("apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: train}\n"
                            "spec: {owner: 'org:ml:vision', resources: {gpuType: H100-80GB, totalGPUs: 24}}\n")
        assert runs(["submit", "-f", str(manifest), *server]) == 0
        # a wants 24 of 32: it gets them, and the 8 nobody claims are shared evenly
        wait("the allowance moves to a's demand", lambda cap: allowances(cap) == {"a": 28, "b": 4})
        state = json.loads((data / "up.json").read_text())
        assert set(state["clusters"]) == {"a", "b"} and state["clusters"]["a"]["grpc"] == printed["grpc a"]
        fed_pid = state["processes"]["federation"]
        os.kill(fed_pid, signal.SIGKILL)
        end = time.monotonic() + 30
        while "federation restarted" not in err_path.read_text():
            assert time.monotonic() < end, err_path.read_text()
            time.sleep(0.2)
        wait("the restarted federation answers from its stored books", lambda cap: allowances(cap) == {"a": 28, "b": 4})
        pids = [*json.loads((data / "up.json").read_text())["processes"].values()]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, err_path.read_text()
        assert "jobtree up: stopped" in err_path.read_text()
        assert not [p for p in pids if alive(p)]
        assert not (data / "up.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
