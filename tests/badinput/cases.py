"""Shared by the catalogue's tables: a case's pytest id, and the case of a command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def ids(cases: Sequence[Any]) -> list[str]:
    return [c.id for c in cases]


@dataclass(frozen=True)
class CommandCase:
    """A command line with bad input and the one line it must answer with."""

    id: str
    args: tuple[str, ...]
    """Arguments; FILE is the path of a file holding `content` (DIR, where used, a fresh directory)."""
    content: str
    message: str
    """The whole error line after the program's prefix, with the test's directory as TMP."""
