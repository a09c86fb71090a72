"""Errors raised by the core for bad input.

Contract: every rejection names the field path, what was wrong and what is allowed, in one
line. Not: a logging or reporting facility.
"""

from __future__ import annotations


class ValidationError(ValueError):
    """Bad input: `path` names the field, `problem` what is wrong (including what is allowed)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        self.command_index: int | None = None
        """Which command of a batch was rejected (set by `Cluster.submit`)."""
        super().__init__(f"{path}: {problem}" if path else problem)

    def under(self, prefix: str) -> ValidationError:
        """The same error with `prefix` put in front of its path."""
        if not prefix:
            return self
        joined = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else prefix + self.path
        return ValidationError(joined, self.problem)


def field_path(path: str, key: str) -> str:
    """The path of field `key` under `path`."""
    return f"{path}.{key}" if path else key


def item_path(path: str, index: int) -> str:
    """The path of list item `index` under `path`."""
    return f"{path}[{index}]"


def show_value(value: object) -> str:
    """A value as a YAML author would recognise it in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
