"""The stand-in API server (tools/kube_standin) behaves as kubectl 1.37 and the kube-bridge need:
each gap of kmock 0.8 that issue 7 lists is pinned here, driven by the real kubectl or raw HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeenv import StandIn, budget, namespace, run


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    s = StandIn(tmp_path_factory.mktemp("standin"))
    s.apply_crds()
    yield s
    s.stop()


RUNS = "/apis/rq.davidlangworthy.io/v1/namespaces/{ns}/runs"


def test_lists_carry_kind_api_version_and_an_increasing_resource_version(api: StandIn) -> None:
    _, first = api.http("GET", "/api/v1/namespaces")
    assert first["kind"] == "NamespaceList" and first["apiVersion"] == "v1"
    code, made = api.http("POST", "/api/v1/namespaces", namespace("lists", None))
    assert code == 201, made
    _, second = api.http("GET", "/api/v1/namespaces")
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert int(made["metadata"]["resourceVersion"]) <= int(second["metadata"]["resourceVersion"])
    code, again = api.http("POST", "/api/v1/namespaces", namespace("lists", None))
    assert (code, again["reason"]) == (409, "AlreadyExists")
    code, missing = api.http("POST", RUNS.format(ns="nowhere"), run("r", "nowhere", 8))
    assert code == 404 and "nowhere" in missing["message"]


def test_put_with_a_stale_version_conflicts_and_status_is_its_own_subresource(api: StandIn) -> None:
    api.apply(namespace("put", None))
    code, obj = api.http("POST", RUNS.format(ns="put"), {**run("r1", "put", 8), "status": {"phase": "Forged"}})
    assert code == 201 and "status" not in obj, "a custom resource's status is not taken at create"
    path = RUNS.format(ns="put") + "/r1"
    code, with_status = api.http("PUT", path + "/status", {**obj, "status": {"phase": "Running"},
                                                           "spec": {"owner": "changed"}})
    assert code == 200 and with_status["status"] == {"phase": "Running"}
    assert with_status["spec"] == obj["spec"], "/status changes only .status"
    assert with_status["metadata"]["generation"] == 1
    stale = {**obj, "spec": {**obj["spec"], "sparesPerGroup": 1}}
    code, refused = api.http("PUT", path, stale)
    assert (code, refused["reason"]) == (409, "Conflict")
    fresh = {**with_status, "spec": {**obj["spec"], "sparesPerGroup": 1}, "status": {"phase": "Ignored"}}
    code, updated = api.http("PUT", path, fresh)
    assert code == 200 and updated["metadata"]["generation"] == 2
    assert updated["status"] == {"phase": "Running"}, "the main endpoint keeps .status"
    code, same = api.http("PUT", path, updated)
    assert code == 200 and same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"], \
        "a no-op update keeps the resourceVersion"
    code, patched = api.http("PATCH", path, [{"op": "replace", "path": "/spec/sparesPerGroup", "value": 2}],
                             "application/json-patch+json")
    assert code == 200 and patched["spec"]["sparesPerGroup"] == 2 and patched["metadata"]["generation"] == 3


def test_a_crd_registers_its_resource_with_printer_columns_short_names_and_category(api: StandIn) -> None:
    api.apply(namespace("cols", None), run("r", "cols", 8, owner="org:a"))
    out = api.kubectl("get", "runs", "-n", "cols").stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "OWNER", "PHASE", "GPUS", "FUNDING", "RESERVED-UNTIL/ETA", "AGE"]
    assert "org:a" in out.splitlines()[1]
    short = api.kubectl("get", "gl", "-A")
    assert short.returncode == 0 and "No resources found" in short.stderr, "gl names gpuleases"
    every = api.kubectl("get", "jobtree", "-A").stdout
    assert "run.rq.davidlangworthy.io/r" in every
    _, discovery = api.http("GET", "/apis/rq.davidlangworthy.io/v1")
    names = {r["name"]: r for r in discovery["resources"]}
    assert names["gpuleases"]["shortNames"] == ["gl"] and "runs/status" in names


def test_kubectl_apply_validates_on_the_server_and_is_idempotent(api: StandIn) -> None:
    first = api.apply(budget("b1", "org:b", [{"name": "e", "flavor": "H100-80GB", "concurrency": 8}]))
    assert "created" in first
    assert "unchanged" in api.apply(budget("b1", "org:b", [{"name": "e", "flavor": "H100-80GB", "concurrency": 8}]))
    _, doc = api.http("GET", "/openapi/v3/apis/rq.davidlangworthy.io/v1")
    params = [p["name"] for path in doc["paths"].values() for op in path.values() for p in op["parameters"]]
    assert "fieldValidation" in params


def _watch_lines(api: StandIn, path: str, out: list[dict], stop_after: int, timeout: float = 10.0) -> threading.Thread:
    def read() -> None:
        with urllib.request.urlopen(api.url + path, timeout=timeout) as resp:
            for line in resp:
                if line.strip():
                    out.append(json.loads(line))
                if len(out) >= stop_after:
                    return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_watch_resumes_from_a_version_honours_selectors_and_times_out(api: StandIn) -> None:
    api.apply(namespace("w", None))
    code, a = api.http("POST", "/api/v1/namespaces/w/configmaps",
                       {"metadata": {"name": "a", "labels": {"app": "x"}}, "data": {"k": "1"}})
    assert code == 201
    since = a["metadata"]["resourceVersion"]
    api.http("POST", "/api/v1/namespaces/w/configmaps", {"metadata": {"name": "b", "labels": {"app": "y"}}})
    api.http("PATCH", "/api/v1/namespaces/w/configmaps/a", {"data": {"k": "2"}}, "application/merge-patch+json")
    events: list[dict] = []
    t = _watch_lines(api, f"/api/v1/namespaces/w/configmaps?watch=true&resourceVersion={since}"
                          "&labelSelector=app%3Dx&timeoutSeconds=2", events, 10)
    t.join(8)
    assert not t.is_alive(), "the watch ended at its timeoutSeconds"
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "a")], events
    assert events[0]["object"]["data"] == {"k": "2"}


def test_kubectl_wait_gets_the_initial_events_end_bookmark(api: StandIn) -> None:
    api.apply(namespace("wait", None), run("r", "wait", 8))
    started = time.monotonic()
    waiter = threading.Thread(target=lambda: api.kubectl("wait", "-n", "wait", "--for=condition=Running",
                                                         "run/r", "--timeout=20s"), daemon=True)
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive(), "kubectl wait returned before the condition held"
    api.patch_status(RUNS.format(ns="wait") + "/r", {"conditions": [
        {"type": "Running", "status": "True", "reason": "Bound", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    waiter.join(15)
    assert not waiter.is_alive() and time.monotonic() - started < 15


def test_deleting_an_owner_collects_what_it_owns_and_finalizers_hold_deletion(api: StandIn) -> None:
    api.apply(namespace("gc", None))
    _, owner = api.http("POST", RUNS.format(ns="gc"), run("owner", "gc", 8))
    ref = {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "name": "owner", "uid": owner["metadata"]["uid"]}
    api.http("POST", "/api/v1/namespaces/gc/configmaps", {"metadata": {"name": "owned", "ownerReferences": [ref]}})
    api.http("POST", "/api/v1/namespaces/gc/configmaps", {"metadata": {"name": "held", "finalizers": ["x/y"]}})
    assert api.http("DELETE", RUNS.format(ns="gc") + "/owner")[0] == 200
    assert api.http("GET", "/api/v1/namespaces/gc/configmaps/owned")[0] == 404
    code, held = api.http("DELETE", "/api/v1/namespaces/gc/configmaps/held")
    assert code == 200 and held["metadata"]["deletionTimestamp"]
    assert api.http("GET", "/api/v1/namespaces/gc/configmaps/held")[0] == 200
    api.http("PATCH", "/api/v1/namespaces/gc/configmaps/held", {"metadata": {"finalizers": None}},
             "application/merge-patch+json")
    assert api.http("GET", "/api/v1/namespaces/gc/configmaps/held")[0] == 404


def test_bad_requests_are_kubernetes_statuses(api: StandIn, tmp_path: Path) -> None:
    code, doc = api.http("GET", "/apis/rq.davidlangworthy.io/v1/nothings")
    assert code == 404 and doc["kind"] == "Status"
    code, doc = api.http("GET", "/api/v1/pods?labelSelector=%28%28")
    assert code == 400 and doc["reason"] == "BadRequest"
