"""Conversion between the protobuf API (proto/jobtree/v1) and the core model, both directions.

Contract:
- `*_to_proto(value)` turns a core value (Budget, Run, RunStatus, Node, Lease, Reservation, a
  command, a journal entry) into its message; `*_from_proto(message)` turns it back. For every
  core value `x`, `x_from_proto(x_to_proto(x)) == x`.
- Budgets and Runs go from proto to the core through their manifest form:
  `MessageToDict(message)` *is* a manifest, because every field's `json_name` is its manifest
  name, and `jobtree.core.manifest` validates it and fills the calculus's defaults. So a gRPC
  request and a kubectl manifest are validated by the same code, and bad input raises
  `ValidationError(path, problem)` naming the field (`spec.resources.totalGPUs`).
- `*_to_proto` writes the canonical, minimal form: fields whose value is the calculus's default
  are left out (as a person would write the manifest), so proto -> core -> proto is the identity
  on canonical messages.
- `parse_manifest(doc)` / `manifest_to_proto(doc)` parse a kubectl manifest dict (from YAML or
  JSON) through the schema: fields the schema does not declare are errors naming the field and
  the fields allowed there, types are checked against the schema, then
  `google.protobuf.json_format.ParseDict` builds the message and the core validates the rest.
- `schema_fields` lists the manifest fields the schema declares, for the test that keeps
  `jobtree.core.manifest` and the schema identical.

Not: transport (jobtree.bus), not scheduling. The core never imports this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jobtree.api.jobtree.v1 import bus_pb2 as bus
from jobtree.api.jobtree.v1 import objects_pb2 as pb
from jobtree.core import facts
from jobtree.core import manifest as core_manifest
from jobtree.core.errors import ValidationError
from jobtree.core.errors import field_path as _at
from jobtree.core.errors import item_path as _item
from jobtree.core.errors import show_value as _show
from jobtree.core.facts import Command, Fact, JournalEntry, SpecChange
from jobtree.core.manifest import API_VERSION, NOTIFY_ANNOTATION, NOTIFY_KINDS_ANNOTATION, RUNTIME_ANNOTATION
from jobtree.core.model import (
    Budget,
    EnvelopeRef,
    FailurePolicy,
    Follow,
    Funding,
    Lease,
    Lending,
    Locality,
    Malleable,
    MintReason,
    Node,
    NodeState,
    Phase,
    PreActivation,
    Reservation,
    ReservationState,
    Role,
    Run,
    RunSpec,
    RunStatus,
    Sharing,
    labels_of,
)
from jobtree.core.timefmt import HOUR, format_duration, format_time, parse_duration

__all__ = [
    "MANIFEST_KINDS",
    "WRITTEN_BY_JOBTREE",
    "ParsedManifest",
    "budget_from_proto",
    "budget_to_proto",
    "command_from_proto",
    "command_to_proto",
    "entry_from_proto",
    "entry_to_proto",
    "error_to_proto",
    "lease_from_proto",
    "lease_to_proto",
    "manifest_to_proto",
    "node_from_proto",
    "node_to_proto",
    "parse_manifest",
    "reservation_from_proto",
    "reservation_to_proto",
    "run_from_proto",
    "run_key",
    "run_ref",
    "run_status_from_proto",
    "run_status_to_proto",
    "run_to_proto",
    "schema_fields",
]

MANIFEST_KINDS: dict[str, type[pb.Budget] | type[pb.Run]] = {"Budget": pb.Budget, "Run": pb.Run}
"""The kinds a person writes as manifests, and their messages."""

WRITTEN_BY_JOBTREE = frozenset({"status"})
"""Top-level fields of API objects that only jobtree writes: a manifest may not carry them."""

E = TypeVar("E", bound=StrEnum)


# --- small helpers -------------------------------------------------------------------------








def _enum(kind: type[E], value: str, path: str) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ValidationError(path, f"must be one of {allowed}; got {_show(value)}") from None


def _instant(msg: Message, name: str) -> int | None:
    """A Timestamp field as Unix seconds, None when absent."""
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.seconds


def _required_instant(msg: Message, name: str, path: str) -> int:
    if not msg.HasField(name):
        raise ValidationError(_at(path, name), "is required")
    ts: Timestamp = getattr(msg, name)
    return ts.seconds


def _required_text(msg: Message, name: str, path: str) -> str:
    value: str = getattr(msg, name)
    if not value:
        raise ValidationError(_at(path, name), "is required")
    return value


def run_key(ref: pb.RunRef, path: str = "") -> str:
    """The core's run key `namespace/name` of a RunRef (namespace defaults to `default`)."""
    if not ref.name:
        raise ValidationError(_at(path, "name"), "is required")
    return f"{ref.namespace or 'default'}/{ref.name}"


