"""The protobuf schema and its conversion to the core (jobtree.api.convert)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from jobtree.api import convert
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.core import facts as F
from jobtree.core import manifest as core_manifest
from jobtree.core.engine import Cluster
from jobtree.core.errors import ValidationError
from jobtree.core.model import (
    Budget,
    Envelope,
    Lease,
    MintReason,
    Node,
    NodeState,
    Phase,
    Reservation,
    ReservationState,
    Role,
    Run,
    RunSpec,
    RunStatus,
)
from jobtree.core.timefmt import parse_time
from jobtree.core.views import state_json
from jobtree.sim import runner
from jobtree.sim.scenario import ApplyAction, load_scenario, load_yaml

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_FILES = sorted(
    [
        *(ROOT.parent / "shared" / "scenarios").glob("*.yaml"),
        *(ROOT / "tests" / "scenarios").glob("*.yaml"),
        *(ROOT / "examples").glob("*.yaml"),
    ]
)
SCENARIO_FILES = [p for p in SCENARIO_FILES if not p.name.endswith(".expect.yaml")]
T0 = parse_time("2026-01-05T00:00:00Z")
LABELS = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": "A", "gpu.flavor": "H100-80GB"}


def full_budget() -> dict[str, Any]:
    """A Budget manifest using every field the schema declares."""
    return {
        "apiVersion": core_manifest.API_VERSION,
        "kind": "Budget",
        "metadata": {"name": "rai", "namespace": "ignored", "labels": {"team": "rai"}, "annotations": {"a": "b"}},
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
                    "lending": {"allow": True, "to": ["org:ml:*", "org:vision"], "maxConcurrency": 16,
                                "maxGPUHours": 200},
                },
                {"name": "east", "flavor": "H100-80GB", "concurrency": 0},
            ],
            "aggregateCaps": [
                {"name": "h100", "flavor": "H100-80GB", "envelopes": ["west", "east"], "maxConcurrency": 48,
                 "maxGPUHours": 500},
            ],
        },
    }


def full_run() -> dict[str, Any]:
    """A Run manifest using every field the schema declares (status excepted)."""
    return {
        "apiVersion": core_manifest.API_VERSION,
        "kind": "Run",
        "metadata": {
            "name": "train.v2",
            "namespace": "rai",
            "labels": {"app": "llm"},
            "annotations": {"jobtree.sim/runtime": "1h30m", "note": "x"},
        },
        "spec": {
            "owner": "org:ai:rai",
            "resources": {"gpuType": "H100-80GB", "totalGPUs": 24},
            "locality": {"groupGPUs": 8, "allowCrossGroupSpread": False, "selector": {"region": "us-west"}},
            "sparesPerGroup": 1,
            "malleable": {"minTotalGPUs": 16, "maxTotalGPUs": 48, "stepGPUs": 8, "desiredTotalGPUs": 32},
            "funding": {"allowBorrow": True, "maxBorrowGPUs": 8, "sponsors": ["org:ml", "org:vision"]},
            "follow": {"after": ["prep", "tokenize"], "onUpstreamFailure": "fail", "upstreamFailureGrace": "30m"},
            "runtime": {"checkpoint": "10m"},
            "roles": [{"name": "worker", "template": {"spec": {"containers": []}}}, {}],
        },
    }


def minimal_run() -> dict[str, Any]:
    return {
        "apiVersion": core_manifest.API_VERSION,
        "kind": "Run",
        "metadata": {"name": "j1"},
        "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 16}},
    }


def node_doc() -> dict[str, Any]:
    return {"name": "a-00", "gpus": 8, "labels": dict(LABELS, rack="r1")}


# --- The schema and the core accept exactly the same fields ---------------------------------


def _paths(doc: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Field paths of a manifest dict (list items flattened), stopping at the schema's leaves."""
    out: set[tuple[str, ...]] = set()
    if isinstance(doc, list):
        for item in doc:
            out |= _paths(item, prefix)
    elif isinstance(doc, dict):
        for key, value in doc.items():
            out.add((*prefix, key))
            if key not in ("labels", "annotations", "selector", "roles"):
                out |= _paths(value, (*prefix, key))
    return out


