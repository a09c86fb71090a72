"""Kubectl-style manifests (plain dicts from YAML) to the immutable model, with field-level validation.

Contract: `parse_manifest` (or `parse_budget` / `parse_run`) turns one `Budget` or `Run`
manifest of apiVersion `rq.davidlangworthy.io/v1` into a `model.Budget` / `model.Run`;
`parse_node` and `generate_nodes` turn a scenario's node entries into `model.Node`s. Parsing is
strict: an unknown field, a wrong type (a bool is not a number), a missing required field or a
value outside what CALCULUS §1 allows raises `ValidationError(path, problem)`. `path` is the
dotted field path under the caller's `path` prefix, list items written `[i]` (for example
`steps[0].apply[1].spec.resources.totalGPUs`); `problem` says what was wrong and what is allowed.
An explicit YAML `null` counts as an absent field. Every rule that one manifest alone can break
is checked here; defaults of CALCULUS §1 are filled in (desired width, follow grace, sharing).

Not: cross-object validation (the family DAG being acyclic, `follow.after` runs existing,
flavors existing on nodes), defaults that come from cluster settings (`period` stays None when
absent), YAML loading, or a serializer back to manifests. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import NamedTuple, TypeVar

from jobtree.core.errors import ValidationError
from jobtree.core.errors import field_path as _at
from jobtree.core.errors import item_path as _item
from jobtree.core.errors import show_value as _show
from jobtree.core.model import (
    REQUIRED_NODE_LABELS,
    AggregateCap,
    Budget,
    Envelope,
    FailurePolicy,
    Follow,
    Funding,
    Labels,
    Lending,
    Locality,
    Malleable,
    Node,
    PreActivation,
    Run,
    RunSpec,
    Sharing,
    labels_of,
)
from jobtree.core.timefmt import HOUR, format_time, parse_duration, parse_time

__all__ = [
    "API_VERSION",
    "NOTIFY_ANNOTATION",
    "NOTIFY_KINDS_ANNOTATION",
    "RUNTIME_ANNOTATION",
    "generate_nodes",
    "parse_budget",
    "parse_manifest",
    "parse_node",
    "parse_run",
]

API_VERSION = "rq.davidlangworthy.io/v1"
RUNTIME_ANNOTATION = "jobtree.sim/runtime"
NOTIFY_ANNOTATION = "rq.davidlangworthy.io/notify"
"""A Run's own notifications: receiver names, comma-separated (the notifier's config allows them)."""
NOTIFY_KINDS_ANNOTATION = "rq.davidlangworthy.io/notify-kinds"
"""... and the event kinds it wants (comma-separated; absent: every kind about the run)."""
_SIM_ANNOTATION_PREFIX = "jobtree.sim/"

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec")
_METADATA_OPTIONAL = ("namespace", "annotations", "labels")
_BUDGET_SPEC_OPTIONAL = ("parents", "period", "envelopes", "aggregateCaps")
ENVELOPE_REQUIRED = ("name", "flavor", "concurrency")
_ENVELOPE_REQUIRED = ENVELOPE_REQUIRED
_ENVELOPE_OPTIONAL = ("selector", "maxGPUHours", "start", "end", "sharing", "preActivation", "lending")
_RUN_SPEC_OPTIONAL = (
    "locality",
    "sparesPerGroup",
    "malleable",
    "funding",
    "follow",
    "runtime",
    "roles",
)

NAME_PATTERN = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
"""Names of objects, envelopes, caps and upstream runs (DNS-1123 subdomain style); the CRDs
(`jobtree.api.crds`) carry the same pattern."""
NAME_MAX = 253
_NAME = re.compile(NAME_PATTERN)
_NAME_MAX = NAME_MAX
_NAME_RULE = "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAMESPACE_MAX = 63
_NAMESPACE_RULE = (
    "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
)

T = TypeVar("T")
E = TypeVar("E", bound=Enum)
Parse = Callable[[object, str], T]


# --- Paths and value rendering -------------------------------------------------------------








# --- Field readers -------------------------------------------------------------------------


def _fields(
    value: object, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, object]:
    """A mapping with exactly the allowed fields and every required one; null values dropped."""
    allowed = (*required, *optional)
    if not isinstance(value, dict):
        raise ValidationError(path, f"must be a mapping with fields {', '.join(allowed)}; got {_show(value)}")
    out: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValidationError(path, f"field names must be strings, got {_show(key)}")
        if key not in allowed:
            raise ValidationError(
                _at(path, key), f"unknown field {key!r}; allowed here: {', '.join(allowed)}"
            )
        if item is not None:
            out[key] = item
    for key in required:
        if key not in out:
            raise ValidationError(_at(path, key), "is required")
    return out


def _optional(fields: Mapping[str, object], key: str, path: str, parse: Parse[T]) -> T | None:
    """`parse` of field `key` if present, else None."""
    return parse(fields[key], _at(path, key)) if key in fields else None


def _or(fields: Mapping[str, object], key: str, path: str, parse: Parse[T], default: T) -> T:
    """`parse` of field `key` if present, else `default`."""
    return parse(fields[key], _at(path, key)) if key in fields else default


def _int(value: object, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValidationError(path, f"must be {kind}, got {_show(value)}")
    return value


def _count(value: object, path: str) -> int:
    return _int(value, path, 0)


def _positive(value: object, path: str) -> int:
    return _int(value, path, 1)


def _gpu_hours(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValidationError(path, f"must be a non-negative number of GPU-hours, got {_show(value)}")
    return float(value)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(path, f"must be true or false, got {_show(value)}")
    return value


MAX_LIST_ITEMS = 256
"""Most items of any list in a manifest (`spec.follow.after`, `spec.funding.sponsors`,
`spec.roles`, `spec.parents`, `spec.envelopes`, `spec.aggregateCaps`, a cap's envelopes): a
valid run of 10,000 upstreams was 1-4 MB and could not be carried on the bus. The size of a
whole object is bounded where it is serialised (`jobtree.api.convert.MAX_OBJECT_BYTES`)."""


def _list(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise ValidationError(path, f"must be a list, got {_show(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise ValidationError(path, f"has {len(value):,} items; at most {MAX_LIST_ITEMS} are allowed")
    return value


def _unique(value: object, path: str, parse: Parse[str], what: str) -> tuple[str, ...]:
    """A list of strings, each parsed by `parse`, none repeated."""
    seen: dict[str, None] = {}
    for i, item in enumerate(_list(value, path)):
        text = parse(item, _item(path, i))
        if text in seen:
            raise ValidationError(_item(path, i), f"duplicate {what} {text!r}; each may be listed once")
        seen[text] = None
    return tuple(seen)


def _token(value: object, path: str, what: str) -> str:
    """A non-empty string without whitespace."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValidationError(
            path, f"must be {what}: a non-empty string without whitespace; got {_show(value)}"
        )
    return value


