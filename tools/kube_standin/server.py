"""The stand-in API server: kmock's Kubernetes scaffold with a store that behaves as an apiserver's.

Contract: `StandIn` is a `kmock.KubernetesScaffold` (kmock 0.8 serves discovery — /api, /apis,
/apis/G, /apis/G/V — from its `resources` table, the HTTP server is kmock's `Server`); this
class answers every resource path itself from a `store.Store`, filling the gaps of kmock's
emulator found by driving it with kubectl 1.37:
- lists carry `kind`, `apiVersion` and the store's real resourceVersion; create answers 201;
- PUT with a stale resourceVersion is 409; `/status` changes only `.status`;
- creating a CRD registers its resource (discovery, tables, watches) at once;
- watch resumes from a resourceVersion (410 Gone when the history has moved on), honours
  label/field selectors and `timeoutSeconds`, sends periodic BOOKMARKs when asked, and with
  `sendInitialEvents=true` the initial state then the `k8s.io/initial-events-end` BOOKMARK
  that `kubectl wait` needs;
- `/openapi/v3` (and each group version's document) is served, with the `fieldValidation`
  query parameter declared, so `kubectl apply` validates on the server side;
- `Table` responses (`Accept: ...;as=Table`) from a CRD's printer columns, so `kubectl get`
  prints them.
Protobuf is not served (kubectl's typed commands send it: use `apply -f`, `get -o json`).
Not: authentication, authorisation, admission, schema validation or pruning.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import sys
from typing import Any

import aiohttp.web
import kmock

from kube_standin.store import ApiError, Json, Kind, Store, dig, field_matcher, label_matcher

BOOKMARK_EVERY = 1.0
"""Seconds between BOOKMARK events on a watch that allows them."""

TRACE = bool(os.environ.get("KUBE_STANDIN_TRACE"))
"""Print every request to stderr (method, path, Accept, Content-Type)."""

_VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


class StandIn(kmock.KubernetesScaffold):  # type: ignore[misc]
    """kmock's scaffold (discovery, HTTP) over a real-enough object store."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store = Store()
        self.sync_discovery()

    def sync_discovery(self) -> None:
        """kmock's discovery table from the store's kinds (after every CRD change)."""
        for key in list(self.resources):
            del self.resources[key]
        for k in self.store.kinds.values():
            self.resources[kmock.resource(k.group, k.version, k.plural)] = kmock.ResourceInfo(
                namespaced=k.namespaced, kind=k.kind, singular=k.singular or k.kind.lower(),
                verbs=_VERBS, shortnames=set(k.short_names), categories=set(k.categories),
                subresources={"status"} if k.status else set())

    async def _serve_server_version(self, request: Any) -> Json:
        return {"major": "1", "minor": "37", "gitVersion": "v1.37.0-jobtree-standin", "platform": "linux/amd64"}

    async def _serve_version(self, request: Any) -> Json:
        """An APIResourceList (kmock's lists a subresource with its parent's short names,
        which kubectl then reports as ambiguous)."""
        group, version = request.resource.group, request.resource.version
        kinds = [k for k in self.store.kinds.values() if (k.group, k.version) == (group, version)]
        if not kinds:
            raise kmock.KubernetesResourceNotFoundError()
        resources: list[Json] = []
        for k in kinds:
            resources.append({"name": k.plural, "singularName": k.singular or k.kind.lower(), "kind": k.kind,
                              "namespaced": k.namespaced, "verbs": sorted(_VERBS), "shortNames": list(k.short_names),
                              "categories": list(k.categories)})
            if k.status:
                resources.append({"name": f"{k.plural}/status", "singularName": "", "kind": k.kind,
                                  "namespaced": k.namespaced, "verbs": ["get", "patch", "update"]})
        return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    # --- HTTP entry ------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        parsed = _parse(raw.path)
        if TRACE:
            print(raw.method, raw.path_qs, raw.headers.get("Accept", ""), raw.headers.get("Content-Type", ""),
                  file=sys.stderr, flush=True)
        try:
            if raw.path.startswith("/openapi/v3"):
                return aiohttp.web.json_response(self._openapi(raw.path))
            if parsed is None:
                return await super().__call__(raw)  # discovery: kmock's
            return await self._resource(raw, *parsed)
        except ApiError as err:
            return aiohttp.web.json_response(err.status(), status=err.code)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug of the stand-in: say so as an apiserver would
            if TRACE:
                import traceback

                traceback.print_exc(file=sys.stderr)
            err = ApiError(500, "InternalError", f"stand-in failure: {exc!r}")
            return aiohttp.web.json_response(err.status(), status=500)

    async def _resource(self, raw: aiohttp.web.BaseRequest, group: str, version: str, namespace: str | None,
                        plural: str, name: str | None, sub: str | None) -> aiohttp.web.StreamResponse:
        store = self.store
        kind = store.kind(group, version, plural)
        if not kind.namespaced:
            namespace = None
        q = raw.query
        method = raw.method
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({plural}/{sub})")
        if method == "GET" and q.get("watch") in ("true", "1"):
            return await self._watch(raw, kind, namespace, name)
        if method == "GET" and name is None:
            items = store.items(kind, namespace, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            if _wants_table(raw):
                return aiohttp.web.json_response(self._table(kind, items))
            return aiohttp.web.json_response({
                "apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": str(store.rv)}, "items": items})
        if method == "GET":
            assert name is not None
            obj = store.get(kind, namespace, name)
            return aiohttp.web.json_response(self._table(kind, [obj]) if _wants_table(raw) else obj)
        body = await _body(raw)
        if method == "POST" and name is None:
            obj = store.create(kind, namespace, body)
            status = 201
        elif method == "PUT" and name is not None:
            obj = store.update(kind, namespace, name, body, status=sub == "status")
            status = 200
        elif method == "PATCH" and name is not None:
            obj = store.patch(kind, namespace, name, raw.headers.get("Content-Type", ""), body,
                              status=sub == "status")
            status = 200
        elif method == "DELETE" and name is not None:
            obj = store.delete(kind, namespace, name)
            status = 200
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on {raw.path}")
        if kind.plural == "customresourcedefinitions":
            self.sync_discovery()
        await store.notify()
        return aiohttp.web.json_response(obj, status=status)

    # --- watch -----------------------------------------------------------------------------

    async def _watch(self, raw: aiohttp.web.BaseRequest, kind: Kind, namespace: str | None,
                     name: str | None) -> aiohttp.web.StreamResponse:
        store, q = self.store, raw.query
        fields = q.get("fieldSelector", "")
        if name is not None:
            fields = ",".join(f for f in (fields, f"metadata.name={name}") if f)
        labels = q.get("labelSelector", "")
        initial = q.get("sendInitialEvents") == "true"
        bookmarks = q.get("allowWatchBookmarks") == "true"
        rv_text = q.get("resourceVersion", "")
        timeout = float(q.get("timeoutSeconds") or 1800)
        try:
            since = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise ApiError(400, "BadRequest", f"resourceVersion: {rv_text!r} is not a resourceVersion") from None
        matching = {(o["metadata"].get("namespace", ""), o["metadata"]["name"])
                    for o in store.items(kind, namespace, labels, fields)}
        # Gone (410) is raised here, before the stream starts, as the apiserver does.
        backlog = list(store.events_since(since)) if since is not None and not initial else []
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                                "Transfer-Encoding": "chunked"})
        await resp.prepare(raw)

        async def send(type_: str, obj: Json) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        match_labels, match_fields = label_matcher(labels), field_matcher(fields)

        def selected(obj: Json) -> bool:
            meta = obj.get("metadata", {})
            return ((namespace is None or meta.get("namespace") == namespace)
                    and match_labels(meta.get("labels") or {}) and match_fields(obj))

        def bookmark(rv: int, end: bool = False) -> Json:
            meta: Json = {"resourceVersion": str(rv)}
            if end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}

        last = store.rv
        if since is None:
            for obj in store.items(kind, namespace, labels, fields):
                await send("ADDED", obj)
            if initial:
                await send("BOOKMARK", bookmark(last, end=True))
        else:
            last = since
            for event in backlog:
                last = await self._relay(send, event, kind, selected, matching, last)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        changed = asyncio.Event()
        store.waiters.add(changed)
        try:
            while loop.time() < deadline:
                changed.clear()
                if store.rv <= last:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), min(BOOKMARK_EVERY, max(0.0, deadline - loop.time())))
                try:
                    events = list(store.events_since(last))
                except ApiError as err:  # this watcher fell behind the history
                    await send("ERROR", err.status())
                    break
                for event in events:
                    last = await self._relay(send, event, kind, selected, matching, last)
                if not events and bookmarks:
                    await send("BOOKMARK", bookmark(store.rv))
                    last = max(last, store.rv)
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        finally:
            store.waiters.discard(changed)
        await resp.write_eof()
        return resp

    @staticmethod
    async def _relay(send: Any, event: Any, kind: Kind, selected: Any, matching: set[tuple[str, str]],
                     last: int) -> int:
        """Send one store event to a watcher as the apiserver's watch cache would: an object that
        stops matching the selector is DELETED for it, one that starts matching is ADDED."""
        if event.kind.key != kind.key:
            return max(last, event.rv)
        obj = event.object
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        now = event.type != "DELETED" and selected(obj)
        before = key in matching
        if event.type == "DELETED":
            if before:
                matching.discard(key)
                await send("DELETED", obj)
        elif now and before and event.type != "ADDED":
            await send("MODIFIED", obj)
        elif now:
            matching.add(key)
            await send("ADDED", obj)
        elif before:
            matching.discard(key)
            await send("DELETED", obj)
        return max(last, event.rv)

    # --- tables and OpenAPI ----------------------------------------------------------------

    def _table(self, kind: Kind, items: list[Json]) -> Json:
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "the object's name",
                    "priority": 0}]
        columns += [{"name": c.name, "type": c.type, "format": c.format, "description": c.description,
                     "priority": c.priority} for c in kind.columns
                    if c.json_path != ".metadata.creationTimestamp"]
        columns.append({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0})
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for c in kind.columns:
                if c.json_path != ".metadata.creationTimestamp":
                    cells.append(_cell(jsonpath(obj, c.json_path)))
            cells.append(age(obj["metadata"].get("creationTimestamp")))
            rows.append({"cells": cells, "object": {
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]}})
        return {"apiVersion": "meta.k8s.io/v1", "kind": "Table",
                "metadata": {"resourceVersion": str(self.store.rv)}, "columnDefinitions": columns, "rows": rows}

    def _openapi(self, path: str) -> Json:
        versions = sorted({(k.group, k.version) for k in self.store.kinds.values()})
        if path.rstrip("/") == "/openapi/v3":
            return {"paths": {_gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}?hash={self.store.rv}"}
                              for g, v in versions}}
        wanted = path[len("/openapi/v3/"):].strip("/")
        param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
        paths: Json = {}
        schemas: Json = {}
        for k in self.store.kinds.values():
            if _gv_path(k.group, k.version) != wanted:
                continue
            base = f"/{wanted}" + ("/namespaces/{namespace}" if k.namespaced else "") + f"/{k.plural}"
            gvk = {"group": k.group, "version": k.version, "kind": k.kind}
            op = {"parameters": [param], "responses": {}, "x-kubernetes-group-version-kind": gvk}
            paths[base] = {"post": op}
            paths[base + "/{name}"] = {"put": op, "patch": op}
            schemas[f"{k.group or 'io.k8s.api.core'}.{k.version}.{k.kind}"] = {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                "x-kubernetes-group-version-kind": [gvk]}
        if not paths:
            raise ApiError(404, "NotFound", f"no OpenAPI document for {wanted}")
        return {"openapi": "3.0.0", "info": {"title": "jobtree stand-in", "version": "v1"}, "paths": paths,
                "components": {"schemas": schemas}}


