"""Scenario files (SCENARIOS.md, "Input") parsed into typed, validated values.

Contract: `parse_scenario(text)` turns the YAML text of a scenario into a `Scenario` whose step
times are absolute Unix seconds, whose nodes and manifests are core model values, and whose
actions are small frozen dataclasses. Everything malformed raises `ScenarioError` with one line
naming the step and the field (`steps[3].shrink.desiredTotalGPUs: ...`). Statically checkable
references are checked too: runs must have been applied by an earlier step, nodes must exist,
snapshot labels are unique and `final` is reserved for the runner.
Not: the player — `jobtree.sim.runner` executes a `Scenario`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobtree.core.errors import ValidationError
from jobtree.core.manifest import generate_nodes, parse_manifest, parse_node
from jobtree.core.model import Budget, ClusterConfig, Node, Run
from jobtree.core.timefmt import format_duration, format_time, parse_duration, parse_time

FINAL_LABEL = "final"
"""The snapshot the runner always records at the end; scenarios may not use the label."""


class ScenarioError(ValueError):
    """A malformed scenario; the message is one line naming the step and field."""


# --- Values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyAction:
    """Create or update Budgets and Runs, in order (kubectl apply)."""

    objects: list[Budget | Run]


@dataclass(frozen=True, slots=True)
class CompleteAction:
    """The workload of `run` (`namespace/name`) reports success."""

    run: str


@dataclass(frozen=True, slots=True)
class FailAction:
    """The workload of `run` reports failure."""

    run: str


@dataclass(frozen=True, slots=True)
class FailNodeAction:
    """Fence a node (it failed)."""

    node: str


@dataclass(frozen=True, slots=True)
class CordonAction:
    node: str


@dataclass(frozen=True, slots=True)
class UncordonAction:
    """Extension: return a cordoned node to Ready."""

    node: str


@dataclass(frozen=True, slots=True)
class DeleteAction:
    """Cancel a run: its open leases close `Cancelled`."""

    run: str


@dataclass(frozen=True, slots=True)
class ShrinkAction:
    """Set the desired width of an elastic run."""

    run: str
    desired: int


@dataclass(frozen=True, slots=True)
class EtaAction:
    """The workload's estimated completion, absolute Unix seconds."""

    run: str
    at: int


@dataclass(frozen=True, slots=True)
class SnapshotAction:
    label: str


@dataclass(frozen=True, slots=True)
class NoAction:
    """A step with only `at`: time moves on, nothing else happens."""


Action = (
    ApplyAction
    | CompleteAction
    | FailAction
    | FailNodeAction
    | CordonAction
    | UncordonAction
    | DeleteAction
    | ShrinkAction
    | EtaAction
    | SnapshotAction
    | NoAction
)


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    at: int
    """Absolute Unix seconds."""
    action: Action


@dataclass(frozen=True, slots=True)
class Scenario:
    start: int
    config: ClusterConfig
    nodes: list[Node]
    steps: list[Step] = field(default_factory=list)

    @property
    def snapshot_labels(self) -> list[str]:
        return [s.action.label for s in self.steps if isinstance(s.action, SnapshotAction)]


# --- YAML loading ------------------------------------------------------------------------


MAX_YAML_DEPTH = 64
"""Deepest nesting of collections a YAML document may have (PyYAML composes recursively: a
5,000-deep document ended in RecursionError)."""
MAX_YAML_NODES = 1_000_000
"""Most nodes a YAML document may stand for once its aliases are expanded (an alias bomb: a
few hundred bytes that stand for billions of nodes burned a minute of CPU downstream)."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without implicit timestamps (RFC3339 stays text) and without duplicate keys,
    bounded: at most MAX_YAML_DEPTH levels of nesting and MAX_YAML_NODES nodes with aliases
    expanded (counted on the composed graph, in time linear in its size); no recursive alias."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels; flatten the document",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes `node` stands for with every alias expanded (each shared node counted once
    per reference, computed once); ComposerError for an alias that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it "
                                          "(a recursive structure); not allowed", node.start_mark)
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, sizes, open_) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if total > MAX_YAML_NODES:  # the innermost node past the bound: where the bomb is
        raise yaml.composer.ComposerError(
            None, None, f"this node stands for {total:,} nodes once its aliases are expanded; at most "
            f"{MAX_YAML_NODES:,} are allowed in a document (an alias bomb?)", node.start_mark)
    sizes[key] = total
    return total


_StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable mapping key", key_node.start_mark
            ) from None
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> object:
    """Parse YAML text strictly (no timestamps, no duplicate keys, bounded); errors as one-line
    ScenarioError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise _yaml_error(e) from None


