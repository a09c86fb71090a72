"""Manifest parsing and field-level validation (jobtree.core.manifest)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobtree.core.errors import ValidationError
from jobtree.core.manifest import (
    API_VERSION,
    generate_nodes,
    parse_budget,
    parse_manifest,
    parse_node,
    parse_run,
)
from jobtree.core.model import (
    AggregateCap,
    Budget,
    Envelope,
    FailurePolicy,
    Follow,
    Funding,
    Lending,
    Locality,
    Malleable,
    Node,
    PreActivation,
    Run,
    RunSpec,
    Sharing,
)
from jobtree.core.timefmt import parse_time

SCENARIOS = Path(__file__).resolve().parents[3] / "shared" / "scenarios"
DELETE = object()
PREFIX = "steps[0].apply[1]"

NODE_LABELS = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "A", "gpu.flavor": "H100-80GB"}


def full_budget() -> dict[str, Any]:
    """A Budget manifest using every field."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {
            "name": "rai",
            "namespace": "ignored",
            "labels": {"team": "rai"},
            "annotations": {"note": "anything"},
        },
        "spec": {
            "owner": "org:ai:rai",
            "parents": ["org:ai", "org:research"],
            "period": "12h",
            "envelopes": [
                {
                    "name": "west",
                    "flavor": "H100-80GB",
                    "selector": {"cluster": "gpu-a", "region": "us-west"},
                    "concurrency": 64,
                    "maxGPUHours": 1000.5,
                    "start": "2026-01-05T00:00:00Z",
                    "end": "2026-02-05T00:00:00Z",
                    "sharing": "none",
                    "preActivation": {"allowReservations": True, "allowAdmission": True},
                    "lending": {
                        "allow": True,
                        "to": ["org:ml:*", "org:vision"],
                        "maxConcurrency": 16,
                        "maxGPUHours": 200,
                    },
                },
                {"name": "east", "flavor": "H100-80GB", "concurrency": 0},
                {"name": "old", "flavor": "A100-40GB", "concurrency": 8},
            ],
            "aggregateCaps": [
                {
                    "name": "h100-total",
                    "flavor": "H100-80GB",
                    "envelopes": ["west", "east"],
                    "maxConcurrency": 48,
                    "maxGPUHours": 500,
                },
                {"name": "a100-hours", "flavor": "A100-40GB", "envelopes": ["old"], "maxGPUHours": 10},
            ],
        },
    }


FULL_BUDGET = Budget(
    name="rai",
    owner="org:ai:rai",
    parents=("org:ai", "org:research"),
    period=12 * 3600,
    envelopes=(
        Envelope(
            name="west",
            flavor="H100-80GB",
            selector=(("cluster", "gpu-a"), ("region", "us-west")),
            concurrency=64,
            max_gpu_hours=1000.5,
            start=parse_time("2026-01-05T00:00:00Z"),
            end=parse_time("2026-02-05T00:00:00Z"),
            sharing=Sharing.NONE,
            pre_activation=PreActivation(allow_reservations=True, allow_admission=True),
            lending=Lending(
                allow=True, to=("org:ml:*", "org:vision"), max_concurrency=16, max_gpu_hours=200.0
            ),
        ),
        Envelope(name="east", flavor="H100-80GB", selector=(), concurrency=0),
        Envelope(name="old", flavor="A100-40GB", selector=(), concurrency=8),
    ),
    aggregate_caps=(
        AggregateCap(
            name="h100-total",
            flavor="H100-80GB",
            envelopes=("west", "east"),
            max_concurrency=48,
            max_gpu_hours=500.0,
        ),
        AggregateCap(name="a100-hours", flavor="A100-40GB", envelopes=("old",), max_gpu_hours=10.0),
    ),
)


