"""Partial expectations over the simulator's JSON output (shared/scenarios/README.md).

Contract: `check_expectations(output, expect)` compares only the fields an expectation lists
and returns one human-readable line per mismatch (empty list = everything holds). A missing
snapshot, run, reservation, budget, envelope or lease is a mismatch. Numbers compare with an
absolute tolerance of 1e-6; dicts compare partially (only listed keys), lists element-wise and
with equal length, except that a mapping expected where the output has a list of objects is
matched by `key` (runs) or `name` (leases, reservations, budgets, envelopes).
A malformed expectation document raises `ExpectError`.
Helper keys: `reservationsByRun`, `budgets: {BUDGET: {ENVELOPE: {...}}}`, `groupDomains`,
`closedGroups`, `closureReasonPrefixes`; `{absent: true}` for a keyed item (run, lease,
reservation) asserts it is not in the output; `unfundedGPUHours` treats an owner absent from the
output as 0.0 GPU-hours.
Not: a schema validator of the output itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TOLERANCE = 1e-6
ABSENT = {"absent": True}
"""`{absent: true}` in place of a keyed item's fields: the item must not be in the output."""


class ExpectError(ValueError):
    """The expectation document itself is malformed."""


def validate_expectations(expect: object) -> None:
    """Raise ExpectError unless `expect` has the shape of an expectation document (nothing is compared)."""
    if not isinstance(expect, Mapping):
        raise ExpectError("expectations: must be a mapping with a `snapshots` key")
    unknown = [k for k in expect if k != "snapshots"]
    if unknown:
        raise ExpectError(f"expectations.{unknown[0]}: unknown key; allowed: snapshots")
    wanted = expect.get("snapshots")
    if wanted is None:
        return
    if not isinstance(wanted, Mapping):
        raise ExpectError("snapshots: must be a mapping from snapshot label to expectations")
    for label, exp in wanted.items():
        if exp is None:
            continue
        path = f"snapshots.{label}"
        if not isinstance(exp, Mapping):
            raise ExpectError(f"{path}: must be a mapping of expected fields")
        for key, value in exp.items():
            shape = _SHAPES.get(str(key))
            if shape is not None:
                shape(f"{path}.{key}", value)


