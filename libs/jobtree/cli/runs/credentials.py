"""How `kubectl-runs` proves who it is to the gateway: a token, a CA, a client certificate.

Part of `kubectl-runs` (`jobtree.cli.runs`). Contract: `credentials_of(args)` takes each of
the gateway address, the bearer token, the CA and the client certificate and key from, in this
order: the flag (`--server`, `--token`, `--certificate-authority`, `--client-certificate`,
`--client-key`), the environment (JOBTREE_SERVER, JOBTREE_TOKEN, JOBTREE_CA,
JOBTREE_CLIENT_CERT, JOBTREE_CLIENT_KEY), the config file (`--config`, else $JOBTREE_CONFIG,
else `~/.config/jobtree/client.yaml` when it exists: a YAML mapping with the keys `server`,
`token` or `tokenFile`, `certificateAuthority`, `clientCertificate`, `clientKey`; relative
paths are relative to the file; `jobtree up` writes one). With any of token, CA or client
certificate the channel is TLS (the system's roots when no CA is given) and the token is sent
as `authorization: Bearer`; with none, plain gRPC (a gateway serving loopback without TLS).
A file that cannot be read, a certificate without its key, or an unknown key in the config
file: RunsError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobtree.cli.runs.options import DEFAULT_SERVER, ENV_SERVER, RunsError

ENV_TOKEN = "JOBTREE_TOKEN"
ENV_CA = "JOBTREE_CA"
ENV_CLIENT_CERT = "JOBTREE_CLIENT_CERT"
ENV_CLIENT_KEY = "JOBTREE_CLIENT_KEY"
ENV_CONFIG = "JOBTREE_CONFIG"
DEFAULT_CONFIG = Path("~/.config/jobtree/client.yaml")
MAX_ANSWER_BYTES = 1 << 30
"""gRPC's default 4 MiB is about 20,000 runs: `get -A` of a large cluster must not fail for size."""
CONFIG_KEYS = ("server", "token", "tokenFile", "certificateAuthority", "clientCertificate", "clientKey")


@dataclass(frozen=True)
class Credentials:
    server: str = DEFAULT_SERVER
    token: str | None = None
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @property
    def tls(self) -> bool:
        return bool(self.token or self.ca or self.cert)

    def channel(self) -> Any:
        import grpc

        options = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
        if not self.tls:
            return grpc.insecure_channel(self.server, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                             certificate_chain=self.cert)
        if self.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return grpc.secure_channel(self.server, creds, options=options)


def add_credential_options(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--token", default=s, metavar="TOKEN", help=f"bearer token (default ${ENV_TOKEN})")
    parser.add_argument("--certificate-authority", default=s, metavar="FILE",
                        help=f"CA certificate of the gateway, PEM (default ${ENV_CA})")
    parser.add_argument("--client-certificate", default=s, metavar="FILE",
                        help=f"client certificate, PEM (default ${ENV_CLIENT_CERT})")
    parser.add_argument("--client-key", default=s, metavar="FILE", help=f"its key, PEM (default ${ENV_CLIENT_KEY})")
    parser.add_argument("--config", default=s, metavar="FILE",
                        help=f"client config: server, token, CA, certificate (default ${ENV_CONFIG}, "
                             f"else {DEFAULT_CONFIG} if it exists)")


def _config(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[dict[str, Any], Path | None]:
    given = getattr(args, "config", None) or env.get(ENV_CONFIG)
    path = Path(given).expanduser() if given else DEFAULT_CONFIG.expanduser()
    if not given and not path.exists():
        return {}, None
    where = "--config" if getattr(args, "config", None) else (ENV_CONFIG if given else str(path))
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RunsError(f"{where}: {path}: cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise RunsError(f"{where}: {path}: not YAML: {' '.join(str(err).split())}") from None
    if doc is None:
        return {}, path.parent
    if not isinstance(doc, dict):
        raise RunsError(f"{path}: must be a mapping with the keys {', '.join(CONFIG_KEYS)}")
    for key, value in doc.items():
        if key not in CONFIG_KEYS:
            raise RunsError(f"{path}: {key}: unknown key; allowed: {', '.join(CONFIG_KEYS)}")
        if not isinstance(value, str) or not value:
            raise RunsError(f"{path}: {key}: must be a non-empty string")
    if "token" in doc and "tokenFile" in doc:
        raise RunsError(f"{path}: token: give token or tokenFile, not both")
    return doc, path.parent


def _read(where: str, raw: str, base: Path | None) -> bytes:
    path = Path(raw).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        return path.read_bytes()
    except OSError as err:
        raise RunsError(f"{where}: {path}: cannot be read: {err.strerror}") from None


def credentials_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Credentials:
    env = os.environ if env is None else env
    conf, base = _config(args, env)

    def pick(flag: str, var: str, key: str) -> tuple[str, str, Path | None] | None:
        """(where it came from, value, the directory relative paths are in)."""
        if getattr(args, flag, None):
            return f"--{flag.replace('_', '-')}", str(getattr(args, flag)), None
        if env.get(var):
            return var, env[var], None
        if conf.get(key):
            return f"{key} (config)", conf[key], base
        return None

    server = pick("server", ENV_SERVER, "server")
    token = pick("token", ENV_TOKEN, "token")
    if token is None and conf.get("tokenFile"):
        token_text = _read("tokenFile (config)", conf["tokenFile"], base).decode("utf-8", "replace").strip()
    else:
        token_text = token[1].strip() if token else None
    if token is not None and not token_text:
        raise RunsError(f"{token[0]}: the token is empty")
    files: dict[str, bytes | None] = {}
    for name, flag, var, key in (("ca", "certificate_authority", ENV_CA, "certificateAuthority"),
                                 ("cert", "client_certificate", ENV_CLIENT_CERT, "clientCertificate"),
                                 ("key", "client_key", ENV_CLIENT_KEY, "clientKey")):
        found = pick(flag, var, key)
        files[name] = _read(found[0], found[1], found[2]) if found else None
    if (files["cert"] is None) != (files["key"] is None):
        raise RunsError("--client-certificate and --client-key go together (a certificate needs its key)")
    return Credentials(server[1] if server else DEFAULT_SERVER, token_text or None, files["ca"], files["cert"],
                       files["key"])
