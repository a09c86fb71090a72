"""Terminal pictures (`kubectl runs top`, `kubectl runs budgets burn`): pure functions, then the
local backend end to end on a scenario."""

from __future__ import annotations

import io
import json
from pathlib import Path

import yaml

from jobtree.cli.runs import main
from jobtree.cli.runs.pictures import CELL, FENCED, FREE, NodeRow, SlotRow, burn, fleet, sparkline

ROOT = Path(__file__).resolve().parents[2]


def test_the_fleet_shows_every_slot_by_class_and_every_domain() -> None:
    nodes = [NodeRow("a-0", 4, "r/c/A"), NodeRow("a-1", 4, "r/c/A", "Cordoned"), NodeRow("b-0", 2, "r/c/B", "Fenced")]
    slots = [SlotRow("a-0", 0, "owned", "org:a", "ns/x"), SlotRow("a-0", 1, "unfunded", "org:b", "ns/y"),
             SlotRow("a-1", 3, "spare", "org:a", "ns/x")]
    text = fleet(nodes, slots)
    lines = text.splitlines()
    assert lines[1] == "r/c/A  8 GPUs: 1 owned, 1 unfunded, 1 spare, 5 free"
    assert lines[2] == f"  a-0  {CELL['owned']}{CELL['unfunded']}{FREE}{FREE}  ns/x (org:a), ns/y (org:b)"
    assert lines[3] == f"  a-1  {FREE * 3}{CELL['spare']} [cordoned]  ns/x (org:a)"
    assert lines[4] == "r/c/B  2 GPUs: 0 free" and lines[5] == f"  b-0  {FENCED * 2} [fenced]"
    assert fleet(nodes, slots, summary=True).splitlines()[1:] == [lines[1], lines[4]]
    colored = fleet(nodes, slots, color=True)
    assert "\x1b[" in colored and "\x1b[" not in text


def test_a_burn_down_projects_exhaustion() -> None:
    assert sparkline([4, 2, 0], 4) == "█▅▁"
    text = burn("t/e", 2.0, 6.0, 4, "2026-01-05T00:30:00Z", "2026-01-05T01:30:00Z", width=10)
    assert "2.00 of 6 GPU-hours (33 %)" in text and "until 2026-01-05T01:30:00Z" in text
    assert "funds nothing more" in burn("t/e", 6.0, 6.0, 4, "now", None)
    assert "no GPU-hours cap" in burn("t/e", 1.0, None, 4, "now", None)


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def test_top_and_burn_from_the_simulator(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "tests" / "scenarios" / "21-gpu-hours-exhaustion.yaml").read_text())
    doc["steps"] = [doc["steps"][0], {"at": "30m", "snapshot": "x"}]
    state = tmp_path / "s.yaml"
    state.write_text(yaml.safe_dump(doc))
    code, text = _cli("--local", "--state", str(state), "top")
    assert code == 0 and "default/r1 (org:t)" in text and CELL["owned"] * 4 in text
    code, text = _cli("--local", "--state", str(state), "budgets", "burn", "org:t")
    assert code == 0 and "2.00 of 6 GPU-hours" in text and "until 2026-01-05T01:30:00Z" in text
    code, text = _cli("--local", "--state", str(state), "-o", "json", "budgets", "burn", "org:t")
    assert json.loads(text)[0]["exhaustsAt"] == "2026-01-05T01:30:00Z"
    code, text = _cli("--local", "--state", str(state), "budgets", "burn", "org:nobody")
    assert code == 2 and text.count("\n") == 1 and "no envelope" in text
