"""The stand-in API server's store in process: watch history bounds (410 Gone), selectors, patches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from kube_standin import store as st


def _store_with_namespace() -> tuple[st.Store, st.Kind]:
    s = st.Store()
    s.create(s.kind("", "v1", "namespaces"), None, {"metadata": {"name": "n"}})
    return s, s.kind("", "v1", "configmaps")


def test_a_version_older_than_the_history_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    s, cms = _store_with_namespace()
    s.history = st.deque(s.history, maxlen=3)
    first = s.create(cms, "n", {"metadata": {"name": "a"}})["metadata"]["resourceVersion"]
    for i in range(5):
        s.patch(cms, "n", "a", "application/merge-patch+json", {"data": {"i": str(i)}})
    with pytest.raises(st.ApiError) as gone:
        list(s.events_since(int(first)))
    assert gone.value.code == 410 and gone.value.reason == "Expired"
    recent = int(s.history[0].rv) - 1
    assert [e.type for e in s.events_since(recent)] == ["MODIFIED"] * 3


@pytest.mark.parametrize(("selector", "names"), [
    ("app=x", ["a"]), ("app!=x", ["b", "c"]), ("app in (x,y)", ["a", "b"]), ("app notin (x)", ["b", "c"]),
    ("app", ["a", "b"]), ("!app", ["c"]), ("app=x,tier=web", []), ("", ["a", "b", "c"]),
])
def test_label_selectors(selector: str, names: list[str]) -> None:
    s, cms = _store_with_namespace()
    s.create(cms, "n", {"metadata": {"name": "a", "labels": {"app": "x"}}})
    s.create(cms, "n", {"metadata": {"name": "b", "labels": {"app": "y"}}})
    s.create(cms, "n", {"metadata": {"name": "c"}})
    assert [o["metadata"]["name"] for o in s.items(cms, "n", selector)] == names


def test_field_selectors_and_a_bad_selector() -> None:
    s, cms = _store_with_namespace()
    s.create(cms, "n", {"metadata": {"name": "a"}, "data": {"k": "v"}})
    s.create(cms, "n", {"metadata": {"name": "b"}})
    assert [o["metadata"]["name"] for o in s.items(cms, None, fields="metadata.name=b")] == ["b"]
    assert [o["metadata"]["name"] for o in s.items(cms, None, fields="data.k!=v")] == ["b"]
    with pytest.raises(st.ApiError) as bad:
        st.label_matcher("a b c")
    assert bad.value.code == 400


def test_merge_and_json_patches_follow_their_rfcs() -> None:
    assert st.merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None, "d": 3}, "l": [2]}) == \
        {"a": {"c": 2, "d": 3}, "l": [2]}
    doc = st.json_patch({"a": [1, 2], "b": {"c": 1}}, [
        {"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/b/c"},
        {"op": "copy", "from": "/a/0", "path": "/b/x"}, {"op": "test", "path": "/a/2", "value": 3}])
    assert doc == {"a": [1, 2, 3], "b": {"x": 1}}
    with pytest.raises(st.ApiError):
        st.json_patch({"a": 1}, [{"op": "replace", "path": "/nope", "value": 1}])
