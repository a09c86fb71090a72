"""How the gateway is reached: TLS and a policy, or (an explicit choice) plain loopback.

Contract: `transport_from_env(host)` reads the gateway's environment and returns a `Transport`,
or raises `ValueError` with one line naming the variable, what was wrong and what is allowed:
- JOBTREE_GRPC_TLS_CERT, JOBTREE_GRPC_TLS_KEY: the server certificate (chain) and key, PEM;
- JOBTREE_GRPC_CLIENT_CA: optional; the CA of client certificates. When set, every caller must
  present a certificate it signed (mutual TLS: gRPC cannot ask for an optional one), and a
  caller sending no token is the identity its certificate's common name names;
- JOBTREE_POLICY: the access policy file (`jobtree.auth.policy`), required with TLS;
- JOBTREE_GRPC_INSECURE=1: no TLS, no policy, every caller may do everything. Refused together
  with the TLS variables and on an address other than loopback (127.0.0.0/8, ::1, localhost).
A gateway with neither is refused: a scheduler of budgets does not start open by accident.
`Transport.server_credentials()` builds grpc's credentials from the files (read at each call).
Not: who a caller is (`jobtree.services.gateway.auth`), not the certificates (`pki`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobtree.auth.policy import load
from jobtree.core.errors import ValidationError

__all__ = ["ENV_CERT", "ENV_CLIENT_CA", "ENV_INSECURE", "ENV_KEY", "ENV_POLICY", "Transport", "transport_from_env"]

ENV_CERT = "JOBTREE_GRPC_TLS_CERT"
ENV_KEY = "JOBTREE_GRPC_TLS_KEY"
ENV_CLIENT_CA = "JOBTREE_GRPC_CLIENT_CA"
ENV_POLICY = "JOBTREE_POLICY"
ENV_INSECURE = "JOBTREE_GRPC_INSECURE"


@dataclass(frozen=True)
class Transport:
    insecure: bool
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    policy: Path | None = None

    def server_credentials(self) -> Any:
        import grpc

        assert self.cert is not None and self.key is not None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file(env: Mapping[str, str], name: str, what: str) -> Path:
    raw = env.get(name, "")
    if not raw:
        raise ValueError(f"{name}: is required with TLS ({what})")
    path = Path(raw)
    if not path.is_file():
        raise ValueError(f"{name}: {raw}: no such file ({what})")
    return path


def _pem(path: Path, name: str, marker: str) -> None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as err:
        raise ValueError(f"{name}: {path}: cannot be read: {err.strerror}") from None
    if f"-----BEGIN {marker}" not in text and not (marker == "PRIVATE KEY" and "PRIVATE KEY-----" in text):
        raise ValueError(f"{name}: {path}: not a PEM {marker.lower()}")


def transport_from_env(host: str, env: Mapping[str, str] | None = None) -> Transport:
    env = os.environ if env is None else env
    insecure = env.get(ENV_INSECURE, "")
    if insecure not in ("", "0", "1"):
        raise ValueError(f"{ENV_INSECURE}: must be 1 (plain loopback, no TLS, no policy) or unset, got {insecure!r}")
    tls_vars = [n for n in (ENV_CERT, ENV_KEY, ENV_CLIENT_CA, ENV_POLICY) if env.get(n)]
    if insecure == "1":
        if tls_vars:
            raise ValueError(f"{ENV_INSECURE}=1 serves without TLS and policy; unset {', '.join(tls_vars)} or it")
        if not is_loopback(host):
            raise ValueError(f"{ENV_INSECURE}=1: only on a loopback address (127.0.0.1, ::1, localhost), "
                             f"not {host!r}: anyone who can reach it could act as any owner")
        return Transport(insecure=True)
    if not tls_vars:
        raise ValueError(f"the gateway needs TLS and an access policy ({ENV_CERT}, {ENV_KEY}, {ENV_POLICY}), "
                         f"or {ENV_INSECURE}=1 to serve plain gRPC on loopback without identities")
    cert = _file(env, ENV_CERT, "the server certificate, PEM")
    key = _file(env, ENV_KEY, "the server's private key, PEM")
    policy = _file(env, ENV_POLICY, "the access policy: who may do what")
    _pem(cert, ENV_CERT, "CERTIFICATE")
    _pem(key, ENV_KEY, "PRIVATE KEY")
    client_ca = None
    if env.get(ENV_CLIENT_CA):
        client_ca = _file(env, ENV_CLIENT_CA, "the CA of client certificates, PEM")
        _pem(client_ca, ENV_CLIENT_CA, "CERTIFICATE")
    try:
        load(policy)
    except ValidationError as err:
        raise ValueError(f"{ENV_POLICY}: {err}") from None
    return Transport(False, cert, key, client_ca, policy)
