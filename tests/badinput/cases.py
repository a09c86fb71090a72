"""Shared by the catalogue's tables: a case's pytest id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def ids(cases: Sequence[Any]) -> list[str]:
    return [c.id for c in cases]
