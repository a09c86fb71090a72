"""`Abort`: a gRPC status carried from wherever a call is refused up to its handler.

Contract: raise `Abort(code, message)` anywhere under a gateway method; the method's guard
(`GatewayBase._guard`, or the handler wrapper for authentication) aborts the call with it.
Not: the mapping of bus error codes (`base.STATUS_OF`).
"""

from __future__ import annotations

import grpc


class Abort(Exception):
    """Carries a gRPC status from helpers up to the handler (which aborts with it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