def run_ref(key: str) -> pb.RunRef:
    """The RunRef of a core run key `namespace/name`."""
    namespace, sep, name = key.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"a run key is namespace/name, got {key!r}")
    return pb.RunRef(namespace=namespace, name=name)


def _split_key(key: str) -> tuple[str, str]:
    ref = run_ref(key)
    return ref.namespace, ref.name


def _to_dict(msg: Message) -> dict[str, Any]:
    """The manifest form of a message (json names, only fields that are set)."""
    return json_format.MessageToDict(msg)


# --- Budgets -------------------------------------------------------------------------------


def budget_to_proto(budget: Budget) -> pb.Budget:
    msg = pb.Budget(api_version=API_VERSION, kind="Budget")
    msg.metadata.name = budget.name
    spec = msg.spec
    spec.owner = budget.owner
    spec.parents.extend(budget.parents)
    if budget.period is not None:
        spec.period = format_duration(budget.period)
    for e in budget.envelopes:
        env = spec.envelopes.add(name=e.name, flavor=e.flavor, concurrency=e.concurrency)
        env.selector.update(dict(e.selector))
        if e.max_gpu_hours is not None:
            env.max_gpu_hours = e.max_gpu_hours
        if e.start is not None:
            env.start = format_time(e.start)
        if e.end is not None:
            env.end = format_time(e.end)
        if e.sharing != Sharing.FAMILY:
            env.sharing = e.sharing.value
        if e.pre_activation != PreActivation():
            env.pre_activation.SetInParent()
            if e.pre_activation.allow_reservations:
                env.pre_activation.allow_reservations = True
            if e.pre_activation.allow_admission:
                env.pre_activation.allow_admission = True
        if e.lending != Lending():
            lend = env.lending
            lend.SetInParent()
            if e.lending.allow:
                lend.allow = True
            lend.to.extend(e.lending.to)
            if e.lending.max_concurrency is not None:
                lend.max_concurrency = e.lending.max_concurrency
            if e.lending.max_gpu_hours is not None:
                lend.max_gpu_hours = e.lending.max_gpu_hours
    for c in budget.aggregate_caps:
        cap = spec.aggregate_caps.add(name=c.name, flavor=c.flavor, envelopes=c.envelopes)
        if c.max_concurrency is not None:
            cap.max_concurrency = c.max_concurrency
        if c.max_gpu_hours is not None:
            cap.max_gpu_hours = c.max_gpu_hours
    return msg


MAX_OBJECT_BYTES = 256 * 1024
"""Most bytes a Run or Budget may take serialised (it travels in one NATS message with its
decision; NATS carries at most 1 MiB). `jobtree.core.manifest.MAX_LIST_ITEMS` bounds lists."""


def check_size(msg: Message, path: str = "") -> None:
    """ValidationError naming the largest field (two levels down, e.g. `spec.roles`) when `msg`
    is larger than MAX_OBJECT_BYTES serialised."""
    size = msg.ByteSize()
    if size <= MAX_OBJECT_BYTES:
        return
    kind = msg.DESCRIPTOR.name

    def alone(parent: Message, name: str) -> int:
        only = type(parent)()
        only.CopyFrom(parent)
        for f, _ in only.ListFields():
            if f.name != name:
                only.ClearField(f.name)
        return only.ByteSize()

    candidates: list[tuple[int, str]] = []
    for top, value in msg.ListFields():
        if top.message_type is not None and not top.is_repeated:
            candidates += [(alone(value, f.name), f"{top.json_name}.{f.json_name}") for f, _ in value.ListFields()]
        else:
            candidates.append((alone(msg, top.name), top.json_name))
    _, field_name = max(candidates) if candidates else (0, "")
    raise ValidationError(_at(path, field_name), f"makes the {kind} {size:,} bytes serialised; a {kind} may be "
                          f"at most {MAX_OBJECT_BYTES:,} bytes ({MAX_OBJECT_BYTES // 1024} KiB)")


def budget_from_proto(msg: pb.Budget, path: str = "") -> Budget:
    """A Budget message as a validated core Budget (apiVersion and kind may be left out)."""
    doc = _to_dict(msg)
    doc.setdefault("apiVersion", API_VERSION)
    doc.setdefault("kind", "Budget")
    budget = core_manifest.parse_budget(doc, path)  # the list limits first: they name the field
    check_size(msg, path)
    return budget


# --- Runs ----------------------------------------------------------------------------------


