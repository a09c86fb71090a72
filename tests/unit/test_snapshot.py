"""Snapshots (jobtree.bus.snapshot) against the replay they stand in for: every reference
scenario's ledger cut after every message, snapshotted there and replayed on, ends in the same
view as replaying it whole — the same state, the same events after the cut, the same next
decisions; and a snapshot that fails any check is refused with its reason."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from test_events import SCENARIOS, play

from jobtree.api import convert
from jobtree.api.events import Deriver
from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.bus import snapshot as snap
from jobtree.core.engine import Cluster
from jobtree.core.facts import Tick
from jobtree.sim import scenario as S

_SKIP = frozenset({"journal", "facts", "observer"})
"""History: not in a snapshot."""


def same(a: Any, b: Any, path: str = "cluster", seen: set[tuple[int, int]] | None = None) -> None:
    """Assert two object graphs hold the same values (identity aside), naming the first path
    that differs; objects without __eq__ (views, indexes) are compared field by field."""
    seen = set() if seen is None else seen
    if (id(a), id(b)) in seen:
        return
    seen.add((id(a), id(b)))
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b) or set(a) == set(b), f"{path}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]", seen)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]", seen)
    elif hasattr(a, "__self__") and hasattr(a, "__func__"):  # a bound method: same function
        assert a.__func__ is b.__func__, path
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}", seen)
    elif isinstance(a, set | frozenset | str | int | float | bytes | type(None)):
        assert a == b, f"{path}: {a!r} != {b!r}"
    elif hasattr(a, "__dict__") or hasattr(a, "__slots__"):
        fields = vars(a) if hasattr(a, "__dict__") else {s: getattr(a, s) for s in a.__slots__ if hasattr(a, s)}
        other = vars(b) if hasattr(b, "__dict__") else {s: getattr(b, s) for s in b.__slots__ if hasattr(b, s)}
        for k in fields:
            if k not in _SKIP:
                same(fields[k], other[k], f"{path}.{k}", seen)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def roundtrip(sc: S.Scenario, cl: Cluster, seq: int) -> snap.Snapshot:
    blob = snap.encode(sc.config.cluster, cl, seq, {"cmd": seq}, {"cmd": b"d"}, "ab" * 32)
    return snap.decode(blob, sc.config.cluster, sc.config)


def apply(cl: Cluster, entries: list[bus.LedgerEntry]) -> list[Any]:
    journal = [convert.entry_from_proto(e) for e in entries]
    for t, item in journal:
        cl.replay_entry(t, item)
    cl.forget_history()
    return journal


def events_json(events: list[bus.Event]) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(e) for e in events]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_a_snapshot_at_any_message_then_the_tail_is_the_whole_replay(path: Path) -> None:
    sc, messages, _ = play(path)
    whole = Cluster(sc.config, sc.nodes, sc.start)
    deriver = Deriver(sc.config.cluster)
    derived: list[list[bus.Event]] = []
    for seq, entries in enumerate(messages, 1):
        derived.append(deriver.derive(whole, seq, apply(whole, entries)))
    cuts = range(1, len(messages) + 1) if len(messages) <= 40 else sorted({*range(1, len(messages) + 1, 7),
                                                                          len(messages)})
    for cut in cuts:
        part = Cluster(sc.config, sc.nodes, sc.start)
        before = Deriver(sc.config.cluster)  # the same reads as the whole replay's (caches fill on reads)
        for seq, entries in enumerate(messages[:cut], 1):
            before.derive(part, seq, apply(part, entries))
        got = roundtrip(sc, part, cut)
        assert got.sequence == cut and got.command_ids == {"cmd": cut}
        restored = got.cluster
        resumed = Deriver.from_view(sc.config.cluster, restored)
        tail: list[bus.Event] = []
        for seq, entries in enumerate(messages[cut:], cut + 1):
            tail += resumed.derive(restored, seq, apply(restored, entries))
        same(restored, whole, f"{path.stem} cut at {cut}")
        assert events_json(tail) == events_json([e for ev in derived[cut:] for e in ev]), f"{path.stem} cut {cut}"
    # and the restored view decides what the replayed one decides
    last = roundtrip(sc, whole, len(messages)).cluster
    horizon = whole.now + 30 * 24 * 3600
    for cl in (whole, last):
        cl.advance(horizon)
        cl.submit(Tick())
    assert [convert.entry_to_proto(e) for e in last.journal] == [convert.entry_to_proto(e) for e in whole.journal]


def test_a_copy_carries_no_history() -> None:
    sc, messages, _ = play(SCENARIOS[0])
    cl = Cluster(sc.config, sc.nodes, sc.start)
    for entries in messages:
        for t, item in (convert.entry_from_proto(e) for e in entries):
            cl.replay_entry(t, item)
    assert cl.journal
    copy = roundtrip(sc, cl, 1).cluster
    assert copy.journal == [] and copy.facts == [] and copy.observer is None
    assert cl.journal, "the original keeps its journal"


def _blob(sc: S.Scenario, **header: Any) -> bytes:
    cl = Cluster(sc.config, sc.nodes, sc.start)
    good = snap.encode(sc.config.cluster, cl, 3, {}, {}, "cd" * 32)
    fields, body_at = snap.read_header(good)
    raw = json.dumps({**fields, **header}).encode()
    return snap.MAGIC + len(raw).to_bytes(4, "big") + raw + good[body_at:]


@pytest.mark.parametrize(("change", "reason"), [
    ({"format": 99}, "format 99, this code reads 1"),
    ({"code": "0" * 64}, "written by another version of the core"),
    ({"cluster": "other"}, "of cluster 'other'"),
    ({"config": "0" * 64}, "the cluster config changed"),
    ({"sequence": 0}, "no valid sequence"),
    ({"ledger_digest": None}, "no valid sequence and ledger digest"),
])
def test_a_snapshot_from_elsewhere_is_refused_with_its_reason(change: dict[str, Any], reason: str) -> None:
    sc = S.load_scenario(SCENARIOS[0])
    with pytest.raises(snap.SnapshotError, match=reason):
        snap.decode(_blob(sc, **change), sc.config.cluster, sc.config)


def test_a_damaged_snapshot_is_refused() -> None:
    sc = S.load_scenario(SCENARIOS[0])
    good = _blob(sc)
    assert snap.decode(good, sc.config.cluster, sc.config).sequence == 3
    with pytest.raises(snap.SnapshotError, match="bad magic"):
        snap.decode(b"PK\x03\x04" + good, sc.config.cluster, sc.config)
    with pytest.raises(snap.SnapshotError, match="the body does not load"):
        snap.decode(good[:-20], sc.config.cluster, sc.config)
    with pytest.raises(snap.SnapshotError, match="header is not JSON"):
        snap.decode(snap.MAGIC + (5).to_bytes(4, "big") + b"{oops" + good, sc.config.cluster, sc.config)
