"""The gateway: jobtree's public gRPC API (`jobtree.v1.Jobtree`), the only public entry.

Contract: `main(ctx)` serves `jobtree.v1.Jobtree` (see `servicer`), grpcio health checking
(`grpc.health.v1.Health`: NOT_SERVING until the gateway's view has caught up with the ledger,
then SERVING for "" and "jobtree.v1.Jobtree") and server reflection, on
`$JOBTREE_GRPC_HOST:$JOBTREE_GRPC_PORT` (default 127.0.0.1:50051; port 0 picks a free port).
Once bound it logs `{"msg": "grpc listening", "port": N}` and writes N to
`<data_dir>/gateway.port` (removed again on a clean stop). Its view is a `Follower` of the
cluster's ledger stream, started as soon as the stream exists. Instants come from a clock
object: the wall clock, or on a virtual clock the request's `jobtree-instant` metadata (see
`clock`). On stop: health NOT_SERVING, watch streams end, the server stops with a short grace.
Who may call is `jobtree.auth.transport`'s: TLS with an access policy (JOBTREE_GRPC_TLS_CERT,
JOBTREE_GRPC_TLS_KEY, JOBTREE_POLICY, optionally JOBTREE_GRPC_CLIENT_CA for client
certificates), or JOBTREE_GRPC_INSECURE=1 on loopback; callers are identified and checked by
`auth`, and every write carries its caller's identity to the ledger.
Environment: JOBTREE_GRPC_HOST, JOBTREE_GRPC_PORT, JOBTREE_GRPC_HEALTH_PORT (optional: a plain
port serving only grpc.health.v1, for probes that speak no TLS), JOBTREE_GATEWAY_COMMAND_TIMEOUT (seconds
admission has to answer a write, default 5), JOBTREE_GATEWAY_READ_TIMEOUT (seconds a read waits
for the view to reach `min_ledger_sequence`, default 5), JOBTREE_GATEWAY_FORWARD_TIMEOUT (seconds
the budget and packer services have to answer, default 5).
Not: scheduling (admission), persistence (the ledger), materialisation (the binder).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.auth.transport import transport_from_env
from jobtree.bus import ports
from jobtree.bus.follower import Follower
from jobtree.bus.ledger import Ledger
from jobtree.bus.runtime import ServiceContext, listen_address
from jobtree.services.gateway.auth import Gatekeeper
from jobtree.services.gateway.clock import Clock, SystemClock, VirtualClock
from jobtree.services.gateway.handlers import add_servicer
from jobtree.services.gateway.servicer import Gateway

__all__ = ["DEFAULT_PORT", "PORT_FILE", "SERVICE_NAME", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
PORT_FILE = ports.GATEWAY_FILE
SERVICE_NAME = api.DESCRIPTOR.services_by_name["Jobtree"].full_name
STOP_GRACE = 2.0
ENV_HEALTH_PORT = "JOBTREE_GRPC_HEALTH_PORT"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def grpc_address() -> tuple[str, int]:
    return listen_address("JOBTREE_GRPC_HOST", "JOBTREE_GRPC_PORT", DEFAULT_HOST, DEFAULT_PORT)


async def main(ctx: ServiceContext) -> None:
    host, port = grpc_address()
    transport = transport_from_env(host)  # `jobtree serve gateway` checked it already (one line, exit 2)
    gatekeeper = Gatekeeper(transport, ctx.log)
    follower = Follower(ctx.js, ctx.cluster, ctx.settings.config)
    clock: Clock = VirtualClock() if ctx.settings.clock == "virtual" else SystemClock()
    gateway = Gateway(
        ctx, follower, Ledger(ctx.js, ctx.cluster), clock,
        command_timeout=_env_float("JOBTREE_GATEWAY_COMMAND_TIMEOUT", 5.0),
        read_timeout=_env_float("JOBTREE_GATEWAY_READ_TIMEOUT", 5.0),
        forward_timeout=_env_float("JOBTREE_GATEWAY_FORWARD_TIMEOUT", 5.0),
    )
    server = grpc.aio.server()
    add_servicer(gateway, server, gatekeeper)  # callers identified, undecodable requests INVALID_ARGUMENT
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    bound = (server.add_insecure_port(address) if transport.insecure
             else server.add_secure_port(address, transport.server_credentials()))
    if not bound:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    probe = None
    health_port = os.environ.get(ENV_HEALTH_PORT)
    if health_port:  # plain grpc.health.v1 only, for probes that speak no TLS (the kubelet's)
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, probe)
        if not probe.add_insecure_port(f"{host}:{int(health_port)}"):
            raise RuntimeError(f"cannot listen on {host}:{health_port} ({ENV_HEALTH_PORT})")
        await probe.start()
    port_file = ctx.settings.data_dir / PORT_FILE
    ports.write(port_file, bound)
    ctx.log.info("grpc listening", extra={"fields": {
        "port": bound, "host": host, "tls": not transport.insecure, "client_certificates": bool(transport.client_ca)}})

    async def shutdown() -> None:
        watching.cancel()
        with contextlib.suppress(Exception):
            await health.enter_graceful_shutdown()
        gateway.close()
        await server.stop(STOP_GRACE)
        if probe is not None:
            await probe.stop(0)
        await follower.stop()
        with contextlib.suppress(OSError):
            port_file.unlink()
        ctx.log.info("grpc stopped")

    watching = asyncio.ensure_future(gatekeeper.watch())
    try:
        await gateway.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await ctx.stopping.wait()
    finally:
        # The runtime cancels this task when it stops: finish the shutdown regardless.
        done = asyncio.ensure_future(shutdown())
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await done
            raise
