"""Options of `kubectl-runs`: exit codes, the argument parser, the `Options` of a call, `RunsError`.

Part of `kubectl-runs` (`jobtree.cli.runs`): see the package docstring for the contract.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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
    from jobtree.cli.runs.credentials import add_credential_options

    add_credential_options(parser)


COMMANDS: dict[str, str] = {
    "submit": "create or update Runs and Budgets from manifests",
    "plan": "what would happen if runs were submitted now (nothing is written)",
    "get": "list runs, or show one",
    "watch": "print runs as they change",
    "explain": "why a run is where it is",
    "budgets": "budgets and their usage",
    "sponsors": "owners that may lend to an owner; add a sponsor to a run",
    "global": "aggregate caps across clusters: each cluster's allowance, funded use and demand (federation)",
    "shrink": "set the desired width of an elastic run",
    "leases": "GPU leases (open ones; --all for the closed too)",
    "events": "what happened: run, budget and node events (-w to follow)",
    "top": "the fleet as a picture: every node's GPUs by domain, who holds them, how they are funded",
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
    burn = bsub.add_parser("burn", help="an owner's GPU-hours against their caps, and when they run out")
    _global_options(burn)
    burn.add_argument("owner", metavar="OWNER")
    b = bsub.add_parser("list", help="the budgets as applied")
    _global_options(b)
    b.add_argument("--owner")
    p = command("global")
    gsub = p.add_subparsers(dest="global_command", metavar="WHAT", required=True, parser_class=_Parser)
    g_usage = gsub.add_parser("usage", help="per cap: allowances, held values and targets, funded use, demand, "
                                            "reachability and the last rebalance, per cluster")
    _global_options(g_usage)
    g_usage.add_argument("--cap", metavar="BUDGET/CAP", help="only this aggregate cap")
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
    p = command("top")
    p.add_argument("--summary", action="store_true", help="one line per fabric domain")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour by owner (auto: when printing to a terminal)")
    p = command("events")
    p.add_argument("-w", "--watch", action="store_true", help="keep printing new events")
    p.add_argument("--kinds", metavar="K,K", default="", help="only these kinds (RunPreempted,RunFailed,...)")
    p.add_argument("--owner", metavar="PREFIX", default="", help="only events of owners under PREFIX")
    p.add_argument("--after", metavar="SEQ", type=int, default=0, help="only events after this ledger sequence")
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
    credentials: Any = None
    """How to reach the gateway (`credentials.Credentials`); None with --local."""


def options_of(args: argparse.Namespace) -> Options:
    namespace = getattr(args, "namespace", None) or DEFAULT_NAMESPACE
    credentials = None
    if not getattr(args, "local", False):
        from jobtree.cli.runs.credentials import credentials_of

        credentials = credentials_of(args)
    server = credentials.server if credentials else DEFAULT_SERVER
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
                   watch_for=timeout, credentials=credentials)


def _one_line(text: str) -> str:
    return " ".join(text.split())
