"""`kubectl-runs` (also `kubectl runs`): the command line client of jobtree's gRPC gateway.

Contract: `main(argv) -> int`.
- Commands: `submit -f FILE` (Runs and Budgets, YAML or JSON, several documents), `plan -f FILE`,
  `get [NAME]`, `watch [NAME...]`, `explain NAME`, `budgets usage|list`, `sponsors list|add`,
  `shrink NAME --to N`, `leases [NAME]`, `pods NAME`, `complete NAME`, `fail NAME`,
  `delete NAME`, `completions bash|zsh|fish`. Global options, accepted before or after the
  command: `-n/--namespace` (default `default`), `--server HOST:PORT` (default
  `$JOBTREE_SERVER`, else 127.0.0.1:50051), `-o table|json`, `--timeout SECONDS`, and
  `--local --state FILE [--at TIME]`, which runs the simulator offline instead of calling a
  server: the state file is a scenario (SCENARIOS.md); writes append a step to it (submit an
  `apply` step, complete a `complete` step, ...) after checking that the whole scenario still
  plays, and reads play it (`jobtree.sim.runner.run_scenario`) and answer from the state after
  the last step.
- Manifests go through the schema and the core before anything is sent (`convert.parse_manifest`),
  so a bad file fails the same way with or without a server.
- `explain NAME -o json` prints the run in the simulator's run schema (SCENARIOS.md
  STATE.runs[]), from the gateway's `sim_view` or from the simulator.
- Exit status: 0 done; 2 bad input or a refusal (one stderr line `kubectl-runs: ...`, with the
  gateway's INVALID_ARGUMENT message); 1 the server is unreachable or unavailable (one line).
  Never a traceback for either.
Not: a scheduler (the gateway and the services decide), not the simulator (jobtree.sim).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_BAD_INPUT = 2
PROG = "kubectl-runs"
ENV_SERVER = "JOBTREE_SERVER"
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_NAMESPACE = "default"
DEFAULT_TIMEOUT = 10.0
OUTPUTS = ("table", "json")
SHELLS = ("bash", "zsh", "fish")
WATCH_LABEL = "__kubectl_runs_step_"
STALE_METADATA = "jobtree-stale"
"""Trailing metadata of an answer the gateway gave while cut off from NATS (see the gateway)."""

Json = dict[str, Any]


class RunsError(Exception):
    """A one-line failure: printed as `kubectl-runs: MESSAGE`, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised (one line, exit 2) instead of printed with the usage."""

    def error(self, message: str) -> NoReturn:
        raise RunsError(f"{message} (see `{self.prog} --help`)")


# ================================================================================================
# Arguments
# ================================================================================================


def _global_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's copy of an option must not overwrite the value given before it.
    s = argparse.SUPPRESS
    parser.add_argument("-n", "--namespace", default=s, help=f"namespace of runs (default {DEFAULT_NAMESPACE})")
    parser.add_argument("--server", default=s, metavar="HOST:PORT",
                        help=f"the gateway (default ${ENV_SERVER}, else {DEFAULT_SERVER})")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default=s, help="table (default) or json")
    parser.add_argument("--timeout", type=float, default=s, metavar="SECONDS",
                        help=f"per call (default {DEFAULT_TIMEOUT:g}); for watch: stop after this long")
    parser.add_argument("--local", action="store_true", default=s,
                        help="no server: play the simulator on --state FILE")
    parser.add_argument("--state", default=s, metavar="FILE", help="with --local: the scenario file to use")
    parser.add_argument("--at", default=s, metavar="TIME",
                        help="with --local: when the step happens (offset such as 10m, or RFC3339)")


COMMANDS: dict[str, str] = {
    "submit": "create or update Runs and Budgets from manifests",
    "plan": "what would happen if runs were submitted now (nothing is written)",
    "get": "list runs, or show one",
    "watch": "print runs as they change",
    "explain": "why a run is where it is",
    "budgets": "budgets and their usage",
    "sponsors": "owners that may lend to an owner; add a sponsor to a run",
    "shrink": "set the desired width of an elastic run",
    "leases": "GPU leases (open ones; --all for the closed too)",
    "pods": "the pods a run's open leases materialise",
    "complete": "report that a run's workload succeeded",
    "fail": "report that a run's workload failed",
    "delete": "cancel a run",
    "completions": "print a shell completion script",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="jobtree runs: submit, watch and explain GPU runs (works as `kubectl runs`)")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        _global_options(p)
        return p

    def request_id(p: argparse.ArgumentParser) -> None:
        p.add_argument("--request-id", metavar="ID",
                       help="idempotency key: repeating the command with the same ID commits it once")

    p = command("submit")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                   help="manifest file (YAML or JSON, several documents; - for stdin); repeatable")
    request_id(p)
    p = command("plan")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE", help="Run manifests")
    p = command("get")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="runs of every namespace")
    p = command("watch")
    p.add_argument("names", nargs="*", metavar="NAME", help="runs to watch (default: every run of the namespace)")
    p.add_argument("--until", metavar="PHASE",
                   help="exit 0 once every named run (or any run, without names) is in PHASE")
    p.add_argument("--no-initial", action="store_true", help="only changes, not the runs as they are now")
    p = command("explain")
    p.add_argument("name", metavar="NAME")
    p = command("budgets")
    bsub = p.add_subparsers(dest="budgets_command", metavar="WHAT", required=True, parser_class=_Parser)
    u = bsub.add_parser("usage", help="funded GPUs, headroom and GPU-hours per envelope")
    _global_options(u)
    u.add_argument("--owner")
    u.add_argument("--budget")
    u.add_argument("--flavor")
    b = bsub.add_parser("list", help="the budgets as applied")
    _global_options(b)
    b.add_argument("--owner")
    p = command("sponsors")
    ssub = p.add_subparsers(dest="sponsors_command", metavar="WHAT", required=True, parser_class=_Parser)
    s_list = ssub.add_parser("list", help="envelopes outside OWNER's family that lend to OWNER")
    _global_options(s_list)
    s_list.add_argument("--owner", required=True, help="the borrowing owner")
    s_list.add_argument("--flavor")
    s_add = ssub.add_parser("add", help="add SPONSOR to a run's spec.funding.sponsors (allowBorrow on)")
    _global_options(s_add)
    s_add.add_argument("name", metavar="NAME", help="the run")
    s_add.add_argument("sponsor", metavar="SPONSOR", help="an owner id")
    request_id(s_add)
    p = command("shrink")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", type=int, required=True, metavar="N", help="the new desiredTotalGPUs")
    request_id(p)
    p = command("leases")
    p.add_argument("name", nargs="?", metavar="NAME", help="one run's leases (default: the namespace's)")
    p.add_argument("--all", action="store_true", help="closed leases too")
    p = command("pods")
    p.add_argument("name", metavar="NAME")
    for verb in ("complete", "fail", "delete"):
        p = command(verb)
        p.add_argument("name", metavar="NAME")
        if verb == "fail":
            p.add_argument("--message", default="", help="why the workload failed")
        request_id(p)
    p = command("completions")
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    return parser


@dataclass
class Options:
    namespace: str
    server: str
    output: str
    timeout: float
    """Seconds per call."""
    local: bool
    state: Path | None
    at: str | None
    watch_for: float | None = None
    """`--timeout` when given: how long `watch` watches (None: until interrupted)."""


def options_of(args: argparse.Namespace) -> Options:
    namespace = getattr(args, "namespace", None) or DEFAULT_NAMESPACE
    server = getattr(args, "server", None) or os.environ.get(ENV_SERVER) or DEFAULT_SERVER
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        raise RunsError(f"--timeout: must be a positive number of seconds, got {timeout:g}")
    local = bool(getattr(args, "local", False))
    state = getattr(args, "state", None)
    at = getattr(args, "at", None)
    if local and not state:
        raise RunsError("--local needs --state FILE (a scenario file to play and append to)")
    if not local and state:
        raise RunsError("--state is only used with --local")
    if not local and at is not None:
        raise RunsError("--at is only used with --local (a server uses its own clock)")
    return Options(namespace, server, getattr(args, "output", None) or "table",
                   timeout if timeout is not None else DEFAULT_TIMEOUT, local, Path(state) if state else None, at,
                   watch_for=timeout)


# ================================================================================================
# Manifests
# ================================================================================================


@dataclass(frozen=True)
class Manifest:
    where: str
    """`FILE` or `FILE[i]` (the i-th document, 0-based, when the file holds several)."""
    doc: Json
    kind: str
    key: str
    """`namespace/name` of a Run, the name of a Budget."""


MAX_FILE_BYTES = 4 * 1024 * 1024
"""The largest manifest file (or standard input) read; the gateway takes no larger request."""


def _read_text(name: str) -> str:
    too_big = f"{name}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; manifest files may be at most that"
    if name == "-":
        text = sys.stdin.read(MAX_FILE_BYTES + 1)
        if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
            raise RunsError(too_big)
        return text
    path = Path(name)
    try:
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise RunsError(too_big)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunsError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RunsError(f"{name}: is a directory, not a manifest file") from None
    except UnicodeDecodeError:
        raise RunsError(f"{name}: not UTF-8 text") from None
    except OSError as e:
        raise RunsError(f"{name}: cannot read: {e.strerror or e}") from None


def _load_documents(text: str, name: str) -> list[object]:
    from jobtree.sim.scenario import _StrictLoader

    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise RunsError(f"{name}: invalid YAML: {where}{' '.join(str(e.problem or e.context).split())}") from None
    except yaml.YAMLError as e:
        raise RunsError(f"{name}: invalid YAML: {' '.join(str(e).split())}") from None
    out: list[object] = []
    for doc in docs:
        if isinstance(doc, list):
            out.extend(doc)
        elif isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


def read_manifests(files: Sequence[str], namespace: str, kinds: Sequence[str] = ("Run", "Budget")) -> list[Manifest]:
    """Every document of `files`, checked through the schema and the core (RunsError naming it)."""
    from jobtree.api import convert
    from jobtree.core.errors import ValidationError

    out: list[Manifest] = []
    for name in files:
        docs = _load_documents(_read_text(name), name)
        if not docs:
            raise RunsError(f"{name}: no manifest in the file")
        for i, doc in enumerate(docs):
            where = f"{name}[{i}]" if len(docs) > 1 else name
            if isinstance(doc, dict) and doc.get("kind") == "Run":
                meta = doc.get("metadata")
                if isinstance(meta, dict) and meta.get("namespace") is None:
                    doc = {**doc, "metadata": {**meta, "namespace": namespace}}
            try:
                parsed = convert.parse_manifest(doc)
            except ValidationError as err:
                raise RunsError(f"{where}: {err}") from None
            assert isinstance(doc, dict)
            kind = str(doc["kind"])
            if kind not in kinds:
                raise RunsError(f"{where}: kind {kind} is not accepted here; expected {' or '.join(kinds)}")
            model = parsed.model
            key = model.key if kind == "Run" else model.name  # type: ignore[union-attr]
            out.append(Manifest(where, doc, kind, key))
    return out


# ================================================================================================
# Output helpers
# ================================================================================================


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] = ()) -> str:
    from jobtree.sim.table import format_columns

    return format_columns(headers, [[_cell(c) for c in row] for row in rows], right)


def _cell(v: object) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}" if v == int(v) else f"{v:.2f}"
    return str(v)


def _ints(value: Any) -> Any:
    """Integral floats back to ints (a protobuf Struct carries every JSON number as a double)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