def run_to_proto(run: Run, status: RunStatus | None = None) -> pb.Run:
    msg = pb.Run(api_version=API_VERSION, kind="Run")
    msg.metadata.name = run.name
    msg.metadata.namespace = run.namespace
    s = run.spec
    if s.runtime is not None:
        msg.metadata.annotations[RUNTIME_ANNOTATION] = format_duration(s.runtime)
    if run.notify:
        msg.metadata.annotations[NOTIFY_ANNOTATION] = ",".join(run.notify)
    if run.notify_kinds:
        msg.metadata.annotations[NOTIFY_KINDS_ANNOTATION] = ",".join(run.notify_kinds)
    spec = msg.spec
    spec.owner = s.owner
    spec.resources.gpu_type = s.gpu_type
    spec.resources.total_gpus = s.total_gpus
    if s.locality != Locality():
        loc = spec.locality
        loc.SetInParent()
        if s.locality.group_gpus is not None:
            loc.group_gpus = s.locality.group_gpus
        if not s.locality.allow_cross_group_spread:
            loc.allow_cross_group_spread = False
        loc.selector.update(dict(s.locality.selector))
    if s.spares_per_group:
        spec.spares_per_group = s.spares_per_group
    if s.malleable is not None:
        m = s.malleable
        spec.malleable.min_total_gpus = m.min_total
        spec.malleable.max_total_gpus = m.max_total
        spec.malleable.step_gpus = m.step
        spec.malleable.desired_total_gpus = m.desired
    if s.funding != Funding():
        fund = spec.funding
        fund.SetInParent()
        if s.funding.allow_borrow:
            fund.allow_borrow = True
        if s.funding.max_borrow_gpus is not None:
            fund.max_borrow_gpus = s.funding.max_borrow_gpus
        fund.sponsors.extend(s.funding.sponsors)
    if s.follow is not None:
        fol = spec.follow
        fol.after.extend(s.follow.after)
        if s.follow.on_upstream_failure != FailurePolicy.WAIT:
            fol.on_upstream_failure = s.follow.on_upstream_failure.value
        if s.follow.upstream_failure_grace != HOUR:
            fol.upstream_failure_grace = format_duration(s.follow.upstream_failure_grace)
    if s.checkpoint is not None:
        spec.runtime.checkpoint = format_duration(s.checkpoint)
    if status is not None:
        msg.status.CopyFrom(run_status_to_proto(status))
    return msg


def run_from_proto(msg: pb.Run, path: str = "") -> Run:
    """A Run message as a validated core Run; `status` is ignored (see run_status_from_proto).

    `spec.roles` is validated but, like in the core, not part of the model: the Kubernetes
    bridge reads it from the message.
    """
    doc = _to_dict(msg)
    doc.pop("status", None)
    doc.setdefault("apiVersion", API_VERSION)
    doc.setdefault("kind", "Run")
    run = core_manifest.parse_run(doc, path)  # the list limits first: they name the field
    check_size(msg, path)
    _check_notify_kinds(run, path)
    return run


def _check_notify_kinds(run: Run, path: str) -> None:
    """A Run's notify-kinds name run event kinds (the core checks only that they are names)."""
    from jobtree.api.events import RUN_KINDS

    for kind in run.notify_kinds:
        if kind not in RUN_KINDS:
            raise ValidationError(_at(path, f"metadata.annotations.{NOTIFY_KINDS_ANNOTATION}"),
                                  f"unknown kind {kind!r}; kinds about a run: {', '.join(RUN_KINDS)}")


def run_from_ledger(msg: pb.Run) -> Run:
    """The inverse of `run_to_proto` for a Run the ledger holds: admission wrote it from a core
    Run it had validated, so the fields are read straight, with nothing checked again (a
    follower applies every spec of the ledger; this is ~10x cheaper than `run_from_proto`).
    Input from anyone else goes through `run_from_proto`. `test_api_convert` pins that both
    agree on every run the scenarios submit."""
    s = msg.spec
    loc, fund, fol = s.locality, s.funding, s.follow
    runtime = msg.metadata.annotations.get(RUNTIME_ANNOTATION)
    spec = RunSpec(
        owner=s.owner,
        gpu_type=s.resources.gpu_type,
        total_gpus=s.resources.total_gpus,
        locality=Locality(
            loc.group_gpus if loc.HasField("group_gpus") else None,
            loc.allow_cross_group_spread if loc.HasField("allow_cross_group_spread") else True,
            labels_of(dict(loc.selector)),
        ) if s.HasField("locality") else Locality(),
        spares_per_group=s.spares_per_group,
        malleable=Malleable(s.malleable.min_total_gpus, s.malleable.max_total_gpus, s.malleable.step_gpus,
                            s.malleable.desired_total_gpus) if s.HasField("malleable") else None,
        funding=Funding(
            fund.allow_borrow,
            fund.max_borrow_gpus if fund.HasField("max_borrow_gpus") else None,
            tuple(fund.sponsors),
        ) if s.HasField("funding") else Funding(),
        follow=Follow(
            tuple(fol.after),
            FailurePolicy(fol.on_upstream_failure) if fol.HasField("on_upstream_failure") else FailurePolicy.WAIT,
            parse_duration(fol.upstream_failure_grace) if fol.HasField("upstream_failure_grace") else HOUR,
        ) if s.HasField("follow") else None,
        checkpoint=parse_duration(s.runtime.checkpoint) if s.runtime.HasField("checkpoint") else None,
        runtime=parse_duration(runtime) if runtime is not None else None,
    )
    notes = msg.metadata.annotations
    return Run(msg.metadata.namespace, msg.metadata.name, spec,
               tuple(n for n in notes.get(NOTIFY_ANNOTATION, "").split(",") if n),
               tuple(n for n in notes.get(NOTIFY_KINDS_ANNOTATION, "").split(",") if n))


