"""Trust at the edge, the pure parts: the access policy, the local CA, the gateway's transport
settings and `kubectl-runs`'s credentials (the processes are in tests/e2e/test_trust.py)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from jobtree.auth import pki
from jobtree.auth.policy import OPEN, Action, load, parse, token_digest
from jobtree.auth.transport import transport_from_env
from jobtree.cli.runs.credentials import credentials_of
from jobtree.cli.runs.options import RunsError
from jobtree.core.errors import ValidationError

TOKEN = "s3cret-token"


def policy_doc(*identities: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "rq.davidlangworthy.io/v1", "kind": "AccessPolicy", "metadata": {"name": "p"},
            "spec": {"identities": list(identities)}}


ALICE = {"name": "alice", "tokenSHA256": [token_digest(TOKEN)],
         "grants": [{"role": "researcher", "owners": ["org:ml:vision", "org:ml:vision:*"]},
                    {"role": "budget-owner", "owners": ["org:ml:*"]}]}
OPS = {"name": "ops", "grants": [{"role": "operator"}]}


# --- the policy: who may ----------------------------------------------------------------------

@pytest.mark.parametrize(("who", "action", "owner", "allowed"), [
    ("alice", Action.SUBMIT, "org:ml:vision", True),
    ("alice", Action.SUBMIT, "org:ml:vision:detect", True),
    ("alice", Action.SUBMIT, "org:ml:visionary", False),  # a prefix pattern ends in ':*' here
    ("alice", Action.SUBMIT, "org:ml:nlp", False),
    ("alice", Action.CANCEL, "org:ml:nlp", False),
    ("alice", Action.SHRINK, "org:ml:vision", True),
    ("alice", Action.REPORT, "org:ml:vision", True),
    ("alice", Action.APPLY_BUDGET, "org:ml:nlp", True),  # budget-owner of org:ml:*
    ("alice", Action.APPLY_BUDGET, "org:ml", False),  # 'org:ml:*' is the subtree below org:ml
    ("alice", Action.SPONSOR, "org:ml:nlp", True),
    ("alice", Action.SPONSOR, "org:other", False),
    ("ops", Action.SUBMIT, "anyone", True),
    ("ops", Action.APPLY_BUDGET, "org:x", True),
])
def test_grants_cover_owners_per_role(who: str, action: Action, owner: str, allowed: bool) -> None:
    policy = parse(policy_doc(ALICE, OPS))
    ident = policy.by_name(who)
    assert ident is not None
    assert (ident.check(action, owner) is None) is allowed


def test_a_refusal_names_the_identity_the_action_and_what_it_has() -> None:
    policy = parse(policy_doc(ALICE, {"name": "bob", "grants": []}))
    alice, bob = policy.by_name("alice"), policy.by_name("bob")
    assert alice is not None and bob is not None
    assert alice.check(Action.SUBMIT, "org:ml:nlp") == (
        "identity 'alice' may not submit runs of 'org:ml:nlp': its researcher grants cover org:ml:vision, "
        "org:ml:vision:*")
    assert bob.check(Action.APPLY_BUDGET, "org:x") == (
        "identity 'bob' may not apply budgets of 'org:x': it has no budget-owner grant")
    assert OPEN.check(Action.SUBMIT, "org:x") is None


def test_tokens_are_known_by_their_digest_only() -> None:
    policy = parse(policy_doc(ALICE, OPS))
    who = policy.by_token(TOKEN)
    assert who is not None and who.name == "alice"
    assert policy.by_token(token_digest(TOKEN)) is None, "the digest itself is not a token"
    assert policy.by_token("other") is None


def test_a_configmap_carries_the_policy(tmp_path: Path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "jobtree-access-policy"},
          "data": {"policy.yaml": yaml.safe_dump(policy_doc(ALICE))}}
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump(cm))
    assert [i.name for i in load(path).identities] == ["alice"]


@pytest.mark.parametrize(("doc", "path", "problem"), [
    ({"kind": "AccessPolicy", "spec": {}}, "apiVersion", "is required"),
    ({**policy_doc(), "kind": "Policy"}, "kind", "must be AccessPolicy"),
    ({**policy_doc(), "extra": 1}, "extra", "unknown field; allowed: apiVersion, kind, spec, metadata"),
    (policy_doc({"grants": []}), "spec.identities[0].name", "is required"),
    (policy_doc({"name": "a b"}), "spec.identities[0].name", "must be 1-128 letters"),
    (policy_doc({"name": "a", "tokenSHA256": ["abc"]}), "spec.identities[0].tokenSHA256[0]",
     "must be the SHA-256 of a token as 64 lowercase hex digits"),
    (policy_doc({"name": "a", "grants": [{"role": "admin"}]}), "spec.identities[0].grants[0].role",
     "must be one of researcher, budget-owner, operator, got 'admin'"),
    (policy_doc({"name": "a", "grants": [{"role": "researcher"}]}), "spec.identities[0].grants[0].owners",
     "a researcher grant needs at least one owner pattern"),
    (policy_doc({"name": "a", "grants": [{"role": "operator", "owners": ["x"]}]}),
     "spec.identities[0].grants[0].owners", "an operator covers every owner"),
    (policy_doc({"name": "a", "grants": [{"role": "researcher", "owners": ["org:*:x"]}]}),
     "spec.identities[0].grants[0].owners[0]", "a prefix ending in '*'"),
    (policy_doc({"name": "a"}, {"name": "a"}), "spec.identities[1].name", "'a' is already spec.identities[0]"),
    (policy_doc({"name": "a", "tokenSHA256": token_digest("t")}, {"name": "b", "tokenSHA256": token_digest("t")}),
     "spec.identities[1].tokenSHA256", "a token of 'a' too"),
    ({"apiVersion": "v1", "kind": "ConfigMap", "data": {}}, 'data.policy.yaml', "is required"),
    ({"apiVersion": "v1", "kind": "ConfigMap", "data": {"policy.yaml": "a: ["}}, 'data."policy.yaml"', "is not YAML"),
])
def test_a_bad_policy_names_the_field(doc: Any, path: str, problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(doc)
    assert info.value.path == path and problem in info.value.problem, (info.value.path, info.value.problem)


def test_a_policy_file_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"nope\.yaml: cannot be read"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(policy_doc({"name": 3})))
    with pytest.raises(ValidationError, match=r"bad\.yaml: spec\.identities\[0\]\.name: must be"):
        load(bad)


# --- the local CA -----------------------------------------------------------------------------

def test_the_server_certificate_is_signed_by_the_ca_and_kept(tmp_path: Path) -> None:
    path = pki.ensure_server(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=800)
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    assert pki.ensure_server(tmp_path).read_bytes() == before, "a good certificate is reused"
    pki.ensure_server(tmp_path, hosts=("127.0.0.1", "localhost", "gw.example"))
    assert path.read_bytes() != before, "a new host needs a new certificate"
    (tmp_path / "ca.crt").unlink()
    pki.ensure_server(tmp_path, hosts=("127.0.0.1", "localhost", "gw.example"))
    fresh = x509.load_pem_x509_certificate(path.read_bytes())
    fresh.verify_directly_issued_by(x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()))


def test_a_client_certificate_names_its_identity(tmp_path: Path) -> None:
    crt, _ = pki.issue_client(tmp_path, "carol")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=carol"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(ValueError, match="identity: must be"):
        pki.issue_client(tmp_path, "../etc")


# --- the gateway's transport ------------------------------------------------------------------

@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    pki.ensure_server(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(policy_doc(OPS)))
    return {"JOBTREE_GRPC_TLS_CERT": str(tmp_path / "server.crt"), "JOBTREE_GRPC_TLS_KEY": str(tmp_path / "server.key"),
            "JOBTREE_POLICY": str(policy)}


def test_transport_with_tls_and_a_policy(tls_files: dict[str, str]) -> None:
    t = transport_from_env("0.0.0.0", tls_files)
    assert not t.insecure and t.client_ca is None and t.policy is not None
    t = transport_from_env("0.0.0.0", {**tls_files, "JOBTREE_GRPC_CLIENT_CA": tls_files["JOBTREE_GRPC_TLS_CERT"]})
    assert t.client_ca is not None
    assert transport_from_env("127.0.0.1", {"JOBTREE_GRPC_INSECURE": "1"}).insecure
    assert transport_from_env("::1", {"JOBTREE_GRPC_INSECURE": "1"}).insecure


@pytest.mark.parametrize(("host", "env", "message"), [
    ("127.0.0.1", {}, "the gateway needs TLS and an access policy"),
    ("0.0.0.0", {"JOBTREE_GRPC_INSECURE": "1"}, "only on a loopback address"),
    ("127.0.0.1", {"JOBTREE_GRPC_INSECURE": "yes"}, "JOBTREE_GRPC_INSECURE: must be 1"),
    ("127.0.0.1", {"JOBTREE_GRPC_INSECURE": "1", "JOBTREE_POLICY": "p"}, "unset JOBTREE_POLICY"),
    ("127.0.0.1", {"JOBTREE_POLICY": "p"}, "JOBTREE_GRPC_TLS_CERT: is required with TLS"),
])
def test_transport_refusals(host: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        transport_from_env(host, env)


def test_transport_checks_the_files(tls_files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"JOBTREE_GRPC_TLS_KEY: .*: no such file"):
        transport_from_env("127.0.0.1", {**tls_files, "JOBTREE_GRPC_TLS_KEY": str(tmp_path / "none")})
    with pytest.raises(ValueError, match=r"JOBTREE_GRPC_TLS_KEY: .*: not a PEM private key"):
        transport_from_env("127.0.0.1", {**tls_files, "JOBTREE_GRPC_TLS_KEY": tls_files["JOBTREE_GRPC_TLS_CERT"]})
    bad = tmp_path / "bad-policy.yaml"
    bad.write_text(yaml.safe_dump(policy_doc({"name": "x", "grants": [{"role": "root"}]})))
    with pytest.raises(ValueError, match=r"JOBTREE_POLICY: .*bad-policy.yaml: spec.identities\[0\].grants\[0\].role"):
        transport_from_env("127.0.0.1", {**tls_files, "JOBTREE_POLICY": str(bad)})


# --- kubectl-runs's credentials ---------------------------------------------------------------

def ns(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_credentials_flags_over_environment_over_config(tmp_path: Path) -> None:
    pki.ensure_ca(tmp_path)
    token_file = tmp_path / "t"
    token_file.write_text("from-file\n")
    config = tmp_path / "client.yaml"
    config.write_text(yaml.safe_dump({"server": "cfg:1", "tokenFile": "t", "certificateAuthority": "ca.crt"}))
    env = {"JOBTREE_CONFIG": str(config)}
    c = credentials_of(ns(), env)
    assert (c.server, c.token, c.ca) == ("cfg:1", "from-file", (tmp_path / "ca.crt").read_bytes())
    assert c.tls
    c = credentials_of(ns(), {**env, "JOBTREE_SERVER": "env:2", "JOBTREE_TOKEN": "from-env"})
    assert (c.server, c.token) == ("env:2", "from-env")
    c = credentials_of(ns(server="flag:3", token="from-flag"), {**env, "JOBTREE_TOKEN": "from-env"})
    assert (c.server, c.token) == ("flag:3", "from-flag")
    plain = credentials_of(ns(), {"HOME": str(tmp_path / "home")})
    assert not plain.tls and plain.server == "127.0.0.1:50051"


@pytest.mark.parametrize(("config", "env", "message"), [
    ({"server": "x", "colour": "red"}, {}, "colour: unknown key; allowed: server, token, tokenFile"),
    ({"token": "a", "tokenFile": "b"}, {}, "give token or tokenFile, not both"),
    ({"certificateAuthority": "missing.crt"}, {}, "certificateAuthority (config): .*missing.crt: cannot be read"),
    ({"server": 5}, {}, "server: must be a non-empty string"),
    ({}, {"JOBTREE_CLIENT_CERT": "x"}, "JOBTREE_CLIENT_CERT: x: cannot be read"),
    ({}, {"JOBTREE_TOKEN": " "}, "JOBTREE_TOKEN: the token is empty"),
])
def test_credentials_refusals(tmp_path: Path, config: dict[str, Any], env: dict[str, str], message: str) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump(config))
    full = {"JOBTREE_CONFIG": str(path), **env}
    with pytest.raises(RunsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        credentials_of(ns(), full)


def test_a_certificate_needs_its_key(tmp_path: Path) -> None:
    crt, _ = pki.issue_client(tmp_path, "carol")
    with pytest.raises(RunsError, match="go together"):
        credentials_of(ns(client_certificate=str(crt)), {"HOME": str(tmp_path)})


def test_an_unidentified_call_may_write_nothing() -> None:
    from jobtree.auth.policy import NOBODY
    from jobtree.services.gateway.auth import allow, caller
    from jobtree.services.gateway.status import Abort

    assert caller() is NOBODY, "before identification a call is nobody"
    with pytest.raises(Abort) as info:
        allow(Action.SUBMIT, "org:a")
    assert info.value.message == "identity 'unidentified' may not submit runs of 'org:a': it has no researcher grant"