def load_yaml_all(text: str) -> list[object]:
    """Every non-empty document of a multi-document YAML text, loaded as `load_yaml` loads one."""
    try:
        return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        raise _yaml_error(e) from None


def _yaml_error(e: yaml.YAMLError) -> ScenarioError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        return ScenarioError(f"invalid YAML: {where}{problem}")
    return ScenarioError(f"invalid YAML: {' '.join(str(e).split())}")


# --- Parsing -----------------------------------------------------------------------------

TOP_LEVEL_KEYS = ("start", "config", "nodes", "steps")
CONFIG_KEYS = ("cluster", "period", "reservationLead", "preemptionHoldDown", "capAllowances")
ACTION_KEYS = (
    "apply",
    "complete",
    "fail",
    "failNode",
    "cordon",
    "uncordon",
    "delete",
    "shrink",
    "eta",
    "snapshot",
)
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def parse_scenario(text: str) -> Scenario:
    """A scenario from its YAML text."""
    return scenario_from_doc(load_yaml(text))


def load_scenario(path: str | Path) -> Scenario:
    """A scenario from a file; unreadable files raise ScenarioError too."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ScenarioError(f"{p}: is a directory, not a scenario file") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read: {e.strerror or e}") from None
    return parse_scenario(text)


def scenario_from_doc(doc: object) -> Scenario:
    """A scenario from an already loaded YAML document."""
    if doc is None:
        raise ScenarioError("scenario: the file is empty; expected a mapping with start, nodes and steps")
    top = _mapping(doc, "scenario")
    _no_unknown_keys(top, TOP_LEVEL_KEYS, "", "top-level key")
    if "start" not in top:
        raise ScenarioError('start: required (the RFC3339 time of step 0, e.g. "2026-01-05T00:00:00Z")')
    start = _checked(parse_time, top["start"], "start")
    config = _parse_config(top.get("config"))
    nodes = _parse_nodes(top.get("nodes"))
    if "steps" not in top:
        raise ScenarioError("steps: required (a list of steps, possibly empty)")
    steps = _StepParser(start, nodes).parse(top["steps"])
    return Scenario(start=start, config=config, nodes=nodes, steps=steps)


def _checked(fn: Callable[[object, str], int], value: object, path: str) -> int:
    """Call a timefmt parser, turning its ValidationError into a ScenarioError."""
    try:
        return fn(value, path)
    except ValidationError as e:
        raise ScenarioError(str(e)) from None


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{path}: must be a mapping, got {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            raise ScenarioError(f"{path}: keys must be strings, got {k!r}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _no_unknown_keys(m: Mapping[str, Any], allowed: tuple[str, ...], path: str, what: str) -> None:
    for k in m:
        if k not in allowed:
            raise ScenarioError(f"{_join(path, k)}: unknown {what}; allowed: {', '.join(allowed)}")


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScenarioError(f"{path}: must be a positive integer, got {_show(value)}")
    return value


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _parse_config(raw: object) -> ClusterConfig:
    if raw is None:
        return ClusterConfig()
    m = _mapping(raw, "config")
    _no_unknown_keys(m, CONFIG_KEYS, "config", "config key")
    default = ClusterConfig()
    cluster = m.get("cluster", default.cluster)
    if not isinstance(cluster, str) or not _NAME.match(cluster):
        raise ScenarioError(f"config.cluster: must be a cluster name such as gpu-a, got {_show(cluster)}")
    period = _checked(parse_duration, m.get("period", default.period), "config.period")
    if period <= 0:
        raise ScenarioError("config.period: must be longer than 0s")
    lead = _checked(
        parse_duration, m.get("reservationLead", default.reservation_lead), "config.reservationLead"
    )
    hold = _checked(
        parse_duration, m.get("preemptionHoldDown", default.preemption_hold_down), "config.preemptionHoldDown"
    )
    allowances: list[tuple[str, int]] = []
    if "capAllowances" in m:
        am = _mapping(m["capAllowances"], "config.capAllowances")
        for key, gpus in am.items():
            path = f"config.capAllowances.{key}"
            budget, sep, cap = key.partition("/")
            if not sep or not budget or not cap or "/" in cap:
                raise ScenarioError(f"{path}: key must be BUDGET/CAP, got {key!r}")
            if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
                raise ScenarioError(f"{path}: must be a GPU count (an integer >= 0), got {_show(gpus)}")
            allowances.append((key, gpus))
    return ClusterConfig(
        cluster=cluster,
        period=period,
        reservation_lead=lead,
        preemption_hold_down=hold,
        cap_allowances=tuple(sorted(allowances)),
    )


def _parse_nodes(raw: object) -> list[Node]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ScenarioError(f"nodes: must be a list of nodes or {{generate: ...}} items, got {_kind(raw)}")
    nodes: list[Node] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(raw):
        path = f"nodes[{i}]"
        m = _mapping(item, path)
        try:
            made = generate_nodes(m, path) if "generate" in m else [parse_node(m, path)]
        except ValidationError as e:
            raise ScenarioError(str(_under(e, path))) from None
        for node in made:
            if node.name in seen:
                raise ScenarioError(
                    f"{path}: duplicate node name {node.name!r} (first defined at {seen[node.name]})"
                )
            seen[node.name] = path
            nodes.append(node)
    return nodes


def _under(e: ValidationError, prefix: str) -> ValidationError:
    """`e` with its path under `prefix`, unless the parser already put it there."""
    if e.path == prefix or e.path.startswith((prefix + ".", prefix + "[")):
        return e
    return e.under(prefix)


def _describe_offset(t: int, start: int) -> str:
    return f"{format_duration(t - start)} ({format_time(t)})" if t >= start else format_time(t)


class _StepParser:
    """Parses steps in order, tracking time, applied runs and snapshot labels."""

    def __init__(self, start: int, nodes: list[Node]) -> None:
        self.start = start
        self.node_names = {n.name for n in nodes}
        self.runs: dict[str, Run] = {}
        """Latest applied spec of every run key applied so far."""
        self.deleted: dict[str, int] = {}
        """Runs deleted and not applied again since, with the deleting step's index."""
        self.labels: dict[str, int] = {}

    def parse(self, raw: object) -> list[Step]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ScenarioError(f"steps: must be a list of steps, got {_kind(raw)}")
        steps: list[Step] = []
        now = self.start
        for i, item in enumerate(raw):
            path = f"steps[{i}]"
            m = _mapping(item, path)
            actions = [k for k in m if k != "at"]
            unknown = [k for k in actions if k not in ACTION_KEYS]
            if unknown:
                raise ScenarioError(
                    f"{path}.{unknown[0]}: unknown step key; a step has `at` and one of: {', '.join(ACTION_KEYS)}"
                )
            if len(actions) > 1:
                raise ScenarioError(
                    f"{path}: a step has exactly one action, got {len(actions)} ({', '.join(actions)}); "
                    "split it into several steps (a step without `at` keeps the previous time)"
                )
            if not m:
                raise ScenarioError(f"{path}: empty step; give `at` and/or one of: {', '.join(ACTION_KEYS)}")
            if "at" in m:
                at = self._time(m["at"], f"{path}.at")
                if at < now:
                    raise ScenarioError(
                        f"{path}.at: time moves backwards: {_describe_offset(at, self.start)} is before the "
                        f"previous step's {_describe_offset(now, self.start)}"
                    )
                now = at
            action: Action = NoAction()
            if actions:
                key = actions[0]
                action = self._action(key, m[key], f"{path}.{key}", i)
            steps.append(Step(index=i, at=now, action=action))
        return steps

    def _time(self, value: object, path: str) -> int:
        """A duration offset from start, or an RFC3339 instant not before start."""
        if isinstance(value, bool) or value is None:
            raise ScenarioError(
                f"{path}: must be an offset from start such as 10m or an RFC3339 time, got {_show(value)}"
            )
        if isinstance(value, float):
            raise ScenarioError(f"{path}: must be whole seconds or a duration such as 10m, got {value}")
        try:
            return self.start + parse_duration(value, path)
        except ValidationError as dur_err:
            if isinstance(value, str) and re.match(r"^\d{4}-\d{2}-\d{2}", value.strip()):
                t = _checked(parse_time, value, path)
                if t < self.start:
                    raise ScenarioError(
                        f"{path}: {value} is before the scenario start {format_time(self.start)}"
                    ) from None
                return t
            if isinstance(value, int) or (isinstance(value, str) and value.strip().startswith("-")):
                raise ScenarioError(f"{path}: must not be negative, got {_show(value)}") from None
            if isinstance(value, str) and "whole seconds" in dur_err.problem:
                raise ScenarioError(str(dur_err)) from None
            raise ScenarioError(
                f"{path}: must be an offset from start such as 10m or 1h30m, or an RFC3339 time, got {_show(value)}"
            ) from None

    def _action(self, key: str, value: object, path: str, index: int) -> Action:
        if key == "apply":
            return self._apply(value, path)
        if key in ("complete", "fail", "delete"):
            run = self._run_ref(value, path)
            if key == "delete":
                self.deleted[run] = index
            if key == "complete":
                return CompleteAction(run)
            return FailAction(run) if key == "fail" else DeleteAction(run)
        if key in ("failNode", "cordon", "uncordon"):
            node = self._node_ref(value, path)
            if key == "failNode":
                return FailNodeAction(node)
            return CordonAction(node) if key == "cordon" else UncordonAction(node)
        if key == "shrink":
            return self._shrink(value, path)
        if key == "eta":
            return self._eta(value, path)
        if key == "snapshot":
            return self._snapshot(value, path, index)
        raise AssertionError(key)  # pragma: no cover - ACTION_KEYS is checked by the caller

    def _apply(self, value: object, path: str) -> ApplyAction:
        if not isinstance(value, list):
            raise ScenarioError(f"{path}: must be a list of Budget and Run manifests, got {_kind(value)}")
        if not value:
            raise ScenarioError(f"{path}: must list at least one manifest")
        objects: list[Budget | Run] = []
        for j, doc in enumerate(value):
            p = f"{path}[{j}]"
            if not isinstance(doc, Mapping):
                raise ScenarioError(f"{p}: must be a Budget or Run manifest (a mapping), got {_kind(doc)}")
            try:
                obj = parse_manifest(doc, p)
            except ValidationError as e:
                raise ScenarioError(str(_under(e, p))) from None
            if isinstance(obj, Run):
                self.runs[obj.key] = obj
                self.deleted.pop(obj.key, None)
            objects.append(obj)
        return ApplyAction(objects=objects)

    def _run_ref(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise ScenarioError(f"{path}: must be a run reference namespace/name, got {_kind(value)}")
        ns, sep, name = value.partition("/")
        if not sep or not _NAME.match(ns) or not _NAME.match(name):
            raise ScenarioError(f"{path}: must be a run reference namespace/name, got {value!r}")
        if value not in self.runs:
            known = ", ".join(sorted(self.runs)) or "none"
            raise ScenarioError(f"{path}: run {value} is not applied by any earlier step (applied: {known})")
        if value in self.deleted:
            raise ScenarioError(
                f"{path}: run {value} was deleted by steps[{self.deleted[value]}] and not applied again since"
            )
        return value

    def _node_ref(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise ScenarioError(f"{path}: must be a node name, got {_kind(value)}")
        if value not in self.node_names:
            raise ScenarioError(f"{path}: no node named {value!r} in nodes")
        return value

    def _shrink(self, value: object, path: str) -> ShrinkAction:
        m = _mapping(value, path)
        _no_unknown_keys(m, ("run", "desiredTotalGPUs"), path, "shrink key")
        if "run" not in m:
            raise ScenarioError(f"{path}.run: required (the run reference namespace/name)")
        run = self._run_ref(m["run"], f"{path}.run")
        if "desiredTotalGPUs" not in m:
            raise ScenarioError(f"{path}.desiredTotalGPUs: required (the new desired width in GPUs)")
        dpath = f"{path}.desiredTotalGPUs"
        desired = _positive_int(m["desiredTotalGPUs"], dpath)
        mal = self.runs[run].spec.malleable
        if mal is None:
            raise ScenarioError(f"{dpath}: run {run} is not elastic (its last applied spec has no malleable)")
        if not mal.min_total <= desired <= mal.max_total:
            raise ScenarioError(
                f"{dpath}: must lie in [minTotalGPUs, maxTotalGPUs] = [{mal.min_total}, {mal.max_total}], "
                f"got {desired}"
            )
        if (desired - mal.min_total) % mal.step:
            raise ScenarioError(
                f"{dpath}: must be minTotalGPUs {mal.min_total} plus whole steps of {mal.step}, got {desired}"
            )
        return ShrinkAction(run=run, desired=desired)

    def _eta(self, value: object, path: str) -> EtaAction:
        m = _mapping(value, path)
        _no_unknown_keys(m, ("run", "at"), path, "eta key")
        if "run" not in m:
            raise ScenarioError(f"{path}.run: required (the run reference namespace/name)")
        run = self._run_ref(m["run"], f"{path}.run")
        if "at" not in m:
            raise ScenarioError(f"{path}.at: required (offset from start such as 40m, or an RFC3339 time)")
        return EtaAction(run=run, at=self._time(m["at"], f"{path}.at"))

    def _snapshot(self, value: object, path: str, index: int) -> SnapshotAction:
        if not isinstance(value, str) or not value.strip():
            raise ScenarioError(f"{path}: must be a non-empty label, got {_kind(value)}")
        if value != value.strip():
            raise ScenarioError(f"{path}: label must not start or end with whitespace, got {value!r}")
        if value == FINAL_LABEL:
            raise ScenarioError(f"{path}: the label {FINAL_LABEL!r} is reserved for the state at the end")
        if value in self.labels:
            raise ScenarioError(
                f"{path}: duplicate snapshot label {value!r} (first used by steps[{self.labels[value]}])"
            )
        self.labels[value] = index
        return SnapshotAction(label=value)