_STATUS_INSTANTS = (
    ("admitted", "admitted"),
    ("bound_at", "bound_at"),
    ("hold_down_until", "hold_down_until"),
    ("checkpoint_deadline", "checkpoint_deadline"),
    ("ended_at", "ended_at"),
    ("upstream_failed_at", "upstream_failed_at"),
    ("eta", "eta"),
)
"""(model attribute, message field) of the optional instants of a RunStatus."""


def run_status_to_proto(status: RunStatus) -> pb.RunStatus:
    msg = pb.RunStatus(
        phase=status.phase.value, reason=status.reason, message=status.message, generation=status.generation
    )
    msg.created.seconds = status.created
    for attr, field in _STATUS_INSTANTS:
        value = getattr(status, attr)
        if value is not None:
            getattr(msg, field).seconds = value
    if status.reservation is not None:
        msg.reservation = status.reservation
    return msg


def run_status_from_proto(msg: pb.RunStatus, path: str = "") -> RunStatus:
    instants = {attr: _instant(msg, field) for attr, field in _STATUS_INSTANTS}
    return RunStatus(
        phase=_enum(Phase, msg.phase, _at(path, "phase")),
        reason=msg.reason,
        message=msg.message,
        created=_required_instant(msg, "created", path),
        reservation=msg.reservation if msg.HasField("reservation") else None,
        generation=msg.generation,
        **instants,
    )


# --- Nodes ---------------------------------------------------------------------------------


def node_to_proto(node: Node) -> pb.Node:
    msg = pb.Node(name=node.name, gpus=node.gpus, state=node.state.value)
    msg.labels.update(dict(node.labels))
    return msg


def node_from_proto(msg: pb.Node, path: str = "") -> Node:
    """A Node message as a validated core Node (state absent = Ready)."""
    doc = _to_dict(msg)
    state = doc.pop("state", NodeState.READY.value)
    node = core_manifest.parse_node(doc, path)
    return replace(node, state=_enum(NodeState, state, _at(path, "state")))


# --- Leases and reservations ---------------------------------------------------------------


def _paid_by(ref: EnvelopeRef) -> pb.PaidBy:
    return pb.PaidBy(budget=ref[0], envelope=ref[1])


def _envelope_ref(msg: Message, name: str, path: str) -> EnvelopeRef | None:
    if not msg.HasField(name):
        return None
    ref: pb.PaidBy = getattr(msg, name)
    at = _at(path, name)
    return (_required_text(ref, "budget", at), _required_text(ref, "envelope", at))


def lease_to_proto(lease: Lease) -> pb.GPULease:
    namespace, run = _split_key(lease.run)
    msg = pb.GPULease(api_version=API_VERSION, kind="GPULease")
    msg.metadata.name = lease.name
    msg.metadata.namespace = namespace
    spec = msg.spec
    spec.run_ref = run
    spec.owner = lease.owner
    spec.group = lease.group
    spec.role = lease.role.value
    for node, index in lease.slots:
        spec.slots.add(node=node, index=index)
    spec.gpus = len(lease.slots)
    if lease.paid_by is not None:
        spec.paid_by.CopyFrom(_paid_by(lease.paid_by))
    spec.start.seconds = lease.start
    spec.mint_reason = lease.mint_reason.value
    if lease.end is not None:
        msg.status.end.seconds = lease.end
    if lease.closure_reason is not None:
        msg.status.closure_reason = lease.closure_reason
    return msg


