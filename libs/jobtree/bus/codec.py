"""Protobuf on the wire: encode and decode bus payloads with a type check.

Contract: every payload on the bus is one protobuf message of proto/jobtree/v1 (no JSON on the
bus). `encode(msg, expected)` refuses anything that is not a message, or not of the expected
type, and serialises deterministically (the same message gives the same bytes, so retried
publishes are byte-identical). Binary protobuf does not say which message it holds, so every
publish also carries the message's full name in the `Jobtree-Type` header (`headers(msg)`);
`decode(data, cls, headers)` refuses a payload whose header names another type, and bytes that
do not parse as `cls`; `parse(data, cls)` only the latter, with the one-line problem a reply
to a garbled request carries (`not_valid`: `not a valid jobtree.v1.X: <why>`). Failures raise
CodecError.

Not: subjects (see `subjects`), not transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

__all__ = ["TYPE_HEADER", "CodecError", "decode", "encode", "headers", "not_valid", "parse", "type_name"]

TYPE_HEADER = "Jobtree-Type"
"""NATS header naming the payload's message type, e.g. `jobtree.v1.LedgerBatch`."""

M = TypeVar("M", bound=Message)


class CodecError(ValueError):
    """A payload that is not the protobuf message it should be."""


def type_name(cls: type[Message] | Message) -> str:
    """The full protobuf name of a message class or message (`jobtree.v1.LedgerBatch`)."""
    return cls.DESCRIPTOR.full_name


def encode(msg: Message, expected: type[Message] | None = None) -> bytes:
    """`msg` as bytes; CodecError if it is not a message (of type `expected`, when given)."""
    if not isinstance(msg, Message):
        raise CodecError(f"only protobuf messages go on the bus, got {type(msg).__name__}")
    if expected is not None and type(msg) is not expected:
        raise CodecError(f"expected {type_name(expected)}, got {type_name(msg)}")
    return msg.SerializeToString(deterministic=True)


def headers(msg: Message | type[Message]) -> dict[str, str]:
    """The NATS headers that go with a payload of this message type."""
    return {TYPE_HEADER: type_name(msg)}


def not_valid(what: str, error: Exception) -> str:
    """The one-line problem of bytes that do not parse as the message `what` (a full name):
    `not a valid jobtree.v1.X: wire format was corrupt` (protobuf's reason, without its preamble)."""
    text = " ".join(str(error).split())
    reason = text.rpartition("': ")[2] or text or "undecodable"
    return f"not a valid {what}: {reason[:1].lower()}{reason[1:]}"


def parse(data: bytes, cls: type[M]) -> M:
    """`data` parsed as `cls`; CodecError(`not_valid`) if the bytes do not parse."""
    try:
        return cls.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:  # DecodeError, or too deeply nested
        raise CodecError(not_valid(type_name(cls), exc)) from None


def decode(data: bytes, cls: type[M], header: Mapping[str, str] | None = None) -> M:
    """`data` parsed as `cls`; CodecError if `header` names another type or the bytes do not parse."""
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise CodecError(f"decode needs a protobuf message class, got {cls!r}")
    if header is not None:
        sent = header.get(TYPE_HEADER)
        if sent is not None and sent != type_name(cls):
            raise CodecError(f"expected {type_name(cls)}, got a payload of type {sent}")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise CodecError(f"payload does not parse as {type_name(cls)}: {exc}") from None
    return msg