def _owner(value: object, path: str) -> str:
    return _token(value, path, "an owner id such as org:ai:rai")


def _flavor(value: object, path: str) -> str:
    return _token(value, path, "a GPU flavor such as H100-80GB")


def _lend_target(value: object, path: str) -> str:
    """An owner id, or an owner-id prefix ending in `*`."""
    text = _token(value, path, "an owner id, or a prefix ending in '*' such as org:ai:*")
    if "*" in text[:-1]:
        raise ValidationError(path, f"may contain '*' only at the end (a prefix match), got {_show(value)}")
    return text


def _name(value: object, path: str) -> str:
    """A DNS-1123 subdomain-style name."""
    if not isinstance(value, str) or len(value) > _NAME_MAX or not _NAME.fullmatch(value):
        raise ValidationError(path, f"must be a name of {_NAME_RULE}; got {_show(value)}")
    return value


def _namespace(value: object, path: str) -> str:
    """A DNS-1123 label, as Kubernetes namespaces are."""
    if not isinstance(value, str) or len(value) > _NAMESPACE_MAX or not _NAMESPACE.fullmatch(value):
        raise ValidationError(path, f"must be a namespace of {_NAMESPACE_RULE}; got {_show(value)}")
    return value


def _string_map(value: object, path: str) -> dict[str, str]:
    """A label or annotation map: non-empty keys without whitespace, string values."""
    if not isinstance(value, dict):
        raise ValidationError(path, f"must be a mapping of strings to strings, got {_show(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            raise ValidationError(
                path, f"keys must be non-empty strings without whitespace, got {_show(key)}"
            )
        if not isinstance(item, str):
            raise ValidationError(
                _at(path, key), f"must be a string (quote numbers and booleans in YAML), got {_show(item)}"
            )
        out[key] = item
    return out