def full_run() -> dict[str, Any]:
    """A Run manifest using every field."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {
            "name": "train.v2",
            "namespace": "rai",
            "labels": {"app": "llm"},
            "annotations": {"jobtree.sim/runtime": "1h30m", "owner-note": "x"},
        },
        "spec": {
            "owner": "org:ai:rai",
            "resources": {"gpuType": "H100-80GB", "totalGPUs": 24},
            "locality": {
                "groupGPUs": 8,
                "allowCrossGroupSpread": False,
                "selector": {"region": "us-west"},
            },
            "sparesPerGroup": 1,
            "malleable": {"minTotalGPUs": 16, "maxTotalGPUs": 48, "stepGPUs": 8, "desiredTotalGPUs": 32},
            "funding": {"allowBorrow": True, "maxBorrowGPUs": 8, "sponsors": ["org:ml", "org:vision"]},
            "follow": {
                "after": ["prep", "tokenize"],
                "onUpstreamFailure": "fail",
                "upstreamFailureGrace": "30m",
            },
            "runtime": {"checkpoint": "10m"},
            "roles": [{"name": "worker", "template": {"spec": {"containers": []}}}, {}],
        },
    }


FULL_RUN = Run(
    namespace="rai",
    name="train.v2",
    spec=RunSpec(
        owner="org:ai:rai",
        gpu_type="H100-80GB",
        total_gpus=24,
        locality=Locality(group_gpus=8, allow_cross_group_spread=False, selector=(("region", "us-west"),)),
        spares_per_group=1,
        malleable=Malleable(min_total=16, max_total=48, step=8, desired=32),
        funding=Funding(allow_borrow=True, max_borrow_gpus=8, sponsors=("org:ml", "org:vision")),
        follow=Follow(
            after=("prep", "tokenize"), on_upstream_failure=FailurePolicy.FAIL, upstream_failure_grace=1800
        ),
        checkpoint=600,
        runtime=5400,
    ),
)


def minimal_run() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {"name": "j1"},
        "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 16}},
    }


def node_doc() -> dict[str, Any]:
    return {"name": "a-00", "gpus": 8, "labels": dict(NODE_LABELS, rack="r1", extra="x")}


def generate_doc(count: int = 3) -> dict[str, Any]:
    return {"generate": {"prefix": "b-", "count": count, "gpus": 4, "labels": dict(NODE_LABELS)}}


def edit(doc: dict[str, Any], *changes: tuple[tuple[str | int, ...], object]) -> dict[str, Any]:
    """A deep copy of `doc` with each (key path, value) set; value DELETE removes the key."""
    out = copy.deepcopy(doc)
    for keys, value in changes:
        target: Any = out
        for key in keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return out


def malleable_run(**fields: object) -> dict[str, Any]:
    base: dict[str, object] = {"minTotalGPUs": 16, "maxTotalGPUs": 48, "stepGPUs": 8}
    base.update(fields)
    return edit(minimal_run(), (("spec", "locality"), {"groupGPUs": 8}), (("spec", "malleable"), base))


# --- Valid inputs --------------------------------------------------------------------------


def test_full_budget_round_trip() -> None:
    assert parse_budget(full_budget()) == FULL_BUDGET
    assert parse_manifest(full_budget(), PREFIX) == FULL_BUDGET


def test_full_run_round_trip() -> None:
    assert parse_run(full_run()) == FULL_RUN
    assert parse_manifest(full_run(), PREFIX) == FULL_RUN


VALID_RUNS: list[tuple[str, dict[str, Any], Run]] = [
    (
        "defaults",
        minimal_run(),
        Run("default", "j1", RunSpec(owner="org:a", gpu_type="H100-80GB", total_gpus=16)),
    ),
    (
        "nulls-are-absent",
        edit(minimal_run(), (("spec", "locality"), None), (("spec", "follow"), None)),
        Run("default", "j1", RunSpec(owner="org:a", gpu_type="H100-80GB", total_gpus=16)),
    ),
    (
        "desired-defaults-to-max",
        malleable_run(),
        Run(
            "default",
            "j1",
            RunSpec(
                owner="org:a",
                gpu_type="H100-80GB",
                total_gpus=16,
                locality=Locality(group_gpus=8),
                malleable=Malleable(16, 48, 8, 48),
            ),
        ),
    ),
    (
        "desired-defaults-to-widest-reachable",
        edit(minimal_run(), (("spec", "malleable"), {"minTotalGPUs": 16, "maxTotalGPUs": 30, "stepGPUs": 8})),
        Run(
            "default",
            "j1",
            RunSpec(owner="org:a", gpu_type="H100-80GB", total_gpus=16, malleable=Malleable(16, 30, 8, 24)),
        ),
    ),
    (
        "follow-defaults",
        edit(minimal_run(), (("spec", "follow"), {"after": ["up"]})),
        Run(
            "default",
            "j1",
            RunSpec(owner="org:a", gpu_type="H100-80GB", total_gpus=16, follow=Follow(after=("up",))),
        ),
    ),
    (
        "empty-runtime-and-roles",
        edit(
            minimal_run(), (("spec", "runtime"), {}), (("spec", "roles"), []), (("spec", "sparesPerGroup"), 0)
        ),
        Run("default", "j1", RunSpec(owner="org:a", gpu_type="H100-80GB", total_gpus=16)),
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [(d, e) for _, d, e in VALID_RUNS], ids=[i for i, _, _ in VALID_RUNS]
)
def test_valid_runs(doc: dict[str, Any], expected: Run) -> None:
    assert parse_manifest(doc) == expected


def test_minimal_budget_defaults() -> None:
    doc = {"apiVersion": API_VERSION, "kind": "Budget", "metadata": {"name": "b"}, "spec": {"owner": "org:b"}}
    assert parse_manifest(doc) == Budget(name="b", owner="org:b")


def test_parse_node_round_trip() -> None:
    assert parse_node(node_doc()) == Node(
        name="a-00",
        gpus=8,
        labels=(
            ("cluster", "gpu-a"),
            ("extra", "x"),
            ("fabric.domain", "A"),
            ("gpu.flavor", "H100-80GB"),
            ("rack", "r1"),
            ("region", "us-west"),
        ),
    )


@pytest.mark.parametrize(
    ("count", "first", "last"),
    [(1, "b-00", "b-00"), (11, "b-00", "b-10"), (100, "b-00", "b-99"), (101, "b-000", "b-100")],
)
def test_generate_nodes_names(count: int, first: str, last: str) -> None:
    nodes = generate_nodes(generate_doc(count))
    assert len(nodes) == count
    assert (nodes[0].name, nodes[-1].name) == (first, last)
    assert len({n.name for n in nodes}) == count
    assert all(n.gpus == 4 and n.flavor == "H100-80GB" and n.domain == "us-west/gpu-a/A" for n in nodes)


def scenario_files() -> list[Path]:
    return sorted(p for p in SCENARIOS.glob("*.yaml") if not p.name.endswith(".expect.yaml"))


def test_reference_scenarios_present() -> None:
    assert scenario_files(), f"no reference scenarios under {SCENARIOS}"


@pytest.mark.parametrize("scenario", scenario_files(), ids=lambda p: p.name)
def test_reference_scenario_manifests_parse(scenario: Path) -> None:
    doc = yaml.safe_load(scenario.read_text())
    nodes: list[Node] = []
    for i, entry in enumerate(doc["nodes"]):
        nodes += (
            generate_nodes(entry, f"nodes[{i}]")
            if "generate" in entry
            else [parse_node(entry, f"nodes[{i}]")]
        )
    assert nodes and len({n.name for n in nodes}) == len(nodes)
    parsed = [
        parse_manifest(manifest, f"steps[{i}].apply[{j}]")
        for i, step in enumerate(doc["steps"])
        for j, manifest in enumerate(step.get("apply") or [])
    ]
    assert parsed
    assert all(isinstance(p, Budget | Run) for p in parsed)


# --- Invalid inputs ------------------------------------------------------------------------

Parser = Callable[[object, str], object]
B = full_budget
R = full_run
ENV = ("spec", "envelopes", 0)
CAP = ("spec", "aggregateCaps", 0)
MAL = ("spec", "malleable")
FOL = ("spec", "follow")
ANN = ("metadata", "annotations")

# (id, parser, document, expected path (under PREFIX), message fragment)
INVALID: list[tuple[str, Parser, object, str, str]] = [
    # manifest envelope
    ("not-a-mapping", parse_manifest, ["Run"], "", "must be a mapping"),
    ("api-version", parse_manifest, edit(B(), (("apiVersion",), "v1")), "apiVersion", "must be rq.davidlangworthy.io/v1, got 'v1'"),
    ("kind-unknown", parse_manifest, edit(B(), (("kind",), "Pod")), "kind", "must be Budget or Run, got 'Pod'"),
    ("kind-mismatch", parse_budget, R(), "kind", "must be Budget, got 'Run'"),
    ("kind-mismatch-run", parse_run, B(), "kind", "must be Run, got 'Budget'"),
    ("top-unknown", parse_manifest, edit(B(), (("status",), {})), "status", "unknown field 'status'"),
    ("metadata-missing", parse_manifest, edit(B(), (("metadata",), DELETE)), "metadata", "is required"),
    ("metadata-unknown", parse_manifest, edit(R(), (("metadata", "uid"), "x")), "metadata.uid", "unknown field 'uid'"),
    ("name-uppercase", parse_manifest, edit(R(), (("metadata", "name"), "Train")), "metadata.name", "lowercase letters"),
    ("name-too-long", parse_manifest, edit(B(), (("metadata", "name"), "a" * 254)), "metadata.name", "at most 253"),
    ("namespace-bad", parse_manifest, edit(R(), (("metadata", "namespace"), "my.ns")), "metadata.namespace", "at most 63"),
    ("labels-not-strings", parse_manifest, edit(R(), (("metadata", "labels"), {"v": 2})), "metadata.labels.v", "must be a string"),
    ("field-name-not-string", parse_manifest, edit(R(), (("spec", 1), "x")), "spec", "field names must be strings"),
    # budget spec
    ("owner-missing", parse_manifest, edit(B(), (("spec", "owner"), DELETE)), "spec.owner", "is required"),
    ("owner-null", parse_manifest, edit(B(), (("spec", "owner"), None)), "spec.owner", "is required"),
    ("owner-whitespace", parse_manifest, edit(B(), (("spec", "owner"), "org ai")), "spec.owner", "without whitespace"),
    ("parent-self", parse_manifest, edit(B(), (("spec", "parents", 1), "org:ai:rai")), "spec.parents[1]", "own owner"),
    ("parent-duplicate", parse_manifest, edit(B(), (("spec", "parents", 1), "org:ai")), "spec.parents[1]", "duplicate parent 'org:ai'"),
    ("parents-not-list", parse_manifest, edit(B(), (("spec", "parents"), "org:ai")), "spec.parents", "must be a list"),
    ("period-text", parse_manifest, edit(B(), (("spec", "period"), "1 day")), "spec.period", "must be a duration"),
    ("period-zero", parse_manifest, edit(B(), (("spec", "period"), "0s")), "spec.period", "must be a positive duration"),
    ("envelopes-not-list", parse_manifest, edit(B(), (("spec", "envelopes"), {})), "spec.envelopes", "must be a list"),
    ("envelope-not-mapping", parse_manifest, edit(B(), (ENV, "west")), "spec.envelopes[0]", "must be a mapping"),
    ("concurrency-negative", parse_manifest, edit(B(), ((*ENV, "concurrency"), -1)), "spec.envelopes[0].concurrency", "must be a non-negative integer, got -1"),
    ("concurrency-bool", parse_manifest, edit(B(), ((*ENV, "concurrency"), True)), "spec.envelopes[0].concurrency", "integer, got true"),
    ("concurrency-float", parse_manifest, edit(B(), ((*ENV, "concurrency"), 8.0)), "spec.envelopes[0].concurrency", "integer, got 8.0"),
    ("gpu-hours-string", parse_manifest, edit(B(), ((*ENV, "maxGPUHours"), "100")), "spec.envelopes[0].maxGPUHours", "non-negative number"),
    ("gpu-hours-negative", parse_manifest, edit(B(), ((*ENV, "maxGPUHours"), -1.5)), "spec.envelopes[0].maxGPUHours", "got -1.5"),
    ("gpu-hours-inf", parse_manifest, edit(B(), ((*ENV, "maxGPUHours"), float("inf"))), "spec.envelopes[0].maxGPUHours", "non-negative number"),
    ("window-backwards", parse_manifest, edit(B(), ((*ENV, "end"), "2026-01-04T00:00:00Z")), "spec.envelopes[0].end", "must be after start (2026-01-05T00:00:00Z)"),
    ("window-empty", parse_manifest, edit(B(), ((*ENV, "end"), "2026-01-05T00:00:00Z")), "spec.envelopes[0].end", "must be after start"),
    ("start-bad", parse_manifest, edit(B(), ((*ENV, "start"), "yesterday")), "spec.envelopes[0].start", "RFC3339"),
    ("sharing-bad", parse_manifest, edit(B(), ((*ENV, "sharing"), "shared")), "spec.envelopes[0].sharing", "must be one of family, none"),
    ("selector-int", parse_manifest, edit(B(), ((*ENV, "selector", "rack"), 3)), "spec.envelopes[0].selector.rack", "must be a string"),
    ("selector-list", parse_manifest, edit(B(), ((*ENV, "selector"), ["a"])), "spec.envelopes[0].selector", "mapping of strings"),
    ("pre-activation-string", parse_manifest, edit(B(), ((*ENV, "preActivation", "allowAdmission"), "yes")), "spec.envelopes[0].preActivation.allowAdmission", "must be true or false, got 'yes'"),
    ("lending-star-middle", parse_manifest, edit(B(), ((*ENV, "lending", "to", 0), "org:*:x")), "spec.envelopes[0].lending.to[0]", "only at the end"),
    ("lending-unknown", parse_manifest, edit(B(), ((*ENV, "lending", "ratio"), 2)), "spec.envelopes[0].lending.ratio", "unknown field 'ratio'"),
    ("lending-max-negative", parse_manifest, edit(B(), ((*ENV, "lending", "maxConcurrency"), -2)), "spec.envelopes[0].lending.maxConcurrency", "non-negative integer"),
    ("envelope-flavor-missing", parse_manifest, edit(B(), (("spec", "envelopes", 1, "flavor"), DELETE)), "spec.envelopes[1].flavor", "is required"),
    ("envelope-unknown", parse_manifest, edit(B(), ((*ENV, "maxGpuHours"), 3)), "spec.envelopes[0].maxGpuHours", "allowed here: name, flavor"),
    ("envelope-duplicate", parse_manifest, edit(B(), (("spec", "envelopes", 1, "name"), "west")), "spec.envelopes[1].name", "duplicate envelope name 'west'"),
    ("cap-unknown-envelope", parse_manifest, edit(B(), ((*CAP, "envelopes", 1), "north")), "spec.aggregateCaps[0].envelopes[1]", "names no envelope of this budget: 'north'"),
    ("cap-flavor-mismatch", parse_manifest, edit(B(), ((*CAP, "envelopes", 1), "old")), "spec.aggregateCaps[0].envelopes[1]", "has flavor 'A100-40GB'"),
    ("cap-no-envelopes", parse_manifest, edit(B(), ((*CAP, "envelopes"), [])), "spec.aggregateCaps[0].envelopes", "at least one envelope"),
    ("cap-duplicate", parse_manifest, edit(B(), (("spec", "aggregateCaps", 1, "name"), "h100-total")), "spec.aggregateCaps[1].name", "duplicate aggregate cap name"),
    ("cap-no-limits", parse_manifest, edit(B(), ((*CAP, "maxConcurrency"), DELETE), ((*CAP, "maxGPUHours"), DELETE)), "spec.aggregateCaps[0]", "must set maxConcurrency, maxGPUHours or both"),
    ("budget-runtime-annotation", parse_manifest, edit(B(), ((*ANN, "jobtree.sim/runtime"), "1h")), "metadata.annotations.jobtree.sim/runtime", "applies to Runs only"),
    # run spec
    ("total-negative", parse_manifest, edit(R(), (("spec", "resources", "totalGPUs"), -3)), "spec.resources.totalGPUs", "must be a positive integer, got -3"),
    ("total-bool", parse_manifest, edit(R(), (("spec", "resources", "totalGPUs"), True)), "spec.resources.totalGPUs", "must be a positive integer, got true"),
    ("total-string", parse_manifest, edit(R(), (("spec", "resources", "totalGPUs"), "8")), "spec.resources.totalGPUs", "got '8'"),
    ("resources-missing", parse_manifest, edit(R(), (("spec", "resources"), DELETE)), "spec.resources", "is required"),
    ("resources-typo", parse_manifest, edit(R(), (("spec", "resources", "totalGpus"), 8)), "spec.resources.totalGpus", "unknown field 'totalGpus'; allowed here: gpuType, totalGPUs"),
    ("gpu-type-empty", parse_manifest, edit(R(), (("spec", "resources", "gpuType"), "")), "spec.resources.gpuType", "GPU flavor"),
    ("group-zero", parse_manifest, edit(R(), (("spec", "locality", "groupGPUs"), 0)), "spec.locality.groupGPUs", "must be a positive integer, got 0"),
    ("spread-string", parse_manifest, edit(R(), (("spec", "locality", "allowCrossGroupSpread"), "false")), "spec.locality.allowCrossGroupSpread", "must be true or false"),
    ("spares-without-groups", parse_manifest, edit(R(), (("spec", "locality", "groupGPUs"), DELETE), ((*MAL, "stepGPUs"), 8)), "spec.sparesPerGroup", "requires locality.groupGPUs"),
    ("spares-negative", parse_manifest, edit(R(), (("spec", "sparesPerGroup"), -1)), "spec.sparesPerGroup", "non-negative integer, got -1"),
    ("malleable-max-below-min", parse_manifest, edit(R(), ((*MAL, "maxTotalGPUs"), 8)), "spec.malleable.maxTotalGPUs", "must be >= minTotalGPUs (16), got 8"),
    ("malleable-min-zero", parse_manifest, edit(R(), ((*MAL, "minTotalGPUs"), 0)), "spec.malleable.minTotalGPUs", "positive integer, got 0"),
    ("malleable-step-zero", parse_manifest, edit(R(), ((*MAL, "stepGPUs"), 0)), "spec.malleable.stepGPUs", "positive integer, got 0"),
    ("malleable-step-missing", parse_manifest, edit(R(), ((*MAL, "stepGPUs"), DELETE)), "spec.malleable.stepGPUs", "is required"),
    ("malleable-step-not-group-multiple", parse_manifest, edit(R(), ((*MAL, "stepGPUs"), 4)), "spec.malleable.stepGPUs", "multiple of locality.groupGPUs (8), got 4"),
    ("desired-above-max", parse_manifest, edit(R(), ((*MAL, "desiredTotalGPUs"), 56)), "spec.malleable.desiredTotalGPUs", "within [minTotalGPUs, maxTotalGPUs] = [16, 48], got 56"),
    ("desired-unreachable", parse_manifest, edit(R(), ((*MAL, "desiredTotalGPUs"), 20)), "spec.malleable.desiredTotalGPUs", "plus a whole number of stepGPUs (8), got 20"),
    ("total-outside-malleable", parse_manifest, edit(R(), (("spec", "resources", "totalGPUs"), 64)), "spec.resources.totalGPUs", "must be within malleable [minTotalGPUs, maxTotalGPUs] = [16, 48], got 64"),
    ("borrow-negative", parse_manifest, edit(R(), (("spec", "funding", "maxBorrowGPUs"), -1)), "spec.funding.maxBorrowGPUs", "non-negative integer"),
    ("sponsor-duplicate", parse_manifest, edit(R(), (("spec", "funding", "sponsors", 1), "org:ml")), "spec.funding.sponsors[1]", "duplicate sponsor 'org:ml'"),
    ("allow-borrow-int", parse_manifest, edit(R(), (("spec", "funding", "allowBorrow"), 1)), "spec.funding.allowBorrow", "must be true or false, got 1"),
    ("follow-after-missing", parse_manifest, edit(R(), ((*FOL, "after"), DELETE)), "spec.follow.after", "is required"),
    ("follow-after-empty", parse_manifest, edit(R(), ((*FOL, "after"), [])), "spec.follow.after", "at least one run"),
    ("follow-self", parse_manifest, edit(R(), ((*FOL, "after", 1), "train.v2")), "spec.follow.after[1]", "cannot follow itself"),
    ("follow-namespaced", parse_manifest, edit(R(), ((*FOL, "after", 0), "ns/prep")), "spec.follow.after[0]", "must be a name of"),
    ("follow-policy", parse_manifest, edit(R(), ((*FOL, "onUpstreamFailure"), "retry")), "spec.follow.onUpstreamFailure", "must be one of wait, fail; got 'retry'"),
    ("follow-grace-negative", parse_manifest, edit(R(), ((*FOL, "upstreamFailureGrace"), "-5m")), "spec.follow.upstreamFailureGrace", "must be a duration"),
    ("checkpoint-fraction", parse_manifest, edit(R(), (("spec", "runtime", "checkpoint"), "1.5s")), "spec.runtime.checkpoint", "whole seconds"),
    ("runtime-unknown", parse_manifest, edit(R(), (("spec", "runtime", "deadline"), "1h")), "spec.runtime.deadline", "allowed here: checkpoint"),
    ("roles-not-list", parse_manifest, edit(R(), (("spec", "roles"), {"worker": {}})), "spec.roles", "must be a list"),
    ("role-not-mapping", parse_manifest, edit(R(), (("spec", "roles", 1), "worker")), "spec.roles[1]", "must be a mapping"),
    ("annotation-runtime-zero", parse_manifest, edit(R(), ((*ANN, "jobtree.sim/runtime"), "0s")), "metadata.annotations.jobtree.sim/runtime", "must be a positive duration"),
    ("annotation-runtime-int", parse_manifest, edit(R(), ((*ANN, "jobtree.sim/runtime"), 3600)), "metadata.annotations.jobtree.sim/runtime", "must be a string"),
    ("annotation-runtime-fraction", parse_manifest, edit(R(), ((*ANN, "jobtree.sim/runtime"), "90.5s")), "metadata.annotations.jobtree.sim/runtime", "whole seconds"),
    ("annotation-sim-unknown", parse_manifest, edit(R(), ((*ANN, "jobtree.sim/runtim"), "1h")), "metadata.annotations.jobtree.sim/runtim", "unknown simulator annotation"),
    # nodes
    ("node-gpus-zero", parse_node, edit(node_doc(), (("gpus",), 0)), "gpus", "must be a positive integer, got 0"),
    ("node-label-missing", parse_node, edit(node_doc(), (("labels", "gpu.flavor"), DELETE)), "labels.gpu.flavor", "is required"),
    ("node-label-empty", parse_node, edit(node_doc(), (("labels", "region"), "")), "labels.region", "must not be empty"),
    ("node-unknown", parse_node, edit(node_doc(), (("state",), "Ready")), "state", "unknown field 'state'"),
    ("node-name", parse_node, edit(node_doc(), (("name",), "A_00")), "name", "lowercase letters"),
    ("generate-count-zero", generate_nodes, edit(generate_doc(), (("generate", "count"), 0)), "generate.count", "positive integer, got 0"),
    ("generate-prefix", generate_nodes, edit(generate_doc(), (("generate", "prefix"), "B-")), "generate.prefix", "would make 'B-00'"),
    ("generate-unknown", generate_nodes, edit(generate_doc(), (("generate", "zone"), "z")), "generate.zone", "unknown field 'zone'"),
    ("generate-gpus-bool", generate_nodes, edit(generate_doc(), (("generate", "gpus"), False)), "generate.gpus", "got false"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("parser", "doc", "path", "fragment"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid(parser: Parser, doc: object, path: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parser(doc, PREFIX)
    expected_path = f"{PREFIX}.{path}" if path else PREFIX
    assert caught.value.path == expected_path
    assert fragment in caught.value.problem
    assert str(caught.value) == f"{expected_path}: {caught.value.problem}"


def test_invalid_table_is_large() -> None:
    assert len(INVALID) >= 30


def test_error_without_prefix_has_bare_path() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_manifest(edit(minimal_run(), (("spec", "resources", "totalGPUs"), -3)))
    assert caught.value.path == "spec.resources.totalGPUs"
    assert str(caught.value) == "spec.resources.totalGPUs: must be a positive integer, got -3"


# --- size limits (issue 13, D6) -----------------------------------------------------------------


def test_lists_are_bounded_naming_the_field() -> None:
    from jobtree.core.manifest import MAX_LIST_ITEMS

    doc = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": "r"},
           "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 8},
                    "follow": {"after": [f"u{i}" for i in range(MAX_LIST_ITEMS + 1)]}}}
    with pytest.raises(ValidationError) as err:
        parse_manifest(doc)
    assert (err.value.path, err.value.problem) == ("spec.follow.after", "has 257 items; at most 256 are allowed")
    doc["spec"]["follow"]["after"] = [f"u{i}" for i in range(MAX_LIST_ITEMS)]  # type: ignore[index]
    assert len(parse_manifest(doc).spec.follow.after) == MAX_LIST_ITEMS  # type: ignore[union-attr]
