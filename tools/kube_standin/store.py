"""The stand-in API server's object store: what etcd and the apiserver's registry do, in memory.

Contract: `Store` keeps objects per resource (`Kind`) by (namespace, name) and one global,
strictly increasing resourceVersion (`rv`). Every change is an event (`ADDED`, `MODIFIED`,
`DELETED`) with the object's new resourceVersion, kept in a bounded history (`HISTORY`) for
watches that resume from a resourceVersion; older is `Gone` (HTTP 410, as an apiserver whose
watch cache has moved on). Writes behave as the apiserver's:
- create fills uid, creationTimestamp, generation 1 and resourceVersion; a taken name is 409
  AlreadyExists; a namespaced object in a namespace that does not exist is 404; a custom
  resource's status is dropped and a pod starts Pending (a Node keeps the status it is given,
  as a kubelet registers it);
- update (PUT) with a stale metadata.resourceVersion is 409 Conflict; on a resource with the
  status subresource the main endpoint keeps `.status` and `/status` changes only `.status`;
  a change outside metadata and status bumps metadata.generation; a no-op keeps the
  resourceVersion and sends no event;
- patch: JSON merge patch (RFC 7386) for merge and strategic-merge content types (lists are
  replaced whole: the stand-in knows no patch strategies), RFC 6902 JSON patch;
- delete: with finalizers sets deletionTimestamp; otherwise removes, then deletes the objects
  that name it as an owner (background cascading, as the garbage collector); an object created
  with owner references to none that exists is collected at once.
Selectors: label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors
(`=`, `==`, `!=` on any dotted path). Not: admission webhooks, pruning of unknown fields,
server-side apply, protobuf.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]

HISTORY = int(os.environ.get("KUBE_STANDIN_HISTORY", "4096"))
"""Events kept for resuming watches; a resourceVersion older than these is Gone."""


class ApiError(Exception):
    """A refusal with its HTTP code and Kubernetes reason; rendered as a `Status`."""

    def __init__(self, code: int, reason: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Json:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


@dataclass
class Column:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclass
class Kind:
    """One served resource: what discovery lists and what a CRD declares."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = False
    columns: tuple[Column, ...] = ()
    objects: dict[tuple[str, str], Json] = field(default_factory=dict)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)


BUILTIN: tuple[Kind, ...] = (
    Kind("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",), status=True),
    Kind("", "v1", "nodes", "Node", False, "node", ("no",), status=True),
    Kind("", "v1", "pods", "Pod", True, "pod", ("po",), ("all",), status=True, columns=(
        Column("Node", "string", ".spec.nodeName"), Column("Status", "string", ".status.phase"))),
    Kind("", "v1", "services", "Service", True, "service", ("svc",), ("all",), status=True),
    Kind("", "v1", "events", "Event", True, "event", ("ev",), columns=(
        Column("Type", "string", ".type"), Column("Reason", "string", ".reason"),
        Column("Object", "string", ".involvedObject.name"), Column("Message", "string", ".message"))),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    Kind("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    Kind("", "v1", "secrets", "Secret", True, "secret"),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
         "customresourcedefinition", ("crd", "crds"), status=True),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", True, "lease"),
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors ----------------------------------------------------------------------------

_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels; ApiError 400 for a selector that does not parse."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(selector or ""):
        term = term.strip()
        m = _SET.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            tests.append(lambda labels, k=absent: k not in labels)
        elif re.fullmatch(r"[\w./-]+", term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels) for t in tests)


def dig(obj: Any, path: str) -> Any:
    """The value at a dotted path (`.spec.nodeName`, `metadata.name`), None where absent."""
    for part in [p for p in path.strip(".").split(".") if p]:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def field_matcher(selector: str) -> Callable[[Json], bool]:
    tests: list[Callable[[Json], bool]] = []
    for term in _split_selector(selector or ""):
        term = term.strip()
        negate = "!=" in term
        parts = term.split("!=" if negate else "=", 1)
        if len(parts) != 2:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        path, value = parts[0].strip(), parts[1].lstrip("=").strip()

        def test(obj: Json, p: str = path, v: str = value, neg: bool = negate) -> bool:
            got = dig(obj, p)
            text = "" if got is None else str(got)
            return (text != v) if neg else (text == v)
        tests.append(test)
    return lambda obj: all(t(obj) for t in tests)