def _mappings(doc: object, desc: Descriptor, path: str = "") -> list[tuple[str, Descriptor]]:
    """(path, message) of every schema message that appears as a mapping in `doc`."""
    out = [(path, desc)]
    assert isinstance(doc, dict)
    for key, value in doc.items():
        field = {f.json_name: f for f in desc.fields}[key]
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf."):
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            at = f"{path}.{key}" if path else key
            out += _mappings(item, sub, f"{at}[{i}]" if isinstance(value, list) else at)
    return out


def _core_allowed(parse: Any, doc: dict[str, Any], path: str) -> set[str]:
    """The fields the core allows in the mapping at `path`, read from its unknown-field error."""
    probe = copy.deepcopy(doc)
    target: Any = probe
    for part in filter(None, re.split(r"\.|\[(\d+)\]", path)):
        target = target[int(part)] if part.isdigit() else target[part]
    target["zzUnknown"] = 1
    with pytest.raises(ValidationError) as info:
        parse(probe)
    assert info.value.path == (f"{path}.zzUnknown" if path else "zzUnknown"), info.value
    match = re.search(r"allowed here: (.*)$", info.value.problem)
    assert match, info.value.problem
    return set(match.group(1).split(", "))


@pytest.mark.parametrize(
    ("make", "message", "parse", "exclude"),
    [
        (full_budget, pb.Budget, core_manifest.parse_budget, convert.WRITTEN_BY_JOBTREE),
        (full_run, pb.Run, core_manifest.parse_run, convert.WRITTEN_BY_JOBTREE),
        (node_doc, pb.Node, core_manifest.parse_node, frozenset({"state"})),
    ],
    ids=["Budget", "Run", "Node"],
)
def test_schema_and_core_manifest_accept_the_same_fields(make: Any, message: Any, parse: Any, exclude: Any) -> None:
    doc = make()
    # The example uses every field the schema declares, and the core accepts all of them ...
    assert _paths(doc) == set(convert.schema_fields(message.DESCRIPTOR, exclude))
    parse(doc)
    # ... and at every level the core allows nothing the schema does not declare.
    for path, desc in _mappings(doc, message.DESCRIPTOR):
        declared = {f.json_name for f in desc.fields} - (exclude if not path else set())
        assert _core_allowed(parse, doc, path) == declared, path


def test_every_field_has_an_explicit_json_name_equal_to_its_manifest_name() -> None:
    text = (ROOT / "proto" / "jobtree" / "v1" / "objects.proto").read_text()
    fields = re.findall(r"^\s*(?:optional |repeated )?[\w.<>, ]+ (\w+) = \d+( \[json_name = \"\w+\"\])?;", text, re.M)
    assert fields and all(json for _, json in fields), [name for name, json in fields if not json]
    assert pb.Resources.DESCRIPTOR.fields_by_name["total_gpus"].json_name == "totalGPUs"
    assert pb.Envelope.DESCRIPTOR.fields_by_name["max_gpu_hours"].json_name == "maxGPUHours"
    assert pb.BudgetSpec.DESCRIPTOR.fields_by_name["aggregate_caps"].json_name == "aggregateCaps"


# --- Manifests through the schema ----------------------------------------------------------


@pytest.mark.parametrize("make", [full_budget, full_run, minimal_run])
def test_manifest_parses_straight_into_the_schema_and_back(make: Any) -> None:
    doc = make()
    parsed = convert.parse_manifest(doc)
    assert parsed.model == core_manifest.parse_manifest(doc)
    assert json_format.MessageToDict(parsed.proto) == doc
    assert convert.manifest_to_proto(doc) == parsed.proto


def test_manifests_of_every_scenario_parse_through_the_schema() -> None:
    count = 0
    for path in SCENARIO_FILES:
        doc = load_yaml(path.read_text())
        assert isinstance(doc, dict)
        for i, step in enumerate(doc.get("steps") or []):
            for j, item in enumerate(step.get("apply") or []):
                where = f"{path.name}: steps[{i}].apply[{j}]"
                parsed = convert.parse_manifest(item)
                assert parsed.model == core_manifest.parse_manifest(item), where
                again = (convert.budget_from_proto if isinstance(parsed.model, Budget) else convert.run_from_proto)
                assert again(parsed.proto) == parsed.model, where  # type: ignore[operator]
                count += 1
    assert count > 20


