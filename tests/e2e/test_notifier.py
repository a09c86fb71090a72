"""The notifier in process against a real nats-server (events stream, durable consumer, KV),
a real HTTP receiver (Slack, webhooks) and a real SMTP server: routing, grouping, repeat
intervals, rate limits, 429/500 answers, SMTP refusals, dead letters, and its config errors."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from receivers import Http, http_receiver, smtp_server

from jobtree.api.events import TYPE_PREFIX
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import subjects
from jobtree.bus.eventstream import EventStream
from jobtree.bus.natsserver import NatsServer
from jobtree.bus.runtime import ServiceContext, ServiceSettings
from jobtree.core.model import ClusterConfig
from jobtree.services.notifier import serve
from jobtree.services.notifier.config import ConfigError, parse


def event(seq: int, kind: str, owner: str, run: str = "", **data: str) -> bus.Event:
    e = bus.Event(id=f"{seq}-0", source="/jobtree/t", type=TYPE_PREFIX + kind, kind=kind, ledger_sequence=seq,
                  owner=owner, message=f"{kind} of {run or owner}")
    if run:
        e.namespace, e.run = run.split("/")
        e.subject = f"runs/{run}"
    else:
        e.budget, e.subject = "b", "budgets/b"
    e.time.seconds = 1_800_000_000
    for k, v in data.items():
        e.data[k] = v
    return e


async def _run(nats_url: str, cluster: str, config: dict[str, Any], events: list[bus.Event],
               until: Any, timeout: float = 20.0, then: tuple[Any, list[bus.Event]] | None = None) -> Any:
    """Publish `events`, run the notifier until `until()`; `then` = (when, more): publish `more`
    once `when()` holds."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = EventStream(js, cluster)
    await stream.create(replicas=1)
    for e in events:
        await stream.publish(e)
    settings = ServiceSettings(name="notifier", cluster=cluster, nats_url=nats_url, user=None, password=None,
                               data_dir=Path("."), metrics_port=0, clock="system", config=ClusterConfig(cluster=cluster))
    ctx = ServiceContext(settings, nc, js, logging.getLogger("notifier-test"))
    task = asyncio.ensure_future(serve(ctx, parse(config)))
    deadline = time.monotonic() + timeout
    try:
        while not until():
            assert time.monotonic() < deadline, "not delivered in time"
            if then is not None and then[0]():
                for e in then[1]:
                    await stream.publish(e)
                then = None
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        while True:  # delivered: now until every event is recorded and acknowledged
            info = await js.consumer_info(subjects.events_stream(cluster), "notifier")
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            assert time.monotonic() < deadline, f"not acknowledged in time: {info}"
            await asyncio.sleep(0.05)
        kv = await js.key_value(subjects.bucket(cluster, "notified"))
        return kv, info
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


def receivers(http: Http, smtp: str = "127.0.0.1:1") -> list[dict[str, Any]]:
    return [{"name": "slack", "slack": {"webhookURL": f"{http.url}/slack"}},
            {"name": "audit", "webhook": {"url": f"{http.url}/audit"}},
            {"name": "mail", "email": {"smarthost": smtp, "from": "jobtree@example.org", "to": ["leads@example.org"]}}]


def test_routes_group_a_storm_into_one_message_per_owner(nats_server: NatsServer, cluster: str) -> None:
    with http_receiver() as http, smtp_server() as (box, smtp):
        config = {"receivers": receivers(http, smtp), "routes": [
            {"match": {"owner": "org:ml:*", "kinds": ["RunReclaimed", "RunPreempted"]}, "receiver": "slack",
             "groupBy": ["owner"], "groupWait": "1s", "continue": True},
            {"match": {"kinds": ["RunFailed"]}, "receiver": "mail", "groupWait": "0s"},
            {"match": {}, "receiver": "audit", "groupWait": "0s"}]}
        storm = [event(i, "RunReclaimed", "org:ml:vision", f"vision/r{i}", seed="ab12") for i in range(1, 6)]
        others = [event(6, "RunPreempted", "org:ml:nlp", "nlp/x", seed="cd34"),
                  event(7, "RunFailed", "org:fin", "fin/y"), event(8, "RunRunning", "org:fin", "fin/z")]

        def done() -> bool:
            return len(http.got.get("slack", [])) == 2 and len(box.messages) == 1 and \
                sum(len(b) if isinstance(b, list) else 1 for b, _, _ in http.got.get("audit", [])) == 7

        _, info = asyncio.run(_run(nats_server.url, cluster, config, storm + others, done))
        slack = sorted((b for b, _, _ in http.got["slack"]), key=lambda b: len(b["blocks"]))
        assert "RunPreempted: nlp/x" in slack[0]["blocks"][0]["text"]["text"]
        assert slack[1]["blocks"][0]["text"]["text"] == "5 jobtree events: RunReclaimed", "the storm is one message"
        assert all(f"vision/r{i}" in slack[1]["text"] for i in range(1, 6))
        mail = box.messages[0]
        assert mail["Subject"] == "[jobtree] RunFailed: fin/y" and mail["X-Jobtree-Event-Ids"] == "7-0"
        assert mail.get_body(("html",)) is not None and "RunFailed" in mail.get_body(("plain",)).get_content()
        ids = sorted(e["id"] for b, _, _ in http.got["audit"] for e in (b if isinstance(b, list) else [b]))
        assert ids == sorted(["1-0", "2-0", "3-0", "4-0", "5-0", "6-0", "8-0"])
        assert all(ct.startswith("application/cloudevents") for _, ct, _ in http.got["audit"])
        assert info.num_ack_pending == 0 and info.num_pending == 0, "every event acknowledged once recorded"


