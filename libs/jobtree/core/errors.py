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
