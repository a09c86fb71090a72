"""The objects of the calculus (CALCULUS §1) as immutable values.

Contract: plain frozen dataclasses and enums, already validated (see `manifest` for parsing
and field-level validation). Instants are int Unix seconds, durations int seconds. Nothing here
decides anything. Not: a store, not the API schema of the services (that is `proto/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

Labels = tuple[tuple[str, str], ...]
"""A label map as a sorted tuple of pairs (hashable, deterministic)."""

REQUIRED_NODE_LABELS = ("region", "cluster", "fabric.domain", "gpu.flavor")


def labels_of(mapping: dict[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


def labels_match(selector: Labels, labels: Labels) -> bool:
    """True when `labels` contains every pair of `selector`."""
    if not selector:
        return True
    have = dict(labels)
    return all(have.get(k) == v for k, v in selector)


def selector_subset(inner: Labels, outer: Labels) -> bool:
    """True when every pair of `inner` is also a pair of `outer`."""
    o = set(outer)
    return all(p in o for p in inner)


class NodeState(StrEnum):
    READY = "Ready"
    CORDONED = "Cordoned"
    FENCED = "Fenced"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    gpus: int
    labels: Labels
    state: NodeState = NodeState.READY

    def label(self, key: str) -> str:
        for k, v in self.labels:
            if k == key:
                return v
        return ""

    @property
    def flavor(self) -> str:
        return self.label("gpu.flavor")

    @property
    def domain(self) -> str:
        """The fast-fabric island: `region/cluster/fabric.domain`."""
        return f"{self.label('region')}/{self.label('cluster')}/{self.label('fabric.domain')}"


Slot = tuple[str, int]
"""One GPU: (node name, ordinal)."""


def slot_text(slot: Slot) -> str:
    return f"{slot[0]}#{slot[1]}"


# --- Budgets -----------------------------------------------------------------------------


class Sharing(StrEnum):
    FAMILY = "family"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class PreActivation:
    allow_reservations: bool = False
    allow_admission: bool = False


@dataclass(frozen=True, slots=True)
class Lending:
    allow: bool = False
    to: tuple[str, ...] = ()
    max_concurrency: int | None = None
    max_gpu_hours: float | None = None

    def lends_to(self, owner: str) -> bool:
        if not self.allow:
            return False
        for pattern in self.to:
            if pattern.endswith("*"):
                if owner.startswith(pattern[:-1]):
                    return True
            elif owner == pattern:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Envelope:
    name: str
    flavor: str
    selector: Labels
    concurrency: int
    max_gpu_hours: float | None = None
    start: int | None = None
    end: int | None = None
    sharing: Sharing = Sharing.FAMILY
    pre_activation: PreActivation = PreActivation()
    lending: Lending = Lending()

    def window_open(self, t: int) -> bool:
        return (self.start is None or t >= self.start) and (self.end is None or t < self.end)


@dataclass(frozen=True, slots=True)
class AggregateCap:
    name: str
    flavor: str
    envelopes: tuple[str, ...]
    max_concurrency: int | None = None
    max_gpu_hours: float | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    owner: str
    parents: tuple[str, ...] = ()
    period: int | None = None
    """Admission look-ahead P; None means the cluster's `period`."""
    envelopes: tuple[Envelope, ...] = ()
    aggregate_caps: tuple[AggregateCap, ...] = ()

    def envelope(self, name: str) -> Envelope | None:
        for e in self.envelopes:
            if e.name == name:
                return e
        return None


EnvelopeRef = tuple[str, str]
"""(budget name, envelope name)."""


# --- Runs --------------------------------------------------------------------------------


class FailurePolicy(StrEnum):
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Locality:
    group_gpus: int | None = None
    allow_cross_group_spread: bool = True
    selector: Labels = ()


@dataclass(frozen=True, slots=True)
class Malleable:
    min_total: int
    max_total: int
    step: int
    desired: int


@dataclass(frozen=True, slots=True)
class Funding:
    allow_borrow: bool = False
    max_borrow_gpus: int | None = None
    sponsors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Follow:
    after: tuple[str, ...] = ()
    on_upstream_failure: FailurePolicy = FailurePolicy.WAIT
    upstream_failure_grace: int = 3600


