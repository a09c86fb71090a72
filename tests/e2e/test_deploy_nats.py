"""The deployment's generated NATS config, run for real (issue 7, item 5): a nats-server started
with `nats.conf` of the dev overlay (only its listen addresses and store moved to loopback and a
temporary directory), every password from the environment as the StatefulSet passes them, and
the services as their own users, with no admin set-up step — as on Kubernetes, the binder
creates the ledger and admission its lock bucket. A run submitted through the gateway runs;
a wrong password and a publish beyond a user's grants are refused by the server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from kubeenv import StandIn
from test_gateway import BUDGET, budget_msg, run_msg, wait_for_port, wait_serving

from jobtree.api import convert
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.bus import codec, subjects
from jobtree.bus.natsconf import nats_conf
from jobtree.bus.natsserver import find_binary
from jobtree.bus.security import ADMIN, SERVICES, password_env
from jobtree.bus.supervisor import Supervisor
from jobtree.cli.kustomize import CLUSTER
from jobtree.core import facts as F
from jobtree.core.model import Node, labels_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_services_run_on_the_generated_nats_config(tmp_path: Path) -> None:
    port = free_port()
    conf = nats_conf(CLUSTER, 1, listen=f"127.0.0.1:{port}", monitor="127.0.0.1:-1", store_dir=str(tmp_path / "js"))
    dev = (Path(__file__).resolve().parents[2] / "deploy/kustomize/overlays/dev/nats.conf").read_text()
    assert conf.split("authorization", 1)[1] == dev.split("authorization", 1)[1], "the test runs the dev config"
    (tmp_path / "nats.conf").write_text(conf)
    passwords = {u: f"secret-{u}-{os.getpid()}" for u in (ADMIN, *SERVICES)}
    env = {**os.environ, **{password_env(u): pw for u, pw in passwords.items()}}
    log = (tmp_path / "nats.log").open("w")
    server = subprocess.Popen([str(find_binary()), "-c", str(tmp_path / "nats.conf")], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"nats://127.0.0.1:{port}"
    sup = Supervisor(tmp_path / "sys", CLUSTER, url)
    (tmp_path / "kube").mkdir()
    kube_api = StandIn(tmp_path / "kube")  # the kube-bridge needs an API server to talk to
    try:
        deadline = time.monotonic() + 15
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "nats.log").read_text()
            time.sleep(0.05)
        for service in SERVICES:
            creds = {"JOBTREE_NATS_USER": service, "JOBTREE_NATS_PASSWORD": passwords[service]}
            notify = tmp_path / "notify.yaml"
            notify.write_text("receivers: [{name: w, webhook: {url: 'http://127.0.0.1:9/'}}]\nroutes: [{receiver: w}]\n")
            extra = {"gateway": ("--grpc-port", "0"), "dashboard": ("--http-port", "0"),
                     "kube-bridge": ("--kubeconfig", str(kube_api.kubeconfig)),
                     "notifier": ("--config", str(notify))}
            plain = {"JOBTREE_GRPC_INSECURE": "1"} if service == "gateway" else {}  # TLS: tests/e2e/test_trust.py
            sup.start(service, env={**creds, **plain}, args=extra.get(service, ()))
        address = f"127.0.0.1:{wait_for_port(tmp_path / 'sys', sup)}"
        wait_serving(address)

        async def as_admin() -> None:
            nc = await nats.connect(url, user=ADMIN, password=passwords[ADMIN], allow_reconnect=False)
            try:
                subject = subjects.request(CLUSTER, "admission", "command")
                for i in range(2):
                    node = Node(f"n-{i}", 8, labels_of({"region": "eu", "cluster": "gw", "fabric.domain": "A",
                                                         "gpu.flavor": "H100-80GB"}))
                    msg = convert.command_to_proto(F.AddNode(node), command_id=f"node-{i}")
                    for _ in range(100):
                        try:
                            raw = await nc.request(subject, codec.encode(msg), timeout=2, headers=codec.headers(msg))
                            break
                        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                            await asyncio.sleep(0.2)
                    assert not codec.decode(raw.data, convert.bus.CommandReply).HasField("error")
            finally:
                await nc.close()

        asyncio.run(as_admin())
        with grpc.insecure_channel(address) as channel:
            stub = api_grpc.JobtreeStub(channel)
            stub.ApplyBudget(api.ApplyBudgetRequest(budget=budget_msg(BUDGET), request_id="b"), timeout=10)
            done = stub.SubmitRun(api.SubmitRunRequest(run=run_msg("on-k8s-config", 8), request_id="r"), timeout=10)
            assert done.run.status.phase == "Running", done

        async def refused() -> None:
            with pytest.raises(nats.errors.Error):
                await nats.connect(url, user="gateway", password="wrong", allow_reconnect=False,
                                   max_reconnect_attempts=0)
            nc = await nats.connect(url, user="budget", password=passwords["budget"], allow_reconnect=False)
            try:  # budget may not write the ledger: the server refuses and logs it
                await nc.publish(subjects.ledger_subject(CLUSTER), b"forged")
                await nc.flush()
                await asyncio.sleep(0.3)
            finally:
                await nc.close()
            text = (tmp_path / "nats.log").read_text()
            assert 'user:budget" - Publish Violation - Subject "jobtree.default.ledger.' in text, text[-2000:]

        asyncio.run(refused())
        assert sup.exited() == {}, {n: sp.log_tail(20) for n, sp in sup.processes.items()}
    finally:
        sup.stop()
        kube_api.stop()
        server.terminate()
        server.wait(10)
        log.close()