def age(stamp: str | None) -> str:
    """kubectl's AGE words (k8s.io/apimachinery duration.HumanDuration) for an RFC 3339 instant."""
    if not stamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    s = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if h < 3:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d"


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _wants_table(raw: aiohttp.web.BaseRequest) -> bool:
    return "as=Table" in raw.headers.get("Accept", "")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


_INDEX = re.compile(r"^(\w+)\[(\*|\d+)\]$")


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of kubectl JSONPath printer columns use: `.a.b`, `.a[0].b`, `.a[*].b`."""
    values = [obj]
    for part in [p for p in path.strip(".").split(".") if p]:
        m = _INDEX.match(part)
        nxt: list[Any] = []
        for v in values:
            got = v.get(m.group(1) if m else part) if isinstance(v, dict) else None
            if m and isinstance(got, list):
                nxt.extend(got if m.group(2) == "*" else got[int(m.group(2)):int(m.group(2)) + 1])
            elif got is not None and not m:
                nxt.append(got)
        values = nxt
    if "[*]" in path:
        return values
    return values[0] if values else None


def _parse(path: str) -> tuple[str, str, str | None, str, str | None, str | None] | None:
    """(group, version, namespace, plural, name, subresource) of a resource path; None otherwise."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), ("/".join(rest[2:]) or None)
    return group, version, namespace, plural, name, sub


async def _body(raw: aiohttp.web.BaseRequest) -> Any:
    text = await raw.text()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, "BadRequest", "the request body is not JSON (the stand-in serves no protobuf; "
                       "use `kubectl apply -f` or `-o json`)") from None


__all__ = ["StandIn", "dig", "jsonpath"]
