"""Registering `jobtree.v1.Jobtree` on a gRPC server so that bad bytes are bad input.

Contract: `add_servicer(servicer, server, gatekeeper)` registers every method of the service
(from its descriptor, as the generated `add_JobtreeServicer_to_server` would). Each call first
identifies its caller (`gatekeeper.identify`: UNAUTHENTICATED before anything else is looked
at), then decodes its request with a deserializer that never raises: a request that is not the
method's protobuf message is aborted with INVALID_ARGUMENT `request: not a valid <message
type>: <why>` before the servicer sees it (grpc itself would answer UNKNOWN, naming Python
exception classes).
Not: the methods themselves (`servicer`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from jobtree.api.jobtree.v1 import service_pb2 as api
from jobtree.bus import codec
from jobtree.services.gateway.auth import Gatekeeper
from jobtree.services.gateway.status import Abort

__all__ = ["SERVICE", "add_servicer"]

SERVICE = api.DESCRIPTOR.services_by_name["Jobtree"]


class Undecodable:
    """What a request deserializer returns for bytes that are not its message."""

    def __init__(self, error: codec.CodecError) -> None:
        self.message = f"request: {error}"


def _parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return codec.parse(data, cls)
        except codec.CodecError as exc:
            return Undecodable(exc)

    return parse


async def _admit(gatekeeper: Gatekeeper, context: Any) -> None:
    try:
        gatekeeper.identify(context)
    except Abort as stop:
        await context.abort(stop.code, stop.message)


def _unary(method: Callable[[Any, Any], Any], gatekeeper: Gatekeeper) -> Callable[[Any, Any], Any]:
    async def call(request: Any, context: Any) -> Any:
        await _admit(gatekeeper, context)
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return call


def _stream(method: Callable[[Any, Any], AsyncIterator[Any]], gatekeeper: Gatekeeper
            ) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def call(request: Any, context: Any) -> AsyncIterator[Any]:
        await _admit(gatekeeper, context)
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in method(request, context):
            yield item

    return call


def _message_class(desc: Any) -> type[Message]:
    """The generated class of a message of service.proto or of a file it imports (bus.proto)."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def add_servicer(servicer: Any, server: Any, gatekeeper: Gatekeeper) -> None:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in SERVICE.methods:
        request_cls: type[Message] = _message_class(m.input_type)
        response_cls: type[Message] = _message_class(m.output_type)
        method = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _stream(method, gatekeeper), request_deserializer=_parser(request_cls),
                response_serializer=response_cls.SerializeToString)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(method, gatekeeper), request_deserializer=_parser(request_cls),
                response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
