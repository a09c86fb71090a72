"""Pure translations between Kubernetes objects and jobtree's view, for the kube-bridge.

Contract (no I/O; the bridge calls these with informer caches and the follower's view):
- In: `run_manifest(cr, owner)` is the jobtree manifest of a Run object (spec.owner defaulted
  to the namespace's owner; Kubernetes bookkeeping dropped); `owner_problem` says why a Run may
  not claim an owner (None when it may); `roles_problem` checks `spec.roles`; `node_of` reads
  a Node as jobtree's (`NodeFacts`: GPUs, topology labels, the state it should be in).
- Command ids (`run_command_id` ...) are derived from the object's uid and generation, so a
  restarted bridge resends the same ids and admission decides each once.
- Out: `run_status` (phase, width, funding words, message as `explain` words,
  observedGeneration, conditions), `lease_object`, `reservation_object`, `budget_status`,
  `pods_for_lease` and `gang_service`.
Not: the reconcile loop, the API calls.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from jobtree.api import convert
from jobtree.api.crds import GROUP, VERSION, pod_name
from jobtree.api.events import funding_words
from jobtree.core import views
from jobtree.core.engine import Cluster
from jobtree.core.errors import Forbidden
from jobtree.core.explain import explain_lines
from jobtree.core.family import Family, owner_claim
from jobtree.core.model import Lease, Node, NodeState, Phase, Reservation, Role
from jobtree.core.timefmt import format_time

Json = dict[str, Any]

API_VERSION = f"{GROUP}/{VERSION}"
OWNER_ANNOTATION = f"{GROUP}/owner"
FABRIC_LABEL = f"{GROUP}/fabric-domain"
FLAVOR_LABEL = f"{GROUP}/gpu-flavor"
RACK_LABEL = f"{GROUP}/rack"
REGION_LABEL = "topology.kubernetes.io/region"
PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
RUN_LABEL = f"{GROUP}/run"
GROUP_LABEL = f"{GROUP}/group"
LEASE_LABEL = f"{GROUP}/lease"
ROLE_LABEL = f"{GROUP}/role"
RANK_LABEL = f"{GROUP}/rank"
MANAGED = {"app.kubernetes.io/managed-by": "jobtree-kube-bridge"}
CONDITION_TYPES = ("Admitted", "Running", "Reserved", "Preempted", "Completed", "Failed")
PREEMPT_REASONS = ("ReclaimUnfunded", "RandomPreempt")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def rfc3339(t: int | None) -> str | None:
    return None if t is None else format_time(t)


# --- in ---------------------------------------------------------------------------------

def run_key(cr: Json) -> str:
    meta = cr.get("metadata", {})
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"


def run_command_id(key: str, uid: str, generation: int) -> str:
    return f"k8s:run:{key}:{uid}:{generation}"


def run_end_command_id(key: str, uid: str, generation: int, verb: str) -> str:
    return f"k8s:run:{key}:{uid}:{generation}:{verb}"


def run_delete_command_id(key: str, uid: str) -> str:
    return f"k8s:run:{key}:{uid}:delete"


def parse_run_command_id(command_id: str) -> tuple[str, str] | None:
    """(run key, uid) of an ApplyRun the bridge sent; None for any other id."""
    parts = command_id.split(":")
    if len(parts) == 5 and parts[:2] == ["k8s", "run"] and parts[4].isdigit():
        return parts[2], parts[3]
    return None


def budget_command_id(cr: Json) -> str:
    meta = cr.get("metadata", {})
    return f"k8s:budget:{meta.get('name')}:{meta.get('uid')}:{meta.get('generation', 1)}"


def node_command_id(name: str, uid: str, verb: str, version: str) -> str:
    return f"k8s:node:{name}:{uid}:{verb}:{version}"


def _clean_meta(meta: Json, *, namespaced: bool) -> Json:
    out: Json = {"name": meta.get("name")}
    if namespaced:
        out["namespace"] = meta.get("namespace", "default")
    if meta.get("labels"):
        out["labels"] = dict(meta["labels"])
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith("kubectl.kubernetes.io/")}
    if notes:
        out["annotations"] = notes
    return out


def run_manifest(cr: Json, namespace_owner: str | None) -> Json:
    """The jobtree manifest of a Run object; `namespace_owner` fills an absent spec.owner."""
    spec = dict(cr.get("spec") or {})
    if not spec.get("owner") and namespace_owner:
        spec["owner"] = namespace_owner
    return {"apiVersion": API_VERSION, "kind": "Run",
            "metadata": _clean_meta(cr.get("metadata", {}), namespaced=True), "spec": spec}


def budget_manifest(cr: Json) -> Json:
    return {"apiVersion": API_VERSION, "kind": "Budget",
            "metadata": _clean_meta(cr.get("metadata", {}), namespaced=False), "spec": dict(cr.get("spec") or {})}


def namespace_owners(namespace: Json | None) -> list[str]:
    """The owners a namespace is bound to: its `rq.davidlangworthy.io/owner` annotation, one
    owner id or several separated by commas (a namespace teams share)."""
    text = ((namespace or {}).get("metadata", {}).get("annotations") or {}).get(OWNER_ANNOTATION) or ""
    return [o.strip() for o in text.split(",") if o.strip()]


def owner_problem(cr: Json, namespace: Json | None, family: Family) -> str | None:
    """Why this Run may not claim its owner: the namespace binds its owners, and a Run may name
    one of them or a descendant (by the budgets' parents); None when it may."""
    ns = cr.get("metadata", {}).get("namespace", "default")
    try:
        owner_claim(ns, namespace_owners(namespace), (cr.get("spec") or {}).get("owner"), family)
    except Forbidden as err:
        return str(err)
    return None


def roles_problem(cr: Json) -> str | None:
    roles = (cr.get("spec") or {}).get("roles") or []
    if not isinstance(roles, list):
        return "spec.roles: must be a list of {name, template}"
    names = set()
    for i, role in enumerate(roles):
        where = f"spec.roles[{i}]"
        if not isinstance(role, dict):
            return f"{where}: must be an object with name and template"
        name = role.get("name")
        if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 15:
            return f"{where}.name: must be a DNS label of at most 15 characters, e.g. worker"
        if name in names:
            return f"{where}.name: {name!r} is used twice"
        names.add(name)
        containers = ((role.get("template") or {}).get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            return f"{where}.template.spec.containers: at least one container is required"
    return None


@dataclass(frozen=True)
class NodeFacts:
    node: Node
    want: NodeState
    why: str
    wait: float
    """Seconds until a NotReady node's grace ends (0: nothing to wait for)."""


def node_gpus(obj: Json) -> int:
    raw = ((obj.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0")
    try:
        return int(str(raw))
    except ValueError:
        return 0


def node_of(obj: Json, cluster: str, now: datetime.datetime, grace: float) -> NodeFacts:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec") or {}, obj.get("status") or {}
    labels = meta.get("labels") or {}
    name = meta["name"]
    topo = {"region": labels.get(REGION_LABEL) or "default", "cluster": cluster,
            "fabric.domain": labels.get(FABRIC_LABEL) or name,
            "gpu.flavor": labels.get(FLAVOR_LABEL) or labels.get(PRODUCT_LABEL) or "unknown"}
    if labels.get(RACK_LABEL):
        topo["rack"] = labels[RACK_LABEL]
    node = Node(name=name, gpus=node_gpus(obj), labels=tuple(sorted(topo.items())))
    if any(t.get("key") == OUT_OF_SERVICE for t in spec.get("taints") or []):
        return NodeFacts(node, NodeState.FENCED, f"the {OUT_OF_SERVICE} taint", 0.0)
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") != "True":
        since = _parse_time(ready.get("lastTransitionTime")) or now
        left = grace - (now - since).total_seconds()
        if left <= 0:
            return NodeFacts(node, NodeState.FENCED, f"Ready={ready.get('status')} for over {grace:g} s", 0.0)
        want = NodeState.CORDONED if spec.get("unschedulable") else NodeState.READY
        return NodeFacts(node, want, "NotReady within its grace period", left)
    if spec.get("unschedulable"):
        return NodeFacts(node, NodeState.CORDONED, "spec.unschedulable", 0.0)
    return NodeFacts(node, NodeState.READY, "Ready", 0.0)


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


# --- out --------------------------------------------------------------------------------

def owner_ref(cr: Json, controller: bool = True) -> Json:
    meta = cr["metadata"]
    return {"apiVersion": cr.get("apiVersion", API_VERSION), "kind": cr.get("kind", "Run"), "name": meta["name"],
            "uid": meta["uid"], "controller": controller, "blockOwnerDeletion": True}


def condition(kind: str, ok: bool, reason: str, message: str, old: list[Json], now: str) -> Json:
    """A metav1.Condition; its lastTransitionTime moves only when its status does."""
    status = "True" if ok else "False"
    before = next((c for c in old if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def refused_status(cr: Json, reason: str, problem: str, now: str) -> Json:
    old = (cr.get("status") or {}).get("conditions") or []
    gen = int(cr["metadata"].get("generation", 1))
    return {"observedGeneration": gen, "reason": reason, "message": problem,
            "conditions": [condition("Admitted", False, reason, problem, old, now)]}


def run_status(cl: Cluster, key: str, cr: Json, now: str) -> Json:
    """The Run object's status from the view (phase, width, funding, explain words, conditions)."""
    st = cl.status[key]
    view = views.run_json(cl, key)
    leases = [lease for lease in cl.leases.values() if lease.run == key]
    reservations = [r for r in cl.reservations.values() if r.run == key]
    lines = explain_lines(view, [views.lease_json(cl, lease) for lease in leases],
                          [views.reservation_json(r) for r in reservations])
    msg = convert.run_status_to_proto(st)
    doc: Json = json_format.MessageToDict(msg)
    phase = st.phase.value
    doc["width"] = view["width"]["allocated"]
    words = funding_words(view["funding"])
    if words:
        doc["funding"] = words
    else:
        doc.pop("funding", None)
    res = cl.reservations.get(st.reservation) if st.reservation else None
    expected = (res.earliest_start if res is not None and st.phase is Phase.RESERVED
                else st.eta if st.phase is Phase.RUNNING else None)
    if expected is not None:
        doc["expectedAt"] = rfc3339(expected)
    doc["message"] = " ".join(lines[:2])
    doc["observedGeneration"] = int(cr["metadata"].get("generation", 1))
    old = (cr.get("status") or {}).get("conditions") or []
    last_closed = max((lease for lease in leases if lease.end is not None), key=lambda lease: (lease.end, lease.name),
                      default=None)
    preempted = (phase in ("Pending", "Reserved", "Waiting") and last_closed is not None
                 and str(last_closed.closure_reason or "").startswith(PREEMPT_REASONS))
    words_reason = st.reason or phase
    doc["conditions"] = [
        condition("Admitted", True, "Accepted", "jobtree holds this run's spec", old, now),
        condition("Running", phase == "Running", words_reason, st.message or phase, old, now),
        condition("Reserved", phase == "Reserved", words_reason,
                  f"reserved from {rfc3339(res.earliest_start)}" if res is not None else "no reservation", old, now),
        condition("Preempted", preempted, "Preempted" if preempted else "NotPreempted",
                  f"lost its GPUs: {last_closed.closure_reason}" if preempted and last_closed else "", old, now),
        condition("Completed", phase == "Completed", words_reason, st.message or phase, old, now),
        condition("Failed", phase == "Failed", words_reason, st.message or phase, old, now),
    ]
    return doc


def lease_object(lease: Lease, cr: Json) -> Json:
    msg = convert.lease_to_proto(lease)
    doc = json_format.MessageToDict(msg)
    namespace, run = lease.run.split("/", 1)
    doc["apiVersion"], doc["kind"] = API_VERSION, "GPULease"
    doc["metadata"] = {"name": lease.name, "namespace": namespace,
                       "labels": {RUN_LABEL: run, GROUP_LABEL: str(lease.group), **MANAGED},
                       "ownerReferences": [owner_ref(cr, controller=False)]}
    if not doc.get("status"):
        doc.pop("status", None)
    return doc


def reservation_object(res: Reservation, cr: Json) -> Json:
    doc = json_format.MessageToDict(convert.reservation_to_proto(res))
    namespace, run = res.run.split("/", 1)
    doc["apiVersion"], doc["kind"] = API_VERSION, "Reservation"
    doc["metadata"] = {"name": res.name, "namespace": namespace, "labels": {RUN_LABEL: run, **MANAGED},
                       "ownerReferences": [owner_ref(cr, controller=False)]}
    return doc


def budget_status(cl: Cluster, name: str, cr: Json) -> Json:
    budget = cl.budgets[name]
    rooms = [f"{e.name}={views.headroom(cl, (name, e.name))}" for e in budget.envelopes]
    return {"headroom": ", ".join(rooms), "observedGeneration": int(cr["metadata"].get("generation", 1))}


def service_name(run: str) -> str:
    return f"{run}-gang"[:63]


def open_active(cl: Cluster, key: str) -> list[Lease]:
    """The run's open Active leases in rank order (group, then lease name)."""
    leases = [lease for lease in cl.open_by_run.get(key, {}).values() if lease.role is Role.ACTIVE]
    return sorted(leases, key=lambda lease: (lease.group, lease.name))


def pods_for_lease(cr: Json, lease: Lease, rank: int, world: int, rank0: str) -> list[Json]:
    """The pods of one open Active lease: one per role, on the lease's node; the first role's
    pod holds the lease's GPUs (`nvidia.com/gpu` limit), the others none."""
    namespace, run = lease.run.split("/", 1)
    node = lease.slots[0][0]
    svc = service_name(run)
    out = []
    for i, role in enumerate((cr.get("spec") or {}).get("roles") or []):
        template = role.get("template") or {}
        tmeta = template.get("metadata") or {}
        spec = json_copy(template.get("spec") or {})
        name = pod_name(lease.name, lease.group, role["name"] if i else None)
        spec["nodeName"] = node
        spec["hostname"] = name
        spec["subdomain"] = svc
        spec.setdefault("restartPolicy", "Never")
        env = [{"name": "JOBTREE_RUN", "value": run}, {"name": "JOBTREE_LEASE", "value": lease.name},
               {"name": "JOBTREE_GROUP", "value": str(lease.group)}, {"name": "JOBTREE_RANK", "value": str(rank)},
               {"name": "JOBTREE_WORLD_SIZE", "value": str(world)},
               {"name": "JOBTREE_GPUS", "value": str(lease.gpus if i == 0 else 0)},
               {"name": "JOBTREE_RENDEZVOUS", "value": f"{rank0}.{svc}.{namespace}.svc"}]
        for j, container in enumerate(spec.get("containers") or []):
            container["env"] = [*env, *(container.get("env") or [])]
            if i == 0 and j == 0:
                limits = container.setdefault("resources", {}).setdefault("limits", {})
                limits[GPU_RESOURCE] = str(lease.gpus)
        labels = {**(tmeta.get("labels") or {}), RUN_LABEL: run, GROUP_LABEL: str(lease.group),
                  LEASE_LABEL: lease.name.rsplit(".", 1)[1], ROLE_LABEL: role["name"], RANK_LABEL: str(rank),
                  **MANAGED}
        out.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": namespace, "labels": labels,
                                 "annotations": {**(tmeta.get("annotations") or {}), f"{GROUP}/lease": lease.name},
                                 "ownerReferences": [owner_ref(cr)]},
                    "spec": spec})
    return out


def gang_service(cr: Json) -> Json:
    meta = cr["metadata"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service_name(meta["name"]), "namespace": meta["namespace"],
                         "labels": {RUN_LABEL: meta["name"], **MANAGED}, "ownerReferences": [owner_ref(cr)]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {RUN_LABEL: meta["name"]}}}


def json_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def lease_run_key(lease_name: str) -> str:
    """The run key of a lease name `<namespace>.<run>.<NNNNN>`."""
    namespace, _, rest = lease_name.partition(".")
    return f"{namespace}/{rest.rsplit('.', 1)[0]}" if rest else ""