def test_429_retry_after_500_and_a_final_refusal(nats_server: NatsServer, cluster: str) -> None:
    with http_receiver() as http:
        http.script["slack"] = [(429, {"Retry-After": "1"}), (500, {})]
        http.script["dead"] = [(400, {})] * 10
        config = {"receivers": [*receivers(http)[:2], {"name": "dead", "webhook": {"url": f"{http.url}/dead"}}],
                  "retry": {"initial": "0s", "max": "1s", "attempts": 5},
                  "routes": [{"match": {"kinds": ["RunFailed"]}, "receiver": "slack", "groupWait": "0s",
                              "continue": True},
                             {"match": {"kinds": ["RunFailed"]}, "receiver": "dead", "groupWait": "0s"}]}
        started = time.monotonic()
        asyncio.run(_run(nats_server.url, cluster, config, [event(1, "RunFailed", "o", "n/r")],
                                 lambda: http.got.get("slack") and http.tries.get("dead")))
        assert http.tries["slack"] == 3 and len(http.got["slack"]) == 1
        assert http.got["slack"][0][2] - started >= 1.0, "Retry-After honoured"
        assert http.tries["dead"] == 1, "a 400 is final: no retry"

        async def records() -> tuple[bytes, bytes]:
            nc = await nats.connect(nats_server.url)
            kv = await nc.jetstream().key_value(subjects.bucket(cluster, "notified"))
            try:
                ok = (await kv.get(subjects.kv_key("slack", "1-0"))).value
                dead = (await kv.get(subjects.kv_key("dead", "1-0"))).value
                return ok, dead
            finally:
                await nc.close()

        ok, dead = asyncio.run(records())
        assert ok == b"delivered" and dead.startswith(b"dead: HTTP 400")


def test_repeat_interval_and_rate_limit_space_messages(nats_server: NatsServer, cluster: str) -> None:
    with http_receiver() as http:
        config = {"receivers": [{"name": "slow", "maxPerMinute": 60, "webhook": {"url": f"{http.url}/slow"}},
                                {"name": "group", "webhook": {"url": f"{http.url}/group"}}],
                  "routes": [{"match": {"kinds": ["RunRunning"]}, "receiver": "slow", "groupWait": "0s"},
                             {"match": {"kinds": ["RunCompleted"]}, "receiver": "group", "groupBy": ["owner"],
                              "groupWait": "0s", "repeatInterval": "2s"}]}
        events = [event(i, "RunRunning", "o", f"n/r{i}") for i in range(1, 4)]
        asyncio.run(_run(nats_server.url, cluster, config, [*events, event(4, "RunCompleted", "o", "n/a")],
                         lambda: len(http.got.get("slow", [])) == 3 and len(http.got.get("group", [])) == 2,
                         then=(lambda: http.got.get("group"), [event(5, "RunCompleted", "o", "n/b"),
                                                                event(6, "RunCompleted", "o", "n/c")])))
        times = [t for _, _, t in http.got["slow"]]
        assert times[2] - times[0] >= 1.8, "at most one message a second to this receiver"
        (first, _, t1), (second, _, t2) = http.got["group"]
        assert first["id"] == "4-0" and [e["id"] for e in second] == ["5-0", "6-0"]
        assert t2 - t1 >= 1.9, "the group's next message waits its repeatInterval, collecting what came"


