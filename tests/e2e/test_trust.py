"""Trust at the edge (issue 9) with real processes: `jobtree up` with TLS, tokens, client
certificates and an access policy; the gateway over gRPC and `kubectl-runs` as a process.

What must hold: a caller without credentials, with an unknown token or a certificate of another
CA gets nothing; a researcher cannot submit, cancel or shrink a run of an owner the policy does
not give it, over gRPC or the CLI (PERMISSION_DENIED, exit 2, one line, the ledger unchanged);
what it may do commits, with its identity in the ledger; the policy is re-read when edited
(a broken edit keeps the previous one); a restarted `up` keeps its CA, token and policy.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import yaml
from test_up import CLUSTER, Up, run_manifest

from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.api.jobtree.v1 import service_pb2_grpc as api_grpc
from jobtree.auth import pki
from jobtree.auth.policy import token_digest
from jobtree.bus.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"


def identities(up: Up, extra: list[dict[str, Any]]) -> None:
    """Add identities to the policy `jobtree up` made, and wait until the gateway took it."""
    path = up.data_dir / "policy.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["identities"] += extra
    path.write_text(yaml.safe_dump(doc))
    wait_log(up, "access policy reloaded")


def wait_log(up: Up, text: str, timeout: float = 10.0) -> None:
    log = up.data_dir / "logs" / "gateway.log"
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"the gateway did not log {text!r}:\n{log.read_text()[-2000:]}"
        time.sleep(0.1)


def researcher(name: str, token: str | None, *owners: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "grants": [{"role": "researcher", "owners": list(owners)}]}
    if token:
        out["tokenSHA256"] = [token_digest(token)]
    return out


def channel(up: Up, token: str | None = None, ca: bytes | None = None, cert: tuple[Path, Path] | None = None
            ) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca if ca is not None else (up.data_dir / "tls" / "ca.crt").read_bytes(),
        private_key=cert[1].read_bytes() if cert else None, certificate_chain=cert[0].read_bytes() if cert else None)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(up.grpc, creds)


def refused(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10)
    return info.value


def ledger_identities(up: Up) -> tuple[int, dict[str, str]]:
    """The ledger's last sequence, and command id -> the identity its first entry records."""
    async def read() -> tuple[int, dict[str, str]]:
        nc = await nats.connect(up.nats, **up.admin_auth(), connect_timeout=2,
                                allow_reconnect=False)
        try:
            ledger = Ledger(nc.jetstream(), CLUSTER)
            out = {e.command_id: e.identity for r in await ledger.replay() for e in r.batch.entries if e.command_digest}
            return await ledger.last_sequence(), out
        finally:
            await nc.close()

    return asyncio.run(read())


def kubectl_runs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBTREE_")}
    clean["HOME"] = "/nonexistent"  # no ~/.config/jobtree/client.yaml of whoever runs the tests
    return subprocess.run([sys.executable, "-m", "jobtree.cli.runs", *args], cwd=REPO, text=True,
                          capture_output=True, env={**clean, **(env or {})}, timeout=60)


def manifest(tmp: Path, name: str, owner: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "rq.davidlangworthy.io/v1", "kind": "Run", "metadata": {"name": name, "namespace": "vision"},
        "spec": {"owner": owner, "resources": {"gpuType": "H100-80GB", "totalGPUs": 8}, "locality": {"groupGPUs": 8}}}))
    return path