@pytest.mark.parametrize(
    ("edit", "path", "problem"),
    [
        (lambda d: d["spec"]["resources"].update(totalGPU=3), "spec.resources.totalGPU",
         "unknown field 'totalGPU'; allowed here: gpuType, totalGPUs"),
        (lambda d: d["spec"]["resources"].update(total_gpus=3), "spec.resources.total_gpus", "unknown field"),
        (lambda d: d.update(status={"phase": "Running"}), "status", "allowed here: apiVersion, kind, metadata, spec"),
        (lambda d: d["spec"]["resources"].update(totalGPUs="8"), "spec.resources.totalGPUs",
         "must be an integer, got '8'"),
        (lambda d: d["spec"]["resources"].update(totalGPUs=True), "spec.resources.totalGPUs", "must be an integer"),
        (lambda d: d["spec"]["resources"].update(totalGPUs=2**40), "spec.resources.totalGPUs", "must be between"),
        (lambda d: d["spec"].update(locality={"allowCrossGroupSpread": "no"}), "spec.locality.allowCrossGroupSpread",
         "must be true or false"),
        (lambda d: d["spec"].update(roles=[3]), "spec.roles[0]", "must be a mapping"),
        (lambda d: d["spec"].update(funding={"sponsors": "org:x"}), "spec.funding.sponsors", "must be a list"),
        (lambda d: d["metadata"].update(labels={"a": 1}), "metadata.labels.a", "must be a string"),
        (lambda d: d["spec"].update(follow={"after": ["x"], "upstreamFailureGrace": 60}),
         "spec.follow.upstreamFailureGrace", "must be a string"),
        # Beyond the schema, the core's rules apply.
        (lambda d: d["spec"]["resources"].update(totalGPUs=0), "spec.resources.totalGPUs",
         "must be a positive integer"),
        (lambda d: d["spec"].update(sparesPerGroup=1), "spec.sparesPerGroup", "requires locality.groupGPUs"),
        (lambda d: d.update(kind="Pod"), "kind", "must be Budget or Run"),
    ],
)
def test_bad_manifests_name_the_field(edit: Any, path: str, problem: str) -> None:
    doc = minimal_run()
    edit(doc)
    with pytest.raises(ValidationError) as info:
        convert.manifest_to_proto(doc, "")
    assert info.value.path == path
    assert problem in info.value.problem


def test_null_fields_count_as_absent() -> None:
    doc = minimal_run()
    doc["spec"]["locality"] = None
    doc["metadata"]["namespace"] = None
    parsed = convert.parse_manifest(doc)
    assert not parsed.proto.spec.HasField("locality")
    assert parsed.model.namespace == "default"  # type: ignore[union-attr]


def test_grpc_messages_are_validated_like_manifests() -> None:
    msg = convert.manifest_to_proto(minimal_run())
    assert isinstance(msg, pb.Run)
    msg.ClearField("api_version")
    msg.ClearField("kind")
    assert convert.run_from_proto(msg).key == "default/j1"  # apiVersion and kind default
    msg.spec.resources.total_gpus = 0
    with pytest.raises(ValidationError) as info:
        convert.run_from_proto(msg, "run")
    assert info.value.path == "run.spec.resources.totalGPUs"
    bad = pb.Budget()
    bad.spec.owner = "org:a"
    bad.spec.envelopes.add(name="e", flavor="H100-80GB")
    with pytest.raises(ValidationError) as info:
        convert.budget_from_proto(bad)
    assert info.value.path == "metadata"


# --- Round trips -----------------------------------------------------------------------------


def _budgets() -> list[Budget]:
    full = core_manifest.parse_budget(full_budget())
    return [full, Budget(name="b", owner="org:a"), Budget(name="c", owner="org:a", period=5400,
                                                           envelopes=(Envelope("e", "A100", (), 4),))]


