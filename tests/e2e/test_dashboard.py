"""The web dashboard in a real headless chromium, against `jobtree up` (the demo cluster) and,
for the 1,000-node fleet, against the dashboard's app on a real cluster view: the four views
load, a submitted run appears in the fleet without a reload, a reserved run shows its ETA, a
budget shows its burn-down; screenshots are kept as test artifacts (tests/e2e/browser.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from browser import browser_page, shot, shown
from kubeenv import UpProcess, poll_until, runs, submit
from kubeenv import run_manifest as run

from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.manifest import generate_nodes, parse_budget
from jobtree.core.model import ClusterConfig
from jobtree.services.dashboard.app import Board, serve_http
from jobtree.services.dashboard.views import BurnHistory

SCENARIOS = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    work = tmp_path_factory.mktemp("dashboard")
    system = UpProcess(work / "jt", "demo", "--dashboard-port", "0").wait_ready()
    try:
        yield system
    finally:
        system.stop()


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_up_prints_the_dashboard_url_and_serves_every_view(up: UpProcess) -> None:
    assert up.dashboard.startswith("http://127.0.0.1:") and up.dashboard.endswith("/")
    assert up.state()["dashboard"] == up.dashboard
    with urllib.request.urlopen(up.dashboard + "healthz", timeout=10) as r:
        assert r.status == 200
    for view in ("fleet", "budgets", "queue", "runs"):
        status, doc = get_json(up.dashboard + f"api/{view}")
        assert status == 200 and doc["sequence"] > 0, (view, doc)
    status, doc = get_json(up.dashboard + "api/runs/nobody/nothing")
    assert status == 404 and doc == {"error": "runs/nobody/nothing: no such run in the cluster's view"}
    fleet = get_json(up.dashboard + "api/fleet")[1]
    assert sum(len(d["nodes"]) for d in fleet["domains"]) == 12


def test_the_views_live_in_a_browser(up: UpProcess) -> None:
    with browser_page() as page:
        shown(page, up.dashboard + "#/fleet")
        assert page.locator(".node").count() == 12
        page.evaluate("window.__noReload = true")
        first = int(page.evaluate("document.body.dataset.sequence"))

        # A submitted run appears in the fleet view without a reload.
        submit(up, run("burn", "nlp", "org:ml:nlp", 8, 8))
        page.wait_for_selector('[data-run="nlp/burn"]')
        assert page.locator('[data-run="nlp/burn"]').count() == 8
        assert page.evaluate("window.__noReload") is True
        assert int(page.evaluate("document.body.dataset.sequence")) > first
        tip = page.locator('[data-run="nlp/burn"]').first.get_attribute("data-tip") or ""
        assert "nlp/burn (org:ml:nlp)" in tip and "lease nlp.burn." in tip and "owned" in tip
        shot(page, "fleet")

        # Funded work of another owner holds the rest: a funded vision run reserves, with an ETA.
        submit(up, {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "other"},
                    "spec": {"owner": "org:other", "envelopes": [{"name": "main", "flavor": "H100-80GB",
                                                                  "concurrency": 96}]}})
        submit(up, run("holder", "other", "org:other", 88, 8))
        page.wait_for_function("document.querySelectorAll('[data-run=\"other/holder\"]').length === 88")
        submit(up, run("train", "vision", "org:ml:vision", 16, 8),
               run("eval", "vision", "org:ml:vision", 8, follow={"after": ["train"]}))
        poll_until("train reserved", lambda: "Reserved" in runs(up, "-n", "vision", "get", "train"))
        page.click('nav a[data-view="queue"]')
        row = page.wait_for_selector('tr[data-queued="vision/train"]')
        assert row is not None
        eta = page.locator('tr[data-queued="vision/train"] .eta').inner_text()
        explained = runs(up, "-n", "vision", "explain", "train")
        expected = explained.split("earliest start ", 1)[1].split(".", 1)[0]  # what `explain` says
        assert eta == expected.replace("T", " ").replace("Z", " UTC"), (eta, explained)
        text = page.locator('tr[data-queued="vision/train"]').inner_text()
        assert "reserved: holds its place" in text and "GPUs must be freed" in text
        assert "vision/train must complete" in page.locator('tr[data-queued="vision/eval"]').inner_text()
        shot(page, "queue")

        # The run page: why it waits, its forest; a running run's lease timeline.
        page.click('a[data-run-link="vision/train"]')
        page.wait_for_selector(".queued .eta")
        assert page.locator('[data-forest-node="vision/eval"]').count() == 1
        assert page.locator('[data-edge="vision/train->vision/eval"]').count() == 1
        shot(page, "run-reserved")
        shown(page, up.dashboard + "#/runs/nlp/burn")
        page.wait_for_selector("svg.timeline rect[data-lease]")
        assert "Start" in page.locator("table").last.inner_text()
        assert "8 owned" in page.inner_text("main")
        shot(page, "run")

        # A budget's burn-down: ml-nlp/main is capped (400 GPU-hours) and funds 8 GPUs now.
        page.click('nav a[data-view="budgets"]')
        page.wait_for_selector('[data-envelope="ml-nlp/main"] svg.burn circle')
        points = page.locator('[data-envelope="ml-nlp/main"] svg.burn polyline').get_attribute("points") or ""
        assert len(points.split()) >= 2, points  # the curve so far, sampled at each ledger instant
        nlp = page.locator('[data-envelope="ml-nlp/main"]')
        assert "runs out at" in nlp.inner_text() and nlp.locator(".exhausts").count() == 1
        assert "Concurrency 8 of 16 GPUs" in nlp.inner_text()
        assert page.locator('[data-envelope="ml-nlp/main"] svg.burn line').count() == 1  # the projection
        shot(page, "budgets")
        assert page.evaluate("window.__noReload") is True


def _big_cluster(nodes: int) -> Cluster:
    """A real cluster view of `nodes` 8-GPU nodes in 10 fabric domains, half of them busy."""
    cl = Cluster(ClusterConfig(), [], 1_767_571_200)
    per = nodes // 10
    for d in range(10):
        labels = {"region": "us-east", "cluster": "big", "fabric.domain": f"d{d}", "gpu.flavor": "H100-80GB"}
        for n in generate_nodes({"generate": {"prefix": f"d{d}-", "count": per, "gpus": 8, "labels": labels}}):
            cl.submit(facts.AddNode(n))
    for team in range(8):
        doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": f"team{team}"},
               "spec": {"owner": f"org:t{team}", "envelopes": [{"name": "main", "flavor": "H100-80GB",
                                                                "concurrency": 400}]}}
        cl.submit(facts.ApplyBudget(parse_budget(doc, "budget")))
    from jobtree.core.manifest import parse_run

    for i in range(nodes // 4):
        team = i % 10  # teams 8 and 9 have no budget: unfunded
        doc = run(f"r{i}", f"t{team}", f"org:t{team}", 16, 8)
        cl.submit(facts.ApplyRun(parse_run(doc, "run")))
    return cl


@contextmanager
def served(cl: Cluster) -> Iterator[str]:
    """The dashboard's app on a still cluster view (a real `Cluster`, a real HTTP server in a
    thread): its base URL."""

    class Still:  # the follower's surface the app reads: a view that is not moving
        cluster = cl
        sequence = 1

        async def catch_up(self, _log: object = None) -> int:
            return self.sequence

    board = Board()
    board.follower, board.history = Still(), BurnHistory()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    bound: list[int] = []

    async def serve() -> None:
        runner, port = await serve_http(board, "127.0.0.1", 0)
        bound.append(port)
        started.set()
        try:
            await board.closing.wait()
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{bound[0]}/"
    finally:
        loop.call_soon_threadsafe(board.close)
        thread.join(10)
        assert not thread.is_alive()


def test_a_thousand_nodes_stay_readable() -> None:
    with served(_big_cluster(1000)) as url, browser_page(1440, 900) as page:
        shown(page, url + "#/fleet")
        assert page.locator(".node").count() == 1000
        assert page.locator(".cell.unfunded").count() > 0 and page.locator(".cell.owned").count() > 0
        # Readable: nothing overflows sideways, and the whole fleet fits in a few screens.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.evaluate("document.documentElement.scrollHeight") < 5 * 900
        path: Path = shot(page, "fleet-1000-nodes")
        assert path.stat().st_size > 10_000


def test_a_reference_scenario_reads_as_its_story() -> None:
    """Scenario 04 played by the core: the elastic run's timeline shows its growth and the cut
    that shrank it, the reclaimed run its seed, the reserved-then-bound run its start."""
    from jobtree.sim.runner import final_cluster
    from jobtree.sim.scenario import load_scenario

    cl = final_cluster(load_scenario(SCENARIOS / "04-reservation-cut-order.yaml"))
    with served(cl) as url, browser_page() as page:
        shown(page, url + "#/runs/default/j2")
        page.wait_for_selector("svg.timeline rect[data-lease]")
        events = page.locator("table").last.inner_text()
        assert "Grow" in events and "Start" in events
        closures = [lease.closure_reason for lease in cl.leases.values() if lease.run == "default/j2" and lease.end]
        assert closures and all(reason in events for reason in closures), (closures, events)
        shot(page, "run-elastic")
        shown(page, url + "#/runs/default/opp")
        opp = [lease for lease in cl.leases.values() if lease.run == "default/opp" and lease.end]
        assert opp and "(" in str(opp[0].closure_reason)  # reclaimed, with the lottery's seed
        page.wait_for_selector("svg.timeline rect[data-lease]")
        assert str(opp[0].closure_reason) in page.inner_text("main")
        shown(page, url + "#/fleet")
        page.wait_for_selector('[data-run="default/j4"]')  # the fleet view renders after the route changes
        assert page.locator('[data-run="default/j4"]').count() == 30


def test_a_taken_dashboard_port_is_refused_when_asked_for_and_avoided_by_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from jobtree.cli import up_cmd
    from jobtree.cli.main import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        assert main(["up", "--data-dir", str(tmp_path / "jt"), "--grpc-port", "0", "--dashboard-port", str(busy)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == (f"jobtree: --dashboard-port: 127.0.0.1:{busy} is in use; "
                                     "pick another port or 0 for a free one\n")
        assert not (tmp_path / "jt").exists()
        assert main(["up", "--data-dir", str(tmp_path / "jt"), "--dashboard-port", "70000"]) == 2
        assert capsys.readouterr().err.startswith("jobtree: --dashboard-port: must be a port number")
        original = up_cmd.DEFAULT_DASHBOARD_PORT
        up_cmd.DEFAULT_DASHBOARD_PORT = busy  # the default is taken: a free port instead, not a refusal
        try:
            chosen = up_cmd.dashboard_port(None, avoid=0)
        finally:
            up_cmd.DEFAULT_DASHBOARD_PORT = original
        assert chosen == 0, "0: the dashboard takes a free port while binding and says which"
