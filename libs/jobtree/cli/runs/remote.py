"""The remote backend: every command as calls to the gateway's gRPC API.

Part of `kubectl-runs` (`jobtree.cli.runs`): see the package docstring for the contract.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from jobtree.cli.runs.local import _watch_columns
from jobtree.cli.runs.manifests import Manifest, read_manifests
from jobtree.cli.runs.options import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    PROG,
    STALE_METADATA,
    Json,
    Options,
    RunsError,
    _one_line,
)
from jobtree.cli.runs.output import (
    LeaseRow,
    RunRow,
    _dump,
    _lease_rows_table,
    _print_plans,
    _print_pods,
    _print_usage,
    _run_key,
    _runs_table,
    _split_key,
    _table,
    _to_dict,
    global_usage_text,
    kinds_of,
    pods_of,
    print_burn,
    print_events,
    print_top,
    sim_run,
)

# ================================================================================================
# The remote client (gRPC)
# ================================================================================================


class Remote:
    """Calls to the gateway; gRPC errors become RunsError with the right exit status."""

    BAD_INPUT_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "OUT_OF_RANGE",
                       "PERMISSION_DENIED", "UNAUTHENTICATED")

    def __init__(self, opts: Options) -> None:

        from jobtree.api.jobtree.v1 import service_pb2_grpc

        self.opts = opts
        from jobtree.cli.runs.credentials import Credentials

        self.channel = (opts.credentials or Credentials(opts.server)).channel()
        self.stub = service_pb2_grpc.JobtreeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def error(self, err: Any, where: str = "") -> RunsError:
        import grpc

        code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
        details = " ".join(str(err.details() if callable(getattr(err, "details", None)) else err).split())
        prefix = f"{where}: " if where else ""
        if code.name in self.BAD_INPUT_CODES:
            return RunsError(f"{prefix}{details}", EXIT_BAD_INPUT)
        if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "refused" in details.lower()):
            return RunsError(f"cannot reach the jobtree gateway at {self.opts.server}: {details}", EXIT_UNAVAILABLE)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RunsError(f"{prefix}the gateway at {self.opts.server} did not answer within "
                             f"{self.opts.timeout:g} s", EXIT_UNAVAILABLE)
        return RunsError(f"{prefix}{code.name}: {details}", EXIT_UNAVAILABLE)

    def call(self, method: str, request: Any, where: str = "") -> Any:
        """One call; an answer the gateway marks stale (it has lost NATS) is still returned,
        with a warning line on stderr."""
        import grpc

        try:
            response, call = getattr(self.stub, method).with_call(request, timeout=self.opts.timeout)
        except grpc.RpcError as err:
            raise self.error(err, where) from None
        for key, value in call.trailing_metadata() or ():
            if key == STALE_METADATA:
                sys.stderr.write(f"{PROG}: warning: {_one_line(str(value))}\n")
        return response


def _ref(key: str) -> Any:
    from jobtree.api.jobtree.v1 import objects_pb2 as pb

    ns, name = _split_key(key)
    return pb.RunRef(namespace=ns, name=name)


def _lease_row(msg: Any) -> LeaseRow:
    from jobtree.core.timefmt import format_time

    spec, status = msg.spec, msg.status
    paid = f"{spec.paid_by.budget}/{spec.paid_by.envelope}" if spec.HasField("paid_by") else None
    return LeaseRow(
        name=msg.metadata.name, run=f"{msg.metadata.namespace}/{spec.run_ref}", group=spec.group, role=spec.role,
        slots=tuple(f"{s.node}#{s.index}" for s in spec.slots), paid_by=paid,
        start=format_time(spec.start.seconds) if spec.HasField("start") else None,
        end=format_time(status.end.seconds) if status.HasField("end") else None,
        closure=status.closure_reason if status.HasField("closure_reason") else None,
    )


def _run_row(msg: Any) -> RunRow:
    spec = msg.spec
    gpus = spec.malleable.desired_total_gpus if spec.HasField("malleable") else spec.resources.total_gpus
    st = msg.status
    return RunRow(f"{msg.metadata.namespace}/{msg.metadata.name}", spec.owner, st.phase, st.reason, str(gpus),
                  st.message)




def _apply_all(r: Remote, manifests: Sequence[Manifest], request_id: str | None, out: TextIO) -> int:
    """Several manifests as one Apply: every object applies, or none does (an error names the
    document, `FILE[i]`, where the gateway names `objects[i]`)."""
    from google.protobuf import json_format

    from jobtree.api.jobtree.v1 import objects_pb2 as pb
    from jobtree.api.jobtree.v1 import service_pb2 as api

    req = api.ApplyRequest(request_id=request_id or str(uuid.uuid4()))
    for m in manifests:
        obj = req.objects.add()
        if m.kind == "Budget":
            obj.budget.CopyFrom(json_format.ParseDict(m.doc, pb.Budget()))
        else:
            obj.run.CopyFrom(json_format.ParseDict(m.doc, pb.Run()))
    try:
        resp = r.call("Apply", req)
    except RunsError as e:
        found = re.search(r"objects\[(\d+)\](?:\.(?:run|budget))?(\.?)", str(e))
        if found and int(found.group(1)) < len(manifests):
            where = manifests[int(found.group(1))].where + (": " if found.group(2) else "")
            e.args = (str(e).replace(found.group(0), where, 1),)
        raise
    phases = [obj.run.status.phase if obj.HasField("run") else "" for obj in resp.objects]
    return _print_submitted(r, [(m, phase, resp.ledger_sequence) for m, phase in zip(manifests, phases, strict=False)],
                            out)


def _print_submitted(r: Remote, done: Sequence[tuple[Manifest, str, int]], out: TextIO) -> int:
    """What a submit did, per manifest: (manifest, the run's phase or "", its ledger sequence)."""
    results: list[Json] = []
    for m, phase, seq in done:
        if m.kind == "Budget":
            results.append({"kind": "Budget", "name": m.key, "ledgerSequence": seq})
            line = f"budget/{m.key} applied (ledger sequence {seq})"
        else:
            results.append({"kind": "Run", "name": m.key, "phase": phase or None, "ledgerSequence": seq})
            line = f"run/{m.key} submitted: {phase or 'submitted'} (ledger sequence {seq})"
        if r.opts.output == "table":
            out.write(line + "\n")
            out.flush()
    if r.opts.output == "json":
        _dump(results, out)
    return EXIT_OK


def remote_submit(r: Remote, manifests: Sequence[Manifest], request_id: str | None, out: TextIO) -> int:
    """One manifest: SubmitRun or ApplyBudget; several: one Apply (all or none)."""
    from google.protobuf import json_format

    from jobtree.api.jobtree.v1 import objects_pb2 as pb
    from jobtree.api.jobtree.v1 import service_pb2 as api

    if len(manifests) > 1:
        return _apply_all(r, manifests, request_id, out)
    m, rid = manifests[0], request_id or str(uuid.uuid4())
    if m.kind == "Budget":
        budget = json_format.ParseDict(m.doc, pb.Budget())
        resp = r.call("ApplyBudget", api.ApplyBudgetRequest(budget=budget, request_id=rid), m.where)
        return _print_submitted(r, [(m, "", resp.ledger_sequence)], out)
    run = json_format.ParseDict(m.doc, pb.Run())
    resp = r.call("SubmitRun", api.SubmitRunRequest(run=run, request_id=rid), m.where)
    return _print_submitted(r, [(m, resp.run.status.phase, resp.ledger_sequence)], out)


def remote_plan(r: Remote, manifests: Sequence[Manifest], out: TextIO) -> int:
    from google.protobuf import json_format

    from jobtree.api.jobtree.v1 import objects_pb2 as pb
    from jobtree.api.jobtree.v1 import service_pb2 as api

    plans = []
    for m in manifests:
        run = json_format.ParseDict(m.doc, pb.Run())
        resp = r.call("PlanRun", api.PlanRunRequest(run=run), m.where)
        d = _to_dict(resp)
        plans.append({"run": m.key, "fitsNow": resp.fits_now, "earliestStart": d.get("earliestStart"),
                      "placement": d.get("placement", []), "funding": d.get("funding", []),
                      "reasons": list(resp.reasons)})
    _print_plans(plans, r.opts.output, out)
    return EXIT_OK




def remote_get(r: Remote, name: str | None, all_namespaces: bool, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    if name:
        runs = [r.call("GetRun", api.GetRunRequest(run=_ref(_run_key(name, r.opts.namespace)))).run]
    else:
        namespace = "" if all_namespaces else r.opts.namespace
        runs = list(r.call("ListRuns", api.ListRunsRequest(namespace=namespace)).runs)
    if r.opts.output == "json":
        _dump([_to_dict(m) for m in runs] if not name else _to_dict(runs[0]), out)
    else:
        out.write(_runs_table([_run_row(m) for m in runs]) + "\n")
    return EXIT_OK


def remote_events(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    import grpc

    from jobtree.api.jobtree.v1 import service_pb2 as api

    req = api.WatchEventsRequest(owner_prefix=args.owner, namespace=getattr(args, "namespace", ""),
                                 kinds=kinds_of(args.kinds), after_ledger_sequence=args.after, no_follow=not args.watch)
    stream = r.stub.WatchEvents(req, timeout=r.opts.watch_for if args.watch else r.opts.timeout)
    try:
        print_events(stream, r.opts.output, out)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED) and args.watch:
            return EXIT_OK  # --timeout: watched for that long
        raise r.error(err, "events") from None
    return EXIT_OK


def remote_watch(r: Remote, names: Sequence[str], until: str | None, initial: bool, out: TextIO) -> int:
    import grpc

    from jobtree.api.jobtree.v1 import service_pb2 as api

    keys = [_run_key(n, r.opts.namespace) for n in names]
    namespaces = {_split_key(k)[0] for k in keys}
    if len(namespaces) > 1:
        raise RunsError("watch takes runs of one namespace (use -n)")
    namespace = namespaces.pop() if namespaces else r.opts.namespace
    req = api.WatchRunsRequest(namespace=namespace, names=[_split_key(k)[1] for k in keys], send_initial=initial)
    stream = r.stub.WatchRuns(req, timeout=r.opts.watch_for)
    phases: dict[str, str] = {}
    header = False
    try:
        for event in stream:
            kind = api.RunEvent.Type.Name(event.type).removeprefix("TYPE_")
            row = _run_row(event.run)
            if r.opts.output == "json":
                out.write(json.dumps({"type": kind, "ledgerSequence": event.ledger_sequence,
                                      "run": _to_dict(event.run)}) + "\n")
            else:
                if not header:
                    out.write(f"{'EVENT':<9} {'SEQ':>6}  {_watch_columns('RUN', 'PHASE', 'REASON', 'GPUS', 'MESSAGE')}\n")
                    header = True
                out.write(f"{kind:<9} {event.ledger_sequence:>6}  "
                          f"{_watch_columns(row.key, row.phase or '-', row.reason or '-', row.gpus, row.message or '-')}\n")
            out.flush()
            if kind == "DELETED":
                phases.pop(row.key, None)
            else:
                phases[row.key] = row.phase
            if until and _reached(phases, keys, until):
                stream.cancel()
                return EXIT_OK
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            return EXIT_OK
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not until:
            return EXIT_OK  # --timeout: watched for that long
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RunsError(f"watch: not every run reached {until} within {r.opts.timeout:g} s",
                            EXIT_UNAVAILABLE) from None
        raise r.error(err, "watch") from None
    if until:
        raise RunsError(f"watch: the stream ended before every run reached {until}", EXIT_UNAVAILABLE)
    return EXIT_OK


def _reached(phases: Mapping[str, str], keys: Sequence[str], until: str) -> bool:
    if keys:
        return all(phases.get(k) == until for k in keys)
    return any(p == until for p in phases.values())


def remote_explain(r: Remote, name: str, out: TextIO) -> int:
    from google.protobuf import json_format

    from jobtree.api.jobtree.v1 import service_pb2 as api

    resp = r.call("ExplainRun", api.ExplainRunRequest(run=_ref(_run_key(name, r.opts.namespace))))
    if r.opts.output == "json":
        _dump(sim_run(json_format.MessageToDict(resp.sim_view)), out)
        return EXIT_OK
    out.write("\n".join(resp.lines) + "\n")
    rows = [_lease_row(m) for m in resp.leases if not m.status.HasField("end")]
    if rows:
        out.write("\n" + _lease_rows_table(rows) + "\n")
    return EXIT_OK


def _usage_row(e: Any) -> Json:
    return {"budget": e.budget, "envelope": e.envelope, "owner": e.owner, "flavor": e.flavor,
            "concurrency": e.concurrency,
            "funded": {"owned": e.funded.owned, "shared": e.funded.shared, "borrowed": e.funded.borrowed,
                       "spare": e.funded.spare},
            "headroom": e.headroom, "consumedGPUHours": e.consumed_gpu_hours,
            "maxGPUHours": e.max_gpu_hours if e.HasField("max_gpu_hours") else None}


def remote_top(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api
    from jobtree.cli.runs.pictures import NodeRow, SlotRow

    nodes = r.call("ListNodes", api.ListNodesRequest()).nodes
    leases = r.call("ListLeases", api.ListLeasesRequest(open_only=True))
    rows = []
    for n in nodes:
        labels = dict(n.labels)
        domain = f"{labels.get('region', '')}/{labels.get('cluster', '')}/{labels.get('fabric.domain', '')}"
        rows.append(NodeRow(n.name, n.gpus, domain, n.state or "Ready"))
    slots = [SlotRow(s.node, s.index, "spare" if m.spec.role == "Spare" else leases.classes.get(m.metadata.name, "?"),
                     m.spec.owner, f"{m.metadata.namespace}/{m.spec.run_ref}")
             for m in leases.leases for s in m.spec.slots]
    print_top(rows, slots, args, r.opts.output, out)
    return EXIT_OK


def remote_budgets(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    if args.budgets_command == "burn":
        resp = r.call("Usage", api.UsageRequest(owner=args.owner))
        from jobtree.core.timefmt import format_time

        print_burn(args.owner, [_usage_row(e) for e in resp.envelopes], format_time(resp.at.seconds),
                   r.opts.output, out)
        return EXIT_OK
    if args.budgets_command == "list":
        budgets = r.call("ListBudgets", api.ListBudgetsRequest(owner=args.owner or "")).budgets
        if r.opts.output == "json":
            _dump([_to_dict(b) for b in budgets], out)
        else:
            out.write(_table(["BUDGET", "OWNER", "PARENTS", "ENVELOPES"],
                             [[b.metadata.name, b.spec.owner, ",".join(b.spec.parents),
                               ",".join(f"{e.name}({e.flavor} x{e.concurrency})" for e in b.spec.envelopes)]
                              for b in budgets]) + "\n")
        return EXIT_OK
    resp = r.call("Usage", api.UsageRequest(owner=args.owner or "", budget=args.budget or "",
                                            flavor=args.flavor or ""))
    envelopes = [_usage_row(e) for e in resp.envelopes]
    unfunded = dict(sorted(resp.unfunded_gpu_hours.items()))
    _print_usage(envelopes, unfunded, r.opts.output, out)
    return EXIT_OK




def remote_global(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    resp = r.call("GlobalUsage", api.GlobalUsageRequest(cap=args.cap or ""))
    if r.opts.output == "json":
        _dump(_to_dict(resp), out)
    else:
        out.write(global_usage_text(resp) + "\n")
    return EXIT_OK


def remote_sponsors(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    if args.sponsors_command == "add":
        key = _run_key(args.name, r.opts.namespace)
        resp = r.call("AddSponsor", api.AddSponsorRequest(run=_ref(key), sponsor=args.sponsor,
                                                          request_id=args.request_id or ""))
        if r.opts.output == "json":
            _dump({"run": _to_dict(resp.run), "ledgerSequence": resp.ledger_sequence}, out)
        else:
            out.write(f"run/{key}: sponsors now {', '.join(resp.run.spec.funding.sponsors)} "
                      f"(ledger sequence {resp.ledger_sequence})\n")
        return EXIT_OK
    resp = r.call("ListSponsors", api.ListSponsorsRequest(owner=args.owner, flavor=args.flavor or ""))
    rows = [{"owner": s.owner, "budget": s.budget, "envelope": s.envelope, "flavor": s.flavor,
             "lendableGPUs": s.lendable_gpus,
             "lendableGPUHours": s.lendable_gpu_hours if s.HasField("lendable_gpu_hours") else None}
            for s in resp.sponsors]
    if r.opts.output == "json":
        _dump(rows, out)
    else:
        out.write(_table(["OWNER", "BUDGET", "ENVELOPE", "FLAVOR", "LENDABLE GPUS", "LENDABLE GPU-HOURS"],
                         [list(x.values()) for x in rows], [False, False, False, False, True, True]) + "\n")
    return EXIT_OK


def remote_leases(r: Remote, name: str | None, show_all: bool, out: TextIO) -> list[LeaseRow]:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    run = ""
    namespace = r.opts.namespace
    if name:
        namespace, run = _split_key(_run_key(name, namespace))
    resp = r.call("ListLeases", api.ListLeasesRequest(namespace=namespace, run=run, open_only=not show_all))
    if r.opts.output == "json" and out is not None:
        _dump([_to_dict(m) for m in resp.leases], out)
    return [_lease_row(m) for m in resp.leases]


def remote_write(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

    key = _run_key(args.name, r.opts.namespace)
    rid = args.request_id or ""
    if args.command == "complete":
        seq = r.call("CompleteRun", api.CompleteRunRequest(run=_ref(key), request_id=rid)).ledger_sequence
        verb = "completed"
    elif args.command == "fail":
        seq = r.call("FailRun", api.FailRunRequest(run=_ref(key), message=args.message,
                                                   request_id=rid)).ledger_sequence
        verb = "failed"
    elif args.command == "delete":
        seq = r.call("DeleteRun", api.DeleteRunRequest(run=_ref(key), request_id=rid)).ledger_sequence
        verb = "deleted"
    else:
        seq = r.call("ShrinkRun", api.ShrinkRunRequest(run=_ref(key), desired_total_gpus=args.to,
                                                       request_id=rid)).ledger_sequence
        verb = f"shrunk to {args.to} GPUs"
    if r.opts.output == "json":
        _dump({"run": key, "ledgerSequence": seq}, out)
    else:
        out.write(f"run/{key} {verb} (ledger sequence {seq})\n")
    return EXIT_OK


def run_remote(args: argparse.Namespace, opts: Options, out: TextIO) -> int:
    r = Remote(opts)
    try:
        cmd = args.command
        if cmd == "submit":
            return remote_submit(r, read_manifests(args.filename, opts.namespace), args.request_id, out)
        if cmd == "plan":
            return remote_plan(r, read_manifests(args.filename, opts.namespace, ("Run",)), out)
        if cmd == "get":
            return remote_get(r, args.name, args.all_namespaces, out)
        if cmd == "watch":
            return remote_watch(r, args.names, args.until, not args.no_initial, out)
        if cmd == "events":
            return remote_events(r, args, out)
        if cmd == "top":
            return remote_top(r, args, out)
        if cmd == "explain":
            return remote_explain(r, args.name, out)
        if cmd == "budgets":
            return remote_budgets(r, args, out)
        if cmd == "sponsors":
            return remote_sponsors(r, args, out)
        if cmd == "global":
            return remote_global(r, args, out)
        if cmd == "leases":
            rows = remote_leases(r, args.name, args.all, out)
            if opts.output == "table":
                out.write(_lease_rows_table(rows) + "\n")
            return EXIT_OK
        if cmd == "pods":
            key = _run_key(args.name, opts.namespace)
            from jobtree.api.jobtree.v1 import service_pb2 as api

            r.call("GetRun", api.GetRunRequest(run=_ref(key)))  # NOT_FOUND for an unknown run
            ns, name = _split_key(key)
            resp = r.call("ListLeases", api.ListLeasesRequest(namespace=ns, run=name, open_only=True))
            _print_pods(pods_of([_lease_row(m) for m in resp.leases]), opts.output, out)
            return EXIT_OK
        return remote_write(r, args, out)
    finally:
        r.close()