def lease_from_proto(msg: pb.GPULease, path: str = "") -> Lease:
    meta_path, spec_path = _at(path, "metadata"), _at(path, "spec")
    spec, status = msg.spec, msg.status
    slots = tuple((s.node, s.index) for s in spec.slots)  # every lease event: no path strings unless wrong
    for i, (node, _) in enumerate(slots):
        if not node:
            raise ValidationError(_at(_item(_at(spec_path, "slots"), i), "node"), "is required")
    if not slots:
        raise ValidationError(_at(spec_path, "slots"), "must hold at least one slot")
    namespace = _required_text(msg.metadata, "namespace", meta_path)
    return Lease(
        name=_required_text(msg.metadata, "name", meta_path),
        run=f"{namespace}/{_required_text(spec, 'run_ref', spec_path)}",
        owner=_required_text(spec, "owner", spec_path),
        group=spec.group,
        role=_enum(Role, spec.role, _at(spec_path, "role")),
        slots=slots,
        paid_by=_envelope_ref(spec, "paid_by", spec_path),
        start=_required_instant(spec, "start", spec_path),
        mint_reason=_enum(MintReason, spec.mint_reason, _at(spec_path, "mintReason")),
        end=_instant(status, "end"),
        closure_reason=status.closure_reason if status.HasField("closure_reason") else None,
    )


def reservation_to_proto(res: Reservation) -> pb.Reservation:
    namespace, run = _split_key(res.run)
    msg = pb.Reservation(api_version=API_VERSION, kind="Reservation")
    msg.metadata.name = res.name
    msg.metadata.namespace = namespace
    spec = msg.spec
    spec.run_ref = run
    for domain, gpus in res.intended_slice:
        spec.intended_slice.add(domain=domain, gpus=gpus)
    if res.paying_envelope is not None:
        spec.paying_envelope.CopyFrom(_paid_by(res.paying_envelope))
    spec.earliest_start.seconds = res.earliest_start
    spec.deficit_gpus = res.deficit_gpus
    if res.window_only:
        spec.window_only = True
    if res.seed is not None:
        spec.seed = res.seed
    spec.conflict_set.extend(res.conflict_set)
    msg.status.state = res.state.value
    return msg


def reservation_from_proto(msg: pb.Reservation, path: str = "") -> Reservation:
    meta_path, spec_path = _at(path, "metadata"), _at(path, "spec")
    spec = msg.spec
    namespace = _required_text(msg.metadata, "namespace", meta_path)
    slice_path = _at(spec_path, "intendedSlice")
    state = msg.status.state or ReservationState.PENDING.value
    return Reservation(
        name=_required_text(msg.metadata, "name", meta_path),
        run=f"{namespace}/{_required_text(spec, 'run_ref', spec_path)}",
        intended_slice=tuple(
            (_required_text(d, "domain", _item(slice_path, i)), d.gpus) for i, d in enumerate(spec.intended_slice)
        ),
        paying_envelope=_envelope_ref(spec, "paying_envelope", spec_path),
        earliest_start=_required_instant(spec, "earliest_start", spec_path),
        deficit_gpus=spec.deficit_gpus,
        state=_enum(ReservationState, state, _at(path, "status.state")),
        window_only=spec.window_only,
        seed=spec.seed if spec.HasField("seed") else None,
        conflict_set=tuple(spec.conflict_set),
    )


# --- Commands ------------------------------------------------------------------------------


def command_to_proto(
    cmd: Command,
    *,
    command_id: str = "",
    epoch: int = 0,
    instant: int | None = None,
    min_ledger_sequence: int = 0,
) -> bus.Command:
    msg = bus.Command(command_id=command_id, epoch=epoch, min_ledger_sequence=min_ledger_sequence)
    if instant is not None:
        msg.instant.seconds = instant
    match cmd:
        case facts.ApplyBudget(budget):
            msg.apply_budget.budget.CopyFrom(budget_to_proto(budget))
        case facts.ApplyRun(run):
            msg.apply_run.run.CopyFrom(run_to_proto(run))
        case facts.DeleteRun(key):
            msg.delete_run.run.CopyFrom(run_ref(key))
        case facts.CompleteRun(key):
            msg.complete_run.run.CopyFrom(run_ref(key))
        case facts.FailRun(key):
            msg.fail_run.run.CopyFrom(run_ref(key))
        case facts.FailNode(node):
            msg.fail_node.node = node
        case facts.CordonNode(node):
            msg.cordon_node.node = node
        case facts.UncordonNode(node):
            msg.uncordon_node.node = node
        case facts.AddNode(node):
            msg.add_node.node.CopyFrom(node_to_proto(node))
        case facts.ShrinkRun(key, desired):
            msg.shrink_run.run.CopyFrom(run_ref(key))
            msg.shrink_run.desired_total_gpus = desired
        case facts.ReportEta(key, at):
            msg.report_eta.run.CopyFrom(run_ref(key))
            msg.report_eta.at.seconds = at
        case facts.Tick():
            msg.tick.SetInParent()
        case facts.SetAllowance():
            msg.set_allowance.CopyFrom(_allowance_to_proto(cmd))
        case _:
            raise TypeError(f"not a command: {cmd!r}")
    return msg


def _node_name(msg: Message, path: str) -> str:
    return _required_text(msg, "node", path)


