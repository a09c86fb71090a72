"""The kube-bridge's Kubernetes plumbing: a JSON client, informers and a work queue.

Contract:
- `Kube.connect(kubeconfig)` loads a kubeconfig file (kubernetes-asyncio), or the in-cluster
  service account when `kubeconfig` is None; `request` sends one JSON request and answers the
  decoded body, raising `KubeError` (HTTP code, reason, message) for an error status; `watch`
  yields the events of one watch request, line by line.
- `Informer` keeps a cache of one resource (optionally a label selector) by list + watch: it
  lists, then watches from the list's resourceVersion with bookmarks; a watch that ends is
  resumed from the last resourceVersion seen; `410 Gone` (or an ERROR event) relists, and the
  cache is diffed against the new list so a deletion missed meanwhile is still reported.
  `on_change(key, obj | None)` is called for every change; `synced` is set after the first list.
- `WorkQueue` holds distinct keys (a key added twice while waiting is processed once), at
  most `capacity`: past it, keys are dropped and `overflowed` says a full resync is due.
  `retry(key)` re-adds a key after a per-key exponential backoff (`BASE`..`CAP` seconds);
  `forget(key)` resets it after a success.
Not: the reconcile logic (see `bridge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

Json = dict[str, Any]
log = logging.getLogger("jobtree.kube-bridge")


class KubeError(Exception):
    """An error answer of the API server (`code` 0: it could not be reached)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> Kube:
        conf = client.Configuration()
        if kubeconfig:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        else:
            config.load_incluster_config(client_configuration=conf)
        return cls(client.ApiClient(configuration=conf))

    async def close(self) -> None:
        await self.api.close()

    async def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                      content_type: str = "application/json", timeout: float = 30.0) -> Json:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            out = await self.api.call_api(
                path, method, query_params=list((query or {}).items()), header_params=headers, body=body,
                auth_settings=["BearerToken"], response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True, _request_timeout=timeout)
        except ApiException as exc:
            raise _error(exc.status or 0, exc.reason or "", exc.body) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, "Unreachable", f"the API server cannot be reached: {exc!r}") from None
        return out if isinstance(out, dict) else {}

    async def watch(self, path: str, query: dict[str, Any]) -> AsyncIterator[Json]:
        headers = {"Accept": "application/json"}
        try:
            resp = await self.api.call_api(
                path, "GET", query_params=list({**query, "watch": "true"}.items()), header_params=headers,
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=None))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, "Unreachable", f"the API server cannot be reached: {exc!r}") from None
        try:
            if resp.status >= 400:
                raise _error(resp.status, resp.reason or "", await resp.read())
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.release()


def _error(code: int, reason: str, body: Any) -> KubeError:
    message = ""
    with contextlib.suppress(Exception):
        doc = json.loads(body)
        message, reason = doc.get("message", ""), doc.get("reason", reason)
    return KubeError(code, reason, message or str(body)[:200])


def object_key(obj: Json) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return (meta.get("namespace", "") or "", meta.get("name", ""))


class Informer:
    """A cache of one resource kept by list + watch (see the module contract)."""

    WATCH_SECONDS = 300

    def __init__(self, kube: Kube, res: Resource, on_change: Callable[[tuple[str, str], Json | None], None], *,
                 labels: str = "") -> None:
        self.kube, self.res, self.on_change, self.labels = kube, res, on_change, labels
        self.cache: dict[tuple[str, str], Json] = {}
        self.synced = asyncio.Event()
        self.lists = 0
        self.rv = ""

    def _put(self, obj: Json) -> None:
        key = object_key(obj)
        old = self.cache.get(key)
        self.cache[key] = obj
        if old is None or old.get("metadata", {}).get("resourceVersion") != obj["metadata"].get("resourceVersion"):
            self.on_change(key, obj)

    def _drop(self, key: tuple[str, str]) -> None:
        if self.cache.pop(key, None) is not None:
            self.on_change(key, None)

    async def _list(self) -> None:
        query = {"labelSelector": self.labels} if self.labels else {}
        doc = await self.kube.request("GET", self.res.path(), query=query)
        seen = set()
        for obj in doc.get("items", []):
            seen.add(object_key(obj))
            self._put(obj)
        for key in [k for k in self.cache if k not in seen]:
            self._drop(key)
        self.rv = doc.get("metadata", {}).get("resourceVersion", "")
        self.lists += 1
        self.synced.set()

    async def run(self) -> None:
        """List, then watch, forever. An informer that already has a resourceVersion (its loop
        was restarted) resumes the watch from it; 410 Gone relists."""
        delay = 0.1
        listed = bool(self.rv)
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                query = {"resourceVersion": self.rv, "allowWatchBookmarks": "true",
                         "timeoutSeconds": str(self.WATCH_SECONDS)}
                if self.labels:
                    query["labelSelector"] = self.labels
                async for event in self.kube.watch(self.res.path(), query):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            listed = False
                            break
                        raise KubeError(int(obj.get("code") or 0), obj.get("reason", ""), obj.get("message", ""))
                    rv = obj.get("metadata", {}).get("resourceVersion")
                    if rv:
                        self.rv = rv
                    if kind in ("ADDED", "MODIFIED"):
                        self._put(obj)
                    elif kind == "DELETED":
                        self._drop(object_key(obj))
                delay = 0.1
            except KubeError as err:
                if err.code == 410:
                    listed = False
                    continue
                log.warning("watch of %s failed; retrying: %s", self.res.plural, err)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                log.warning("watch of %s broke; resuming: %r", self.res.plural, exc)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)


class WorkQueue:
    """Distinct keys, bounded, with per-key backoff for retries (see the module contract)."""

    BASE = 0.05
    CAP = 30.0

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: set[Any] = set()
        self._failures: dict[Any, int] = {}
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, key: Any) -> None:
        if key in self._waiting:
            return
        if len(self._waiting) >= self.capacity:
            self.overflowed = True
            return
        self._waiting.add(key)
        self._queue.put_nowait(key)

    def add_after(self, key: Any, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, delay), self.add, key)

    async def get(self) -> Any:
        key = await self._queue.get()
        self._waiting.discard(key)
        return key

    def retry(self, key: Any) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.CAP, self.BASE * (2 ** n))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Any) -> None:
        self._failures.pop(key, None)