def _runs() -> list[Run]:
    full = core_manifest.parse_run(full_run())
    return [full, core_manifest.parse_run(minimal_run()),
            Run("ns", "r", RunSpec(owner="o", gpu_type="g", total_gpus=1, runtime=1))]


def _statuses() -> list[RunStatus]:
    return [
        RunStatus(Phase.PENDING, "", "", created=T0),
        RunStatus(Phase.RUNNING, "Bound", "bound on 2 nodes", created=T0, admitted=T0 + 1, bound_at=T0 + 2,
                  hold_down_until=T0 + 3, checkpoint_deadline=T0 + 4, ended_at=T0 + 5, upstream_failed_at=T0 + 6,
                  reservation="ns.r.r000", eta=T0 + 7, generation=3),
        RunStatus(Phase.COMPLETED, "Done", "x", created=0, ended_at=0),
    ]


def _leases() -> list[Lease]:
    return [
        Lease("ns.r.00000", "ns/r", "org:a", 0, Role.ACTIVE, (("a-00", 0), ("a-00", 1)), ("b", "e"), T0,
              MintReason.START),
        Lease("ns.r.00001", "ns/r", "org:a", 2, Role.SPARE, (("a-01", 7),), None, T0, MintReason.SWAP,
              end=T0 + 60, closure_reason="ReclaimUnfunded(ab12)"),
    ]


def _reservations() -> list[Reservation]:
    return [
        Reservation("ns.r.r000", "ns/r", (("us/gpu-a/A", 16), ("us/gpu-a/B", 8)), ("b", "e"), T0 + 900, 8),
        Reservation("ns.r.r001", "ns/r", (), None, T0, 0, ReservationState.FAILED, window_only=True,
                    seed="00ff", conflict_set=("ns/x", "ns/y")),
    ]


def _nodes() -> list[Node]:
    return [core_manifest.parse_node(node_doc()),
            Node("b-01", 4, tuple(sorted(LABELS.items())), NodeState.FENCED)]


@pytest.mark.parametrize(
    ("values", "to", "back"),
    [
        (_budgets(), convert.budget_to_proto, convert.budget_from_proto),
        (_runs(), convert.run_to_proto, convert.run_from_proto),
        (_statuses(), convert.run_status_to_proto, convert.run_status_from_proto),
        (_leases(), convert.lease_to_proto, convert.lease_from_proto),
        (_reservations(), convert.reservation_to_proto, convert.reservation_from_proto),
        (_nodes(), convert.node_to_proto, convert.node_from_proto),
    ],
    ids=["budget", "run", "status", "lease", "reservation", "node"],
)
def test_objects_round_trip(values: list[Any], to: Any, back: Any) -> None:
    for value in values:
        msg = to(value)
        wire = type(msg).FromString(msg.SerializeToString())
        assert back(wire) == value
        assert to(back(msg)) == msg  # canonical messages are a fixed point


def _scenario_runs() -> list[Run]:
    """Every Run the project's and the reference scenarios apply."""
    here = Path(__file__).resolve().parents[1] / "scenarios"
    files = [*here.glob("*.yaml"), *(here.parents[1].parent / "shared" / "scenarios").glob("*.yaml")]
    runs: list[Run] = []
    for path in sorted(files):
        if path.name.endswith(".expect.yaml"):
            continue
        for step in load_scenario(path).steps:
            if isinstance(step.action, ApplyAction):
                runs.extend(o for o in step.action.objects if isinstance(o, Run))
    return runs


def test_ledger_runs_decode_like_validated_runs() -> None:
    """`run_from_ledger` (followers, no checks) and `run_from_proto` (validated) agree on every
    run a scenario submits, and on the hand-made ones above."""
    runs = [*_runs(), *_scenario_runs()]
    assert len(runs) > 100
    assert any(r.spec.follow for r in runs) and any(r.spec.malleable for r in runs)
    assert any(r.spec.checkpoint for r in runs) and any(r.spec.funding.sponsors for r in runs)
    assert any(r.spec.locality.selector for r in runs) and any(r.spec.runtime for r in runs)
    for run in runs:
        wire = pb.Run.FromString(convert.run_to_proto(run).SerializeToString())
        assert convert.run_from_ledger(wire) == convert.run_from_proto(wire) == run, run.key


