"""Federation over real nats-servers (CALCULUS §9): two clusters, each its own NATS system and
services, joined to a hub as leaf nodes through TCP proxies; the federation service moves a
cap's allowances as demand moves, in demarcation order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from fedworld import World, capped_budget, funded_series, merged_peaks, run, until

from jobtree.bus.natsserver import NatsServer
from jobtree.core import facts as F

CAP = ("vision", "all")
KEY = "vision/all"


@pytest.fixture(params=[()])
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    w = World.start(tmp_path, ["a", "b"], [{"cap": KEY, "maxConcurrency": 16}],
                    allowances={"a": {KEY: 8}, "b": {KEY: 8}}, gateways=request.param)
    try:
        for c in ("a", "b"):
            w.send(c, [capped_budget(c, "vision", "org:vision", "all", 32, 16)])
        yield w
    finally:
        w.stop()


def test_allowance_follows_demand(world: World) -> None:
    until("the federation books the cap", lambda: any(c.cap == KEY and c.clusters[0].version >= 0 and c.last_rebalance.seconds >= 0
                                                      for c in world.usage().caps), world=world)
    world.send("a", [run("big", "org:vision", 16)])
    until("a's allowance rises to its demand", lambda: world.allowance("a", KEY) == 16, world=world)
    assert world.allowance("b", KEY) == 0

    def seen_from_a() -> list[tuple[str, int, int]]:
        return [(c.cluster, c.allowance, c.funded) for c in world.usage("a").caps[0].clusters]

    until("GlobalUsage, asked from cluster a, shows the move", lambda: seen_from_a() == [("a", 16, 16), ("b", 0, 0)],
          world=world)
    series = {c: funded_series(world.records(c), c, CAP, {KEY: 8}) for c in ("a", "b")}
    assert all(total <= 16 for _, total, _ in merged_peaks(series)), merged_peaks(series)


def test_a_cut_off_cluster_keeps_its_allowance_and_keeps_admitting(world: World) -> None:
    until("the cap is booked", lambda: all(c.reachable for c in world.usage().caps[0].clusters), world=world)
    world.cut("b")
    until("the federation sees b cut off", lambda: not world.usage().caps[0].clusters[1].reachable, world=world)
    world.send("a", [run("wide", "org:vision", 16)])
    time.sleep(3)  # rounds pass: b's 8 stay counted, so a cannot get more than 8
    assert world.allowance("a", KEY) == 8 and world.allowance("b", KEY) == 8
    world.send("b", [run("local", "org:vision", 8), run("over", "org:vision", 8)])  # b decides alone
    caps = {u.cap: u for u in world.caps("b").caps}
    assert (caps[KEY].funded, caps[KEY].demand) == (8, 16), "b admits within its allowance; the rest runs unfunded"
    world.heal("b")
    until("allowances converge to demand after healing",
          lambda: (world.allowance("a", KEY), world.allowance("b", KEY)) == (8, 8) and not any(
              c.HasField("pending") for c in world.usage().caps[0].clusters), world=world)
    world.send("b", [F.DeleteRun("default/over"), F.DeleteRun("default/local")])
    until("b's demand gone, a gets the cap", lambda: world.allowance("a", KEY) == 16, world=world)
    series = {c: funded_series(world.records(c), c, CAP, {KEY: 8}) for c in ("a", "b")}
    assert all(total <= 16 for _, total, _ in merged_peaks(series))


@pytest.mark.parametrize("world", [("a",)], indirect=True)
def test_kubectl_runs_global_usage_through_a_clusters_gateway(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from jobtree.cli.runs import main as runs

    server = ["--server", world.grpc_address("a")]
    world.send("b", [run("there", "org:vision", 12)])
    # b wants 12 of 16: it gets them, and the 4 nobody claims are shared evenly
    until("b's allowance follows its demand", lambda: world.allowance("b", KEY) == 14, world=world)

    def shown() -> dict[str, Any]:
        capsys.readouterr()
        assert runs(["global", "usage", "-o", "json", *server]) == 0
        return cast(dict[str, Any], json.loads(capsys.readouterr().out))

    until("kubectl runs global usage shows the move", lambda: [
        (c["cluster"], c["allowance"], c.get("funded", 0), c.get("demand", 0), c["reachable"])
        for c in shown()["caps"][0]["clusters"]] == [("a", 2, 0, 0, True), ("b", 14, 12, 12, True)], world=world)
    assert runs(["global", "usage", *server]) == 0
    text = capsys.readouterr().out
    assert text.startswith("vision/all: cap 16 GPUs; last rebalance "), text
    assert text.splitlines()[1].split()[:6] == ["CLUSTER", "ALLOWANCE", "HELD", "PENDING", "TARGET", "FUNDED"]
    assert runs(["global", "usage", "--cap", "nosuch/cap", "-o", "json", *server]) == 0
    assert "caps" not in json.loads(capsys.readouterr().out)
    world.kill_federation()
    assert runs(["global", "usage", "--timeout", "2", *server]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kubectl-runs: UNAVAILABLE: the federation service (on the hub cluster a joins"), err


def test_gpu_hours_are_divided_by_demand_and_never_sum_above_the_cap(tmp_path: Path) -> None:
    world = World.start(tmp_path, ["a", "b"], [{"cap": KEY, "maxConcurrency": 16, "maxGPUHours": 100}],
                        allowances={"a": {KEY: 8}, "b": {KEY: 8}})
    try:
        for c in ("a", "b"):
            world.send(c, [capped_budget(c, "vision", "org:vision", "all", 32, 16, hours=100)])

        def hours() -> dict[str, float]:
            return {u.cluster: next(x.allowance_gpu_hours for x in world.caps(u.cluster).caps if x.cap == KEY)
                    for u in world.usage().caps[0].clusters}

        until("both clusters hold a GPU-hour allowance", lambda: all(h > 0 for h in hours().values()), world=world)
        assert sum(hours().values()) <= 100
        world.send("a", [run("big", "org:vision", 12)])
        until("a's share of the GPU-hours follows its demand",
              lambda: hours()["a"] > 90 and world.allowance("a", KEY) == 14, world=world)
        assert sum(hours().values()) <= 100
        rows = world.usage().caps[0]
        assert rows.max_gpu_hours == 100
        assert all(c.HasField("allowance_gpu_hours") for c in rows.clusters)
        entries = [e.allowance_set for r in world.records("a") for e in r.batch.entries
                   if e.WhichOneof("fact") == "allowance_set"]
        assert entries and all(e.HasField("gpu_hours") for e in entries), "every grant carries both bounds"
    finally:
        world.stop()


def test_two_federations_cannot_grant_from_different_books(nats_server: NatsServer, tmp_path: Path) -> None:
    """Compare-and-set on the stored book: an instance whose book is not the stored one sends
    nothing and takes the stored one (a second instance by mistake, or a restart racing the old
    process)."""
    import asyncio
    import logging

    import nats as nats_client
    import yaml

    from jobtree.api.jobtree.v1 import service_pb2 as svc
    from jobtree.bus.runtime import ServiceContext, ServiceSettings
    from jobtree.services.federation import Federation
    from jobtree.services.federation.book import Book
    from jobtree.services.federation.config import Cap

    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump({"kind": "Federation", "clusters": ["a", "b"], "caps": [
        {"cap": KEY, "maxConcurrency": 16}]}))

    async def go() -> None:
        nc = await nats_client.connect(nats_server.url)
        try:
            def instance() -> Federation:
                ctx = ServiceContext(ServiceSettings("federation", "fed", nats_server.url), nc, nc.jetstream(),
                                     logging.getLogger("test.federation"))
                return Federation(ctx, config)

            one, two = instance(), instance()
            await one.open()
            await two.open()
            mine = Book.start(KEY, 16, None, {"a": (8, None, 0), "b": (8, None, 0)})
            theirs = Book.start(KEY, 16, None, {"a": (8, None, 0), "b": (8, None, 0)})
            one.books[KEY], two.books[KEY] = mine, theirs
            assert mine.plan({"a": (16, None), "b": (0, None)}) and await one.save(mine)
            assert theirs.plan({"a": (0, None), "b": (16, None)})
            assert not await two.save(theirs), "a book not based on the stored one is not stored"
            assert two.books[KEY].to_json() == mine.to_json(), "the loser takes the stored book"
            took = two.books[KEY]
            took.confirm("b", 1, 0, None)
            assert took.plan({"a": (16, None), "b": (0, None)}) and await two.save(took)
            # now the first one is behind: its round plans grants, but sends none of them
            for c, demand in (("a", 16), ("b", 0)):
                report = svc.ClusterCapsResponse(cluster=c)
                report.caps.add(cap=KEY, allowance=8, version=0, demand=demand)
                one.reports[c], one.reachable[c] = report, True
            assert await one.cap_round(Cap(KEY, 16)) == [], "grants leave only from the stored book"
            assert one.books[KEY].to_json() == took.to_json()
        finally:
            await nc.close()

    asyncio.run(go())
