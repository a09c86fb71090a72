"""`kubectl-runs` (also `kubectl runs`): the command line client of jobtree's gRPC gateway.

Contract: `main(argv) -> int`.
- Commands: `submit -f FILE` (Runs and Budgets, YAML or JSON, several documents), `plan -f FILE`,
  `get [NAME]`, `watch [NAME...]`, `explain NAME`, `budgets usage|list`, `sponsors list|add`, `global usage [--cap B/C]`,
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
Layout: `options` (exit codes, the parser, `Options`, `RunsError`), `manifests` (reading
files: bounded YAML, each document through the schema and the core), `output` (tables, rows,
JSON), `remote` (the gateway backend), `local` (the simulator backend), `completion` (shell
scripts); this module dispatches to a backend and turns errors into one line.
Not: a scheduler (the gateway and the services decide), not the simulator (jobtree.sim).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from jobtree.cli.runs.completion import completion_script
from jobtree.cli.runs.local import (  # noqa: F401
    LocalState,
    local_budgets,
    local_explain,
    local_plan,
    local_sponsors,
    local_submit,
    local_watch,
    local_write,
    run_local,
)
from jobtree.cli.runs.manifests import MAX_FILE_BYTES, Manifest, read_manifests  # noqa: F401
from jobtree.cli.runs.options import (  # noqa: F401
    COMMANDS,
    DEFAULT_NAMESPACE,
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT,
    ENV_SERVER,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    OUTPUTS,
    PROG,
    SHELLS,
    STALE_METADATA,
    WATCH_LABEL,
    Json,
    Options,
    RunsError,
    _one_line,
    build_parser,
    options_of,
)
from jobtree.cli.runs.output import SIM_RUN_ORDER, LeaseRow, RunRow, pods_of, sim_run  # noqa: F401
from jobtree.cli.runs.remote import (  # noqa: F401
    Remote,
    remote_budgets,
    remote_explain,
    remote_get,
    remote_leases,
    remote_plan,
    remote_sponsors,
    remote_submit,
    remote_watch,
    remote_write,
    run_remote,
)

# ================================================================================================
# main
# ================================================================================================




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