def test_canonical_messages_leave_defaults_out() -> None:
    run = core_manifest.parse_run(minimal_run())
    assert json_format.MessageToDict(convert.run_to_proto(run)) == dict(
        minimal_run(), metadata={"name": "j1", "namespace": "default"}
    )
    doc = json_format.MessageToDict(convert.lease_to_proto(_leases()[1]))
    assert doc["spec"]["slots"] == [{"node": "a-01", "index": 7}]
    assert "paidBy" not in doc["spec"]
    assert doc["status"] == {"end": "2026-01-05T00:01:00Z", "closureReason": "ReclaimUnfunded(ab12)"}


def test_run_with_status() -> None:
    run, status = _runs()[1], _statuses()[1]
    msg = convert.run_to_proto(run, status)
    assert convert.run_from_proto(msg) == run
    assert convert.run_status_from_proto(msg.status) == status


def test_system_written_objects_are_checked() -> None:
    msg = convert.lease_to_proto(_leases()[0])
    msg.spec.role = "Boss"
    with pytest.raises(ValidationError) as info:
        convert.lease_from_proto(msg, "lease")
    assert info.value.path == "lease.spec.role"
    assert "Active, Spare" in info.value.problem
    msg = convert.lease_to_proto(_leases()[0])
    msg.spec.ClearField("start")
    with pytest.raises(ValidationError, match=r"spec\.start: is required"):
        convert.lease_from_proto(msg)


COMMANDS: list[F.Command] = [
    F.ApplyBudget(_budgets()[0]),
    F.ApplyRun(_runs()[0]),
    F.DeleteRun("ns/r"),
    F.CompleteRun("ns/r"),
    F.FailRun("ns/r"),
    F.FailNode("a-00"),
    F.CordonNode("a-00"),
    F.UncordonNode("a-00"),
    F.AddNode(_nodes()[0]),
    F.ShrinkRun("ns/r", 16),
    F.ReportEta("ns/r", T0 + 3600),
    F.Tick(),
    F.SetAllowance("org/west-total", 8, 3, 12.5),
    F.SetAllowance("org/west-total", None, 4),
]


def test_every_command_round_trips() -> None:
    assert {type(c).__name__ for c in COMMANDS} | {"Batch"} == {
        f.message_type.name for f in bus.Command.DESCRIPTOR.oneofs_by_name["command"].fields
    }
    for cmd in COMMANDS:
        msg = convert.command_to_proto(cmd, command_id="c-1", epoch=7, instant=T0, min_ledger_sequence=5)
        wire = bus.Command.FromString(msg.SerializeToString())
        assert (wire.command_id, wire.epoch, wire.instant.seconds, wire.min_ledger_sequence) == ("c-1", 7, T0, 5)
        assert convert.command_from_proto(wire) == cmd


def test_malformed_commands_name_the_field() -> None:
    with pytest.raises(ValidationError, match="command: is required"):
        convert.command_from_proto(bus.Command())
    msg = bus.Command()
    msg.delete_run.run.namespace = "ns"
    with pytest.raises(ValidationError) as info:
        convert.command_from_proto(msg)
    assert info.value.path == "delete_run.run.name"
    err = convert.error_to_proto(info.value)
    assert (err.code, err.field_path) == (bus.ERROR_CODE_INVALID_ARGUMENT, "delete_run.run.name")


ENTRIES: list[F.JournalEntry] = [
    (T0, F.LeaseMinted(_leases()[0])),
    (T0 + 1, F.LeaseClosed("ns.r.00000", T0 + 1, "Completed")),
    (T0, F.ReservationPut(_reservations()[1])),
    (T0, F.RunStatusPut("ns/r", _statuses()[1])),
    (T0, F.SpecPut(_runs()[0])),
    (T0, F.SpecDeleted("ns/r")),
    (T0, F.NodeStatePut(_nodes()[1])),
    (T0, F.ApplyBudget(_budgets()[0])),
    (T0 + 60, F.ClockAdvanced()),
    (T0 + 60, F.SetAllowance("org/west-total", 8, 3, 12.5)),
]


