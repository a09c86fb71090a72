"""The `jobtree` command (console script): argument parsing and error reporting.

Contract: `main(argv) -> int` never prints a traceback for bad input: usage errors, unreadable
or malformed files give exit status 2 and exactly one stderr line `jobtree: <message>`.
Subcommands: `sim run FILE [--output json|table] [--check EXPECT.yaml]` (see `sim_cmd`),
`serve NAME` (one service, see `serve_cmd`), `up` (the whole system on this machine, see
`up_cmd`; what `make up` runs) and `demo`, which plays the demo scenario `examples/demo.yaml`
(or `--scenario FILE`) on the simulator and prints its tables; `auth` makes tokens and client
certificates and checks access policies (see `auth_cmd`).
Not: the simulator, the services or the gRPC client.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jobtree.cli.auth_cmd import add_auth_parser
from jobtree.cli.serve_cmd import add_serve_parser
from jobtree.cli.sim_cmd import (
    EXIT_BAD_INPUT,
    OUTPUT_FORMATS,
    CliError,
    add_sim_parser,
    play,
)
from jobtree.cli.up_cmd import add_up_parser
from jobtree.core.errors import ValidationError
from jobtree.sim.scenario import ScenarioError

PROG = "jobtree"
DEMO_RELATIVE = Path("examples") / "demo.yaml"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised (reported as one line by `main`) instead of printed."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="jobtree: gang scheduling of GPU job forests under time-scoped budgets",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_sim_parser(sub)
    add_serve_parser(sub)
    add_up_parser(sub)
    add_auth_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="play the demo scenario on the simulator (no services) and print its tables",
        description=f"Play the demo scenario ({DEMO_RELATIVE}) on the simulator and print its tables.",
    )
    demo.add_argument("--scenario", metavar="FILE", help=f"scenario to play instead of {DEMO_RELATIVE}")
    demo.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="table (default) or json")
    demo.set_defaults(handler=cmd_demo)
    return parser


def demo_scenario_path() -> Path:
    """`examples/demo.yaml` of the source tree (editable install) or of the working directory."""
    candidates = [Path(__file__).resolve().parents[3] / DEMO_RELATIVE, Path.cwd() / DEMO_RELATIVE]
    for path in candidates:
        if path.is_file():
            return path
    raise CliError(f"demo scenario {DEMO_RELATIVE} not found (looked in {', '.join(str(p) for p in candidates)})")


def cmd_demo(args: argparse.Namespace) -> int:
    path = Path(args.scenario) if args.scenario else demo_scenario_path()
    return play(path, args.output)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        handler = args.handler
        code: int = handler(args)
        return code
    except SystemExit as e:  # --help / --version from argparse
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except (_UsageError, CliError, ScenarioError, ValidationError) as e:
        # ValidationError: what the calculus rejects is bad input too. Anything else is a bug
        # and keeps its traceback.
        print(f"{PROG}: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
