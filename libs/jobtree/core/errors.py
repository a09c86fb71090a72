"""Errors raised by the core for bad input.

Contract: every rejection names the field path, what was wrong and what is allowed, in one
line, and says what kind of refusal it is (`kind`), so the edges map it to a status once
(admission to a bus ErrorCode, the gateway to a gRPC code) and keep no copy of the rule:
- `ValidationError` (`invalid`): the input itself is wrong (a field, a value, a cycle);
- `NotFound` (`not_found`): well formed, but it names a run or node that does not exist;
- `Precondition` (`precondition`): well formed and known, but the state does not allow it now
  (a run that already ended, one that has not started, one that is not malleable);
- `Forbidden` (`forbidden`): well formed, but whoever asks may not (a Run naming an owner its
  namespace is not bound to: `family.owner_claim`).
All are ValidationErrors, so code that only cares that a command was refused catches one type.
Not: a logging or reporting facility.
"""

from __future__ import annotations


class ValidationError(ValueError):
    """Bad input: `path` names the field, `problem` what is wrong (including what is allowed)."""

    kind = "invalid"

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
        return type(self)(joined, self.problem)


class NotFound(ValidationError):
    """The input names a run or node that does not exist."""

    kind = "not_found"


class Precondition(ValidationError):
    """The input is well formed, but the state does not allow it now."""

    kind = "precondition"


class Forbidden(ValidationError):
    """The input is well formed, but whoever asks may not make it."""

    kind = "forbidden"


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
