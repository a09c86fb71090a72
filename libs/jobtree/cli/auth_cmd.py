"""`jobtree auth`: credentials for the gateway's access policy.

Contract:
- `jobtree auth token [NAME]` prints a fresh random bearer token on the first line and, on the
  next, the policy fragment that makes it NAME's (`tokenSHA256: [<its SHA-256>]`): the token
  goes to the caller, only the digest into the policy.
- `jobtree auth policy-check FILE` checks an access policy (the file or a ConfigMap holding it):
  `ok: N identities` and status 0, or one line naming the field and status 2.
- `jobtree auth client-cert NAME [--data-dir D]` issues a client certificate for identity NAME
  from the local CA of `jobtree up --data-dir D` (`D/tls/client-NAME.crt` and `.key`) and prints
  the two paths.
Not: the policy (`jobtree.auth.policy`), not the gateway.
"""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path
from typing import Any

from jobtree.cli.sim_cmd import CliError


def add_auth_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("auth", help="tokens, client certificates and policy checks for the gateway")
    sub = p.add_subparsers(dest="auth_command", metavar="COMMAND", required=True)
    t = sub.add_parser("token", help="a new bearer token and its policy fragment")
    t.add_argument("name", nargs="?", default="NAME", help="the identity it is for (for the fragment)")
    t.set_defaults(handler=cmd_token)
    c = sub.add_parser("policy-check", help="check an access policy file")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(handler=cmd_policy_check)
    k = sub.add_parser("client-cert", help="a client certificate from the local CA of `jobtree up`")
    k.add_argument("name", metavar="NAME", help="the identity: the certificate's common name")
    k.add_argument("--data-dir", metavar="D", default=".jobtree", help="the data directory of `jobtree up`")
    k.set_defaults(handler=cmd_client_cert)


def cmd_token(args: argparse.Namespace) -> int:
    from jobtree.auth.policy import token_digest

    token = secrets.token_urlsafe(32)
    print(token)
    print(f"# in the policy: - name: {args.name}\n#                  tokenSHA256: [{token_digest(token)}]")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from jobtree.auth.policy import load

    policy = load(Path(args.file))  # ValidationError: one line, status 2 (main)
    print(f"ok: {len(policy.identities)} identities")
    return 0


def cmd_client_cert(args: argparse.Namespace) -> int:
    from jobtree.auth import pki

    tls = Path(args.data_dir) / "tls"
    if not (tls / "ca.crt").is_file():
        raise CliError(f"--data-dir {args.data_dir}: no local CA in {tls} (start `jobtree up` there first)")
    try:
        cert, key = pki.issue_client(tls, args.name)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(cert)
    print(key)
    return 0
