"""The local backend (`--local --state FILE`): a scenario file as the cluster, played by the simulator.

Part of `kubectl-runs` (`jobtree.cli.runs`): see the package docstring for the contract.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from jobtree.cli.runs.manifests import Manifest, read_manifests
from jobtree.cli.runs.options import DEFAULT_NAMESPACE, EXIT_OK, WATCH_LABEL, Json, Options, RunsError
from jobtree.cli.runs.output import (
    LeaseRow,
    RunRow,
    _dump,
    _lease_rows_table,
    _paid_text,
    _print_plans,
    _print_pods,
    _print_usage,
    _run_key,
    _runs_table,
    _split_key,
    _table,
    _to_dict,
    kinds_of,
    pods_of,
    print_burn,
    print_events,
    print_top,
)

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
    if args.budgets_command == "burn":
        args.owner, args.budget, args.flavor = args.owner, None, None
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
    if args.budgets_command == "burn":
        print_burn(args.owner, envelopes, state["time"], output, out)
        return EXIT_OK
    unfunded = {o: h for o, h in state["unfundedGPUHours"].items() if not args.owner or o == args.owner}
    _print_usage(envelopes, unfunded, output, out)
    return EXIT_OK


def local_top(st: LocalState, args: argparse.Namespace, out: TextIO) -> int:
    from jobtree.cli.runs.pictures import NodeRow, SlotRow
    from jobtree.core.model import Role
    from jobtree.sim.runner import final_cluster
    from jobtree.sim.scenario import scenario_from_doc

    doc = st._with({"at": st.at}) if st.at is not None else st.doc
    cl = final_cluster(scenario_from_doc(doc))
    nodes = [NodeRow(n.name, n.gpus, n.domain, n.state.value) for n in cl.topo.nodes.values()]
    slots = [SlotRow(node, index, "spare" if lease.role is Role.SPARE else cl.funding.class_of(lease.name).value,
                     lease.owner, lease.run)
             for leases in cl.open_by_run.values() for lease in leases.values() for node, index in lease.slots]
    print_top(nodes, slots, args, st.output, out)
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


def local_events(st: LocalState, args: argparse.Namespace, out: TextIO) -> int:
    """The scenario's events as the live system would publish them (`jobtree.sim.events`)."""
    from jobtree.sim.events import scenario_events
    from jobtree.sim.scenario import scenario_from_doc

    kinds = set(kinds_of(args.kinds))
    namespace = getattr(args, "namespace", "")
    doc = st._with({"at": st.at}) if st.at is not None else st.doc
    chosen = [e for e in scenario_events(scenario_from_doc(doc))
              if (not kinds or e.kind in kinds) and (not namespace or e.namespace == namespace)
              and e.ledger_sequence > args.after
              and (not args.owner or e.owner == args.owner or e.owner.startswith(args.owner.rstrip(":") + ":"))]
    print_events(chosen, st.output, out)
    return EXIT_OK


def run_local(args: argparse.Namespace, opts: Options, out: TextIO) -> int:
    assert opts.state is not None
    cmd = args.command
    if cmd == "global":
        raise RunsError("global usage: the simulator plays one cluster; ask a gateway whose cluster is joined "
                        "to a federation (without --local)")
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
    if cmd == "events":
        return local_events(st, args, out)
    if cmd == "top":
        return local_top(st, args, out)
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