def test_every_journal_entry_round_trips() -> None:
    kinds = {f.name for f in bus.LedgerEntry.DESCRIPTOR.oneofs_by_name["fact"].fields}
    seen = set()
    for entry in ENTRIES:
        msg = convert.entry_to_proto(entry, command_id="c-9", epoch=2)
        seen.add(msg.WhichOneof("fact"))
        wire = bus.LedgerEntry.FromString(msg.SerializeToString())
        assert (wire.command_id, wire.epoch) == ("c-9", 2)
        assert convert.entry_from_proto(wire) == entry
    assert seen == kinds


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.name)
def test_a_played_journal_survives_the_wire_and_replays_to_the_same_state(path: Path) -> None:
    scenario = load_scenario(path)
    cl = Cluster(scenario.config, scenario.nodes, scenario.start)
    for step in scenario.steps:
        cl.advance(step.at)
        cmds = runner.commands_of(step.action)
        if cmds:
            cl.submit(*cmds)
    batch = bus.LedgerBatch(entries=[convert.entry_to_proto(e) for e in cl.journal])
    wire = bus.LedgerBatch.FromString(batch.SerializeToString())
    journal = [convert.entry_from_proto(e) for e in wire.entries]
    assert journal == cl.journal
    replayed = Cluster.replay(scenario.config, scenario.nodes, scenario.start, journal)
    direct = Cluster.replay(scenario.config, scenario.nodes, scenario.start, cl.journal)
    assert state_json(replayed) == state_json(direct)
    # Against the live cluster, everything recorded comes back; what is derived from GPU-hour
    # metering (funding classes, consumed hours) is not compared: the core's replay charges the
    # meter only at journal instants, so it drifts where funding changed at a timer that wrote
    # no fact — a property of Cluster.replay, not of the wire.
    def recorded(cluster: Cluster) -> dict[str, Any]:
        state = state_json(cluster)
        return {
            "runs": [{k: v for k, v in r.items() if k != "funding"} for r in state["runs"]],
            "leases": [{k: v for k, v in lease.items() if k != "class"} for lease in state["leases"]],
            "reservations": state["reservations"],
        }

    assert recorded(replayed) == recorded(cl)


def test_a_batch_round_trips_in_order_and_names_a_bad_member() -> None:
    msg = convert.batch_to_proto(COMMANDS[:3], command_id="b-1", instant=T0)
    wire = bus.Command.FromString(msg.SerializeToString())
    assert convert.commands_from_proto(wire) == COMMANDS[:3]
    assert convert.commands_from_proto(convert.command_to_proto(COMMANDS[3])) == [COMMANDS[3]]
    wire.batch.commands[1].delete_run.run.ClearField("name")
    with pytest.raises(ValidationError) as info:
        convert.commands_from_proto(wire)
    assert info.value.path == "batch.commands[1].delete_run.run.name"


# --- object size (issue 13, D6) -------------------------------------------------------------------


def _big_run(annotation_bytes: int) -> dict[str, Any]:
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run",
            "metadata": {"name": "big", "annotations": {"example.org/notes": "x" * annotation_bytes}},
            "spec": {"owner": "org:a", "resources": {"gpuType": "H100-80GB", "totalGPUs": 8},
                     "roles": [{"name": "worker", "template": {"note": "y" * 1000}}]}}


def test_objects_are_bounded_in_size_naming_the_largest_field() -> None:
    assert isinstance(convert.parse_manifest(_big_run(200_000)).model, Run)
    with pytest.raises(ValidationError) as err:
        convert.parse_manifest(_big_run(300_000))
    assert err.value.path == "metadata.annotations"
    assert err.value.problem.startswith("makes the Run 301,")
    assert err.value.problem.endswith("a Run may be at most 262,144 bytes (256 KiB)")
    msg = convert.manifest_to_proto(_big_run(1000))
    assert isinstance(msg, pb.Run)
    msg.spec.roles[0].update({"blob": "z" * 400_000})
    with pytest.raises(ValidationError) as err:
        convert.run_from_proto(msg, "run")
    assert err.value.path == "run.spec.roles"