# --- patches ------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Json, ops: Any) -> Json:
    """RFC 6902 (add, remove, replace, test, move, copy)."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    doc: Any = copy.deepcopy(target)

    def parent(parts: list[str]) -> tuple[Any, str]:
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node, parts[-1]

    try:
        for op in ops:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "test":
                node = doc
                for p in parts:
                    node = node[int(p)] if isinstance(node, list) else node[p]
                if node != op["value"]:
                    raise ApiError(422, "Invalid", f"test failed at {op['path']}")
                continue
            if kind in ("move", "copy"):
                src, key = parent(_pointer(op["from"]))
                value = src[int(key)] if isinstance(src, list) else src[key]
                if kind == "move":
                    del src[int(key) if isinstance(src, list) else key]
                op = {"op": "add", "path": op["path"], "value": copy.deepcopy(value)}
                kind = "add"
            node, key = parent(parts)
            if kind == "remove":
                del node[int(key) if isinstance(node, list) else key]
            elif isinstance(node, list):
                idx = len(node) if key == "-" else int(key)
                if kind == "add":
                    node.insert(idx, op["value"])
                else:
                    node[idx] = op["value"]
            elif kind in ("add", "replace"):
                if kind == "replace" and key not in node:
                    raise ApiError(422, "Invalid", f"replace of a missing path {op['path']}")
                node[key] = op["value"]
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the JSON patch does not apply: {exc!r}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "Invalid", "a JSON patch must leave an object")
    return doc


# --- the store ----------------------------------------------------------------------------

@dataclass
class Event:
    rv: int
    kind: Kind
    type: str
    object: Json


class Store:
    def __init__(self) -> None:
        self.kinds: dict[tuple[str, str, str], Kind] = {k.key: k for k in copy.deepcopy(BUILTIN)}
        self.rv = 1
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.waiters: set[asyncio.Event] = set()
        """One event per watch, set at every change (no lock: a watch never blocks a writer)."""
        for name in ("default", "kube-system", "kube-public"):  # as every cluster has them
            self.create(self.kinds[("", "v1", "namespaces")], None, {"metadata": {"name": name}})

    # kinds ------------------------------------------------------------------------------

    def kind(self, group: str, version: str, plural: str) -> Kind:
        found = self.kinds.get((group, version, plural))
        if found is None:
            where = f"{group}/{version}" if group else version
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural}.{where})")
        return found

    def register_crd(self, crd: Json) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            key = (spec.get("group", ""), version["name"], names.get("plural", ""))
            old = self.kinds.get(key)
            columns = tuple(Column(c["name"], c.get("type", "string"), c["jsonPath"], c.get("description", ""),
                                   int(c.get("priority", 0)), c.get("format", ""))
                            for c in version.get("additionalPrinterColumns", []))
            self.kinds[key] = Kind(
                key[0], key[1], key[2], names.get("kind", ""), spec.get("scope") == "Namespaced",
                names.get("singular", ""), tuple(names.get("shortNames", [])), tuple(names.get("categories", [])),
                "status" in (version.get("subresources") or {}), columns,
                old.objects if old is not None else {})

    def unregister_crd(self, crd: Json) -> None:
        spec = crd.get("spec", {})
        for version in spec.get("versions", []):
            self.kinds.pop((spec.get("group", ""), version["name"], spec.get("names", {}).get("plural", "")), None)

    # reads ------------------------------------------------------------------------------

    def items(self, kind: Kind, namespace: str | None, labels: str = "", fields: str = "") -> list[Json]:
        match_labels, match_fields = label_matcher(labels), field_matcher(fields)
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(kind.objects.items())
                if (namespace is None or ns == namespace)
                and match_labels(obj.get("metadata", {}).get("labels") or {}) and match_fields(obj)]

    def get(self, kind: Kind, namespace: str | None, name: str) -> Json:
        obj = kind.objects.get((namespace or "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural}.{kind.group or "core"} "{name}" not found',
                           {"name": name, "kind": kind.plural, "group": kind.group})
        return copy.deepcopy(obj)

    def events_since(self, rv: int) -> Iterator[Event]:
        """Events after `rv`; Gone (410) if the history no longer reaches back that far."""
        if self.history and rv < self.history[0].rv - 1:
            raise ApiError(410, "Expired", f"too old resource version: {rv} ({self.history[0].rv - 1})")
        for event in list(self.history):
            if event.rv > rv:
                yield event

    # writes -----------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, kind: Kind, type_: str, obj: Json) -> None:
        self.history.append(Event(int(obj["metadata"]["resourceVersion"]), kind, type_, copy.deepcopy(obj)))

    async def notify(self) -> None:
        for waiter in list(self.waiters):
            waiter.set()

    def _check_namespace(self, kind: Kind, namespace: str | None) -> str:
        if not kind.namespaced:
            return ""
        if not namespace:
            raise ApiError(400, "BadRequest", f"{kind.plural} are namespaced: a namespace is required")
        if ("", namespace) not in self.kinds[("", "v1", "namespaces")].objects:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        return namespace

    def create(self, kind: Kind, namespace: str | None, body: Any) -> Json:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body is not a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata: must be an object")
        ns = self._check_namespace(kind, namespace or meta.get("namespace"))
        if kind.namespaced and meta.get("namespace") not in (None, "", ns):
            raise ApiError(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(422, "Invalid", f"{kind.kind}: metadata.name: Required value: name or generateName is required")
        if (ns, name) in kind.objects:
            raise ApiError(409, "AlreadyExists", f'{kind.plural}.{kind.group or "core"} "{name}" already exists',
                           {"name": name, "kind": kind.plural, "group": kind.group})
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1,
                    resourceVersion=self._next_rv())
        meta.pop("deletionTimestamp", None)
        if kind.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        if kind.status and kind.group not in ("", "apiextensions.k8s.io"):
            obj.pop("status", None)  # a custom resource's status is written through /status only
        if kind.plural == "pods":
            obj["status"] = {"phase": "Pending"}
        if kind.plural == "customresourcedefinitions":
            obj["status"] = _crd_status(obj)
        elif kind.plural == "namespaces":
            obj["status"] = {"phase": "Active"}
        kind.objects[(ns, name)] = obj
        self._emit(kind, "ADDED", obj)
        refs = [r.get("uid") for r in meta.get("ownerReferences") or []]
        if refs and not any(self._exists(uid) for uid in refs):
            self.delete(kind, ns or None, name)  # the garbage collector: an object whose owners are gone
            return copy.deepcopy(obj)
        if kind.plural == "customresourcedefinitions":
            self.register_crd(obj)
        return copy.deepcopy(obj)

    def update(self, kind: Kind, namespace: str | None, name: str, body: Any, *, status: bool = False) -> Json:
        """PUT: replace (the main object or only its status), with optimistic concurrency."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body is not a JSON object")
        current = self.get(kind, namespace, name)
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural}.{kind.group or "core"} '
                           f'"{name}": the object has been modified; please apply your changes to the latest '
                           "version and try again", {"name": name, "kind": kind.plural, "group": kind.group})
        if (body.get("metadata") or {}).get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name of the URL")
        return self._replace(kind, current, body, status=status)

    def patch(self, kind: Kind, namespace: str | None, name: str, content_type: str, body: Any, *,
              status: bool = False) -> Json:
        current = self.get(kind, namespace, name)
        if "json-patch" in content_type:
            wanted = json_patch(current, body)
        elif "merge-patch" in content_type or "strategic-merge-patch" in content_type:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch is a JSON object")
            wanted = merge_patch(current, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the patch type {content_type!r} is not supported "
                           "(merge, strategic-merge and JSON patches are)")
        given = (wanted.get("metadata") or {}).get("resourceVersion")
        if given and given != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural} "{name}": '
                           "the object has been modified; please apply your changes to the latest version and try again")
        return self._replace(kind, current, wanted, status=status)

    def _replace(self, kind: Kind, current: Json, body: Json, *, status: bool) -> Json:
        meta = current["metadata"]
        if status:
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new_meta = new.setdefault("metadata", {})
            for keep in ("uid", "creationTimestamp", "generation", "namespace", "name", "deletionTimestamp"):
                if keep in meta:
                    new_meta[keep] = meta[keep]
                else:
                    new_meta.pop(keep, None)
            if kind.status:
                if "status" in current:
                    new["status"] = current["status"]
                else:
                    new.pop("status", None)
            new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            if _spec_of(new) != _spec_of(current):
                new_meta["generation"] = int(meta.get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = meta["resourceVersion"]
        if new == current:
            return current  # a no-op: same resourceVersion, no event
        if kind.plural == "customresourcedefinitions":
            new["status"] = _crd_status(new)
        new["metadata"]["resourceVersion"] = self._next_rv()
        key = (meta.get("namespace", ""), meta["name"])
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            kind.objects.pop(key, None)
            self._emit(kind, "DELETED", new)
            self._collect(new["metadata"]["uid"])
            return copy.deepcopy(new)
        kind.objects[key] = new
        self._emit(kind, "MODIFIED", new)
        if kind.plural == "customresourcedefinitions":
            self.register_crd(new)
        return copy.deepcopy(new)

    def delete(self, kind: Kind, namespace: str | None, name: str) -> Json:
        current = self.get(kind, namespace, name)
        meta = current["metadata"]
        key = (meta.get("namespace", ""), name)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_rfc3339()
                meta["resourceVersion"] = self._next_rv()
                kind.objects[key] = current
                self._emit(kind, "MODIFIED", current)
            return copy.deepcopy(current)
        del kind.objects[key]
        meta["resourceVersion"] = self._next_rv()
        self._emit(kind, "DELETED", current)
        if kind.plural == "customresourcedefinitions":
            self.unregister_crd(current)
        if kind.plural == "namespaces":
            for other in list(self.kinds.values()):
                if other.namespaced:
                    for ns, obj_name in [k for k in other.objects if k[0] == name]:
                        self.delete(other, ns, obj_name)
        self._collect(meta["uid"])
        return copy.deepcopy(current)

    def _exists(self, uid: str) -> bool:
        return any(o.get("metadata", {}).get("uid") == uid for k in self.kinds.values() for o in k.objects.values())

    def _collect(self, uid: str) -> None:
        """Delete what `uid` owned (the garbage collector's background propagation)."""
        for kind in list(self.kinds.values()):
            for (ns, name), obj in list(kind.objects.items()):
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") == uid for ref in refs) and (ns, name) in kind.objects:
                    self.delete(kind, ns or None, name)


def _spec_of(obj: Json) -> str:
    return json.dumps({k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")},
                      sort_keys=True)


def _crd_status(crd: Json) -> Json:
    names = (crd.get("spec") or {}).get("names") or {}
    now = now_rfc3339()
    return {"acceptedNames": names, "storedVersions": [v["name"] for v in (crd.get("spec") or {}).get("versions", [])
                                                      if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now,
                 "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "lastTransitionTime": now, "message": "the initial names have been accepted"}]}
