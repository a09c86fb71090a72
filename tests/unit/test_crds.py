"""The CRDs generated from the proto schema (issue 7, item 1), checked with real validators.

- The CRDs themselves validate as `apiextensions.k8s.io/v1` objects (`kubernetes-validate`,
  strict, Kubernetes 1.37 schemas), and their schemas are structural.
- Every field of the messages is in the schema; every example and scenario manifest validates
  against it (`jsonschema`) and passes its CEL rules (`cel-python`).
- The schema and the core agree: each rule the schema states (required, minimum, enumeration,
  pattern, list bound, CEL rule) is one the core enforces — a manifest breaking it is refused
  by both, naming the same field.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from google.protobuf.descriptor import Descriptor
from test_api_convert import full_budget, full_run

from jobtree.api import crds
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.core.errors import ValidationError
from jobtree.core.manifest import MAX_LIST_ITEMS, parse_manifest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
K8S = "1.37.0"

Doc = dict[str, Any]


def schema(kind: str) -> Doc:
    doc = next(d for d in crds.crds() if d["spec"]["names"]["kind"] == kind)
    out: Doc = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


# --- the CRDs as Kubernetes objects -------------------------------------------------------------


def test_the_crds_are_valid_kubernetes_objects() -> None:
    for doc in crds.crds():
        assert kubernetes_validate.validate(doc, K8S, strict=True)
    broken = copy.deepcopy(crds.crds()[0])
    broken["spec"]["versions"][0]["servd"] = True  # the validator is not a rubber stamp
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S, strict=True)


def test_names_columns_and_subresources() -> None:
    by_kind = {d["spec"]["names"]["kind"]: d for d in crds.crds()}
    assert set(by_kind) == {"Budget", "Run", "Reservation", "GPULease"}
    assert by_kind["Budget"]["spec"]["scope"] == "Cluster"
    assert {by_kind[k]["spec"]["scope"] for k in ("Run", "Reservation", "GPULease")} == {"Namespaced"}
    assert by_kind["GPULease"]["spec"]["names"]["shortNames"] == ["gl"]
    for doc in by_kind.values():
        assert doc["spec"]["group"] == "rq.davidlangworthy.io"
        assert doc["spec"]["names"]["categories"] == ["jobtree"]
        assert doc["spec"]["versions"][0]["subresources"] == {"status": {}}
    columns = {k: [c["name"] for c in d["spec"]["versions"][0]["additionalPrinterColumns"]]
               for k, d in by_kind.items()}
    assert columns["Run"] == ["OWNER", "PHASE", "GPUS", "FUNDING", "RESERVED-UNTIL/ETA", "AGE"]
    assert columns["Budget"] == ["OWNER", "ENVELOPES", "HEADROOM", "AGE"]
    assert columns["GPULease"] == ["RUN", "NODE", "GPUS", "ROLE", "PAID-BY", "CLOSURE", "AGE"]


def _nodes(node: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_the_schemas_are_structural() -> None:
    """Every node has a type (or keeps unknown fields: a role's pod template)."""
    for doc in crds.crds():
        for path, node in _nodes(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            assert "type" in node, (doc["metadata"]["name"], path)
            if node["type"] == "object" and "properties" not in node and "additionalProperties" not in node:
                assert path in (".metadata",) or node.get("x-kubernetes-preserve-unknown-fields"), path


def _proto_paths(desc: Descriptor, prefix: str = "") -> set[str]:
    out = set()
    for f in desc.fields:
        path = f"{prefix}.{f.json_name}"
        out.add(path)
        if f.message_type is not None and not f.message_type.GetOptions().map_entry and \
                f.message_type.full_name.startswith("jobtree."):
            out |= _proto_paths(f.message_type, path + ("[]" if f.is_repeated else ""))
    return out


@pytest.mark.parametrize("message", [pb.Budget, pb.Run, pb.Reservation, pb.GPULease], ids=lambda m: m.__name__)
def test_every_field_of_the_message_is_in_the_schema(message: Any) -> None:
    want = {p for p in _proto_paths(message.DESCRIPTOR) if not p.startswith(".metadata.")}
    have = {p for p, _ in _nodes(schema(message.DESCRIPTOR.name)) if p and "{}" not in p}
    have = {p.replace("[]", "[]") for p in have}
    assert want <= have, sorted(want - have)


# --- manifests against the schema and its CEL rules ---------------------------------------------------


def _cel_failures(node: Doc, value: Any, path: str = "") -> list[str]:
    """The CEL rules of the schema that `value` breaks, evaluated with cel-python."""
    out = []
    if value is None:
        return out
    for rule in node.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        try:
            holds = bool(program.evaluate({"self": celpy.json_to_cel(value)}))
        except celpy.CELEvalError as e:  # the API server refuses an object a rule cannot evaluate
            out.append(f"{path}: rule {rule['rule']!r} could not be evaluated: {e.args[0]}")
            continue
        if not holds:
            out.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            out += _cel_failures(sub, value.get(name), f"{path}.{name}")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            out += _cel_failures(node["items"], item, f"{path}[{i}]")
    return out


def schema_errors(doc: Doc) -> list[str]:
    """What the schema and its CEL rules say of a manifest (empty: valid)."""
    s = schema(doc["kind"])
    validator = jsonschema.Draft7Validator(s, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    found = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    return found + _cel_failures(s, doc)


def _scenario_manifests(path: Path) -> Iterator[tuple[str, Doc]]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        return
    for i, step in enumerate(doc.get("steps") or []):
        applied = step.get("apply") if isinstance(step, dict) else None
        for j, item in enumerate(applied if isinstance(applied, list) else [applied] if applied else []):
            if isinstance(item, dict) and item.get("kind") in ("Run", "Budget"):
                yield f"{path.name} steps[{i}].apply[{j}]", item


def every_example() -> list[tuple[str, Doc]]:
    out: list[tuple[str, Doc]] = []
    for path in sorted((REPO / "examples" / "manifests").glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    for folder in (SHARED / "scenarios", REPO / "tests" / "scenarios", REPO / "examples"):
        for path in sorted(folder.glob("*.yaml")):
            if not path.name.endswith(".expect.yaml"):
                out += list(_scenario_manifests(path))
    return out


def test_every_example_and_scenario_manifest_is_valid() -> None:
    examples = every_example()
    assert len(examples) > 300, len(examples)  # the scenarios are there
    invalid = {}
    for where, doc in examples:
        parse_manifest(doc)  # the core accepts it
        errors = schema_errors(doc)
        if errors:
            invalid[where] = errors
    assert not invalid, invalid


def test_the_full_manifests_are_valid() -> None:
    for doc in (full_run(), full_budget()):
        parse_manifest(doc)
        assert schema_errors(doc) == []


# --- the schema and the core agree ---------------------------------------------------------------------


def _drop(*path: str | int) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


def _set(value: Any, *path: str | int) -> Callable[[Doc], None]:
    def change(doc: Doc) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


RUN_CASES: dict[str, tuple[Callable[[Doc], None], str]] = {
    "owner required": (_drop("spec", "owner"), "spec.owner"),
    "resources required": (_drop("spec", "resources"), "spec.resources"),
    "gpuType required": (_drop("spec", "resources", "gpuType"), "spec.resources.gpuType"),
    "totalGPUs positive": (_set(0, "spec", "resources", "totalGPUs"), "spec.resources.totalGPUs"),
    "owner without spaces": (_set("org: a", "spec", "owner"), "spec.owner"),
    "groupGPUs positive": (_set(0, "spec", "locality", "groupGPUs"), "spec.locality.groupGPUs"),
    "sparesPerGroup non-negative": (_set(-1, "spec", "sparesPerGroup"), "spec.sparesPerGroup"),
    "stepGPUs required": (_drop("spec", "malleable", "stepGPUs"), "spec.malleable.stepGPUs"),
    "minTotalGPUs positive": (_set(0, "spec", "malleable", "minTotalGPUs"), "spec.malleable.minTotalGPUs"),
    "min at most max (CEL)": (_set(64, "spec", "malleable", "minTotalGPUs"), "spec.malleable.maxTotalGPUs"),
    "desired within (CEL)": (_set(56, "spec", "malleable", "desiredTotalGPUs"), "spec.malleable.desiredTotalGPUs"),
    "total within malleable (CEL)": (_set(8, "spec", "resources", "totalGPUs"), "spec.resources.totalGPUs"),
    "spares need groupGPUs (CEL)": (_drop("spec", "locality", "groupGPUs"), "spec.sparesPerGroup"),
    "maxBorrowGPUs non-negative": (_set(-1, "spec", "funding", "maxBorrowGPUs"), "spec.funding.maxBorrowGPUs"),
    "sponsor without spaces": (_set(["org: x"], "spec", "funding", "sponsors"), "spec.funding.sponsors[0]"),
    "sponsors bounded": (_set([f"org:s{i}" for i in range(MAX_LIST_ITEMS + 1)], "spec", "funding", "sponsors"),
                         "spec.funding.sponsors"),
    "after required": (_drop("spec", "follow", "after"), "spec.follow.after"),
    "after not empty": (_set([], "spec", "follow", "after"), "spec.follow.after"),
    "after names runs": (_set(["Not_A_Name"], "spec", "follow", "after"), "spec.follow.after[0]"),
    "onUpstreamFailure words": (_set("retry", "spec", "follow", "onUpstreamFailure"), "spec.follow.onUpstreamFailure"),
    "roles bounded": (_set([{}] * (MAX_LIST_ITEMS + 1), "spec", "roles"), "spec.roles"),
}

BUDGET_CASES: dict[str, tuple[Callable[[Doc], None], str]] = {
    "owner required": (_drop("spec", "owner"), "spec.owner"),
    "parents without spaces": (_set(["org x"], "spec", "parents"), "spec.parents[0]"),
    "parents bounded": (_set([f"org:p{i}" for i in range(MAX_LIST_ITEMS + 1)], "spec", "parents"), "spec.parents"),
    "envelope name required": (_drop("spec", "envelopes", 0, "name"), "spec.envelopes[0].name"),
    "envelope flavor required": (_drop("spec", "envelopes", 0, "flavor"), "spec.envelopes[0].flavor"),
    "concurrency required": (_drop("spec", "envelopes", 0, "concurrency"), "spec.envelopes[0].concurrency"),
    "concurrency non-negative": (_set(-1, "spec", "envelopes", 0, "concurrency"), "spec.envelopes[0].concurrency"),
    "envelope name a name": (_set("West", "spec", "envelopes", 0, "name"), "spec.envelopes[0].name"),
    "maxGPUHours non-negative": (_set(-1, "spec", "envelopes", 0, "maxGPUHours"), "spec.envelopes[0].maxGPUHours"),
    "sharing words": (_set("all", "spec", "envelopes", 0, "sharing"), "spec.envelopes[0].sharing"),
    "end after start (CEL)": (_set("2026-01-01T00:00:00Z", "spec", "envelopes", 0, "end"), "spec.envelopes[0].end"),
    "lending maxConcurrency non-negative": (_set(-2, "spec", "envelopes", 0, "lending", "maxConcurrency"),
                                            "spec.envelopes[0].lending.maxConcurrency"),
    "cap bounds something (CEL)": (_drop("spec", "aggregateCaps", 0, "maxConcurrency"), "spec.aggregateCaps[0]"),
    "cap envelopes required": (_drop("spec", "aggregateCaps", 0, "envelopes"), "spec.aggregateCaps[0].envelopes"),
}


def _cap_without_hours(doc: Doc) -> None:
    del doc["spec"]["aggregateCaps"][0]["maxGPUHours"]


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_a_run_the_schema_refuses_the_core_refuses(case: str) -> None:
    change, path = RUN_CASES[case]
    doc = full_run()
    change(doc)
    _both_refuse(case, doc, path)


def _both_refuse(case: str, doc: Doc, path: str) -> None:
    errors = schema_errors(doc)
    assert errors, f"the schema accepts {case}"
    with pytest.raises(ValidationError) as err:
        parse_manifest(doc)
    assert err.value.path == path, (err.value.path, err.value.problem)
    if "(CEL)" in case:  # the API server's error names the field the core names
        assert any(e.startswith(f".{path}: ") for e in errors), errors


@pytest.mark.parametrize("case", sorted(BUDGET_CASES))
def test_a_budget_the_schema_refuses_the_core_refuses(case: str) -> None:
    change, path = BUDGET_CASES[case]
    doc = full_budget()
    if case == "cap bounds something (CEL)":
        _cap_without_hours(doc)
    change(doc)
    _both_refuse(case, doc, path)


def test_every_rule_of_the_table_is_exercised() -> None:
    """Each RULES entry and CEL rule is broken by some case above (a rule nobody tests could
    refuse what the core accepts)."""
    cases = len(RUN_CASES) + len(BUDGET_CASES)
    cel_rules = sum(len(rules) for rules in crds.CEL.values())
    assert cel_rules == 6 and cases >= len(crds.RULES) - 12, (cases, len(crds.RULES))