@dataclass(frozen=True, slots=True)
class RunSpec:
    owner: str
    gpu_type: str
    total_gpus: int
    locality: Locality = Locality()
    spares_per_group: int = 0
    malleable: Malleable | None = None
    funding: Funding = Funding()
    follow: Follow | None = None
    checkpoint: int | None = None
    runtime: int | None = None
    """Simulator annotation `jobtree.sim/runtime`: the workload completes this long after it starts."""

    @property
    def min_width(self) -> int:
        """The runnable width: below it the gang is broken."""
        return self.malleable.min_total if self.malleable else self.total_gpus

    @property
    def max_width(self) -> int:
        return self.malleable.max_total if self.malleable else self.total_gpus

    @property
    def desired_width(self) -> int:
        return self.malleable.desired if self.malleable else self.total_gpus


@dataclass(frozen=True, slots=True)
class Run:
    namespace: str
    name: str
    spec: RunSpec
    notify: tuple[str, ...] = ()
    """Receivers the run asks the notifier to tell (annotation `rq.davidlangworthy.io/notify`);
    not part of the calculus, carried so that the events of the run can name them."""
    notify_kinds: tuple[str, ...] = ()
    """... of these event kinds only (`rq.davidlangworthy.io/notify-kinds`; empty: every kind)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Phase(StrEnum):
    WAITING = "Waiting"
    PENDING = "Pending"
    RESERVED = "Reserved"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)


@dataclass(frozen=True, slots=True)
class RunStatus:
    """What the calculus knows of a run beyond its spec; replaced whole on every change."""

    phase: Phase
    reason: str
    message: str
    created: int
    admitted: int | None = None
    """Admission time (§1): creation, or the instant a follower became eligible. Kept across requeues."""
    bound_at: int | None = None
    """The last instant the run was bound (started or restarted). A run is never cut at that instant."""
    hold_down_until: int | None = None
    checkpoint_deadline: int | None = None
    ended_at: int | None = None
    """When the run reached a terminal phase (follow grace counts from an upstream's failure)."""
    upstream_failed_at: int | None = None
    """Start of a follow grace countdown (an upstream failed or was deleted)."""
    reservation: str | None = None
    eta: int | None = None
    generation: int = 0
    """Submission count of this run name; a resubmission after a terminal phase increments it."""


# --- Leases and reservations -------------------------------------------------------------


class Role(StrEnum):
    ACTIVE = "Active"
    SPARE = "Spare"


class MintReason(StrEnum):
    START = "Start"
    GROW = "Grow"
    SWAP = "Swap"


class FundingClass(StrEnum):
    OWNED = "owned"
    SHARED = "shared"
    BORROWED = "borrowed"
    UNFUNDED = "unfunded"


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    run: str
    owner: str
    group: int
    role: Role
    slots: tuple[Slot, ...]
    paid_by: EnvelopeRef | None
    start: int
    mint_reason: MintReason
    end: int | None = None
    closure_reason: str | None = None

    @property
    def gpus(self) -> int:
        return len(self.slots)

    @property
    def node(self) -> str:
        return self.slots[0][0]

    @property
    def open(self) -> bool:
        return self.end is None


class ReservationState(StrEnum):
    PENDING = "Pending"
    RELEASED = "Released"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class Reservation:
    name: str
    run: str
    intended_slice: tuple[tuple[str, int], ...]
    """(domain, GPUs) the run is intended to occupy, domains in placement order."""
    paying_envelope: EnvelopeRef | None
    earliest_start: int
    deficit_gpus: int
    state: ReservationState = ReservationState.PENDING
    window_only: bool = False
    """Reserved for an envelope window that opens later: never binds before earliest_start."""
    seed: str | None = None
    conflict_set: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    cluster: str = "default"
    period: int = 24 * 3600
    reservation_lead: int = 15 * 60
    preemption_hold_down: int = 3600
    cap_allowances: tuple[tuple[str, int], ...] = field(default=())
    """Per-cluster allowances for aggregate caps (§9), as (`budget/cap`, GPUs); they replace the cap."""
