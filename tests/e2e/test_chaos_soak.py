"""The chaos soak, short (bench/chaos_soak.py --quick): 40 s of submissions at 50 runs/s while
a random process (every role in turn, in a random order: the admission leader and standby, the
binder, the gateway, the readers, the nats-server) is killed with SIGKILL every 3 s. The long
soak (minutes at 200 runs/s) is the benchmark; both check the same things."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_short_chaos_soak_loses_nothing() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos_soak.py"), "--quick", "--seed", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    result = json.loads(lines[-1])
    assert result["violations"] == [], result
    assert result["acknowledged"] == result["submissions"] and result["given_up"] == 0, result
    assert (result["committed_twice"], result["acked_missing"], result["acked_lost"]) == (0, 0, 0)
    assert result["oracle"] == "ok"
    assert result["gateway_view"] == result["budget_view"] == result["packer_view"] == "equal"
    assert result["kills"] >= 10 and all(n >= 1 for n in result["kills_by_role"].values()), result["kills_by_role"]
    assert result["processes_alive_at_end"] == 9
    assert proc.returncode == 0, proc.stderr[-3000:]
