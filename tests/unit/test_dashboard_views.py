"""The dashboard's views as functions of the core's view: the fleet's slots and classes, the
budgets' projections and burn curves, the queue's order, reasons and needs, a run's timeline
and forest (services/dashboard/views.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import HOUR, START, budget, dom, envelope, node, run

from jobtree.core import facts
from jobtree.core.engine import Cluster
from jobtree.core.model import ClusterConfig, Follow
from jobtree.core.timefmt import format_time
from jobtree.services.dashboard import views

OWNER = "org:a"


def after(r, *upstreams: str):  # type: ignore[no-untyped-def]
    return replace(r, spec=replace(r.spec, follow=Follow(after=upstreams)))


def test_the_fleet_marks_every_slot_with_its_holder_and_class_and_counts_each_domain() -> None:
    cl = Cluster(ClusterConfig(), [node("a1", domain="A"), node("a2", domain="A"), node("b1", domain="B"),
                                   node("b2", domain="B")], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8))))
    cl.submit(facts.ApplyRun(run("funded", OWNER, 8, 8)), facts.ApplyRun(run("stray", "org:x", 8, 8)))
    cl.submit(facts.CordonNode("b2"))
    cl.submit(facts.FailNode("a2" if cl.open_by_run.get("default/stray") is None else "b1"))
    doc = views.fleet(cl)
    by_node = {n["name"]: n for d in doc["domains"] for n in d["nodes"]}
    classes = {}
    for n in by_node.values():
        for s in n["slots"]:
            if s is not None:
                h = doc["holders"][s]
                classes[h["run"]] = h["class"]
                assert h["lease"] in cl.leases and cl.leases[h["lease"]].run == h["run"]
    assert classes.get("default/funded") == "owned"
    assert by_node["b2"]["state"] == "Cordoned"
    assert sorted(d["name"] for d in doc["domains"]) == [dom("A"), dom("B")]
    fenced = [n for n in by_node.values() if n["state"] == "Fenced"]
    assert len(fenced) == 1 and all(s is None for s in fenced[0]["slots"])
    for d in doc["domains"]:
        held = sum(d["classes"].values())
        usable = sum(n["gpus"] for n in d["nodes"] if n["state"] != "Fenced")
        assert d["free"] == usable - held
    assert doc["owners"] == sorted({h["owner"] for h in doc["holders"]})


def test_unfunded_and_spare_slots_are_drawn_as_such() -> None:
    cl = Cluster(ClusterConfig(), [node("a1", domain="A", gpus=8), node("a2", domain="A", gpus=8)], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 16))))
    cl.submit(facts.ApplyRun(run("spared", OWNER, 4, 4, spares=1)), facts.ApplyRun(run("stray", "org:x", 8)))
    doc = views.fleet(cl)
    seen = {(h["run"], h["class"]) for h in doc["holders"]}
    assert ("default/spared", "spare") in seen and ("default/spared", "owned") in seen
    assert ("default/stray", "unfunded") in seen


def _hours_world(hours: float, *, end: int | None = None) -> Cluster:
    cl = Cluster(ClusterConfig(), [node("a1", domain="A")], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8, hours=hours, start=START - HOUR, end=end))))
    cl.submit(facts.ApplyRun(run("burn", OWNER, 8)))
    cl.advance(START + HOUR)
    return cl


def test_the_projection_is_when_the_hours_run_out_at_the_funded_pace() -> None:
    cl = _hours_world(10)
    p = views.projection(cl, ("a", "e"))
    assert p.left_hours == 2.0 and p.exhausts_at == START + HOUR + 900
    # Seen ten minutes later: the hours burned meanwhile count, the instant stays.
    later = views.projection(cl, ("a", "e"), START + HOUR + 600)
    assert later.exhausts_at == START + HOUR + 900 and later.left_hours == pytest.approx(2 - 8 * 600 / 3600, abs=1e-6)
    row = views.budgets(cl, None, START + HOUR + 600)["budgets"][0]["envelopes"][0]
    assert row["gpuHours"] == pytest.approx(8 + 8 * 600 / 3600, abs=1e-6)
    assert row["exhaustsAt"] == format_time(START + HOUR + 900) and row["fundedNow"] == 8
    assert row["used"] == 8 and row["concurrency"] == 8 and row["headroom"] == 0


def test_a_window_that_closes_first_is_said_and_an_uncapped_envelope_has_no_projection() -> None:
    cl = _hours_world(10, end=START + HOUR + 600)
    p = views.projection(cl, ("a", "e"))
    assert p.exhausts_at is None and p.window_ends_first
    row = views.budgets(cl)["budgets"][0]["envelopes"][0]
    assert row["windowEndsFirst"] and row["windowElapsed"] == pytest.approx(2 * HOUR / (2 * HOUR + 600))
    free = Cluster(ClusterConfig(), [node("a1")], START)
    free.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8))))
    assert views.projection(free, ("a", "e")) == views.Projection(None, None)


def test_spent_hours_project_nothing_and_the_gpu_hours_never_pass_the_cap() -> None:
    cl = _hours_world(4)  # 8 GPUs for an hour: spent after 30 minutes
    p = views.projection(cl, ("a", "e"), START + 2 * HOUR)
    assert p.left_hours == 0 and p.exhausts_at is None
    row = views.budgets(cl, None, START + 3 * HOUR)["budgets"][0]["envelopes"][0]
    assert row["gpuHours"] == 4.0 and row["leftGPUHours"] == 0


def test_the_burn_history_keeps_the_curve_and_only_the_ends_of_a_flat_stretch() -> None:
    cl = Cluster(ClusterConfig(), [node("a1")], START)
    history = views.BurnHistory()
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8, hours=100))))
    history.observe(cl)
    for t in (1, 2, 3):
        cl.advance(START + t * HOUR)
        history.observe(cl)  # nothing runs: flat
    cl.submit(facts.ApplyRun(run("burn", OWNER, 8)))
    history.observe(cl)
    cl.advance(START + 4 * HOUR)
    history.observe(cl)
    line = history.points[("a", "e")]
    assert line == [(START, 0.0), (START + 3 * HOUR, 0.0), (START + 4 * HOUR, 8.0)]
    doc = views.budgets(cl, history)["budgets"][0]["envelopes"][0]["burn"]
    assert doc[-1] == [format_time(START + 4 * HOUR), 8.0]


def test_the_burn_history_thins_itself_but_keeps_both_ends() -> None:
    cl = Cluster(ClusterConfig(), [node("a1")], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8))))
    history = views.BurnHistory()
    cl.submit(facts.ApplyRun(run("burn", OWNER, 1)))
    for t in range(1, 3 * views.BURN_POINTS):
        cl.advance(START + t * 60 + (t % 7))
        history.observe(cl)
    line = history.points[("a", "e")]
    assert len(line) <= views.BURN_POINTS and line[-1][0] == cl.now and line[0][0] == START + 60 + 1
    assert [p[0] for p in line] == sorted(p[0] for p in line)


def _queue_world() -> Cluster:
    cl = Cluster(ClusterConfig(), [node("a1", domain="A"), node("a2", domain="A"), node("b1", domain="B")], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 8))),
              facts.ApplyBudget(budget("o", "org:o", envelope("e", 24))))
    cl.submit(facts.ApplyRun(run("holder", "org:o", 24, 8)))
    cl.advance(START + 60)
    cl.submit(facts.ApplyRun(run("mine", OWNER, 8, 8)))  # funded, no room: reserves
    cl.advance(START + 120)
    cl.submit(facts.ApplyRun(run("huge", OWNER, 64, 8)))  # more than the fleet: nothing to reserve
    cl.submit(facts.ApplyRun(run("wide", "org:x", 16, 8)))  # unfunded: waits for capacity
    cl.submit(facts.ApplyRun(after(run("next", OWNER, 8), "mine")))
    return cl


def test_the_queue_is_in_admission_order_with_reasons_etas_and_needs() -> None:
    cl = _queue_world()
    doc = views.queue(cl)
    rows = {r["key"]: r for r in doc["runs"]}
    assert [r["position"] for r in doc["runs"]] == list(range(1, len(doc["runs"]) + 1))
    queued = [r["key"] for r in doc["runs"] if r["phase"] in ("Pending", "Reserved")]
    assert queued == cl.queue_order()  # the order admission tries them
    assert [r["phase"] for r in doc["runs"]][len(queued):] == ["Waiting"]  # then what waits for upstreams
    mine = rows["default/mine"]
    res = cl.reservations[cl.status["default/mine"].reservation]
    assert mine["phase"] == "Reserved" and mine["eta"] == format_time(res.earliest_start)
    assert mine["needs"][0].startswith(f"{res.deficit_gpus} GPUs must be freed")
    huge = rows["default/huge"]
    assert huge["phase"] == "Pending" and huge["needs"][0].startswith("more H100-80GB nodes: the fleet has 24 Ready")
    assert any(n.startswith("budgets fund 8 of its 64 GPUs now: 56 more headroom") for n in huge["needs"])
    wide = rows["default/wide"]
    assert wide["needs"] == ["16 more H100-80GB GPUs must be freed (0 free of the 16 it needs)",
                             "budgets fund 0 of its 16 GPUs now: 16 more headroom in an envelope for org:x would "
                             "fund the rest (unfunded, it may still run on idle GPUs, reclaimed first)"]
    nxt = rows["default/next"]
    assert nxt["phase"] == "Waiting" and nxt["needs"] == ["default/mine must complete (now Reserved)"]
    assert doc["byReason"] == {"Reserved": 1, "Unschedulable": 2, "WaitingForUpstream": 1}


def test_a_run_that_only_lacks_one_domain_is_told_so() -> None:
    cl = Cluster(ClusterConfig(), [node("a1", domain="A"), node("b1", domain="B")], START)
    cl.submit(facts.ApplyRun(run("left", "org:x", 4, selector={"fabric.domain": "A"})),
              facts.ApplyRun(run("right", "org:x", 4, selector={"fabric.domain": "B"})))
    cl.submit(facts.ApplyRun(run("one", "org:x", 8, 8)))
    assert cl.status["default/one"].phase.value == "Pending"
    _, _, needs = views.waiting_words(cl, "default/one")
    assert needs[0] == "a fabric domain with 8 free H100-80GB GPUs for one group (the emptiest has 4)", needs


def test_a_run_page_has_its_timeline_funding_split_and_forest() -> None:
    cl = Cluster(ClusterConfig(), [node("a1"), node("a2")], START)
    cl.submit(facts.ApplyBudget(budget("a", OWNER, envelope("e", 16))))
    cl.submit(facts.ApplyRun(run("first", OWNER, 8)))
    cl.submit(facts.ApplyRun(after(run("second", OWNER, 8), "first")),
              facts.ApplyRun(after(run("third", OWNER, 8), "second")))
    cl.advance(START + HOUR)
    cl.submit(facts.CompleteRun("default/first"))
    cl.advance(START + 2 * HOUR)
    doc = views.run(cl, "default/second")
    assert doc is not None and doc["run"]["phase"] == "Running"
    assert doc["run"]["funding"]["owned"] == 8 and doc["leases"][0]["class"] == "owned"
    assert doc["forest"]["edges"] == [["default/first", "default/second"], ["default/second", "default/third"]]
    assert {n["key"]: n["phase"] for n in doc["forest"]["nodes"]} == {
        "default/first": "Completed", "default/second": "Running", "default/third": "Waiting"}
    assert doc["queued"] is None and doc["lines"][0].startswith("default/second is Running")
    first = views.run(cl, "default/first")
    assert first is not None
    assert [e["what"] for e in first["timeline"]] == ["Start", cl.leases[first["leases"][0]["name"]].closure_reason]
    assert views.run(cl, "default/nope") is None
    third = views.run(cl, "default/third")
    assert third is not None and third["queued"]["needs"] == ["default/second must complete (now Running)"]
