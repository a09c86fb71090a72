"""Who is calling the gateway, and whether they may: authentication and the owner checks.

Contract: `Gatekeeper(transport, log)` identifies the caller of every `jobtree.v1.Jobtree`
method (`identify(context)`, called by `handlers` before the method runs; the identity is then
`caller()` for the rest of the call):
- a gateway serving plain loopback (`JOBTREE_GRPC_INSECURE=1`) has no policy: every caller is
  `anonymous` and may do everything;
- otherwise the metadata `authorization: Bearer <token>` names the identity listing the token's
  SHA-256; without a token, a verified client certificate (mutual TLS) names the identity whose
  name is its common name. No credentials, a malformed header, an unknown token or a
  certificate of nobody the policy knows: UNAUTHENTICATED, saying which.
The policy file is re-read when it changes (`watch`, checking once a second): identities are
added or revoked without a restart. A policy that no longer parses is not taken; the previous
one stays and the error is logged once.
`allow(action, *owners)` raises PERMISSION_DENIED naming the identity, the action, the owner and
what its grants cover (`Policy.check`). Health checks and reflection need no credentials.
Not: transport security (`jobtree.auth.transport`), not the policy's format (`jobtree.auth.policy`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import grpc

from jobtree.auth.policy import NOBODY, OPEN, Action, Identity, Policy, load
from jobtree.auth.transport import Transport
from jobtree.core.errors import ValidationError
from jobtree.services.gateway.status import Abort

__all__ = ["Gatekeeper", "allow", "caller"]

RELOAD_EVERY = 1.0
_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("jobtree_caller", default=NOBODY)


def caller() -> Identity:
    """The identity of the call being served."""
    return _CALLER.get()


class Gatekeeper:
    def __init__(self, transport: Transport, log: logging.Logger) -> None:
        self.transport = transport
        self.log = log
        self.policy: Policy | None = None
        self._stamp: tuple[int, int] | None = None
        self._bad: str | None = None
        if not transport.insecure:
            assert transport.policy is not None
            self.policy = load(transport.policy)
            self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        assert self.transport.policy is not None
        try:
            st = self.transport.policy.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def watch(self) -> None:
        """Re-read the policy file when it changes, until cancelled (a gateway with none: return)."""
        while self.transport.policy is not None:
            await asyncio.sleep(RELOAD_EVERY)
            self.refresh()

    def refresh(self) -> None:
        """Take the policy file if it changed since it was last read and still parses."""
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        assert self.transport.policy is not None
        try:
            self.policy = load(self.transport.policy)
        except ValidationError as err:
            if str(err) != self._bad:
                self._bad = str(err)
                self.log.error("access policy not reloaded: keeping the previous one",
                               extra={"fields": {"error": str(err)}})
            return
        self._stamp, self._bad = stamp, None
        self.log.info("access policy reloaded", extra={"fields": {"identities": len(self.policy.identities)}})

    def identify(self, context: Any) -> Identity:
        """The caller of `context` (set as `caller()`), or Abort(UNAUTHENTICATED)."""
        if self.policy is None:
            _CALLER.set(OPEN)
            return OPEN
        policy = self.policy
        header = next((str(v) for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
        who: Identity | None
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: must be `Bearer <token>`")
            who = policy.by_token(token.strip())
            if who is None:
                raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                             "authorization: the bearer token is not known to the access policy "
                             "(revoked, mistyped, or for another cluster)")
        else:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            if not names:
                how = (" or a client certificate signed by the cluster's CA" if self.transport.client_ca
                       else "")
                raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                             f"no credentials: send `authorization: Bearer <token>` (kubectl runs --token){how}")
            name = names[0].decode("utf-8", "replace") if isinstance(names[0], bytes) else str(names[0])
            who = policy.by_name(name)
            if who is None:
                raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                             f"client certificate: common name {name!r} is no identity of the access policy")
        _CALLER.set(who)
        return who


def allow(action: Action, *owners: str) -> None:
    """Nothing when the caller may take `action` on every owner of `owners`; Abort(PERMISSION_DENIED)
    naming the first it may not."""
    for owner in dict.fromkeys(owners):
        why = caller().check(action, owner)
        if why is not None:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, why)