def _mapping_of(path: str, value: object, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ExpectError(f"{path}: must be a mapping from {what}")
    return value


def _fields_by_id(what: str) -> Any:
    def check(path: str, value: object) -> None:
        for ident, fields in _mapping_of(path, value, f"{what} to expected fields").items():
            if fields is not None and not isinstance(fields, Mapping):
                raise ExpectError(f"{path}.{ident}: must be a mapping of expected fields")

    return check


def _budgets_shape(path: str, value: object) -> None:
    for bname, envs in _mapping_of(path, value, "budget name to {ENVELOPE: {fields}}").items():
        if envs is None:
            continue
        for ename, fields in _mapping_of(f"{path}.{bname}", envs, "envelope name to expected fields").items():
            if fields is not None and not isinstance(fields, Mapping):
                raise ExpectError(f"{path}.{bname}.{ename}: must be a mapping of expected fields")


def _groups_shape(what: str) -> Any:
    def check(path: str, value: object) -> None:
        for run, groups in _mapping_of(path, value, f"run key to {{GROUP: {what}}}").items():
            for g, item in _mapping_of(f"{path}.{run}", groups, f"group index to {what}").items():
                _group_of(g, f"{path}.{run}")
                if not isinstance(item, str) or not item:
                    raise ExpectError(f"{path}.{run}.{g}: must be a {what} (text), got {_show(item)}")

    return check


def _prefixes_shape(path: str, value: object) -> None:
    for run, prefixes in _mapping_of(path, value, "run key to a list of closure-reason prefixes").items():
        items = [prefixes] if isinstance(prefixes, str) else prefixes
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise ExpectError(f"{path}.{run}: must be a list of closure-reason prefixes")


def _hours_shape(path: str, value: object) -> None:
    for owner, hours in _mapping_of(path, value, "owner to GPU-hours").items():
        if not _is_number(hours):
            raise ExpectError(f"{path}.{owner}: must be a number of GPU-hours, got {_show(hours)}")


_SHAPES: dict[str, Any] = {
    "runs": _fields_by_id("run key"),
    "reservationsByRun": _fields_by_id("run key"),
    "budgets": _budgets_shape,
    "groupDomains": _groups_shape("node-name prefix"),
    "closedGroups": _groups_shape("closure reason"),
    "closureReasonPrefixes": _prefixes_shape,
    "unfundedGPUHours": _hours_shape,
}


def check_expectations(output: Mapping[str, Any], expect: Mapping[str, Any]) -> list[str]:
    """Mismatch lines between `output` (`{"snapshots": {...}}`) and the partial `expect`."""
    validate_expectations(expect)
    wanted = expect.get("snapshots") or {}
    snapshots = output.get("snapshots")
    if not isinstance(snapshots, Mapping):
        return ["output: has no `snapshots` mapping"]
    problems: list[str] = []
    for label, exp in wanted.items():
        where = f"snapshot {label}"
        state = snapshots.get(str(label))
        if not isinstance(state, Mapping):
            problems.append(f"{where}: missing from the output (have: {', '.join(map(str, snapshots)) or 'none'})")
            continue
        problems.extend(_check_state(where, state, exp or {}))
    return problems


def _check_state(where: str, state: Mapping[str, Any], exp: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in exp.items():
        path = f"{where}: {key}"
        if key == "runs":
            out += _check_keyed(path, state.get("runs"), value, "key", "run")
        elif key == "reservationsByRun":
            out += _check_reservations_by_run(path, state.get("reservations"), value)
        elif key == "budgets":
            out += _check_budgets(path, state.get("budgets"), value)
        elif key == "groupDomains":
            out += _check_group_domains(path, state.get("leases"), value)
        elif key == "closedGroups":
            out += _check_closed_groups(path, state.get("leases"), value)
        elif key == "closureReasonPrefixes":
            out += _check_closure_prefixes(path, state.get("leases"), value)
        elif key == "unfundedGPUHours":
            out += _check_unfunded(path, state.get("unfundedGPUHours"), value)
        elif key not in state:
            out.append(f"{path}: missing from the output")
        else:
            out += compare(path, value, state[key])
    return out


# --- generic partial comparison -----------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _show(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float) and v.is_integer():
        return str(v)
    return repr(v) if not isinstance(v, int | float) else str(v)


def compare(path: str, expected: object, actual: object) -> list[str]:
    """Partial comparison: mismatch lines for every listed field of `expected` not met by `actual`."""
    if isinstance(expected, Mapping):
        if isinstance(actual, Sequence) and not isinstance(actual, str):
            id_field = "key" if any(isinstance(a, Mapping) and "key" in a for a in actual) else "name"
            return _check_keyed(path, actual, expected, id_field, "item")
        if not isinstance(actual, Mapping):
            return [f"{path}: expected a mapping, got {_show(actual)}"]
        out: list[str] = []
        for k, v in expected.items():
            sub = f"{path}.{k}"
            key = k if k in actual else str(k)
            if key not in actual:
                out.append(f"{sub}: missing from the output (expected {_show(v)})")
            else:
                out += compare(sub, v, actual[key])
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected a list of {len(expected)}, got {_show(actual)}"]
        if len(expected) != len(actual):
            return [f"{path}: expected {len(expected)} items, got {len(actual)}: {actual!r}"]
        out = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += compare(f"{path}[{i}]", e, a)
        return out
    if _is_number(expected) and _is_number(actual):
        assert isinstance(expected, int | float) and isinstance(actual, int | float)
        if abs(float(expected) - float(actual)) <= TOLERANCE:
            return []
    elif expected is None or isinstance(expected, bool) or isinstance(actual, bool):
        if expected is actual:
            return []
    elif type(expected) is type(actual) and expected == actual:
        return []
    return [f"{path}: expected {_show(expected)}, got {_show(actual)}"]


def _index(items: object, id_field: str) -> dict[str, Mapping[str, Any]] | None:
    if not isinstance(items, list):
        return None
    return {str(it.get(id_field)): it for it in items if isinstance(it, Mapping)}


def _check_keyed(path: str, items: object, expected: object, id_field: str, what: str) -> list[str]:
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be a mapping from {what} {id_field} to expected fields")
    index = _index(items, id_field)
    if index is None:
        return [f"{path}: missing from the output"]
    out: list[str] = []
    for ident, exp in expected.items():
        sub = f"{path}[{ident}]"
        item = index.get(str(ident))
        if exp == ABSENT:
            if item is not None:
                out.append(f"{sub}: expected no {what} {ident}, but the output has one")
        elif item is None:
            out.append(f"{sub}: no {what} {ident} in the output")
        elif exp is not None:
            out += compare(sub, exp, item)
    return out


def _check_reservations_by_run(path: str, reservations: object, expected: object) -> list[str]:
    """The latest reservation (highest number) of each listed run."""
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be a mapping from run key to expected reservation fields")
    if not isinstance(reservations, list):
        return [f"{path}: the output has no reservations list"]
    latest: dict[str, Mapping[str, Any]] = {}
    for res in sorted((r for r in reservations if isinstance(r, Mapping)), key=_reservation_order):
        latest[str(res.get("run"))] = res
    out: list[str] = []
    for run, exp in expected.items():
        sub = f"{path}[{run}]"
        found = latest.get(str(run))
        if found is None:
            out.append(f"{sub}: run {run} has no reservation in the output")
        elif exp is not None:
            out += compare(sub, exp, found)
    return out


def _reservation_order(r: Mapping[str, Any]) -> tuple[int, str]:
    name = str(r.get("name", ""))
    _, _, tail = name.rpartition(".r")
    return (int(tail) if tail.isdigit() else -1, name)


def _check_budgets(path: str, budgets: object, expected: object) -> list[str]:
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be {{BUDGET: {{ENVELOPE: {{fields}}}}}}")
    index = _index(budgets, "name")
    if index is None:
        return [f"{path}: the output has no budgets list"]
    out: list[str] = []
    for bname, envs in expected.items():
        b = index.get(str(bname))
        if b is None:
            out.append(f"{path}[{bname}]: no budget {bname} in the output")
            continue
        if envs is None:
            continue
        if not isinstance(envs, Mapping):
            raise ExpectError(f"{path}.{bname}: must be a mapping from envelope name to expected fields")
        env_index = _index(b.get("envelopes"), "name") or {}
        for ename, exp in envs.items():
            sub = f"{path}[{bname}/{ename}]"
            e = env_index.get(str(ename))
            if e is None:
                out.append(f"{sub}: budget {bname} has no envelope {ename} in the output")
            elif exp is not None:
                out += compare(sub, exp, e)
    return out


def _run_leases(leases: object, run: str) -> list[Mapping[str, Any]]:
    if not isinstance(leases, list):
        return []
    return [le for le in leases if isinstance(le, Mapping) and le.get("run") == run]


def _group_of(key: object, path: str) -> int:
    try:
        return int(str(key))
    except ValueError:
        raise ExpectError(f"{path}: group must be an integer, got {key!r}") from None


def _node_of(slot: object) -> str:
    return str(slot).rsplit("#", 1)[0]


def _check_group_domains(path: str, leases: object, expected: object) -> list[str]:
    """Open Active leases of each listed group sit on nodes named `PREFIX-...`; unlisted groups hold none."""
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be {{RUN: {{GROUP: PREFIX}}}}")
    if not isinstance(leases, list):
        return [f"{path}: the output has no leases list"]
    out: list[str] = []
    for run, groups in expected.items():
        if not isinstance(groups, Mapping):
            raise ExpectError(f"{path}.{run}: must be a mapping from group index to node-name prefix")
        wanted = {_group_of(g, f"{path}.{run}"): str(p) for g, p in groups.items()}
        nodes_by_group: dict[int, set[str]] = {}
        for le in _run_leases(leases, str(run)):
            if le.get("role") == "Active" and le.get("end") is None:
                group = le.get("group")
                if not isinstance(group, int):
                    continue
                nodes_by_group.setdefault(group, set()).update(_node_of(s) for s in le.get("slots") or [])
        for g, prefix in sorted(wanted.items()):
            sub = f"{path}[{run}][{g}]"
            nodes = nodes_by_group.get(g)
            if not nodes:
                out.append(f"{sub}: expected open Active leases on {prefix}-* nodes, found none")
                continue
            off = sorted(n for n in nodes if not n.startswith(prefix + "-"))
            if off:
                out.append(
                    f"{sub}: expected every open Active lease on {prefix}-* nodes, found {', '.join(off)}"
                )
        extra = sorted(g for g in nodes_by_group if g not in wanted)
        for g in extra:
            out.append(
                f"{path}[{run}][{g}]: group {g} holds open Active leases on "
                f"{', '.join(sorted(nodes_by_group[g]))} but is not listed"
            )
    return out


def _check_closed_groups(path: str, leases: object, expected: object) -> list[str]:
    """Every Active lease of each listed group is closed with the given reason."""
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be {{RUN: {{GROUP: REASON}}}}")
    if not isinstance(leases, list):
        return [f"{path}: the output has no leases list"]
    out: list[str] = []
    for run, groups in expected.items():
        if not isinstance(groups, Mapping):
            raise ExpectError(f"{path}.{run}: must be a mapping from group index to closure reason")
        run_leases = _run_leases(leases, str(run))
        for g_raw, reason in groups.items():
            g = _group_of(g_raw, f"{path}.{run}")
            sub = f"{path}[{run}][{g}]"
            active = [le for le in run_leases if le.get("role") == "Active" and le.get("group") == g]
            if not active:
                out.append(f"{sub}: no Active leases of group {g} in the output")
                continue
            for le in active:
                if le.get("end") is None:
                    out.append(f"{sub}: lease {le.get('name')} is still open (expected closed {reason})")
                elif le.get("closureReason") != reason:
                    out.append(
                        f"{sub}: lease {le.get('name')} closed {_show(le.get('closureReason'))}, expected {_show(reason)}"
                    )
    return out


def _check_closure_prefixes(path: str, leases: object, expected: object) -> list[str]:
    """The run has closed leases whose closure reasons start with each listed prefix."""
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be {{RUN: [PREFIX, ...]}}")
    if not isinstance(leases, list):
        return [f"{path}: the output has no leases list"]
    out: list[str] = []
    for run, prefixes in expected.items():
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        if not isinstance(prefixes, list):
            raise ExpectError(f"{path}.{run}: must be a list of closure-reason prefixes")
        reasons = sorted(
            {
                str(le.get("closureReason"))
                for le in _run_leases(leases, str(run))
                if le.get("end") is not None
            }
        )
        for prefix in prefixes:
            if not any(r.startswith(str(prefix)) for r in reasons):
                out.append(
                    f"{path}[{run}]: no closed lease with a closure reason starting {str(prefix)!r} "
                    f"(closure reasons: {', '.join(reasons) or 'none'})"
                )
    return out


def _check_unfunded(path: str, actual: object, expected: object) -> list[str]:
    if not isinstance(expected, Mapping):
        raise ExpectError(f"{path}: must be a mapping from owner to GPU-hours")
    if not isinstance(actual, Mapping):
        return [f"{path}: missing from the output"]
    out: list[str] = []
    for owner, hours in expected.items():
        got = actual.get(str(owner), 0.0)
        out += compare(f"{path}[{owner}]", hours, got)
    return out
