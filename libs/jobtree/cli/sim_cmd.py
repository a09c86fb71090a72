"""`jobtree sim run FILE [--output json|table] [--check EXPECT.yaml] [--live [NATS_URL]]`: play a scenario.

Contract: read and validate the scenario (`jobtree.sim.scenario`) before anything runs, play it
with `jobtree.sim.runner.run_scenario` (imported lazily) — or, with `--live`, through the
services over NATS (`jobtree.sim.live.play_live`, same JSON) — print the JSON of SCENARIOS.md
(`json.dumps(out, indent=2)`) or the human tables; with `--check`, compare against a partial
expectation file and fail with one stderr line per mismatch. Exit codes: 0 played (and every
expectation held), 1 expectations not met (or `--live` services failed), 2 invalid input (one line `jobtree: <message>`).
Not: argument parsing (see `main`) or the simulator itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from jobtree.sim.expect import ExpectError, check_expectations, validate_expectations
from jobtree.sim.scenario import Scenario, ScenarioError, load_scenario, load_yaml
from jobtree.sim.table import render_tables

OUTPUT_FORMATS = ("json", "table")
EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


class CliError(Exception):
    """Bad input from the user: printed as one line `jobtree: <message>`, exit status 2."""


class LiveFailure(Exception):
    """`--live`: the services did not start or answer (exit status 1, not bad input)."""


def add_sim_parser(subparsers: Any) -> None:
    """Register `sim run` on the top-level subcommand set."""
    sim = subparsers.add_parser("sim", help="play scenarios on the simulator (virtual clock, no services)")
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="COMMAND", required=True)
    run = sim_sub.add_parser("run", help="play a scenario file and print the state at every snapshot")
    run.add_argument("file", metavar="FILE", help="scenario YAML (see SCENARIOS.md)")
    run.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default="json", help="json (default) or human tables"
    )
    run.add_argument("--check", metavar="EXPECT.yaml", help="partial expectations the output must meet")
    run.add_argument(
        "--live", nargs="?", const="", default=None, metavar="NATS_URL",
        help="play through the services on a virtual clock (their own nats-server, or the one at NATS_URL)",
    )
    run.set_defaults(handler=cmd_sim_run)


def cmd_sim_run(args: argparse.Namespace) -> int:
    if args.live and "://" not in args.live:
        raise CliError(f"--live: NATS_URL must be a URL such as nats://127.0.0.1:4222, got {args.live!r} "
                       "(the scenario FILE goes before --live)")
    return play(Path(args.file), args.output, Path(args.check) if args.check else None, live=args.live)


def read_expectations(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise CliError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        doc = load_yaml(text)
    except ScenarioError as e:
        raise CliError(f"{path}: {e}") from None
    try:
        validate_expectations(doc)
    except ExpectError as e:
        raise CliError(f"{path}: {e}") from None
    assert isinstance(doc, dict)
    return doc


def simulate(scenario: Scenario, live: str | None = None) -> dict[str, Any]:
    """Play a parsed scenario with the simulator, or through the services when `live` is set
    ("" for services on a nats-server of their own, else the server's URL)."""
    if live is not None:
        from jobtree.sim.live import LiveError, play_live

        try:
            return play_live(scenario, live or None)
        except LiveError as e:
            raise LiveFailure(f"live: {e}") from None
    from jobtree.sim.runner import run_scenario

    result: dict[str, Any] = run_scenario(scenario)
    return result


def play(
    path: Path,
    output_format: str = "json",
    check: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    live: str | None = None,
) -> int:
    """Validate, play and print one scenario; raises CliError / ScenarioError on bad input."""
    out = out or sys.stdout
    err = err or sys.stderr
    scenario = load_scenario(path)
    expect = read_expectations(check) if check is not None else None
    try:
        result = simulate(scenario, live)
    except LiveFailure as e:
        err.write(f"jobtree: {e}\n")
        return EXIT_MISMATCH
    if output_format == "table":
        out.write(render_tables(result))
    else:
        out.write(json.dumps(result, indent=2, sort_keys=False) + "\n")
    out.flush()
    if expect is None:
        return EXIT_OK
    try:
        problems = check_expectations(result, expect)
    except ExpectError as e:
        raise CliError(f"{check}: {e}") from None
    if problems:
        err.write(f"jobtree: {len(problems)} expectation(s) of {check} not met:\n")
        for line in problems:
            err.write(f"  {line}\n")
        return EXIT_MISMATCH
    count = len(expect.get("snapshots") or {})
    err.write(f"jobtree: all expectations of {check} met ({count} snapshot(s))\n")
    return EXIT_OK