def command_from_proto(msg: bus.Command) -> Command:
    """The core command of a Command message; ValidationError names the field when it is malformed."""
    which = msg.WhichOneof("command")
    if which is None:
        raise ValidationError("command", "is required: one of " + ", ".join(_COMMAND_FIELDS))
    if which == "batch":
        raise ValidationError("batch", "a batch holds several commands: use commands_from_proto")
    body = getattr(msg, which)
    return _COMMANDS_FROM[which](body, which)


def command_digest(msg: bus.Command) -> bytes:
    """What a command asks for, as 16 bytes: its payload without the fields a retry may change
    (its id, the sender's epoch, the instant, the read-your-writes sequence and who sent it). Two sends of one
    request have the same digest; a command id reused for another request does not."""
    bare = bus.Command()
    bare.CopyFrom(msg)
    for name in ("command_id", "epoch", "instant", "min_ledger_sequence", "identity"):
        bare.ClearField(name)  # type: ignore[arg-type]
    return hashlib.blake2b(bare.SerializeToString(deterministic=True), digest_size=16).digest()


def commands_from_proto(msg: bus.Command) -> list[Command]:
    """The core commands of a Command message: one, or every command of a batch (in order)."""
    if msg.WhichOneof("command") != "batch":
        return [command_from_proto(msg)]
    if not msg.batch.commands:
        raise ValidationError("batch.commands", "must hold at least one command")
    out: list[Command] = []
    for i, inner in enumerate(msg.batch.commands):
        if inner.WhichOneof("command") == "batch":
            raise ValidationError(f"batch.commands[{i}]", "a batch may not hold another batch")
        try:
            out.append(command_from_proto(inner))
        except ValidationError as err:
            raise err.under(f"batch.commands[{i}]") from None
    return out


def batch_to_proto(cmds: list[Command], *, command_id: str = "", instant: int | None = None) -> bus.Command:
    """Several commands as one Command (applied together, then one settling)."""
    msg = bus.Command(command_id=command_id)
    if instant is not None:
        msg.instant.seconds = instant
    msg.batch.SetInParent()
    for cmd in cmds:
        msg.batch.commands.append(command_to_proto(cmd))
    return msg


def _allowance_to_proto(cmd: facts.SetAllowance) -> bus.SetAllowance:
    out = bus.SetAllowance(cap=cmd.cap, version=cmd.version)
    if cmd.concurrency is not None:
        out.concurrency = cmd.concurrency
    if cmd.gpu_hours is not None:
        out.gpu_hours = cmd.gpu_hours
    return out


def _allowance_from_proto(msg: bus.SetAllowance, path: str) -> facts.SetAllowance:
    cap = _required_text(msg, "cap", path)
    if "/" not in cap:
        raise ValidationError(_at(path, "cap"), f"must name an aggregate cap as budget/capName, got {cap!r}")
    if msg.version <= 0:
        raise ValidationError(_at(path, "version"), "must be a positive grant version")
    return facts.SetAllowance(cap, msg.concurrency if msg.HasField("concurrency") else None, msg.version,
                              msg.gpu_hours if msg.HasField("gpu_hours") else None)


_COMMANDS_FROM: dict[str, Callable[[Any, str], Command]] = {
    "apply_budget": lambda b, p: facts.ApplyBudget(budget_from_proto(b.budget, _at(p, "budget"))),
    "apply_run": lambda b, p: facts.ApplyRun(run_from_proto(b.run, _at(p, "run"))),
    "delete_run": lambda b, p: facts.DeleteRun(run_key(b.run, _at(p, "run"))),
    "complete_run": lambda b, p: facts.CompleteRun(run_key(b.run, _at(p, "run"))),
    "fail_run": lambda b, p: facts.FailRun(run_key(b.run, _at(p, "run"))),
    "fail_node": lambda b, p: facts.FailNode(_node_name(b, p)),
    "cordon_node": lambda b, p: facts.CordonNode(_node_name(b, p)),
    "uncordon_node": lambda b, p: facts.UncordonNode(_node_name(b, p)),
    "add_node": lambda b, p: facts.AddNode(node_from_proto(b.node, _at(p, "node"))),
    "shrink_run": lambda b, p: facts.ShrinkRun(run_key(b.run, _at(p, "run")), b.desired_total_gpus),
    "report_eta": lambda b, p: facts.ReportEta(run_key(b.run, _at(p, "run")), _required_instant(b, "at", p)),
    "tick": lambda b, p: facts.Tick(),
    "set_allowance": lambda b, p: _allowance_from_proto(b, p),
}
_COMMAND_FIELDS = tuple(f.name for f in bus.Command.DESCRIPTOR.oneofs_by_name["command"].fields)
assert set(_COMMAND_FIELDS) == {*_COMMANDS_FROM, "batch"}, "bus.proto Command and convert disagree"


