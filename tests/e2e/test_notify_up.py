"""`jobtree up --notify FILE` end to end: real processes, a real HTTP receiver standing in for
Slack and a webhook, a real SMTP server. A preemption reaches Slack and a GPU-hours threshold
the mailbox within seconds; the events stream holds what a replay of the ledger derives; a
notifier killed during a burst loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import yaml
from kubeenv import UpProcess, poll_until, runs, submit
from kubeenv import run_manifest as run
from receivers import http_receiver, smtp_server

from jobtree.api import convert
from jobtree.api.events import Deriver
from jobtree.bus.eventstream import EventStream
from jobtree.bus.ledger import Ledger
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig

CLUSTER = "demo"


def notify_up(work: Path, notify: dict[str, Any], config: dict[str, Any], env: dict[str, str] | None = None
              ) -> UpProcess:
    """`jobtree up --notify --config` on the demo cluster."""
    (work / "notify.yaml").write_text(yaml.safe_dump(notify))
    (work / "cluster.yaml").write_text(yaml.safe_dump(config))
    return UpProcess(work / "jt", CLUSTER, "--notify", str(work / "notify.yaml"), "--config",
                     str(work / "cluster.yaml"), env=env).wait_ready()


def test_a_preemption_reaches_slack_and_a_gpu_hours_threshold_the_mailbox(tmp_path: Path) -> None:
    with http_receiver() as http, smtp_server() as (box, smtp):
        notify = {
            "receivers": [{"name": "slack", "slack": {"webhookURL": f"{http.url}/slack"}},
                          {"name": "audit", "webhook": {"url": f"{http.url}/audit"}},
                          {"name": "mail", "email": {"smarthost": smtp, "from": "jobtree@example.org",
                                                     "to": ["leads@example.org"]}}],
            "routes": [{"match": {}, "receiver": "audit", "groupWait": "0s", "continue": True},
                       {"match": {"kinds": ["RunReclaimed", "RunPreempted"]}, "receiver": "slack", "groupWait": "0s"},
                       {"match": {"owner": "org:t*", "kinds": ["BudgetGPUHoursThreshold"]}, "receiver": "mail",
                        "groupWait": "0s"}]}
        up = notify_up(tmp_path, notify, {"cluster": CLUSTER, "reservationLead": "2s"})
        try:
            submit(up, {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": "tiny"},
                       "spec": {"owner": "org:t", "envelopes": [{"name": "main", "flavor": "H100-80GB",
                                                                 "concurrency": 8, "maxGPUHours": 0.005}]}})
            submit(up, run("spend", "t", "org:t", 8, 8))
            submit(up, run("opp", "stray", "org:stray", 80, 8))
            submit(up, run("main", "vision", "org:ml:vision", 16, 8))
            started = time.monotonic()
            slack = poll_until("a preemption on Slack", lambda: http.got.get("slack"), timeout=30)
            body = slack[0][0]
            assert "RunReclaimed" in body["text"] and "stray/opp" in body["text"] and "seed" in body["text"]
            assert body["blocks"][0]["type"] == "header"
            mail = poll_until("a GPU-hours threshold by e-mail", lambda: box.messages, timeout=30)
            assert "BudgetGPUHoursThreshold" in mail[0]["Subject"]
            assert "tiny/main" in mail[0].get_body(("plain",)).get_content()
            assert time.monotonic() - started < 30
            poll_until("main running", lambda: "Running" in runs(up, "-n", "vision", "get", "main"))
            assert_stream_is_the_ledger_replayed(up)
            told = [json.loads(line) for line in runs(up, "-o", "json", "events", "--kinds", "RunReclaimed").splitlines()]
            assert told and all(e["type"] == "io.davidlangworthy.rq.RunReclaimed" for e in told)
            assert {e["data"]["run"] for e in told} == {"opp"} and told[0]["data"]["seed"]
            mine = runs(up, "-n", "vision", "events", "--owner", "org:ml")
            assert "RunRunning" in mine and "runs/vision/main" in mine and "stray" not in mine
            assert "(none)" in runs(up, "events", "--owner", "org:nobody")
            top = runs(up, "top")
            spent = next(line for line in top.splitlines() if "t/spend (org:t)" in line)
            assert "░" * 8 in spent, "GPU-hours spent: it runs on, unfunded"
            assert "vision/main (org:ml:vision)" in top, top
            assert "us-west/demo/" in runs(up, "top", "--summary") or "/demo/" in runs(up, "top", "--summary")
            assert "tiny/main: [" in runs(up, "budgets", "burn", "org:t")
            assert_every_dashboard_metric_exists(up)
            assert_events_w_follows(up)
        finally:
            up.stop()


def assert_events_w_follows(up: UpProcess) -> None:
    """`events -w` prints what is kept, then what happens after it started."""
    watcher = subprocess.Popen([sys.executable, "-m", "jobtree.cli.runs", "--timeout", "60", "events", "-w",
                                "--kinds", "RunReserved,RunRunning"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "JOBTREE_SERVER": up.grpc})
    seen: list[str] = []

    def until(text: str) -> bool:
        assert watcher.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = watcher.stdout.readline()
            seen.append(line)
            if text in line:
                return True
        return False

    try:
        assert until("runs/vision/main"), seen
        submit(up, run("late", "vision", "org:ml:vision", 0 + 8, 8))
        assert until("runs/vision/late"), seen
    finally:
        watcher.terminate()
        watcher.wait(10)


def assert_every_dashboard_metric_exists(up: UpProcess) -> None:
    """Scrape every process of the system: each metric a Grafana dashboard queries exists, and
    the fleet gauges say what the system holds."""
    from jobtree.cli.grafana import metric_names

    names: set[str] = set()
    samples: list[str] = []

    def scrape() -> bool:
        names.clear()
        samples.clear()
        for address in up.state()["metrics"].values():
            text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
            names.update(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))
            samples.extend(line for line in text.splitlines() if line.startswith("jobtree_gpus{"))
        return any('owner="org:ml:vision"' in s and 'class="owned"' in s and s.endswith(" 16.0") for s in samples)

    poll_until("the fleet gauges (refreshed every 5 s)", scrape, timeout=20)
    assert metric_names() - names == set(), f"dashboards query metrics nobody exports: {metric_names() - names}"
    assert any('class="unfunded"' in s and 'owner="org:t"' in s for s in samples), samples


def assert_stream_is_the_ledger_replayed(up: UpProcess) -> None:
    async def read() -> tuple[list[Any], list[Any]]:
        nc = await nats.connect(up.nats, **up.admin())
        js = nc.jetstream()
        try:
            published = [e async for e in EventStream(js, CLUSTER).read(follow=False)]
            cl = Cluster(ClusterConfig(cluster=CLUSTER), (), 0)
            deriver = Deriver(CLUSTER)
            derived = []
            for record in await Ledger(js, CLUSTER).replay():
                entries = [convert.entry_from_proto(e) for e in record.batch.entries]
                for t, item in entries:
                    cl.replay_entry(t, item)
                derived += deriver.derive(cl, record.sequence, entries)
            return published, derived
        finally:
            await nc.close()

    published, derived = asyncio.run(read())
    last = max(e.ledger_sequence for e in published)
    assert published and published == [e for e in derived if e.ledger_sequence <= last], \
        "the stream holds exactly what a replay of the ledger derives"


def test_a_notifier_killed_during_a_burst_delivers_every_event(tmp_path: Path) -> None:
    with http_receiver() as http:
        notify = {"receivers": [{"name": "audit", "webhook": {"url": f"{http.url}/audit"}}],
                  "routes": [{"match": {"kinds": ["RunRunning"]}, "receiver": "audit", "groupWait": "0s"}]}
        up = notify_up(tmp_path, notify, {"cluster": CLUSTER}, {"JOBTREE_NOTIFIER_ACK_WAIT": "3"})
        try:
            submit(up, *(run(f"b{i}", "burst", "org:stray", 1) for i in range(12)))
            os.kill(int(up.state()["services"]["notifier"]), signal.SIGKILL)
            submit(up, *(run(f"c{i}", "burst", "org:stray", 1) for i in range(12)))

            def runs_told() -> set[str]:
                return {e["data"]["run"] for b, _, _ in http.got.get("audit", [])
                        for e in (b if isinstance(b, list) else [b])}

            want = {f"b{i}" for i in range(12)} | {f"c{i}" for i in range(12)}
            poll_until("every RunRunning delivered", lambda: runs_told() >= want, timeout=40)
            sent = [e for b, _, _ in http.got["audit"] for e in (b if isinstance(b, list) else [b])]
            by_run: dict[str, set[str]] = {}
            for e in sent:
                by_run.setdefault(e["data"]["run"], set()).add(e["id"])
            assert all(len(ids) == 1 for ids in by_run.values()), "a duplicate carries the same event id"
            assert up.state()["restarts"].get("notifier", 0) >= 1
            metrics = urllib.request.urlopen(f"http://{up.state()['metrics']['notifier']}/metrics", timeout=10).read()
            delivered = [line for line in metrics.decode().splitlines()
                         if line.startswith('jobtree_notifier_delivered_total{kind="RunRunning",receiver="audit"}')]
            assert delivered and float(delivered[0].split()[-1]) >= 1, "the restarted notifier counts what it sent"
        finally:
            up.stop()
