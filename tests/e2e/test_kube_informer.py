"""The kube-bridge's informer against the stand-in API server: it follows changes, and when its
resourceVersion has expired (410 Gone) it relists and still reports what it missed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from kubeenv import StandIn

from jobtree.services.kube_bridge.kube import Informer, Kube, KubeError, Resource

CONFIGMAPS = Resource("", "v1", "configmaps", True)


def test_an_informer_follows_and_relists_after_gone(tmp_path: Path) -> None:
    os.environ["KUBE_STANDIN_HISTORY"] = "5"  # the stand-in process forgets quickly
    try:
        api = StandIn(tmp_path)
    finally:
        del os.environ["KUBE_STANDIN_HISTORY"]
    try:
        for name in ("a", "b"):
            assert api.http("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": name}})[0] == 201
        asyncio.run(_scenario(api))
    finally:
        api.stop()


async def _scenario(api: StandIn) -> None:
    kube = await Kube.connect(str(api.kubeconfig))
    seen: list[tuple[str, bool]] = []
    informer = Informer(kube, CONFIGMAPS, lambda key, obj: seen.append((key[1], obj is not None)))
    task = asyncio.ensure_future(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        assert sorted(seen) == [("a", True), ("b", True)] and informer.lists == 1
        api.http("PATCH", "/api/v1/namespaces/default/configmaps/a", {"data": {"k": "1"}},
                 "application/merge-patch+json")
        await _until(lambda: ("a", True) in seen[2:])
        task.cancel()  # the watch loop dies; meanwhile the history moves past its version
        await asyncio.gather(task, return_exceptions=True)
        seen.clear()
        api.http("DELETE", "/api/v1/namespaces/default/configmaps/a")
        api.http("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c"}})
        for i in range(10):
            api.http("PATCH", "/api/v1/namespaces/default/configmaps/b", {"data": {"i": str(i)}},
                     "application/merge-patch+json")
        task = asyncio.ensure_future(informer.run())  # resumes from its version: Gone, so it relists
        await _until(lambda: informer.lists == 2)
        await _until(lambda: {("a", False), ("c", True), ("b", True)} <= set(seen))
        assert sorted(n for _, n in informer.cache) == ["b", "c"]
        assert informer.cache[("default", "b")]["data"] == {"i": "9"}
        try:
            await kube.request("GET", CONFIGMAPS.path("default", "nope"))
        except KubeError as err:
            assert err.code == 404 and err.reason == "NotFound"
        else:
            raise AssertionError("a missing object is a KubeError 404")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()


async def _until(probe: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