# --- Journal entries (ledger facts and spec changes) ---------------------------------------


def entry_to_proto(entry: JournalEntry, *, command_id: str = "", epoch: int = 0) -> bus.LedgerEntry:
    """A core journal entry `(instant, fact or spec change)` as a LedgerEntry."""
    instant, what = entry
    msg = bus.LedgerEntry(command_id=command_id, epoch=epoch)
    msg.instant.seconds = instant
    match what:
        case facts.LeaseMinted(lease):
            msg.lease_minted.lease.CopyFrom(lease_to_proto(lease))
        case facts.LeaseClosed(name, end, reason):
            closed = msg.lease_closed
            closed.name = name
            closed.end.seconds = end
            closed.reason = reason
        case facts.ReservationPut(res):
            msg.reservation_put.reservation.CopyFrom(reservation_to_proto(res))
        case facts.RunStatusPut(key, status):
            msg.run_status_put.run.CopyFrom(run_ref(key))
            msg.run_status_put.status.CopyFrom(run_status_to_proto(status))
        case facts.SpecPut(run):
            msg.spec_put.run.CopyFrom(run_to_proto(run))
        case facts.SpecDeleted(key):
            msg.spec_deleted.run.CopyFrom(run_ref(key))
        case facts.NodeStatePut(node):
            msg.node_state_put.node.CopyFrom(node_to_proto(node))
        case facts.ApplyBudget(budget):
            msg.budget_put.budget.CopyFrom(budget_to_proto(budget))
        case facts.ClockAdvanced():
            msg.clock_advanced.SetInParent()
        case facts.SetAllowance():
            msg.allowance_set.CopyFrom(_allowance_to_proto(what))
        case _:
            raise TypeError(f"not a fact or spec change: {what!r}")
    return msg


def entry_from_proto(msg: bus.LedgerEntry) -> JournalEntry:
    which = msg.WhichOneof("fact")
    if which is None:
        raise ValidationError("fact", "is required: one of " + ", ".join(_FACT_FIELDS))
    instant = _required_instant(msg, "instant", "")
    return instant, _FACTS_FROM[which](getattr(msg, which), which)


_FACTS_FROM: dict[str, Callable[[Any, str], Fact | SpecChange]] = {
    "lease_minted": lambda b, p: facts.LeaseMinted(lease_from_proto(b.lease, _at(p, "lease"))),
    "lease_closed": lambda b, p: facts.LeaseClosed(
        _required_text(b, "name", p), _required_instant(b, "end", p), b.reason
    ),
    "reservation_put": lambda b, p: facts.ReservationPut(
        reservation_from_proto(b.reservation, _at(p, "reservation"))
    ),
    "run_status_put": lambda b, p: facts.RunStatusPut(
        run_key(b.run, _at(p, "run")), run_status_from_proto(b.status, _at(p, "status"))
    ),
    "spec_put": lambda b, p: facts.SpecPut(run_from_ledger(b.run)),
    "spec_deleted": lambda b, p: facts.SpecDeleted(run_key(b.run, _at(p, "run"))),
    "node_state_put": lambda b, p: facts.NodeStatePut(node_from_proto(b.node, _at(p, "node"))),
    "budget_put": lambda b, p: facts.ApplyBudget(budget_from_proto(b.budget, _at(p, "budget"))),
    "clock_advanced": lambda b, p: facts.ClockAdvanced(),
    "allowance_set": lambda b, p: _allowance_from_proto(b, p),
}
_FACT_FIELDS = tuple(f.name for f in bus.LedgerEntry.DESCRIPTOR.oneofs_by_name["fact"].fields)
assert set(_FACT_FIELDS) == set(_FACTS_FROM), "bus.proto LedgerEntry and convert disagree"


ERROR_CODE_OF_KIND: dict[str, int] = {
    "invalid": bus.ERROR_CODE_INVALID_ARGUMENT,
    "not_found": bus.ERROR_CODE_NOT_FOUND,
    "precondition": bus.ERROR_CODE_FAILED_PRECONDITION,
    "forbidden": bus.ERROR_CODE_PERMISSION_DENIED,
}
"""The core's kinds of refusal (`jobtree.core.errors`) as bus ErrorCodes: the one mapping."""


def error_to_proto(err: ValidationError) -> bus.Error:
    """A core refusal as a bus Error: its kind's code, the field path and the problem."""
    return bus.Error(code=ERROR_CODE_OF_KIND[err.kind], field_path=err.path, problem=err.problem)  # type: ignore[arg-type]


# --- Manifests through the schema ----------------------------------------------------------


class ParsedManifest(NamedTuple):
    proto: pb.Budget | pb.Run
    """The manifest as the schema's message (everything it said, roles and labels included)."""
    model: Budget | Run
    """The manifest as the core's validated value (defaults filled in)."""


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_wellknown(desc: Descriptor) -> bool:
    return desc.full_name.startswith("google.protobuf.")