def _selector(value: object, path: str) -> Labels:
    return labels_of(_string_map(value, path))


def _choice(value: object, path: str, kind: type[E]) -> E:
    for member in kind:
        if isinstance(value, str) and value == member.value:
            return member
    allowed = ", ".join(str(member.value) for member in kind)
    raise ValidationError(path, f"must be one of {allowed}; got {_show(value)}")


def _sharing(value: object, path: str) -> Sharing:
    return _choice(value, path, Sharing)


def _failure_policy(value: object, path: str) -> FailurePolicy:
    return _choice(value, path, FailurePolicy)


def _duration(value: object, path: str) -> int:
    """A Go-style duration, zero allowed."""
    return parse_duration(value, path)


def _positive_duration(value: object, path: str) -> int:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise ValidationError(path, f"must be a positive duration such as 30m or 1h, got {_show(value)}")
    return seconds


# --- Manifest envelope: apiVersion, kind, metadata -----------------------------------------


class _Metadata(NamedTuple):
    name: str
    namespace: str | None
    annotations: dict[str, str]


def _manifest(doc: object, path: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, object]]:
    """The kind and top-level fields of a manifest whose kind is one of `kinds`."""
    fields = _fields(doc, path, _TOP_LEVEL)
    if fields["apiVersion"] != API_VERSION:
        raise ValidationError(
            _at(path, "apiVersion"), f"must be {API_VERSION}, got {_show(fields['apiVersion'])}"
        )
    kind = fields["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        raise ValidationError(_at(path, "kind"), f"must be {' or '.join(kinds)}, got {_show(kind)}")
    return kind, fields


def _annotations(value: object, path: str) -> dict[str, str]:
    notes = _string_map(value, path)
    for key in notes:
        if key.startswith(_SIM_ANNOTATION_PREFIX) and key != RUNTIME_ANNOTATION:
            raise ValidationError(
                _at(path, key), f"unknown simulator annotation; allowed: {RUNTIME_ANNOTATION}"
            )
    return notes


def _metadata(value: object, path: str) -> _Metadata:
    fields = _fields(value, path, ("name",), _METADATA_OPTIONAL)
    _optional(fields, "labels", path, _string_map)  # validated, not stored
    return _Metadata(
        name=_name(fields["name"], _at(path, "name")),
        namespace=_optional(fields, "namespace", path, _namespace),
        annotations=_optional(fields, "annotations", path, _annotations) or {},
    )


# --- Budget --------------------------------------------------------------------------------


def _pre_activation(value: object, path: str) -> PreActivation:
    fields = _fields(value, path, (), ("allowReservations", "allowAdmission"))
    return PreActivation(
        allow_reservations=_or(fields, "allowReservations", path, _bool, False),
        allow_admission=_or(fields, "allowAdmission", path, _bool, False),
    )


def _lending(value: object, path: str) -> Lending:
    fields = _fields(value, path, (), ("allow", "to", "maxConcurrency", "maxGPUHours"))
    return Lending(
        allow=_or(fields, "allow", path, _bool, False),
        to=_unique(fields.get("to", []), _at(path, "to"), _lend_target, "lending target"),
        max_concurrency=_optional(fields, "maxConcurrency", path, _count),
        max_gpu_hours=_optional(fields, "maxGPUHours", path, _gpu_hours),
    )


def _window(fields: dict[str, object], path: str) -> tuple[int | None, int | None]:
    start = _optional(fields, "start", path, parse_time)
    end = _optional(fields, "end", path, parse_time)
    if start is not None and end is not None and end <= start:
        raise ValidationError(
            _at(path, "end"), f"must be after start ({format_time(start)}), got {format_time(end)}"
        )
    return start, end


def _envelope(value: object, path: str) -> Envelope:
    fields = _fields(value, path, _ENVELOPE_REQUIRED, _ENVELOPE_OPTIONAL)
    start, end = _window(fields, path)
    return Envelope(
        name=_name(fields["name"], _at(path, "name")),
        flavor=_flavor(fields["flavor"], _at(path, "flavor")),
        selector=_or(fields, "selector", path, _selector, ()),
        concurrency=_count(fields["concurrency"], _at(path, "concurrency")),
        max_gpu_hours=_optional(fields, "maxGPUHours", path, _gpu_hours),
        start=start,
        end=end,
        sharing=_or(fields, "sharing", path, _sharing, Sharing.FAMILY),
        pre_activation=_or(fields, "preActivation", path, _pre_activation, PreActivation()),
        lending=_or(fields, "lending", path, _lending, Lending()),
    )


def _envelopes(value: object, path: str) -> tuple[Envelope, ...]:
    out: list[Envelope] = []
    for i, item in enumerate(_list(value, path)):
        envelope = _envelope(item, _item(path, i))
        if any(e.name == envelope.name for e in out):
            raise ValidationError(
                _at(_item(path, i), "name"),
                f"duplicate envelope name {envelope.name!r}; names must be unique within the budget",
            )
        out.append(envelope)
    return tuple(out)


def _cap_members(value: object, path: str, flavor: str, envelopes: tuple[Envelope, ...]) -> tuple[str, ...]:
    """The envelope names of a cap: at least one, each an envelope of this budget with the cap's flavor."""
    members = _unique(value, path, _name, "envelope")
    if not members:
        raise ValidationError(path, "must name at least one envelope of this budget")
    by_name = {e.name: e for e in envelopes}
    for i, member in enumerate(members):
        envelope = by_name.get(member)
        if envelope is None:
            known = ", ".join(by_name) or "(none)"
            raise ValidationError(
                _item(path, i), f"names no envelope of this budget: {member!r}; envelopes are {known}"
            )
        if envelope.flavor != flavor:
            raise ValidationError(
                _item(path, i),
                f"envelope {member!r} has flavor {envelope.flavor!r}, but the cap's flavor is {flavor!r}",
            )
    return members


def _aggregate_cap(value: object, path: str, envelopes: tuple[Envelope, ...]) -> AggregateCap:
    fields = _fields(value, path, ("name", "flavor", "envelopes"), ("maxConcurrency", "maxGPUHours"))
    flavor = _flavor(fields["flavor"], _at(path, "flavor"))
    cap = AggregateCap(
        name=_name(fields["name"], _at(path, "name")),
        flavor=flavor,
        envelopes=_cap_members(fields["envelopes"], _at(path, "envelopes"), flavor, envelopes),
        max_concurrency=_optional(fields, "maxConcurrency", path, _count),
        max_gpu_hours=_optional(fields, "maxGPUHours", path, _gpu_hours),
    )
    if cap.max_concurrency is None and cap.max_gpu_hours is None:
        raise ValidationError(
            path, "must set maxConcurrency, maxGPUHours or both (a cap without either bounds nothing)"
        )
    return cap


def _aggregate_caps(value: object, path: str, envelopes: tuple[Envelope, ...]) -> tuple[AggregateCap, ...]:
    out: list[AggregateCap] = []
    for i, item in enumerate(_list(value, path)):
        cap = _aggregate_cap(item, _item(path, i), envelopes)
        if any(c.name == cap.name for c in out):
            raise ValidationError(
                _at(_item(path, i), "name"),
                f"duplicate aggregate cap name {cap.name!r}; names must be unique within the budget",
            )
        out.append(cap)
    return tuple(out)


def _parents(value: object, path: str, owner: str) -> tuple[str, ...]:
    parents = _unique(value, path, _owner, "parent")
    for i, parent in enumerate(parents):
        if parent == owner:
            raise ValidationError(_item(path, i), f"must not be the budget's own owner {owner!r} (a cycle)")
    return parents


def _budget(fields: dict[str, object], path: str) -> Budget:
    meta = _metadata(fields["metadata"], _at(path, "metadata"))
    if RUNTIME_ANNOTATION in meta.annotations:
        raise ValidationError(
            _at(_at(path, "metadata.annotations"), RUNTIME_ANNOTATION), "applies to Runs only"
        )
    spec_path = _at(path, "spec")
    spec = _fields(fields["spec"], spec_path, ("owner",), _BUDGET_SPEC_OPTIONAL)
    owner = _owner(spec["owner"], _at(spec_path, "owner"))
    envelopes = _envelopes(spec.get("envelopes", []), _at(spec_path, "envelopes"))
    return Budget(
        name=meta.name,
        owner=owner,
        parents=_parents(spec.get("parents", []), _at(spec_path, "parents"), owner),
        period=_optional(spec, "period", spec_path, _positive_duration),
        envelopes=envelopes,
        aggregate_caps=_aggregate_caps(
            spec.get("aggregateCaps", []), _at(spec_path, "aggregateCaps"), envelopes
        ),
    )


# --- Run -----------------------------------------------------------------------------------


def _resources(value: object, path: str) -> tuple[str, int]:
    fields = _fields(value, path, ("gpuType", "totalGPUs"))
    return (
        _flavor(fields["gpuType"], _at(path, "gpuType")),
        _positive(fields["totalGPUs"], _at(path, "totalGPUs")),
    )


def _locality(value: object, path: str) -> Locality:
    fields = _fields(value, path, (), ("groupGPUs", "allowCrossGroupSpread", "selector"))
    return Locality(
        group_gpus=_optional(fields, "groupGPUs", path, _positive),
        allow_cross_group_spread=_or(fields, "allowCrossGroupSpread", path, _bool, True),
        selector=_or(fields, "selector", path, _selector, ()),
    )


def _desired(fields: dict[str, object], path: str, low: int, high: int, step: int) -> int:
    """`desiredTotalGPUs`: in [low, high] and low plus whole steps; default the widest such width."""
    if "desiredTotalGPUs" not in fields:
        return low + (high - low) // step * step
    at = _at(path, "desiredTotalGPUs")
    desired = _positive(fields["desiredTotalGPUs"], at)
    if not low <= desired <= high:
        raise ValidationError(
            at, f"must be within [minTotalGPUs, maxTotalGPUs] = [{low}, {high}], got {desired}"
        )
    if (desired - low) % step:
        raise ValidationError(
            at, f"must be minTotalGPUs ({low}) plus a whole number of stepGPUs ({step}), got {desired}"
        )
    return desired


def _malleable(value: object, path: str, group_gpus: int | None) -> Malleable:
    fields = _fields(value, path, ("minTotalGPUs", "maxTotalGPUs", "stepGPUs"), ("desiredTotalGPUs",))
    low = _positive(fields["minTotalGPUs"], _at(path, "minTotalGPUs"))
    high = _positive(fields["maxTotalGPUs"], _at(path, "maxTotalGPUs"))
    if high < low:
        raise ValidationError(_at(path, "maxTotalGPUs"), f"must be >= minTotalGPUs ({low}), got {high}")
    step = _positive(fields["stepGPUs"], _at(path, "stepGPUs"))
    if group_gpus is not None and step % group_gpus:
        raise ValidationError(
            _at(path, "stepGPUs"), f"must be a multiple of locality.groupGPUs ({group_gpus}), got {step}"
        )
    return Malleable(
        min_total=low, max_total=high, step=step, desired=_desired(fields, path, low, high, step)
    )


def _funding(value: object, path: str) -> Funding:
    fields = _fields(value, path, (), ("allowBorrow", "maxBorrowGPUs", "sponsors"))
    return Funding(
        allow_borrow=_or(fields, "allowBorrow", path, _bool, False),
        max_borrow_gpus=_optional(fields, "maxBorrowGPUs", path, _count),
        sponsors=_unique(fields.get("sponsors", []), _at(path, "sponsors"), _owner, "sponsor"),
    )


def _follow(value: object, path: str, run_name: str) -> Follow:
    fields = _fields(value, path, ("after",), ("onUpstreamFailure", "upstreamFailureGrace"))
    after_path = _at(path, "after")
    after = _unique(fields["after"], after_path, _name, "upstream run")
    if not after:
        raise ValidationError(after_path, "must name at least one run (of the same namespace)")
    if run_name in after:
        raise ValidationError(
            _item(after_path, after.index(run_name)), f"a run cannot follow itself ({run_name!r})"
        )
    return Follow(
        after=after,
        on_upstream_failure=_or(fields, "onUpstreamFailure", path, _failure_policy, FailurePolicy.WAIT),
        upstream_failure_grace=_or(fields, "upstreamFailureGrace", path, _duration, HOUR),
    )


def _checkpoint(value: object, path: str) -> int | None:
    fields = _fields(value, path, (), ("checkpoint",))
    return _optional(fields, "checkpoint", path, _positive_duration)


def _roles(value: object, path: str) -> None:
    """Pod templates for the Kubernetes bridge: accepted, each a mapping, not stored."""
    for i, item in enumerate(_list(value, path)):
        if not isinstance(item, dict):
            raise ValidationError(
                _item(path, i), f"must be a mapping (a role's pod template), got {_show(item)}"
            )


def _spares(spec: dict[str, object], path: str, locality: Locality) -> int:
    spares = _or(spec, "sparesPerGroup", path, _count, 0)
    if spares and locality.group_gpus is None:
        raise ValidationError(
            _at(path, "sparesPerGroup"), "requires locality.groupGPUs (spares are held per group)"
        )
    return spares


def _check_total(total: int, malleable: Malleable | None, path: str) -> None:
    if malleable is not None and not malleable.min_total <= total <= malleable.max_total:
        raise ValidationError(
            path,
            f"must be within malleable [minTotalGPUs, maxTotalGPUs] = "
            f"[{malleable.min_total}, {malleable.max_total}], got {total}",
        )


def _run_spec(value: object, path: str, run_name: str, runtime: int | None) -> RunSpec:
    spec = _fields(value, path, ("owner", "resources"), _RUN_SPEC_OPTIONAL)
    owner = _owner(spec["owner"], _at(path, "owner"))
    gpu_type, total = _resources(spec["resources"], _at(path, "resources"))
    locality = _or(spec, "locality", path, _locality, Locality())
    malleable = _optional(spec, "malleable", path, lambda v, p: _malleable(v, p, locality.group_gpus))
    _check_total(total, malleable, _at(path, "resources.totalGPUs"))
    _optional(spec, "roles", path, _roles)
    return RunSpec(
        owner=owner,
        gpu_type=gpu_type,
        total_gpus=total,
        locality=locality,
        spares_per_group=_spares(spec, path, locality),
        malleable=malleable,
        funding=_or(spec, "funding", path, _funding, Funding()),
        follow=_optional(spec, "follow", path, lambda v, p: _follow(v, p, run_name)),
        checkpoint=_or(spec, "runtime", path, _checkpoint, None),
        runtime=runtime,
    )


def _run(fields: dict[str, object], path: str) -> Run:
    meta_path = _at(path, "metadata")
    meta = _metadata(fields["metadata"], meta_path)
    runtime = _optional(
        meta.annotations, RUNTIME_ANNOTATION, _at(meta_path, "annotations"), _positive_duration
    )
    notes_path = _at(meta_path, "annotations")
    return Run(
        namespace=meta.namespace or "default",
        name=meta.name,
        spec=_run_spec(fields["spec"], _at(path, "spec"), meta.name, runtime),
        notify=_names(meta.annotations.get(NOTIFY_ANNOTATION), _at(notes_path, NOTIFY_ANNOTATION)),
        notify_kinds=_names(meta.annotations.get(NOTIFY_KINDS_ANNOTATION), _at(notes_path, NOTIFY_KINDS_ANNOTATION)),
    )


_NOTIFY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _names(value: str | None, path: str) -> tuple[str, ...]:
    """A comma-separated list of names (receivers, event kinds), each at most 63 characters."""
    if value is None:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for n in names:
        if not _NOTIFY_NAME.fullmatch(n):
            raise ValidationError(path, f"{n!r} is not a name: letters, digits, '-', '_', '.', at most 63")
    if len(names) > 16:
        raise ValidationError(path, f"at most 16 names, got {len(names)}")
    return tuple(dict.fromkeys(names))


# --- Public API ----------------------------------------------------------------------------


def parse_manifest(doc: object, path: str = "") -> Budget | Run:
    """A `Budget` or `Run` manifest as a model object, dispatched on `kind`."""
    kind, fields = _manifest(doc, path, ("Budget", "Run"))
    return _budget(fields, path) if kind == "Budget" else _run(fields, path)


def parse_budget(doc: object, path: str = "") -> Budget:
    """A `Budget` manifest (cluster-scoped: `metadata.namespace` is optional and ignored)."""
    _, fields = _manifest(doc, path, ("Budget",))
    return _budget(fields, path)


def parse_run(doc: object, path: str = "") -> Run:
    """A `Run` manifest; `metadata.namespace` defaults to `default`."""
    _, fields = _manifest(doc, path, ("Run",))
    return _run(fields, path)


def _node_labels(value: object, path: str) -> Labels:
    labels = _string_map(value, path)
    for key in REQUIRED_NODE_LABELS:
        if not labels.get(key):
            raise ValidationError(
                _at(path, key),
                f"is required and must not be empty; every node needs labels {', '.join(REQUIRED_NODE_LABELS)}"
                " (rack is optional)",
            )
    return labels_of(labels)


def parse_node(doc: object, path: str = "") -> Node:
    """A scenario node entry `{name, gpus, labels}`."""
    fields = _fields(doc, path, ("name", "gpus", "labels"))
    return Node(
        name=_name(fields["name"], _at(path, "name")),
        gpus=_positive(fields["gpus"], _at(path, "gpus")),
        labels=_node_labels(fields["labels"], _at(path, "labels")),
    )


def _node_prefix(value: object, path: str, first_name: Callable[[str], str]) -> str:
    """A generate prefix whose generated names are valid node names."""
    if not isinstance(value, str):
        raise ValidationError(path, f"must be a string, got {_show(value)}")
    name = first_name(value)
    if len(name) > _NAME_MAX or not _NAME.fullmatch(name):
        raise ValidationError(path, f"must make node names of {_NAME_RULE}; would make {name!r}")
    return value


def generate_nodes(doc: object, path: str = "") -> list[Node]:
    """A scenario `{generate: {prefix, count, gpus, labels}}` entry: `count` nodes named prefix + index.

    The index counts from 0, zero-padded to max(2, digits of count-1): `a-00`..`a-99`, `a-000`..
    """
    outer = _fields(doc, path, ("generate",))
    gen_path = _at(path, "generate")
    fields = _fields(outer["generate"], gen_path, ("prefix", "count", "gpus", "labels"))
    count = _positive(fields["count"], _at(gen_path, "count"))
    width = max(2, len(str(count - 1)))
    prefix = _node_prefix(fields["prefix"], _at(gen_path, "prefix"), lambda p: f"{p}{0:0{width}d}")
    gpus = _positive(fields["gpus"], _at(gen_path, "gpus"))
    labels = _node_labels(fields["labels"], _at(gen_path, "labels"))
    return [Node(name=f"{prefix}{i:0{width}d}", gpus=gpus, labels=labels) for i in range(count)]
