"""Bad custom resources applied with the real kubectl to the stand-in API server, read by the
kube-bridge of a real `jobtree up --kubeconfig`.

Each case: the object's condition (`Admitted` for a Run, `Accepted` for a Budget) is False with
the exact reason and message, and the ledger never took its spec (no SpecPut of the run, no
BudgetPut of the budget).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cases import ids
from kubeenv import KubeUp, StandIn, UpProcess, budget, namespace, poll_until, run

CLUSTER = "badcrs"


@dataclass(frozen=True)
class Case:
    id: str
    obj: dict[str, Any]
    condition: str
    reason: str
    message: str


def _bad_budget(name: str, **spec: Any) -> dict[str, Any]:
    doc = budget(name, "org:crs", [{"name": "pool", "flavor": "H100-80GB", "concurrency": 8}])
    doc["spec"].update(spec)
    return doc


CASES = [
    Case("run-zero-gpus", run("zero", "crs", 0), "Admitted", "Invalid",
         'spec.resources.totalGPUs: must be a positive integer, got 0'),
    Case("run-bad-role-name", run("roles", "crs", 8, roles=[{"name": "Worker!", "template": {}}]),
         "Admitted", "Invalid",
         'spec.roles[0].name: must be a DNS label of at most 15 characters, e.g. worker'),
    Case("run-owner-of-another-team", run("forged", "crs", 8, owner="org:other"), "Admitted", "OwnerForbidden",
         "spec.owner: 'org:other' is neither 'org:crs' (the owner of namespace crs) nor a "
         "descendant; a Run may only spend its namespace's budgets"),
    Case("run-namespace-unbound", run("stray", "unbound", 8), "Admitted", "OwnerForbidden",
         'namespace unbound is not bound to an owner: annotate it with '
         "rq.davidlangworthy.io/owner=<owner> (a platform admin's act) before it can run work"),
    Case("budget-own-parent", _bad_budget("loop", parents=["org:crs"]), "Accepted", "Invalid",
         "spec.parents[0]: must not be the budget's own owner 'org:crs' (a cycle)"),
    Case("budget-negative-concurrency",
         budget("neg", "org:crs", [{"name": "pool", "flavor": "H100-80GB", "concurrency": -1}]),
         "Accepted", "Invalid", "spec.envelopes[0].concurrency: must be a non-negative integer, got -1"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandIn, UpProcess]]:
    work = tmp_path_factory.mktemp("badcrs")
    api = StandIn(work)
    api.apply_crds()
    up = KubeUp(work / "up", api, CLUSTER).wait_ready()
    api.apply(namespace("crs", "org:crs"), namespace("unbound", None))
    try:
        yield api, up
    finally:
        up.stop()
        api.stop()


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def _took(up: UpProcess, case: Case) -> bool:
    """Whether the ledger holds the object's spec."""
    meta = case.obj["metadata"]
    for e in up.ledger_entries():
        fact = e.WhichOneof("fact")
        if fact == "spec_put" and (e.spec_put.run.metadata.namespace, e.spec_put.run.metadata.name) == (
                meta.get("namespace"), meta["name"]):
            return True
        if fact == "budget_put" and e.budget_put.budget.metadata.name == meta["name"]:
            return True
    return False


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bad_custom_resource(env: tuple[StandIn, UpProcess], case: Case) -> None:
    api, up = env
    api.apply(case.obj)
    kind = case.obj["kind"].lower()
    where = ("-n", case.obj["metadata"]["namespace"]) if "namespace" in case.obj["metadata"] else ()
    cond = poll_until(f"{case.condition} on {case.id}", lambda: _condition(
        api.get_json(kind, case.obj["metadata"]["name"], *where), case.condition) or None)
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", case.reason, case.message)
    assert not _took(up, case), "the ledger took a refused object"