def test_up_serves_tls_and_the_policy_decides_who_writes_what(tmp_path: Path) -> None:
    data = tmp_path / "jt"
    up = Up(data, secure=True).wait_ready()
    try:
        # What `up` printed and made: TLS, the admin token, the policy, the client config.
        assert up.printed["auth"].startswith("TLS (CA "), up.printed
        assert up.printed["use"].startswith(f"export JOBTREE_CONFIG={data / 'client.yaml'}")
        assert up.state()["tls"] is True
        for private in ("admin.token", "policy.yaml", "client.yaml", "tls/ca.key", "tls/server.key"):
            assert stat.S_IMODE((data / private).stat().st_mode) == 0o600, private
        admin = (data / "admin.token").read_text().strip()
        client = yaml.safe_load((data / "client.yaml").read_text())
        assert client == {"server": up.grpc, "tokenFile": str(data / "admin.token"),
                          "certificateAuthority": str(data / "tls" / "ca.crt")}

        identities(up, [researcher("alice", ALICE, "org:ml:vision", "org:ml:vision:*"),
                        {"name": "bob", "tokenSHA256": [token_digest(BOB)],
                         "grants": [{"role": "budget-owner", "owners": ["org:ml:nlp"]}]}])

        # No credentials, an unknown token, a plain channel, another CA: nothing gets through.
        with channel(up) as ch:
            err = refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.details().startswith("no credentials: send `authorization: Bearer <token>`"), err.details()
        with channel(up, "not-a-token") as ch:
            err = refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token is not known to the access policy" in err.details()
        with grpc.insecure_channel(up.grpc) as ch:
            assert refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest()).code() == \
                grpc.StatusCode.UNAVAILABLE
        other = pki.ensure_ca(tmp_path / "other-ca")
        with channel(up, admin, ca=other.cert_path.read_bytes()) as ch:
            assert refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest()).code() == \
                grpc.StatusCode.UNAVAILABLE

        before, _ = ledger_identities(up)
        with channel(up, ALICE) as ch:
            stub = api_grpc.JobtreeStub(ch)
            # alice may read everything, and write runs of org:ml:vision only.
            assert len(stub.ListBudgets(api.ListBudgetsRequest(), timeout=10).budgets) == 3
            other_team = run_manifest("nlp-job", 8)
            other_team.spec.owner = "org:ml:nlp"
            err = refused(stub.SubmitRun, api.SubmitRunRequest(run=other_team, request_id="alice-forges"))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.details() == ("identity 'alice' may not submit runs of 'org:ml:nlp': its researcher grants "
                                     "cover org:ml:vision, org:ml:vision:*"), err.details()
            budget = pb.Budget()
            budget.metadata.name = "ml-vision"
            budget.spec.owner = "org:ml:vision"
            err = refused(stub.ApplyBudget, api.ApplyBudgetRequest(budget=budget))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "no budget-owner grant" in err.details()
            assert ledger_identities(up)[0] == before, "a refused write changed the ledger"
            ok = stub.SubmitRun(api.SubmitRunRequest(run=run_manifest("mine", 8), request_id="alice-submits"),
                                timeout=10)
            assert ok.ledger_sequence > before
        with channel(up, admin) as ch:  # the operator submits for anyone
            nlp = run_manifest("theirs", 8)
            nlp.spec.owner = "org:ml:nlp"
            api_grpc.JobtreeStub(ch).SubmitRun(api.SubmitRunRequest(run=nlp, request_id="admin-submits"), timeout=10)
        with channel(up, ALICE) as ch:
            stub = api_grpc.JobtreeStub(ch)
            theirs = pb.RunRef(namespace="vision", name="theirs")
            for call, request in ((stub.DeleteRun, api.DeleteRunRequest(run=theirs)),
                                  (stub.ShrinkRun, api.ShrinkRunRequest(run=theirs, desired_total_gpus=1)),
                                  (stub.CompleteRun, api.CompleteRunRequest(run=theirs))):
                err = refused(call, request)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'org:ml:nlp'" in err.details()
            # Replacing another owner's run under one's own owner is replacing their run.
            err = refused(stub.SubmitRun, api.SubmitRunRequest(run=run_manifest("theirs", 8)))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'org:ml:nlp'" in err.details()
        with channel(up, BOB) as ch:  # bob owns nlp's budget but is no researcher
            err = refused(api_grpc.JobtreeStub(ch).DeleteRun, api.DeleteRunRequest(run=pb.RunRef(
                namespace="vision", name="mine")))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "no researcher grant" in err.details()
        seq, who = ledger_identities(up)
        assert who["alice-submits"] == "alice" and who["admin-submits"] == "admin", who
        assert "alice-forges" not in who
        assert who["demo-budget-ml"] == "service:jobtree-up", who

        # The CLI: flags, the environment, the config file; refusals are one line, exit 2.
        ca = str(data / "tls" / "ca.crt")
        forged = kubectl_runs("--server", up.grpc, "--token", ALICE, "--certificate-authority", ca,
                              "submit", "-f", str(manifest(tmp_path, "cli-nlp", "org:ml:nlp")))
        assert forged.returncode == 2, forged
        assert forged.stderr.strip().count("\n") == 0 and "may not submit runs of 'org:ml:nlp'" in forged.stderr
        own = kubectl_runs("submit", "-f", str(manifest(tmp_path, "cli-vision", "org:ml:vision")),
                           env={"JOBTREE_SERVER": up.grpc, "JOBTREE_TOKEN": ALICE, "JOBTREE_CA": ca})
        assert own.returncode == 0, own.stderr
        anonymous = kubectl_runs("--server", up.grpc, "--certificate-authority", ca, "get")
        assert anonymous.returncode == 2 and anonymous.stderr.startswith("kubectl-runs: no credentials"), anonymous
        by_config = kubectl_runs("get", "-n", "vision", env={"JOBTREE_CONFIG": str(data / "client.yaml")})
        assert by_config.returncode == 0, by_config.stderr
        assert all(name in by_config.stdout for name in ("mine", "theirs", "cli-vision")), by_config.stdout
        seq_after, who = ledger_identities(up)
        assert seq_after > seq and sum(v == "alice" for v in who.values()) == 2, who  # gRPC, then the CLI

        # A broken edit keeps the policy in force; revoking alice takes effect without a restart.
        policy = data / "policy.yaml"
        good = policy.read_text()
        policy.write_text(good + "oops: [\n")
        wait_log(up, "access policy not reloaded")
        with channel(up, ALICE) as ch:
            api_grpc.JobtreeStub(ch).ListRuns(api.ListRunsRequest(), timeout=10)
        doc = yaml.safe_load(good)
        doc["spec"]["identities"] = [i for i in doc["spec"]["identities"] if i["name"] != "alice"]
        policy.write_text(yaml.safe_dump(doc))
        deadline = time.monotonic() + 10
        while True:
            with channel(up, ALICE) as ch:
                try:
                    api_grpc.JobtreeStub(ch).ListRuns(api.ListRunsRequest(), timeout=10)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
            assert time.monotonic() < deadline, "alice was not revoked"
            time.sleep(0.2)
        assert up.interrupt() == 0
    finally:
        up.stop()

    # A second start keeps the CA, the token and the policy.
    ca_before = (data / "tls" / "ca.crt").read_bytes()
    again = Up(data, secure=True).wait_ready()
    try:
        assert (data / "tls" / "ca.crt").read_bytes() == ca_before
        assert (data / "admin.token").read_text().strip() == admin
        with channel(again, admin) as ch:
            runs = api_grpc.JobtreeStub(ch).ListRuns(api.ListRunsRequest(), timeout=10).runs
            assert {"mine", "theirs"} <= {r.metadata.name for r in runs}
        assert again.interrupt() == 0
    finally:
        again.stop()