def test_an_smtp_server_that_refuses_then_accepts(nats_server: NatsServer, cluster: str) -> None:
    with http_receiver() as http, smtp_server() as (box, smtp):
        box.refuse = 2
        config = {"receivers": receivers(http, smtp), "retry": {"initial": "0s", "max": "1s"},
                  "routes": [{"match": {}, "receiver": "mail", "groupWait": "0s"}]}
        asyncio.run(_run(nats_server.url, cluster, config,
                         [event(1, "BudgetGPUHoursThreshold", "org:ml", threshold="80", exhaustsAt="2027-01-01T00:00:00Z")],
                         lambda: box.messages))
        assert box.tries == 3 and len(box.messages) == 1
        body = box.messages[0].get_body(("plain",)).get_content()
        assert "GPU-hours run out at 2027-01-01T00:00:00Z" in body, "what happens next"


def test_a_run_asks_for_its_own_receivers_within_what_the_config_allows(nats_server: NatsServer,
                                                                        cluster: str) -> None:
    with http_receiver() as http:
        config = {"receivers": [{"name": "team", "webhook": {"url": f"{http.url}/team"}},
                                {"name": "leads", "webhook": {"url": f"{http.url}/leads"}}],
                  "runRequests": {"receivers": ["team"], "kinds": ["RunFailed", "RunCompleted"]},
                  "routes": [{"match": {"kinds": ["RunCompleted"]}, "receiver": "leads", "groupWait": "0s"}]}
        asked = event(1, "RunFailed", "o", "n/a", notify="team,leads")  # leads: not the run's to ask
        also = event(2, "RunCompleted", "o", "n/b", notify="team")
        unasked = event(3, "RunFailed", "o", "n/c")
        asyncio.run(_run(nats_server.url, cluster, config, [asked, also, unasked],
                         lambda: len(http.got.get("team", [])) == 2 and http.got.get("leads")))
        team = sorted(b["id"] for b, _, _ in http.got["team"])
        assert team == ["1-0", "2-0"], "the run's own receiver, for the kinds the config allows"
        assert [b["id"] for b, _, _ in http.got["leads"]] == ["2-0"], "a run cannot add a receiver it may not"


@pytest.mark.parametrize(("doc", "path"), [
    ({}, "receivers"),
    ({"receivers": [{"name": "a"}], "routes": []}, "receivers[0]"),
    ({"receivers": [{"name": "a", "webhook": {"url": "ftp://x"}}], "routes": [{"receiver": "a"}]},
     "receivers[0].webhook.url"),
    ({"receivers": [{"name": "a", "webhook": {"url": "http://x"}}], "routes": [{"receiver": "b"}]},
     "routes[0].receiver"),
    ({"receivers": [{"name": "a", "webhook": {"url": "http://x"}}],
      "routes": [{"receiver": "a", "match": {"kinds": ["RunExploded"]}}]}, "routes[0].match.kinds[0]"),
    ({"receivers": [{"name": "a", "webhook": {"url": "http://x"}}],
      "routes": [{"receiver": "a", "groupWait": "soon"}]}, "routes[0].groupWait"),
    ({"receivers": [{"name": "a", "email": {"smarthost": "mail", "from": "a@b", "to": ["c@d"]}}],
      "routes": [{"receiver": "a"}]}, "receivers[0].email.smarthost"),
    ({"receivers": [{"name": "a", "slack": {"webhookURLEnv": "NO_SUCH_VARIABLE_HERE"}}],
      "routes": [{"receiver": "a"}]}, "receivers[0].slack.webhookURLEnv"),
    ({"receivers": [{"name": "a", "webhook": {"url": "http://x"}}], "routes": [{"receiver": "a"}], "extra": 1},
     "extra"),
    ({"receivers": [{"name": "a", "webhook": {"url": "http://x"}}], "routes": [{"receiver": "a"}],
      "runRequests": {"receivers": ["b"]}}, "runRequests.receivers[0]"),
])
def test_an_invalid_config_names_the_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(doc)
    assert err.value.path == path, str(err.value)


def test_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("https://hooks.example.org/secret\n")
    cfg = parse({"receivers": [{"name": "s", "slack": {"webhookURLFile": str(tmp_path / "hook")}}],
                 "routes": [{"receiver": "s"}]})
    assert cfg.receivers["s"].url == "https://hooks.example.org/secret"



def test_an_invalid_config_stops_serve_and_up_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "notify.yaml"
    bad.write_text("receivers: [{name: a, webhook: {url: 'http://x'}}]\nroutes: [{receiver: a, groupWait: soon}]\n")
    for argv in (["serve", "notifier", "--config", str(bad)],
                 ["up", "--data-dir", str(tmp_path / "jt"), "--grpc-port", "0", "--notify", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "jobtree.cli.main", *argv], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (argv, out.stderr)
        assert "routes[0].groupWait" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "jt").exists(), "nothing started"