_INT_RANGE = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _check_scalar(value: object, field: FieldDescriptor, path: str) -> None:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if not isinstance(value, str):
            raise ValidationError(path, f"must be a string, got {_show(value)}")
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise ValidationError(path, f"must be true or false, got {_show(value)}")
    elif cpp in _INT_RANGE:
        low, high = _INT_RANGE[cpp]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(path, f"must be an integer, got {_show(value)}")
        if not low <= value <= high:
            raise ValidationError(path, f"must be between {low} and {high}, got {value}")
    elif cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(path, f"must be a number, got {_show(value)}")
    elif cpp == FieldDescriptor.CPPTYPE_ENUM and not isinstance(value, str):
        raise ValidationError(path, f"must be a string, got {_show(value)}")


def _check_single(value: object, field: FieldDescriptor, path: str) -> object:
    if field.message_type is None:
        _check_scalar(value, field, path)
        return value
    if _is_wellknown(field.message_type):
        if field.message_type.full_name == "google.protobuf.Struct" and not isinstance(value, dict):
            raise ValidationError(path, f"must be a mapping, got {_show(value)}")
        return value  # json_format checks the rest (Timestamp text, Value)
    return _check_message(value, field.message_type, path)


def _check_field(value: object, field: FieldDescriptor, path: str) -> object:
    if _is_map(field):
        if not isinstance(value, dict):
            raise ValidationError(path, f"must be a mapping, got {_show(value)}")
        entry = field.message_type
        assert entry is not None
        value_field = entry.fields_by_name["value"]
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(path, f"keys must be strings, got {_show(key)}")
            out[key] = _check_single(item, value_field, _at(path, key))
        return out
    if field.is_repeated:
        if not isinstance(value, list):
            raise ValidationError(path, f"must be a list, got {_show(value)}")
        return [_check_single(item, field, _item(path, i)) for i, item in enumerate(value)]
    return _check_single(value, field, path)


def _check_message(
    value: object, desc: Descriptor, path: str, exclude: frozenset[str] = frozenset()
) -> dict[str, object]:
    """`value` checked against message `desc` by json name; returns it with null fields dropped."""
    fields = {f.json_name: f for f in desc.fields if f.json_name not in exclude}
    allowed = ", ".join(fields)
    if not isinstance(value, dict):
        raise ValidationError(path, f"must be a mapping with fields {allowed}; got {_show(value)}")
    out: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValidationError(path, f"field names must be strings, got {_show(key)}")
        field = fields.get(key)
        if field is None:
            raise ValidationError(_at(path, key), f"unknown field {key!r}; allowed here: {allowed}")
        if item is not None:
            out[key] = _check_field(item, field, _at(path, key))
    return out


def parse_manifest(doc: object, path: str = "") -> ParsedManifest:
    """A Budget or Run manifest through the schema, then the core: (message, core value).

    Raises ValidationError naming the field for a field the schema does not declare (or that
    only jobtree writes, such as `status`), a value of the wrong type, and everything the core
    rejects (a missing required field, a value outside what CALCULUS §1 allows).
    """
    kind = doc.get("kind") if isinstance(doc, dict) else None
    cls = MANIFEST_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        core_manifest.parse_manifest(doc, path)  # raises, naming apiVersion or kind
        raise ValidationError(_at(path, "kind"), f"must be {' or '.join(MANIFEST_KINDS)}")
    cleaned = _check_message(doc, cls.DESCRIPTOR, path, WRITTEN_BY_JOBTREE)
    msg = cls()
    try:
        json_format.ParseDict(cleaned, msg)
    except json_format.ParseError as exc:  # pragma: no cover - _check_message catches these first
        raise ValidationError(path, f"does not match the schema: {exc}") from None
    model = core_manifest.parse_manifest(doc, path)  # the list limits first: they name the field
    check_size(msg, path)
    return ParsedManifest(msg, model)


def manifest_to_proto(doc: object, path: str = "") -> pb.Budget | pb.Run:
    """A Budget or Run manifest as its message, validated by the schema and the core."""
    return parse_manifest(doc, path).proto


def schema_fields(desc: Descriptor, exclude: frozenset[str] = frozenset()) -> Iterator[tuple[str, ...]]:
    """Every manifest field path the schema declares under `desc`, as tuples of json names.

    Maps (labels, selectors), Struct (roles) and other well-known types are leaves.
    """
    for field in desc.fields:
        if field.json_name in exclude:
            continue
        yield (field.json_name,)
        sub = field.message_type
        if sub is not None and not _is_map(field) and not _is_wellknown(sub):
            for rest in schema_fields(sub):
                yield (field.json_name, *rest)
