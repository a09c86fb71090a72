"""Scenario files parse into typed steps; malformed ones fail naming the step and the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobtree.core.model import Budget, ClusterConfig, Run
from jobtree.core.timefmt import parse_time
from jobtree.sim.scenario import (
    ApplyAction,
    CompleteAction,
    CordonAction,
    DeleteAction,
    EtaAction,
    FailAction,
    FailNodeAction,
    NoAction,
    Scenario,
    ScenarioError,
    ShrinkAction,
    SnapshotAction,
    UncordonAction,
    load_scenario,
    parse_scenario,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/scenarios")
REFERENCE = sorted(p for p in SHARED.glob("*.yaml") if not p.name.endswith(".expect.yaml")) if SHARED.is_dir() else []
LOCAL = sorted(p for p in (REPO / "tests" / "scenarios").glob("*.yaml") if not p.name.endswith(".expect.yaml"))
START = parse_time("2026-01-05T00:00:00Z")

LABELS = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "A", "gpu.flavor": "H100-80GB"}


def budget(name: str = "team-a", owner: str = "org:team-a", concurrency: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {
            "owner": owner,
            "envelopes": [
                {"name": "west", "flavor": "H100-80GB", "selector": {"cluster": "gpu-a"}, "concurrency": concurrency}
            ],
        },
    }


def run(name: str = "j1", ns: str = "default", total: int = 8, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"owner": "org:team-a", "resources": {"gpuType": "H100-80GB", "totalGPUs": total}, **spec},
    }


def base() -> dict[str, Any]:
    """A valid scenario touching every action; cases below break one thing each."""
    return {
        "start": "2026-01-05T00:00:00Z",
        "config": {"cluster": "gpu-a", "period": "24h", "reservationLead": "15m", "preemptionHoldDown": "30m"},
        "nodes": [
            {"name": "x-00", "gpus": 8, "labels": dict(LABELS)},
            {"generate": {"prefix": "a-", "count": 4, "gpus": 8, "labels": dict(LABELS)}},
        ],
        "steps": [
            {
                "at": "0s",
                "apply": [
                    budget(),
                    run("j1"),
                    run("e1", malleable={"minTotalGPUs": 8, "maxTotalGPUs": 24, "stepGPUs": 8}),
                ],
            },
            {"snapshot": "t0"},
            {"at": "10m", "eta": {"run": "default/j1", "at": "40m"}},
            {"at": "20m", "shrink": {"run": "default/e1", "desiredTotalGPUs": 16}},
            {"cordon": "a-01"},
            {"uncordon": "a-01"},
            {"at": "2026-01-05T00:30:00Z", "failNode": "a-02"},
            {"at": "40m", "complete": "default/j1"},
            {"fail": "default/e1"},
            {"at": "1h"},
            {"delete": "default/e1"},
            {"at": "2h", "snapshot": "t1"},
        ],
    }


def parse(doc: object) -> Scenario:
    return parse_scenario(yaml.safe_dump(doc, sort_keys=False))


# --- valid input ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", REFERENCE + LOCAL, ids=lambda p: p.name)
def test_reference_scenarios_parse(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.nodes and sc.steps
    times = [s.at for s in sc.steps]
    assert times == sorted(times) and times[0] >= sc.start
    assert [s.index for s in sc.steps] == list(range(len(sc.steps)))
    assert "final" not in sc.snapshot_labels
    assert len(set(sc.snapshot_labels)) == len(sc.snapshot_labels) > 0


def test_reference_scenarios_present() -> None:
    if not SHARED.is_dir():
        pytest.fail("the reference scenarios are missing: CI puts ../shared beside the repo")
    assert len(REFERENCE) >= 4


def test_reference_04_details() -> None:
    path = SHARED / "04-reservation-cut-order.yaml"
    if not path.is_file():
        pytest.fail("the reference scenarios are missing: CI puts ../shared beside the repo")
    sc = load_scenario(path)
    assert sc.start == START
    assert sc.config == ClusterConfig(cluster="gpu-a", reservation_lead=900)
    assert [n.name for n in sc.nodes] == [f"a-{i:02d}" for i in range(9)]
    first = sc.steps[0].action
    assert isinstance(first, ApplyAction)
    assert [type(o) for o in first.objects] == [Budget] * 3 + [Run] * 4
    assert [(s.at - START, type(s.action)) for s in sc.steps] == [
        (0, ApplyAction),
        (0, SnapshotAction),
        (60, ApplyAction),
        (60, SnapshotAction),
        (1200, SnapshotAction),
    ]
    last = sc.steps[-1].action
    assert isinstance(last, SnapshotAction) and last.label == "activated"


def test_demo_scenario_parses() -> None:
    sc = load_scenario(REPO / "examples" / "demo.yaml")
    assert len(sc.nodes) == 8 and {n.domain.rsplit("/", 1)[1] for n in sc.nodes} == {"A", "B"}
    assert sc.snapshot_labels


def test_every_action_parses() -> None:
    sc = parse(base())
    assert sc.config == ClusterConfig(cluster="gpu-a", period=86400, reservation_lead=900, preemption_hold_down=1800)
    assert [n.name for n in sc.nodes] == ["x-00", "a-00", "a-01", "a-02", "a-03"]
    got = [(s.at - START, s.action) for s in sc.steps]
    assert isinstance(got[0][1], ApplyAction) and len(got[0][1].objects) == 3
    assert got[1:] == [
        (0, SnapshotAction("t0")),
        (600, EtaAction("default/j1", START + 2400)),
        (1200, ShrinkAction("default/e1", 16)),
        (1200, CordonAction("a-01")),
        (1200, UncordonAction("a-01")),
        (1800, FailNodeAction("a-02")),
        (2400, CompleteAction("default/j1")),
        (2400, FailAction("default/e1")),
        (3600, NoAction()),
        (3600, DeleteAction("default/e1")),
        (7200, SnapshotAction("t1")),
    ]


def test_defaults_and_time_forms() -> None:
    doc = {
        "start": "2026-01-05T01:00:00+01:00",
        "steps": [
            {"snapshot": "a"},
            {"at": 90, "snapshot": "b"},
            {"at": "2026-01-05T00:05:00Z", "snapshot": "c"},
            {"at": "1h30m", "snapshot": "d"},
        ],
    }
    sc = parse(doc)
    assert sc.start == START
    assert sc.config == ClusterConfig()
    assert sc.nodes == []
    assert [s.at - START for s in sc.steps] == [0, 90, 300, 5400]


def test_unquoted_timestamps_stay_text() -> None:
    text = "start: 2026-01-05T00:00:00Z\nsteps:\n  - {at: 2026-01-05T00:10:00Z, snapshot: s}\n"
    sc = parse_scenario(text)
    assert sc.start == START and sc.steps[0].at == START + 600


def test_shrink_may_target_a_run_updated_later() -> None:
    doc = base()
    doc["steps"][3]["shrink"]["desiredTotalGPUs"] = 24
    assert isinstance(parse(doc).steps[3].action, ShrinkAction)


def test_delete_then_reapply_allows_reference() -> None:
    doc = base()
    doc["steps"] += [{"apply": [run("e1")]}, {"complete": "default/e1"}]
    assert parse(doc).steps[-1].action == CompleteAction("default/e1")


def test_cap_allowances_extension() -> None:
    doc = base()
    doc["config"]["capAllowances"] = {"team-a/global": 16}
    assert parse(doc).config.cap_allowances == (("team-a/global", 16),)


# --- malformed input -----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _set(path: list[Any], value: Any) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


def _delete(path: list[Any]) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return apply


def _append(step: dict[str, Any]) -> Mutation:
    return lambda doc: doc["steps"].append(step)


CASES: list[tuple[str, Mutation, str]] = [
    ("unknown top-level key", _set(["clusters"], 1), "clusters: unknown top-level key"),
    ("missing start", _delete(["start"]), "start: required"),
    ("bad start", _set(["start"], "yesterday"), "start: must be an RFC3339 time"),
    ("missing steps", _delete(["steps"]), "steps: required"),
    ("steps not a list", _set(["steps"], {"at": "0s"}), "steps: must be a list"),
    ("unknown config key", _set(["config", "lead"], "5m"), "config.lead: unknown config key"),
    ("bad period", _set(["config", "period"], "soon"), "config.period: must be a duration"),
    ("zero period", _set(["config", "period"], "0s"), "config.period: must be longer than 0s"),
    ("bad reservationLead", _set(["config", "reservationLead"], "-5m"), "config.reservationLead:"),
    ("bad holdDown", _set(["config", "preemptionHoldDown"], True), "config.preemptionHoldDown:"),
    ("bad cluster", _set(["config", "cluster"], ""), "config.cluster: must be a cluster name"),
    ("bad allowance", _set(["config", "capAllowances"], {"nocap": 3}), "config.capAllowances.nocap: key must be"),
    ("nodes not a list", _set(["nodes"], {"a": 1}), "nodes: must be a list"),
    ("node gpus zero", _set(["nodes", 0, "gpus"], 0), "nodes[0].gpus:"),
    ("node label missing", _delete(["nodes", 0, "labels", "fabric.domain"]), "nodes[0].labels.fabric.domain:"),
    ("generate count", _set(["nodes", 1, "generate", "count"], "four"), "nodes[1].generate.count:"),
    ("generate extra key", _set(["nodes", 1, "name"], "zz"), "nodes[1].name:"),
    ("duplicate node", _set(["nodes", 0, "name"], "a-02"), "nodes[1]: duplicate node name 'a-02'"),
    ("step not a mapping", _set(["steps", 1], "snapshot t0"), "steps[1]: must be a mapping"),
    ("empty step", _set(["steps", 1], {}), "steps[1]: empty step"),
    ("unknown step key", _set(["steps", 1], {"snap": "t0"}), "steps[1].snap: unknown step key"),
    ("two actions", _set(["steps", 1], {"snapshot": "t0", "complete": "default/j1"}), "steps[1]: a step has exactly one action"),
    ("bad at", _set(["steps", 2, "at"], "ten minutes"), "steps[2].at: must be an offset from start"),
    ("negative at", _set(["steps", 2, "at"], "-10m"), "steps[2].at: must not be negative"),
    ("fractional at", _set(["steps", 2, "at"], "1.5s"), "steps[2].at: must be whole seconds"),
    ("float at", _set(["steps", 2, "at"], 1.5), "steps[2].at: must be whole seconds"),
    ("null at", _set(["steps", 2, "at"], None), "steps[2].at: must be an offset"),
    ("backwards at", _set(["steps", 3, "at"], "5m"), "steps[3].at: time moves backwards"),
    ("backwards rfc3339", _set(["steps", 6, "at"], "2026-01-05T00:15:00Z"), "steps[6].at: time moves backwards"),
    ("at before start", _set(["steps", 0, "at"], "2026-01-04T23:00:00Z"), "steps[0].at: 2026-01-04T23:00:00Z is before the scenario start"),
    ("bad rfc3339 at", _set(["steps", 6, "at"], "2026-13-05T00:30:00Z"), "steps[6].at:"),
    ("apply not a list", _set(["steps", 0, "apply"], budget()), "steps[0].apply: must be a list"),
    ("apply empty", _set(["steps", 0, "apply"], []), "steps[0].apply: must list at least one manifest"),
    ("apply item not a mapping", _set(["steps", 0, "apply", 1], "j1"), "steps[0].apply[1]: must be a Budget or Run manifest"),
    ("apply bad kind", _set(["steps", 0, "apply", 1, "kind"], "Job"), "steps[0].apply[1].kind:"),
    ("apply bad total", _set(["steps", 0, "apply", 1, "spec", "resources", "totalGPUs"], 0), "steps[0].apply[1].spec.resources.totalGPUs:"),
    ("apply bad envelope", _set(["steps", 0, "apply", 0, "spec", "envelopes", 0, "concurrency"], -1), "steps[0].apply[0].spec.envelopes[0].concurrency:"),
    ("apply unknown spec field", _set(["steps", 0, "apply", 1, "spec", "gpus"], 8), "steps[0].apply[1].spec.gpus:"),
    ("complete not a ref", _set(["steps", 7, "complete"], "j1"), "steps[7].complete: must be a run reference namespace/name"),
    ("complete not a string", _set(["steps", 7, "complete"], ["default/j1"]), "steps[7].complete: must be a run reference"),
    ("complete unknown run", _set(["steps", 7, "complete"], "default/nope"), "steps[7].complete: run default/nope is not applied by any earlier step"),
    ("fail unknown run", _set(["steps", 8, "fail"], "other/e1"), "steps[8].fail: run other/e1 is not applied"),
    ("delete unknown run", _set(["steps", 10, "delete"], "default/x"), "steps[10].delete: run default/x is not applied"),
    ("ref after delete", _append({"complete": "default/e1"}), "steps[12].complete: run default/e1 was deleted by steps[10]"),
    ("failNode unknown node", _set(["steps", 6, "failNode"], "z-99"), "steps[6].failNode: no node named 'z-99'"),
    ("cordon unknown node", _set(["steps", 4, "cordon"], "a-04"), "steps[4].cordon: no node named 'a-04'"),
    ("uncordon not a name", _set(["steps", 5, "uncordon"], 3), "steps[5].uncordon: must be a node name"),
    ("shrink not a mapping", _set(["steps", 3, "shrink"], "default/e1"), "steps[3].shrink: must be a mapping"),
    ("shrink zero", _set(["steps", 3, "shrink", "desiredTotalGPUs"], 0), "steps[3].shrink.desiredTotalGPUs: must be a positive integer, got 0"),
    ("shrink bool", _set(["steps", 3, "shrink", "desiredTotalGPUs"], True), "steps[3].shrink.desiredTotalGPUs: must be a positive integer, got true"),
    ("shrink missing desired", _delete(["steps", 3, "shrink", "desiredTotalGPUs"]), "steps[3].shrink.desiredTotalGPUs: required"),
    ("shrink missing run", _delete(["steps", 3, "shrink", "run"]), "steps[3].shrink.run: required"),
    ("shrink unknown key", _set(["steps", 3, "shrink", "desired"], 8), "steps[3].shrink.desired: unknown shrink key"),
    ("shrink fixed run", _set(["steps", 3, "shrink", "run"], "default/j1"), "steps[3].shrink.desiredTotalGPUs: run default/j1 is not elastic"),
    ("shrink out of range", _set(["steps", 3, "shrink", "desiredTotalGPUs"], 32), "steps[3].shrink.desiredTotalGPUs: must lie in [minTotalGPUs, maxTotalGPUs] = [8, 24]"),
    ("shrink off step", _set(["steps", 3, "shrink", "desiredTotalGPUs"], 12), "steps[3].shrink.desiredTotalGPUs: must be minTotalGPUs 8 plus whole steps of 8"),
    ("eta missing at", _delete(["steps", 2, "eta", "at"]), "steps[2].eta.at: required"),
    ("eta bad at", _set(["steps", 2, "eta", "at"], "later"), "steps[2].eta.at: must be an offset from start"),
    ("eta unknown key", _set(["steps", 2, "eta", "when"], "1h"), "steps[2].eta.when: unknown eta key"),
    ("eta bad run", _set(["steps", 2, "eta", "run"], "default/"), "steps[2].eta.run: must be a run reference"),
    ("snapshot final", _set(["steps", 1, "snapshot"], "final"), "steps[1].snapshot: the label 'final' is reserved"),
    ("snapshot duplicate", _set(["steps", 11, "snapshot"], "t0"), "steps[11].snapshot: duplicate snapshot label 't0' (first used by steps[1])"),
    ("snapshot empty", _set(["steps", 1, "snapshot"], ""), "steps[1].snapshot: must be a non-empty label"),
    ("snapshot not text", _set(["steps", 1, "snapshot"], {"label": "x"}), "steps[1].snapshot: must be a non-empty label"),
]


@pytest.mark.parametrize(("mutate", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_malformed_scenario_names_step_and_field(mutate: Mutation, expected: str) -> None:
    doc = copy.deepcopy(base())
    mutate(doc)
    with pytest.raises(ScenarioError) as info:
        parse(doc)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


def test_enough_malformed_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "scenario: the file is empty"),
        ("- 1\n- 2\n", "scenario: must be a mapping"),
        ("start: [unclosed\n", "invalid YAML: line 2"),
        ("start: a\nstart: b\nsteps: []\n", "invalid YAML: line 2, column 1: duplicate key 'start'"),
        ("start: '2026-01-05T00:00:00Z'\nsteps: [{at: 0s, at: 1m}]\n", "duplicate key 'at'"),
        ("\tstart: x\n", "invalid YAML"),
    ],
)
def test_yaml_level_errors(text: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "absent.yaml")
    with pytest.raises(ScenarioError, match="is a directory"):
        load_scenario(tmp_path)
