"""The trust `jobtree up` sets up on one machine: a local CA, the gateway's certificate, an admin.

Contract: `prepare(data_dir, insecure=False, client_certs=False)` returns the `Trust` of
`jobtree up` (files under `D`, made on the first start and reused on every later one):
- `D/tls/ca.crt`, `ca.key`: a local CA; `D/tls/server.crt`, `server.key`: the gateway's
  certificate for 127.0.0.1 and localhost, signed by it (`jobtree.auth.pki`);
- `D/admin.token` (mode 0600): the bearer token of the identity `admin`;
- `D/policy.yaml`: the access policy, created with `admin` as an operator; edit it to add
  identities (the gateway re-reads it when it changes). A policy that exists is kept as it is;
- with `client_certs`, `D/tls/client-admin.crt`/`.key` too, and the gateway requires a client
  certificate of the CA from every caller (mutual TLS);
- `D/client.yaml`: `kubectl-runs`'s config (server, token file, CA, client certificate),
  written by `client_config(server)` once the port is known.
With `insecure`, none of this: the gateway serves plain gRPC on loopback and anyone who can
reach it may do everything (`JOBTREE_GRPC_INSECURE=1`).
`Trust.gateway_env()` is the gateway's environment; `Trust.lines(server)` what `up` prints.
Not: the policy's rules (`jobtree.auth.policy`), the gateway's checks (`services/gateway/auth`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobtree.auth import pki
from jobtree.auth.policy import API_VERSION, KIND, load, token_digest
from jobtree.auth.transport import ENV_CERT, ENV_CLIENT_CA, ENV_INSECURE, ENV_KEY, ENV_POLICY
from jobtree.core.errors import ValidationError

ADMIN = "admin"


@dataclass(frozen=True)
class Trust:
    data_dir: Path
    insecure: bool
    client_certs: bool = False

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def policy_file(self) -> Path:
        return self.data_dir / "policy.yaml"

    @property
    def client_file(self) -> Path:
        return self.data_dir / "client.yaml"

    def gateway_env(self) -> dict[str, str]:
        if self.insecure:
            return {ENV_INSECURE: "1"}
        env = {ENV_CERT: str(self.tls_dir / "server.crt"), ENV_KEY: str(self.tls_dir / "server.key"),
               ENV_POLICY: str(self.policy_file)}
        if self.client_certs:
            env[ENV_CLIENT_CA] = str(self.tls_dir / "ca.crt")
        return env

    def client_config(self, server: str) -> None:
        """Write `D/client.yaml` for `kubectl runs --config` (or JOBTREE_CONFIG)."""
        doc: dict[str, str] = {"server": server}
        if not self.insecure:
            doc.update(tokenFile=str(self.token_file), certificateAuthority=str(self.tls_dir / "ca.crt"))
            if self.client_certs:
                doc.update(clientCertificate=str(self.tls_dir / f"client-{ADMIN}.crt"),
                           clientKey=str(self.tls_dir / f"client-{ADMIN}.key"))
        pki.write_file(self.client_file, yaml.safe_dump(doc, sort_keys=False).encode(), private=True)

    def lines(self, server: str) -> list[str]:
        if self.insecure:
            return [f"auth: none (--insecure): plain gRPC on {server}, every caller may do everything"]
        how = "a client certificate of the CA and a token" if self.client_certs else "a token"
        return [f"auth: TLS (CA {self.tls_dir / 'ca.crt'}), callers need {how}; admin token in {self.token_file}; "
                f"policy {self.policy_file}",
                f"use: export JOBTREE_CONFIG={self.client_file}   # then: kubectl runs get"]


def admin_policy(token: str) -> str:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "jobtree"},
           "spec": {"identities": [{"name": ADMIN, "tokenSHA256": [token_digest(token)],
                                    "grants": [{"role": "operator"}]}]}}
    return ("# Who may do what through the gateway (docs/operator-guide/security.md).\n"
            "# Add identities here; the gateway re-reads this file when it changes.\n"
            + yaml.safe_dump(doc, sort_keys=False))


def prepare(data_dir: Path, insecure: bool = False, client_certs: bool = False) -> Trust:
    """The trust of `jobtree up` on `data_dir` (ValueError, one line, when a kept file is bad)."""
    trust = Trust(data_dir, insecure, client_certs)
    if insecure:
        return trust
    pki.ensure_server(trust.tls_dir)
    if not trust.token_file.exists():
        pki.write_file(trust.token_file, (secrets.token_urlsafe(32) + "\n").encode(), private=True)
    token = trust.token_file.read_text(encoding="utf-8").strip()
    if not trust.policy_file.exists():
        pki.write_file(trust.policy_file, admin_policy(token).encode(), private=True)
    try:
        policy = load(trust.policy_file)
    except ValidationError as err:
        raise ValueError(f"{err}; fix it, or remove it to have a new one made") from None
    if policy.by_token(token) is None:
        raise ValueError(f"{trust.policy_file}: lists no identity for the token in {trust.token_file}; "
                         "add its tokenSHA256, or remove both files to have new ones made")
    if client_certs and not (trust.tls_dir / f"client-{ADMIN}.crt").exists():
        pki.issue_client(trust.tls_dir, ADMIN)
    return trust