SIM_RUN_ORDER = {
    "": ("key", "owner", "phase", "reason", "message", "width", "funding", "reservation", "earliestStart"),
    "width": ("min", "max", "desired", "allocated"),
    "funding": ("owned", "shared", "borrowed", "unfunded", "spare"),
}
"""The key order of a run in the simulator's output (SCENARIOS.md STATE.runs[])."""


def sim_run(view: Mapping[str, Any]) -> Json:
    """A run of the simulator's schema (e.g. from a protobuf Struct) in the simulator's key order."""

    def order(value: Mapping[str, Any], keys: Sequence[str], at: str) -> Json:
        known = [k for k in keys if k in value] + sorted(k for k in value if k not in keys)
        return {k: order(value[k], SIM_RUN_ORDER.get(k, ()), k) if isinstance(value[k], Mapping) and not at
                else _ints(value[k]) for k in known}

    return order(view, SIM_RUN_ORDER[""], "")


def _dump(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _split_key(key: str) -> tuple[str, str]:
    ns, _, name = key.partition("/")
    return ns, name


def _run_key(name: str, namespace: str) -> str:
    if "/" in name:
        ns, _, short = name.partition("/")
        if not ns or not short:
            raise RunsError(f"a run is NAME or NAMESPACE/NAME, got {name!r}")
        return name
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class LeaseRow:
    """A lease as both modes show it (from a GPULease message or the simulator's JSON)."""

    name: str
    run: str
    group: int
    role: str
    slots: tuple[str, ...]
    paid_by: str | None
    start: str | None
    end: str | None
    closure: str | None

    @property
    def node(self) -> str:
        return self.slots[0].split("#", 1)[0] if self.slots else "-"

    @property
    def open(self) -> bool:
        return self.end is None


def _lease_rows_table(rows: Sequence[LeaseRow]) -> str:
    return _table(["LEASE", "RUN", "GROUP", "ROLE", "NODE", "GPUS", "PAID BY", "START", "END", "CLOSURE"],
                  [[r.name, r.run, r.group, r.role, r.node, len(r.slots), r.paid_by, r.start, r.end, r.closure]
                   for r in rows], [False, False, True, False, False, True])


def pods_of(rows: Sequence[LeaseRow]) -> list[Json]:
    """The pods a run's open leases materialise: one per lease (one node, one group, one role)."""
    out = []
    for r in sorted((r for r in rows if r.open), key=lambda r: (r.group, r.role != "Active", r.name)):
        run_name = _split_key(r.run)[1]
        out.append({
            "pod": f"{run_name}-g{r.group}-{r.name.rsplit('.', 1)[-1]}",
            "node": r.node,
            "group": r.group,
            "role": r.role,
            "gpus": len(r.slots),
            "gpuIndices": [int(s.split("#", 1)[1]) for s in r.slots],
            "lease": r.name,
        })
    return out


def _pods_table(pods: Sequence[Json]) -> str:
    return _table(["POD", "NODE", "GROUP", "ROLE", "GPUS", "GPU INDICES", "LEASE"],
                  [[p["pod"], p["node"], p["group"], p["role"], p["gpus"], ",".join(map(str, p["gpuIndices"])),
                    p["lease"]] for p in pods], [False, False, True, False, True])


@dataclass(frozen=True)
class RunRow:
    key: str
    owner: str
    phase: str
    reason: str
    gpus: str
    message: str


def _runs_table(rows: Sequence[RunRow]) -> str:
    return _table(["RUN", "OWNER", "PHASE", "REASON", "GPUS", "MESSAGE"],
                  [[r.key, r.owner, r.phase, r.reason, r.gpus, r.message] for r in rows],
                  [False, False, False, False, True])


def _usage_table(envelopes: Sequence[Json], unfunded: Mapping[str, float]) -> str:
    rows = [[e["budget"], e["envelope"], e.get("owner"), e.get("flavor"), e["concurrency"],
             e["funded"]["owned"], e["funded"]["shared"], e["funded"]["borrowed"], e["funded"]["spare"],
             e["headroom"], e["consumedGPUHours"], e.get("maxGPUHours")] for e in envelopes]
    text = _table(["BUDGET", "ENVELOPE", "OWNER", "FLAVOR", "CONCURRENCY", "OWNED", "SHARED", "BORROWED", "SPARE",
                   "HEADROOM", "GPU-HOURS", "MAX GPU-HOURS"], rows,
                  [False, False, False, False, True, True, True, True, True, True, True, True])
    if unfunded:
        text += "\n\nUnfunded GPU-hours\n" + _table(["OWNER", "GPU-HOURS"], sorted(unfunded.items()), [False, True])
    return text


def _plan_text(plan: Json) -> str:
    lines = [f"{plan['run']}: fits now: {_cell(plan['fitsNow'])}"]
    if plan.get("earliestStart"):
        lines.append(f"earliest start: {plan['earliestStart']}")
    if plan.get("placement"):
        lines.append(_table(["GROUP", "DOMAIN", "GPUS", "SPARES"],
                            [[p.get("group", 0), p.get("domain"), p.get("gpus", 0), p.get("spares", 0)]
                             for p in plan["placement"]], [True, False, True, True]))
    if plan.get("funding"):
        lines.append(_table(["PAID BY", "CLASS", "GPUS"],
                            [[_paid_text(f.get("paidBy")), f.get("fundingClass"), f.get("gpus", 0)]
                             for f in plan["funding"]], [False, False, True]))
    lines += [f"- {r}" for r in plan.get("reasons", [])]
    return "\n".join(lines)


def _paid_text(paid: object) -> str | None:
    if isinstance(paid, Mapping) and paid.get("budget"):
        return f"{paid.get('budget')}/{paid.get('envelope')}"
    return None


# ================================================================================================
# The remote client (gRPC)
# ================================================================================================


class Remote:
    """Calls to the gateway; gRPC errors become RunsError with the right exit status."""

    BAD_INPUT_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "OUT_OF_RANGE",
                       "PERMISSION_DENIED", "UNAUTHENTICATED")

    def __init__(self, opts: Options) -> None:
        import grpc

        from jobtree.api.jobtree.v1 import service_pb2_grpc

        self.opts = opts
        self.channel = grpc.insecure_channel(opts.server)
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