def test_client_certificates_identify_callers(tmp_path: Path) -> None:
    data = tmp_path / "jt"
    up = Up(data, "--client-certs", secure=True).wait_ready()
    try:
        made = subprocess.run([sys.executable, "-m", "jobtree.cli.main", "auth", "client-cert", "carol",
                               "--data-dir", str(data)], cwd=REPO, text=True, capture_output=True, timeout=60)
        assert made.returncode == 0, made.stderr
        cert, key = (Path(p) for p in made.stdout.split())
        identities(up, [researcher("carol", None, "org:ml:nlp")])
        admin = (data / "admin.token").read_text().strip()
        # The port asks every caller for a certificate of the CA: a token alone is not enough.
        with channel(up, admin) as ch:
            assert refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest()).code() == \
                grpc.StatusCode.UNAVAILABLE
        stranger = pki.issue_client(tmp_path / "other-ca", "carol")  # the same name, another CA
        with channel(up, cert=stranger) as ch:
            assert refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest()).code() == \
                grpc.StatusCode.UNAVAILABLE
        admin_cert = (data / "tls" / "client-admin.crt", data / "tls" / "client-admin.key")
        unknown = pki.issue_client(data / "tls", "mallory")
        with channel(up, cert=unknown) as ch:
            err = refused(api_grpc.JobtreeStub(ch).ListRuns, api.ListRunsRequest())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'mallory'" in err.details()
        with channel(up, cert=(cert, key)) as ch:
            stub = api_grpc.JobtreeStub(ch)
            nlp = run_manifest("carols", 8)
            nlp.spec.owner = "org:ml:nlp"
            stub.SubmitRun(api.SubmitRunRequest(run=nlp, request_id="carol-submits"), timeout=10)
            err = refused(stub.SubmitRun, api.SubmitRunRequest(run=run_manifest("vision", 8)))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "identity 'carol'" in err.details()
        # The CLI with the config `up` wrote (certificate and token) and with certificate flags.
        by_config = kubectl_runs("get", "-n", "vision", env={"JOBTREE_CONFIG": str(data / "client.yaml")})
        assert by_config.returncode == 0 and "carols" in by_config.stdout, by_config
        as_carol = kubectl_runs("--server", up.grpc, "--certificate-authority", str(data / "tls" / "ca.crt"),
                                "--client-certificate", str(cert), "--client-key", str(key), "delete", "carols",
                                "-n", "vision")
        assert as_carol.returncode == 0, as_carol.stderr
        half = kubectl_runs("--server", up.grpc, "--client-certificate", str(admin_cert[0]), "get")
        assert half.returncode == 2 and "go together" in half.stderr
        who = ledger_identities(up)[1]
        assert who["carol-submits"] == "carol"
        assert up.interrupt() == 0
    finally:
        up.stop()
