"""The kube-bridge's translations (objects.py) and its work queue, without a cluster."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from jobtree.core.family import Family
from jobtree.core.model import Budget, Lease, MintReason, NodeState, Role
from jobtree.services.kube_bridge import objects as o
from jobtree.services.kube_bridge.kube import WorkQueue

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
FAMILY = Family([Budget("org", "org:ml"), Budget("vision", "org:ml:vision", ("org:ml",)),
                 Budget("deep", "org:ml:vision:deep", ("org:ml:vision",)), Budget("other", "org:fin")])


def cr(owner: str | None = None, ns: str = "vision", **spec: object) -> dict:
    body = dict(spec)
    if owner:
        body["owner"] = owner
    return {"metadata": {"name": "r", "namespace": ns, "uid": "u-1", "generation": 2}, "spec": body}


def ns(owners: str | None) -> dict:
    meta: dict = {"name": "vision"}
    if owners is not None:
        meta["annotations"] = {o.OWNER_ANNOTATION: owners}
    return {"metadata": meta}


@pytest.mark.parametrize(("claimed", "bound", "allowed"), [
    (None, "org:ml:vision", True),                 # takes the namespace's
    ("org:ml:vision", "org:ml:vision", True),
    ("org:ml:vision:deep", "org:ml:vision", True),  # a descendant
    ("org:ml", "org:ml:vision", False),            # an ancestor is not the namespace's to spend
    ("org:fin", "org:ml:vision", False),           # another family
    ("org:nobody", "org:ml:vision", False),
    ("org:fin", "org:ml:vision, org:fin", True),    # a shared namespace
    (None, "org:ml:vision,org:fin", False),        # ... must say which
    (None, None, False),                           # an unbound namespace runs nothing
    (None, "", False),
])
def test_owners_can_not_be_forged(claimed: str | None, bound: str | None, allowed: bool) -> None:
    problem = o.owner_problem(cr(claimed), ns(bound), FAMILY)
    assert (problem is None) is allowed, problem
    if problem is not None:
        assert "spec.owner" in problem or o.OWNER_ANNOTATION in problem


def test_a_run_manifest_takes_the_namespace_owner_and_drops_kubernetes_bookkeeping() -> None:
    obj = cr(None, resources={"gpuType": "H100-80GB", "totalGPUs": 8})
    obj["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "x"}
    doc = o.run_manifest(obj, "org:ml:vision")
    assert doc["spec"]["owner"] == "org:ml:vision"
    assert doc["metadata"] == {"name": "r", "namespace": "vision", "annotations": {"team": "x"}}
    assert "owner" not in obj["spec"], "the object itself is not changed"


@pytest.mark.parametrize(("roles", "problem"), [
    ([{"name": "worker", "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}], None),
    ([], None),
    ([{"name": "Worker", "template": {"spec": {"containers": [{}]}}}], "spec.roles[0].name"),
    ([{"name": "w", "template": {"spec": {"containers": []}}}], "spec.roles[0].template.spec.containers"),
    ([{"name": "w", "template": {"spec": {"containers": [{}]}}}] * 2, "spec.roles[1].name"),
    ("worker", "spec.roles"),
])
def test_roles_are_checked(roles: object, problem: str | None) -> None:
    got = o.roles_problem(cr(roles=roles))
    assert (got is None) if problem is None else (got is not None and got.startswith(problem)), got


def node(**kw: object) -> dict:
    obj = {"metadata": {"name": "n1", "uid": "x", "labels": {o.REGION_LABEL: "eu", o.FABRIC_LABEL: "f1",
                                                             o.PRODUCT_LABEL: "A100"}},
           "spec": {}, "status": {"allocatable": {o.GPU_RESOURCE: "8"},
                                  "conditions": [{"type": "Ready", "status": "True"}]}}
    for k, v in kw.items():
        obj[k].update(v)  # type: ignore[attr-defined]
    return obj


def test_a_node_is_read_as_jobtree_topology() -> None:
    facts = o.node_of(node(), "c1", NOW, 40)
    assert facts.node.gpus == 8 and facts.want is NodeState.READY
    assert dict(facts.node.labels) == {"region": "eu", "cluster": "c1", "fabric.domain": "f1", "gpu.flavor": "A100"}
    flavored = node(metadata={"labels": {o.FLAVOR_LABEL: "H100-80GB", o.PRODUCT_LABEL: "NVIDIA-H100", o.RACK_LABEL: "r7"}})
    labels = dict(o.node_of(flavored, "c1", NOW, 40).node.labels)
    assert labels["gpu.flavor"] == "H100-80GB" and labels["rack"] == "r7"
    assert labels["fabric.domain"] == "n1", "without the label a node is a fabric domain of its own"


def test_node_states_cordon_grace_taint() -> None:
    assert o.node_of(node(spec={"unschedulable": True}), "c", NOW, 40).want is NodeState.CORDONED
    ten_ago = (NOW - datetime.timedelta(seconds=10)).isoformat()
    young = o.node_of(node(status={"conditions": [{"type": "Ready", "status": "False",
                                                   "lastTransitionTime": ten_ago}]}), "c", NOW, 40)
    assert young.want is NodeState.READY and young.wait == pytest.approx(30)
    old = o.node_of(node(status={"conditions": [{"type": "Ready", "status": "Unknown",
                                                 "lastTransitionTime": ten_ago}]}), "c", NOW, 5)
    assert old.want is NodeState.FENCED and "Unknown" in old.why
    tainted = node(spec={"taints": [{"key": o.OUT_OF_SERVICE, "effect": "NoExecute"}]})
    assert o.node_of(tainted, "c", NOW, 40).want is NodeState.FENCED
    assert o.node_gpus(node(status={"allocatable": {}})) == 0


def test_pods_of_a_lease_carry_its_gpus_rank_and_rendezvous() -> None:
    lease = Lease("vision.r.00003", "vision/r", "org:ml:vision", 1, Role.ACTIVE, (("n1", 0), ("n1", 1)),
                  ("vision", "main"), 0, MintReason.START)
    run = cr(roles=[{"name": "worker", "template": {"metadata": {"labels": {"app": "t"}}, "spec": {
        "containers": [{"name": "c", "image": "i", "env": [{"name": "MINE", "value": "1"}]}]}}},
        {"name": "ps", "template": {"spec": {"containers": [{"name": "p", "image": "i"}]}}}])
    worker, ps = o.pods_for_lease(run, lease, rank=3, world=4, rank0="r-g0-00000")
    assert worker["metadata"]["name"] == "r-g1-00003" and ps["metadata"]["name"] == "r-g1-00003-ps"
    assert worker["spec"]["nodeName"] == "n1" and worker["spec"]["restartPolicy"] == "Never"
    c = worker["spec"]["containers"][0]
    assert c["resources"]["limits"][o.GPU_RESOURCE] == "2"
    assert "resources" not in ps["spec"]["containers"][0], "only the first role holds the GPUs"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert (env["JOBTREE_RANK"], env["JOBTREE_WORLD_SIZE"], env["MINE"]) == ("3", "4", "1")
    assert env["JOBTREE_RENDEZVOUS"] == "r-g0-00000.r-gang.vision.svc"
    assert worker["metadata"]["labels"]["app"] == "t" and worker["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert run["spec"]["roles"][0]["template"]["spec"]["containers"][0]["env"] == [{"name": "MINE", "value": "1"}]


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    old = [{"type": "Running", "status": "True", "lastTransitionTime": "T0"}]
    assert o.condition("Running", True, "R", "m", old, "T1")["lastTransitionTime"] == "T0"
    assert o.condition("Running", False, "R", "m", old, "T1")["lastTransitionTime"] == "T1"


def test_command_ids_come_from_uid_and_generation() -> None:
    cid = o.run_command_id("vision/r", "u-1", 2)
    assert o.parse_run_command_id(cid) == ("vision/r", "u-1")
    assert o.parse_run_command_id(o.run_end_command_id("vision/r", "u-1", 2, "complete-1")) is None
    assert o.parse_run_command_id("anything-else") is None
    assert o.lease_run_key("vision.my.run.00012") == "vision/my.run"


def test_the_work_queue_dedups_bounds_and_backs_off() -> None:
    async def scenario() -> None:
        q = WorkQueue(capacity=2)
        q.add("a")
        q.add("a")
        q.add("b")
        q.add("c")
        assert len(q) == 2 and q.overflowed
        assert [await q.get(), await q.get()] == ["a", "b"]
        delays = [q.retry("a") for _ in range(3)]
        assert delays == [WorkQueue.BASE, WorkQueue.BASE * 2, WorkQueue.BASE * 4]
        q.forget("a")
        assert q.retry("a") == WorkQueue.BASE
        assert await asyncio.wait_for(q.get(), 1) == "a"
        for _ in range(40):
            last = q.retry("z")
        assert last == WorkQueue.CAP

    asyncio.run(scenario())
