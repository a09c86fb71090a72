"""Commands in, facts out: the vocabulary between the core and its shells.

Contract: a command is something a user, a workload or the fleet says (apply a budget, submit
a run, a node failed); a fact is something the calculus decided (a lease minted or closed, a
reservation made or resolved, a run's status). Facts are what the binder appends to the
ledger; applying the same facts in the same order to the same state reproduces it.
Not: wire encodings (see `proto/` in the services), not validation (see `manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobtree.core.model import Budget, Lease, Node, Reservation, Run, RunStatus

# --- commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyBudget:
    budget: Budget


@dataclass(frozen=True, slots=True)
class ApplyRun:
    run: Run


@dataclass(frozen=True, slots=True)
class DeleteRun:
    run: str


@dataclass(frozen=True, slots=True)
class CompleteRun:
    run: str


@dataclass(frozen=True, slots=True)
class FailRun:
    run: str


@dataclass(frozen=True, slots=True)
class FailNode:
    node: str


@dataclass(frozen=True, slots=True)
class CordonNode:
    node: str


@dataclass(frozen=True, slots=True)
class UncordonNode:
    node: str


@dataclass(frozen=True, slots=True)
class AddNode:
    node: Node


@dataclass(frozen=True, slots=True)
class ShrinkRun:
    run: str
    desired: int


@dataclass(frozen=True, slots=True)
class ReportEta:
    run: str
    at: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Nothing but the passage of time: the caller advances the clock to the command's instant."""


@dataclass(frozen=True, slots=True)
class SetAllowance:
    """This cluster's allowance of the aggregate cap `cap` (`budget/capName`): classify with
    `concurrency` as its maxConcurrency and `gpu_hours` as its maxGPUHours (the GPU-hours this
    cluster may debit under it; None: the cap's own bound), from grant `version` of the
    federation on (CALCULUS §9). A command and, once applied, a spec change in the journal."""

    cap: str
    concurrency: int | None
    version: int
    gpu_hours: float | None = None


Command = (ApplyBudget | ApplyRun | DeleteRun | CompleteRun | FailRun | FailNode | CordonNode
           | UncordonNode | AddNode | ShrinkRun | ReportEta | Tick | SetAllowance)

# --- facts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseMinted:
    lease: Lease


@dataclass(frozen=True, slots=True)
class LeaseClosed:
    name: str
    end: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReservationPut:
    reservation: Reservation


@dataclass(frozen=True, slots=True)
class RunStatusPut:
    run: str
    status: RunStatus


@dataclass(frozen=True, slots=True)
class SpecPut:
    """A run's spec as it now stands (submitted, updated or shrunk)."""

    run: Run


@dataclass(frozen=True, slots=True)
class SpecDeleted:
    run: str


@dataclass(frozen=True, slots=True)
class NodeStatePut:
    node: Node


@dataclass(frozen=True, slots=True)
class ClockAdvanced:
    """The clock reached the entry's instant (journaled so that a follower meters what the
    leader metered even when nothing else happened)."""


Fact = LeaseMinted | LeaseClosed | ReservationPut | RunStatusPut
SpecChange = ApplyBudget | SpecPut | SpecDeleted | NodeStatePut | ClockAdvanced | SetAllowance
JournalEntry = tuple[int, "Fact | SpecChange"]
"""(instant, what happened): the ledger plus the spec changes it was decided against."""