def _to_dict(msg: Any) -> Json:
    from google.protobuf import json_format

    out: Json = _ints(json_format.MessageToDict(msg))
    return out


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


def _print_plans(plans: Sequence[Json], output: str, out: TextIO) -> None:
    if output == "json":
        _dump(plans, out)
    else:
        out.write("\n\n".join(_plan_text(p) for p in plans) + "\n")


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


def remote_budgets(r: Remote, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.api.jobtree.v1 import service_pb2 as api

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
    envelopes = []
    for e in resp.envelopes:
        envelopes.append({"budget": e.budget, "envelope": e.envelope, "owner": e.owner, "flavor": e.flavor,
                          "concurrency": e.concurrency,
                          "funded": {"owned": e.funded.owned, "shared": e.funded.shared,
                                     "borrowed": e.funded.borrowed, "spare": e.funded.spare},
                          "headroom": e.headroom, "consumedGPUHours": e.consumed_gpu_hours,
                          "maxGPUHours": e.max_gpu_hours if e.HasField("max_gpu_hours") else None})
    unfunded = dict(sorted(resp.unfunded_gpu_hours.items()))
    _print_usage(envelopes, unfunded, r.opts.output, out)
    return EXIT_OK


def _print_usage(envelopes: Sequence[Json], unfunded: Mapping[str, float], output: str, out: TextIO) -> None:
    if output == "json":
        _dump({"envelopes": list(envelopes), "unfundedGPUHours": dict(unfunded)}, out)
    else:
        out.write(_usage_table(envelopes, unfunded) + "\n")


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
        if cmd == "explain":
            return remote_explain(r, args.name, out)
        if cmd == "budgets":
            return remote_budgets(r, args, out)
        if cmd == "sponsors":
            return remote_sponsors(r, args, out)
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


def _print_pods(pods: Sequence[Json], output: str, out: TextIO) -> None:
    if output == "json":
        _dump(list(pods), out)
    else:
        out.write(_pods_table(pods) + "\n")


# ================================================================================================
# --local: the simulator on a scenario file
# ================================================================================================


class LocalState:
    """A scenario file that commands append steps to and reads play."""

    def __init__(self, path: Path, at: str | None, output: str = "table") -> None:
        from jobtree.sim.scenario import ScenarioError, load_yaml, scenario_from_doc

        self.path = path
        self.at = at
        self.output = output
        self.last_index = -1
        try:
            self.text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunsError(f"{path}: no such file; --local --state needs a scenario file with start, nodes "
                            "and steps (see docs/cli/kubectl-runs.md)") from None
        except IsADirectoryError:
            raise RunsError(f"{path}: is a directory, not a scenario file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RunsError(f"{path}: cannot read: {e}") from None
        try:
            doc = load_yaml(self.text)
            scenario_from_doc(doc)
        except ScenarioError as e:
            raise RunsError(f"{path}: {e}") from None
        assert isinstance(doc, dict)
        self.doc: Json = doc

    @property
    def steps(self) -> list[Any]:
        steps = self.doc.get("steps")
        return list(steps) if isinstance(steps, list) else []

    def _with(self, *steps: Json) -> Json:
        doc = copy.deepcopy(self.doc)
        doc["steps"] = [*self.steps, *steps]
        return doc

    def _timed(self, step: Json) -> Json:
        return {"at": self.at, **step} if self.at is not None else step

    @staticmethod
    def play(doc: Json, where: str = "") -> Json:
        """The simulator's output for a scenario document (RunsError naming the step)."""
        from jobtree.sim.runner import run_scenario
        from jobtree.sim.scenario import ScenarioError, scenario_from_doc

        try:
            result: Json = run_scenario(scenario_from_doc(doc))
        except ScenarioError as e:
            raise RunsError(f"{where}{e}") from None
        return result

    def state(self) -> Json:
        """The state after the last step (and after `--at`, without writing it)."""
        doc = self._with({"at": self.at}) if self.at is not None else self.doc
        return dict(self.play(doc, f"{self.path}: ")["snapshots"]["final"])

    def append(self, step: Json) -> Json:
        """Append a step if the scenario still plays with it; returns the state after it."""
        step = self._timed(step)
        doc = self._with(step)
        index = len(self.steps)
        final = dict(self.play(doc, f"{self.path}: ")["snapshots"]["final"])
        self._write(doc, step)
        self.doc = doc
        self.last_index = index
        return final

    def _write(self, doc: Json, step: Json) -> None:
        """Append the step's YAML to the file when that reproduces `doc` (comments kept), else
        rewrite the whole file."""
        from jobtree.sim.scenario import ScenarioError, load_yaml

        item = yaml.safe_dump([step], sort_keys=False, default_flow_style=None, width=100)
        text = self.text if self.text.endswith("\n") or not self.text else self.text + "\n"
        candidates = []
        if "steps" in self.doc and self.steps:
            for indent in ("", "  ", "    "):
                candidates.append(text + "".join(indent + line + "\n" for line in item.splitlines()))
        elif "steps" not in self.doc:
            candidates.append(text + "steps:\n" + item)
        else:  # `steps: []` or `steps:` with nothing after it
            candidates += [re.sub(r"(?m)^steps:[ \t]*(\[[ \t]*\])?[ \t]*(#.*)?$", lambda m: "steps:\n" + item.rstrip("\n"),
                                  text, count=1)]
        new_text = None
        for candidate in candidates:
            try:
                if load_yaml(candidate) == doc:
                    new_text = candidate
                    break
            except ScenarioError:
                continue
        if new_text is None:
            new_text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(new_text, encoding="utf-8")
        tmp.replace(self.path)
        self.text = new_text

    def latest_manifest(self, key: str) -> Json | None:
        """The last applied manifest of run `key` in the steps."""
        found = None
        for step in self.steps:
            for doc in (step.get("apply") or []) if isinstance(step, dict) else []:
                if isinstance(doc, dict) and doc.get("kind") == "Run":
                    meta = doc.get("metadata") or {}
                    if f"{meta.get('namespace') or DEFAULT_NAMESPACE}/{meta.get('name')}" == key:
                        found = doc
        return found

    def node_domains(self) -> dict[str, str]:
        from jobtree.sim.scenario import scenario_from_doc

        return {n.name: n.domain for n in scenario_from_doc(self.doc).nodes}


def _state_run(state: Json, key: str) -> Json:
    for run in state.get("runs", []):
        if run.get("key") == key:
            return dict(run)
    raise RunsError(f"run {key} not found")


def _state_lease_row(lease: Json) -> LeaseRow:
    return LeaseRow(name=lease["name"], run=lease["run"], group=lease["group"], role=lease["role"],
                    slots=tuple(lease["slots"]), paid_by=_paid_text(lease.get("paidBy")), start=lease.get("start"),
                    end=lease.get("end"), closure=lease.get("closureReason"))


def _state_run_row(run: Json) -> RunRow:
    w = run.get("width") or {}
    gpus = f"{w.get('allocated', 0)}/{w.get('desired', 0)}"
    return RunRow(run["key"], run.get("owner", ""), run.get("phase", ""), run.get("reason", ""), gpus,
                  run.get("message", ""))


def _in_namespace(key: str, namespace: str) -> bool:
    return _split_key(key)[0] == namespace


def local_submit(st: LocalState, manifests: Sequence[Manifest], out: TextIO) -> int:
    state = st.append({"apply": [m.doc for m in manifests]})
    results = []
    for m in manifests:
        if m.kind == "Budget":
            results.append({"kind": "Budget", "name": m.key, "step": st.last_index})
            line = f"budget/{m.key} applied (step {st.last_index})"
        else:
            phase = _state_run(state, m.key).get("phase")
            results.append({"kind": "Run", "name": m.key, "phase": phase, "step": st.last_index})
            line = f"run/{m.key} submitted: {phase} (step {st.last_index})"
        if st.output == "table":
            out.write(line + "\n")
    if st.output == "json":
        _dump(results, out)
    return EXIT_OK


def local_plan(st: LocalState, manifests: Sequence[Manifest], out: TextIO) -> int:
    domains = st.node_domains()
    plans = []
    for m in manifests:
        before = st.state()
        after = LocalState.play(st._with(st._timed({"apply": [m.doc]})), f"{m.where}: ")["snapshots"]["final"]
        run = _state_run(after, m.key)
        mine = [le for le in after["leases"] if le["run"] == m.key and le.get("end") is None]
        groups: dict[tuple[int, str], list[int]] = {}
        funding: dict[tuple[str | None, str], int] = {}
        for le in mine:
            node = le["slots"][0].split("#", 1)[0]
            row = groups.setdefault((le["group"], domains.get(node, "-")), [0, 0])
            row[1 if le["role"] == "Spare" else 0] += len(le["slots"])
            fk = (_paid_text(le.get("paidBy")), le.get("class") or "unfunded")
            funding[fk] = funding.get(fk, 0) + len(le["slots"])
        reasons = [f"{run['phase']} ({run['reason']}): {run['message']}"]
        open_before = {le["name"] for le in before["leases"] if le.get("end") is None}
        for le in after["leases"]:
            if le["name"] in open_before and le.get("end") is not None and le["run"] != m.key:
                reasons.append(f"would end lease {le['name']} of {le['run']} ({le.get('closureReason')})")
        fits = run["phase"] == "Running" and bool(mine)
        plans.append({
            "run": m.key, "fitsNow": fits,
            "earliestStart": None if fits else run.get("earliestStart"),
            "placement": [{"group": g, "domain": d, "gpus": a, "spares": s}
                          for (g, d), (a, s) in sorted(groups.items())],
            "funding": [{"paidBy": None if p is None else dict(zip(("budget", "envelope"), p.split("/", 1),
                                                                     strict=True)),
                         "fundingClass": c, "gpus": n} for (p, c), n in sorted(funding.items(), key=str)],
            "reasons": reasons,
        })
    _print_plans(plans, st.output, out)
    return EXIT_OK


def local_watch(st: LocalState, names: Sequence[str], namespace: str, initial: bool, out: TextIO) -> int:
    """The changes of runs step by step, from snapshots taken after every step (then exit)."""
    keys = {_run_key(n, namespace) for n in names}
    steps: list[Json] = []
    for i, step in enumerate(st.steps):
        steps += [step, {"snapshot": f"{WATCH_LABEL}{i}"}]
    if st.at is not None:
        steps += [{"at": st.at}, {"snapshot": f"{WATCH_LABEL}{len(st.steps)}"}]
    doc = copy.deepcopy(st.doc)
    doc["steps"] = steps
    snapshots = LocalState.play(doc, f"{st.path}: ")["snapshots"]
    seen: dict[str, Json] = {}
    output = st.output
    if output == "table":
        out.write(f"{'EVENT':<9} {'STEP':>4}  {'TIME':<20}  {_watch_columns('RUN', 'PHASE', 'REASON', 'GPUS', 'MESSAGE')}\n")
    for label, state in snapshots.items():
        if not label.startswith(WATCH_LABEL):
            continue
        index = int(label.removeprefix(WATCH_LABEL))
        now = {r["key"]: r for r in state["runs"]
               if (r["key"] in keys if keys else _in_namespace(r["key"], namespace))}
        events = [("ADDED" if k not in seen else "MODIFIED", now[k]) for k in sorted(now) if seen.get(k) != now[k]]
        events += [("DELETED", seen[k]) for k in sorted(seen) if k not in now]
        seen = now
        if not initial and index < len(st.steps) - 1:
            continue
        for kind, run in events:
            if output == "json":
                out.write(json.dumps({"type": kind, "step": index, "time": state["time"], "run": run}) + "\n")
            else:
                row = _state_run_row(run)
                out.write(f"{kind:<9} {index:>4}  {state['time']:<20}  "
                          f"{_watch_columns(row.key, row.phase, row.reason, row.gpus, row.message)}\n")
    return EXIT_OK


def _watch_columns(run: str, phase: str, reason: str, gpus: object, message: str) -> str:
    """The columns of a watch line after the event: fixed widths, since a stream cannot size
    its columns from rows it has not seen (a longer value pushes the rest of its line)."""
    return f"{run:<28}  {phase:<10}  {reason:<18}  {gpus!s:>4}  {message}".rstrip()


def local_explain(st: LocalState, key: str, out: TextIO) -> int:
    from jobtree.core.explain import Details, explain_lines

    state = st.state()
    run = _state_run(state, key)
    if st.output == "json":
        _dump(run, out)
        return EXIT_OK
    leases = [le for le in state["leases"] if le["run"] == key]
    reservations = [r for r in state["reservations"] if r["run"] == key]
    manifest = st.latest_manifest(key) or {}
    follow = ((manifest.get("spec") or {}).get("follow") or {}) if isinstance(manifest, dict) else {}
    details = Details(upstreams=tuple(follow.get("after") or ()),
                      on_upstream_failure=follow.get("onUpstreamFailure"))
    out.write("\n".join(explain_lines(run, leases, reservations, details)) + "\n")
    rows = [_state_lease_row(le) for le in leases if le.get("end") is None]
    if rows:
        out.write("\n" + _lease_rows_table(rows) + "\n")
    return EXIT_OK


def local_budgets(st: LocalState, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.sim.scenario import ApplyAction, scenario_from_doc

    budgets: dict[str, Any] = {}
    for step in scenario_from_doc(st.doc).steps:
        if isinstance(step.action, ApplyAction):
            for obj in step.action.objects:
                if not hasattr(obj, "spec"):
                    budgets[obj.name] = obj
    output = st.output
    if args.budgets_command == "list":
        from jobtree.api import convert

        chosen = [budgets[n] for n in sorted(budgets) if not args.owner or budgets[n].owner == args.owner]
        if output == "json":
            _dump([_to_dict(convert.budget_to_proto(b)) for b in chosen], out)
        else:
            out.write(_table(["BUDGET", "OWNER", "PARENTS", "ENVELOPES"],
                             [[b.name, b.owner, ",".join(b.parents),
                               ",".join(f"{e.name}({e.flavor} x{e.concurrency})" for e in b.envelopes)]
                              for b in chosen]) + "\n")
        return EXIT_OK
    state = st.state()
    envelopes = []
    for row in state["budgets"]:
        b = budgets[row["name"]]
        if (args.owner and b.owner != args.owner) or (args.budget and b.name != args.budget):
            continue
        for env_row, env in zip(row["envelopes"], b.envelopes, strict=True):
            if args.flavor and env.flavor != args.flavor:
                continue
            envelopes.append({"budget": b.name, "envelope": env.name, "owner": b.owner, "flavor": env.flavor,
                              "concurrency": env.concurrency, "funded": env_row["funded"],
                              "headroom": env_row["headroom"], "consumedGPUHours": env_row["consumedGPUHours"],
                              "maxGPUHours": env.max_gpu_hours})
    unfunded = {o: h for o, h in state["unfundedGPUHours"].items() if not args.owner or o == args.owner}
    _print_usage(envelopes, unfunded, output, out)
    return EXIT_OK


def local_sponsors(st: LocalState, args: argparse.Namespace, namespace: str, out: TextIO) -> int:
    if args.sponsors_command == "list":
        raise RunsError("sponsors list is answered by the budget service; it is not available with --local")
    key = _run_key(args.name, namespace)
    manifest = st.latest_manifest(key)
    if manifest is None or all(r["key"] != key for r in st.state()["runs"]):
        raise RunsError(f"run {key} not found")
    doc = copy.deepcopy(manifest)
    funding = doc.setdefault("spec", {}).setdefault("funding", {})
    sponsors = list(funding.get("sponsors") or [])
    if args.sponsor not in sponsors:
        sponsors.append(args.sponsor)
    funding["sponsors"], funding["allowBorrow"] = sponsors, True
    from jobtree.api import convert
    from jobtree.core.errors import ValidationError

    try:
        convert.parse_manifest(doc)
    except ValidationError as err:
        if err.path.startswith("spec.funding.sponsors"):
            raise RunsError(f"sponsor: {err.problem}") from None
        raise RunsError(str(err)) from None
    st.append({"apply": [doc]})
    if st.output == "json":
        _dump({"run": key, "sponsors": sponsors, "step": st.last_index}, out)
    else:
        out.write(f"run/{key}: sponsors now {', '.join(sponsors)} (step {st.last_index})\n")
    return EXIT_OK


def local_write(st: LocalState, args: argparse.Namespace, namespace: str, out: TextIO) -> int:
    key = _run_key(args.name, namespace)
    if all(r["key"] != key for r in st.state()["runs"]):
        raise RunsError(f"run {key} not found")
    if args.command == "shrink":
        step: Json = {"shrink": {"run": key, "desiredTotalGPUs": args.to}}
        verb = f"shrunk to {args.to} GPUs"
    else:
        step = {args.command: key}
        verb = {"complete": "completed", "fail": "failed", "delete": "deleted"}[args.command]
    st.append(step)
    if st.output == "json":
        _dump({"run": key, "step": st.last_index}, out)
    else:
        out.write(f"run/{key} {verb} (step {st.last_index})\n")
    return EXIT_OK


def run_local(args: argparse.Namespace, opts: Options, out: TextIO) -> int:
    assert opts.state is not None
    cmd = args.command
    if cmd in ("submit", "plan"):
        manifests = read_manifests(args.filename, opts.namespace, ("Run", "Budget") if cmd == "submit" else ("Run",))
        st = LocalState(opts.state, opts.at, opts.output)
        return local_submit(st, manifests, out) if cmd == "submit" else local_plan(st, manifests, out)
    st = LocalState(opts.state, opts.at, opts.output)
    if cmd == "get":
        state = st.state()
        if args.name:
            runs = [_state_run(state, _run_key(args.name, opts.namespace))]
        else:
            runs = [r for r in state["runs"] if args.all_namespaces or _in_namespace(r["key"], opts.namespace)]
        if opts.output == "json":
            _dump(runs[0] if args.name else runs, out)
        else:
            out.write(_runs_table([_state_run_row(r) for r in runs]) + "\n")
        return EXIT_OK
    if cmd == "watch":
        return local_watch(st, args.names, opts.namespace, not args.no_initial, out)
    if cmd == "explain":
        return local_explain(st, _run_key(args.name, opts.namespace), out)
    if cmd == "budgets":
        return local_budgets(st, args, out)
    if cmd == "sponsors":
        return local_sponsors(st, args, opts.namespace, out)
    if cmd in ("leases", "pods"):
        state = st.state()
        key = _run_key(args.name, opts.namespace) if args.name else None
        if key is not None:
            _state_run(state, key)
        chosen = [le for le in state["leases"]
                  if (le["run"] == key if key else _in_namespace(le["run"], opts.namespace))
                  and ((cmd == "leases" and args.all) or le.get("end") is None)]
        if cmd == "pods":
            _print_pods(pods_of([_state_lease_row(le) for le in chosen]), opts.output, out)
        elif opts.output == "json":
            _dump(chosen, out)
        else:
            out.write(_lease_rows_table([_state_lease_row(le) for le in chosen]) + "\n")
        return EXIT_OK
    return local_write(st, args, opts.namespace, out)


# ================================================================================================
# Shell completions
# ================================================================================================


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def _file_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if a.dest in ("filename", "state")}


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    commands = _subparsers(parser)
    global_flags = _flags(parser)
    if shell in ("bash", "zsh"):
        lines = ["# kubectl-runs completion (generated by `kubectl-runs completions " + shell + "`)"]
        if shell == "zsh":
            lines += ["autoload -U +X bashcompinit && bashcompinit"]
        lines += [
            "_kubectl_runs() {",
            '  local cur prev cmd="" sub="" i',
            '  cur="${COMP_WORDS[COMP_CWORD]}"',
            '  prev="${COMP_WORDS[COMP_CWORD-1]}"',
            '  case "$prev" in',
            '    -f|--filename|--state) COMPREPLY=( $(compgen -f -- "$cur") ); return ;;',
            '    -o|--output) COMPREPLY=( $(compgen -W "' + " ".join(OUTPUTS) + '" -- "$cur") ); return ;;',
            "  esac",
            f'  local commands="{" ".join(commands)}"',
            "  for ((i=1; i<COMP_CWORD; i++)); do",
            '    if [[ -z "$cmd" && " $commands " == *" ${COMP_WORDS[i]} "* ]]; then cmd="${COMP_WORDS[i]}";',
            '    elif [[ -n "$cmd" && -z "$sub" && "${COMP_WORDS[i]}" != -* ]]; then sub="${COMP_WORDS[i]}"; fi',
            "  done",
            '  case "$cmd" in',
            f'    "") COMPREPLY=( $(compgen -W "$commands {" ".join(global_flags)}" -- "$cur") ) ;;',
        ]
        for name, sub in commands.items():
            nested = _subparsers(sub)
            if nested:
                inner = " ".join(nested)
                flags = " ".join(sorted({f for p in nested.values() for f in _flags(p)}))
                lines.append(f'    {name}) if [[ -z "$sub" ]]; then COMPREPLY=( $(compgen -W "{inner}" -- "$cur") ); '
                             f'else COMPREPLY=( $(compgen -W "{flags}" -- "$cur") ); fi ;;')
            elif name == "completions":
                lines.append(f'    {name}) COMPREPLY=( $(compgen -W "{" ".join(SHELLS)}" -- "$cur") ) ;;')
            else:
                lines.append(f'    {name}) COMPREPLY=( $(compgen -W "{" ".join(_flags(sub))}" -- "$cur") ) ;;')
        lines += ["  esac", "}", "complete -F _kubectl_runs kubectl-runs", ""]
        return "\n".join(lines)
    # fish
    lines = ["# kubectl-runs completion (generated by `kubectl-runs completions fish`)",
             "complete -c kubectl-runs -f"]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            lines.append(_fish_option(action, ""))
    for name, sub in commands.items():
        lines.append(f"complete -c kubectl-runs -n __fish_use_subcommand -a {name} -d {_fish_quote(COMMANDS[name])}")
        cond = f"__fish_seen_subcommand_from {name}"
        nested = _subparsers(sub)
        for inner, p in nested.items():
            lines.append(f"complete -c kubectl-runs -n '{cond}' -a {inner} -d {_fish_quote(p.description or inner)}")
            for action in p._actions:
                if action.option_strings and action.dest != "help" and action.dest not in _GLOBAL_DESTS:
                    lines.append(_fish_option(action, f"{cond}; and __fish_seen_subcommand_from {inner}"))
        if name == "completions":
            lines.append(f"complete -c kubectl-runs -n '{cond}' -a '{' '.join(SHELLS)}'")
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and action.dest not in _GLOBAL_DESTS:
                lines.append(_fish_option(action, cond))
    return "\n".join(lines) + "\n"


_GLOBAL_DESTS = frozenset({"namespace", "server", "output", "timeout", "local", "state", "at"})


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_option(action: argparse.Action, cond: str) -> str:
    parts = ["complete -c kubectl-runs"]
    if cond:
        parts.append(f"-n '{cond}'")
    for s in action.option_strings:
        parts.append(f"-l {s[2:]}" if s.startswith("--") else f"-s {s[1:]}")
    if action.dest in ("filename", "state"):
        parts.append("-r -F")
    elif action.choices:
        parts.append(f"-x -a '{' '.join(map(str, action.choices))}'")
    elif action.nargs != 0:
        parts.append("-r")
    if action.help and action.help != argparse.SUPPRESS:
        parts.append(f"-d {_fish_quote(action.help.split(' (')[0])}")
    return " ".join(parts)


# ================================================================================================
# main
# ================================================================================================


def _one_line(text: str) -> str:
    return " ".join(text.split())


def dispatch(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "completions":
        out.write(completion_script(args.shell))
        return EXIT_OK
    opts = options_of(args)
    if opts.local:
        return run_local(args, opts, out)
    return run_remote(args, opts, out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
        return dispatch(args, out)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_BAD_INPUT
    except RunsError as e:
        out.flush()
        err.write(f"{PROG}: {_one_line(str(e))}\n")
        return e.code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 128 + signal.SIGINT



if __name__ == "__main__":
    sys.exit(main())
