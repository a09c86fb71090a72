"""Domain events (jobtree.api.events): every kind comes out of some scenario, and deriving them
again from the ledger (replayed into a fresh view, as a follower does) gives the same events
with the same ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from google.protobuf import json_format

from jobtree.api import convert
from jobtree.api.events import KINDS, Deriver, bus_subject, cloudevent
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.sim import scenario as S
from jobtree.sim.events import scenario_events
from jobtree.sim.runner import played

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted(p for d in (ROOT / "tests" / "scenarios", ROOT.parent / "shared" / "scenarios")
                   for p in d.glob("*.yaml") if not p.name.endswith(".expect.yaml"))


def play(path: Path) -> tuple[S.Scenario, list[list[bus.LedgerEntry]], list[bus.Event]]:
    """Play a scenario, one ledger message per step (its journal entries, through the wire
    format), deriving events on the live view as the budget service does after each message."""
    sc = S.load_scenario(path)
    deriver = Deriver(sc.config.cluster)
    messages: list[list[bus.LedgerEntry]] = []
    events: list[bus.Event] = []
    for cl, journal in played(sc):
        entries = [convert.entry_to_proto(e) for e in journal]
        messages.append(entries)
        events += deriver.derive(cl, len(messages), [convert.entry_from_proto(e) for e in entries])
    return sc, messages, events


def replay(sc: S.Scenario, messages: list[list[bus.LedgerEntry]]) -> list[bus.Event]:
    cl = Cluster(sc.config, sc.nodes, sc.start)
    deriver = Deriver(sc.config.cluster)
    out: list[bus.Event] = []
    for seq, entries in enumerate(messages, 1):
        journal = [convert.entry_from_proto(e) for e in entries]
        for t, item in journal:
            cl.replay_entry(t, item)
        out += deriver.derive(cl, seq, journal)
    return out


def test_every_kind_comes_from_some_scenario_and_a_replay_gives_the_same_events() -> None:
    kinds: Counter[str] = Counter()
    for path in SCENARIOS:
        sc, messages, events = play(path)
        again = replay(sc, messages)
        assert [json_format.MessageToDict(e) for e in again] == [json_format.MessageToDict(e) for e in events], path
        assert len({e.id for e in events}) == len(events), f"{path}: ids are unique"
        kinds.update(e.kind for e in events)
    assert set(kinds) == set(KINDS), f"never produced: {set(KINDS) - set(kinds)}"


def test_an_event_as_a_cloudevent_and_its_subject() -> None:
    _, _, events = play(ROOT.parent / "shared" / "scenarios" / "04-reservation-cut-order.yaml")
    reclaimed = next(e for e in events if e.kind == "RunReclaimed")
    ce = cloudevent(reclaimed)
    assert ce["specversion"] == "1.0" and ce["type"] == "io.davidlangworthy.rq.RunReclaimed"
    assert ce["source"] == "/jobtree/gpu-a" and ce["subject"] == f"runs/{reclaimed.namespace}/{reclaimed.run}"
    assert ce["data"]["seed"] and "ReclaimUnfunded(" in ce["data"]["reason"] and ce["data"]["owner"]
    assert bus_subject("gpu-a", reclaimed) == f"jobtree.gpu-a.evt.run.{reclaimed.namespace}.{reclaimed.run}"
    reserved = next(e for e in events if e.kind == "RunReserved")
    assert reserved.data["eta"].endswith("Z") and "reserved from" in reserved.message


def test_the_simulator_gives_the_events_the_followers_derive() -> None:
    path = ROOT.parent / "shared" / "scenarios" / "04-reservation-cut-order.yaml"
    _, _, events = play(path)
    assert scenario_events(S.load_scenario(path)) == events


def test_a_run_may_ask_for_its_own_notifications() -> None:
    import pytest

    from jobtree.api.jobtree.v1 import objects_pb2 as pb
    from jobtree.core.manifest import NOTIFY_ANNOTATION, NOTIFY_KINDS_ANNOTATION

    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
           "metadata": {"name": "r", "namespace": "n", "annotations": {
               NOTIFY_ANNOTATION: "ml-slack, audit", NOTIFY_KINDS_ANNOTATION: "RunFailed,RunPreempted"}},
           "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 8}}}
    msg = convert.manifest_to_proto(doc)
    assert isinstance(msg, pb.Run)
    run = convert.run_from_proto(msg)
    assert run.notify == ("ml-slack", "audit") and run.notify_kinds == ("RunFailed", "RunPreempted")
    assert convert.run_from_ledger(convert.run_to_proto(run)) == run, "the ledger keeps the request"
    doc["metadata"]["annotations"][NOTIFY_KINDS_ANNOTATION] = "RunExploded"  # type: ignore[index]
    with pytest.raises(ValidationError) as err:
        convert.run_from_proto(convert.manifest_to_proto(doc))  # type: ignore[arg-type]
    assert err.value.path == f"metadata.annotations.{NOTIFY_KINDS_ANNOTATION}"
    doc["metadata"]["annotations"] = {NOTIFY_ANNOTATION: "not a name!"}  # type: ignore[index]
    with pytest.raises(ValidationError) as err:
        convert.manifest_to_proto(doc)
    assert err.value.path == f"metadata.annotations.{NOTIFY_ANNOTATION}"


def test_the_events_of_a_run_name_the_receivers_it_asked_for() -> None:
    import yaml

    text = (ROOT.parent / "shared" / "scenarios" / "01-fit-unfunded-refund.yaml").read_text()
    doc = yaml.safe_load(text)
    big = next(d for d in doc["steps"][0]["apply"] if d["metadata"]["name"] == "big")
    big["metadata"]["annotations"] = {"rq.davidlangworthy.io/notify": "team-chat",
                                      "rq.davidlangworthy.io/notify-kinds": "RunCompleted"}
    events = scenario_events(S.scenario_from_doc(doc))
    told = {(e.run, e.kind) for e in events if e.data.get("notify") == "team-chat"}
    assert told == {("big", "RunCompleted")}, "only the kinds it asked for"


def test_every_kind_of_gpu_hours_cap_is_watched() -> None:
    caps: Counter[str] = Counter()
    for path in SCENARIOS:
        _, _, events = play(path)
        caps.update(e.data["cap"] for e in events if e.kind == "BudgetGPUHoursThreshold")
    assert caps["env"] > 0 and caps["cap"] > 0, caps  # scenario 24 spends an aggregate cap's hours
    assert set(caps) <= {"env", "lend", "cap"}
