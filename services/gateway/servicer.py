"""The `jobtree.v1.Jobtree` gRPC service: validate, send commands to admission, read the follower.

Contract:
- Writes (SubmitRun, ApplyBudget, Apply, DeleteRun, ShrinkRun, CompleteRun, FailRun, AddSponsor) are
  validated through the schema and the core (`convert.*_from_proto`, which runs
  `jobtree.core.manifest`); bad input aborts with INVALID_ARGUMENT `field.path: problem` and
  sends nothing. Commands that name an existing run are checked against the gateway's view
  once it has caught up with the ledger's last sequence: an unknown run is NOT_FOUND. What a
  command may do to a run (not after it ended, not before it started, shrink only a malleable
  run) is the core's rule: admission answers FAILED_PRECONDITION and the gateway maps the code
  (`STATUS_OF`), keeping no copy of the rule. A valid write becomes one `bus.Command`
  (`command_id` = the request's `request_id`, or a fresh uuid4; the instant from the clock) sent
  to `jobtree.<c>.admission.command`; the `bus.CommandReply`'s error maps to a gRPC code
  (`STATUS_OF`), and its `ledger_sequence` is returned so the client can read its own write.
  While nobody answers the subject (a leader failover), the command is re-sent with the same id
  until `command_timeout`; a timeout is UNAVAILABLE. While the gateway has lost NATS, writes
  wait for it until their deadline and then fail UNAVAILABLE naming NATS (not admission). A
  request id already committed for a *different* request is refused INVALID_ARGUMENT on
  `request_id` (admission compares the command digests the ledger carries).
- Reads of runs, leases and reservations are answered from the gateway's own `Follower`, once it
  has applied `min_ledger_sequence` (UNAVAILABLE if it does not within `read_timeout`;
  OUT_OF_RANGE at once when the sequence is beyond the ledger's end). While the gateway has
  lost NATS, reads are answered from the view it has, with the trailing metadata
  `jobtree-stale` saying since when and at which ledger sequence (kubectl-runs prints it).
  WatchRuns streams the matching runs (ADDED), then ADDED/MODIFIED/DELETED as the follower
  applies batches; `after_ledger_sequence` resumes with the current state of every run that
  changed after that sequence (intermediate states are coalesced).
- Usage and ListSponsors are forwarded to the budget service, GlobalUsage to the federation
  (on its hub, over the cluster's leaf connection; UNAVAILABLE when none answers), ListNodes and PlanRun to the
  packer (request/reply over NATS with the same messages; a reply typed `jobtree.v1.Error`
  maps like a command error); no responder is UNAVAILABLE naming the service. ListBudgets is
  read from the follower (the ledger carries every applied budget).
Not: a decision maker (admission decides), not a writer of the ledger (the binder is).
"""

from __future__ import annotations

from jobtree.services.gateway.base import STALE_METADATA, STATUS_OF, GatewayBase, batch_run_keys, run_message  # noqa: F401
from jobtree.services.gateway.reads import Reads
from jobtree.services.gateway.writes import Writes

__all__ = ["STATUS_OF", "Gateway"]


class Gateway(Reads, Writes):
    """`jobtree.v1.Jobtree`: the writes, the reads and the plumbing they share (`GatewayBase`)."""
