"""Shared world builders and output helpers for the core benchmarks (not a benchmark itself).

Contract: deterministic synthetic worlds for `jobtree.core` — a fleet of 8-GPU H100 nodes in
fabric domains of 32 nodes, ~100 owners in a small family tree with ~100 envelopes (some
aggregate caps, a few GPU-hour caps), and a seeded mix of runs. Everything here is built
outside the timed regions of the benchmarks. Also: the table / JSON printing every benchmark
shares. Not: a scenario file format (see `jobtree.sim`), not part of the installed package.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobtree.core.model import (
    AggregateCap,
    Budget,
    Envelope,
    Locality,
    Malleable,
    Node,
    Run,
    RunSpec,
    labels_of,
)

FLAVOR = "H100-80GB"
GPUS_PER_NODE = 8
NODES_PER_DOMAIN = 32
REGION = "eu-west"
CLUSTER = "bench"
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
SEED = 20260101

N_DEPTS = 10
TEAMS_PER_DEPT = 9  # 10 dept owners + 90 team owners = 100 owners
CAPPED_DEPTS = 5  # these dept budgets hold two envelopes bound by one aggregate cap
HOUR_CAPPED_TEAMS = 5  # these team envelopes also carry a (generous) maxGPUHours


# --- fleet ---------------------------------------------------------------------------------


def make_nodes(n: int) -> list[Node]:
    """`n` Ready 8-GPU H100 nodes, 32 per fabric domain."""
    out = []
    for i in range(n):
        labels = labels_of({
            "region": REGION,
            "cluster": CLUSTER,
            "fabric.domain": f"fd{i // NODES_PER_DOMAIN:04d}",
            "gpu.flavor": FLAVOR,
            "rack": f"rack{i // 8:05d}",
        })
        out.append(Node(f"n{i:05d}", GPUS_PER_NODE, labels))
    return out


# --- owners and budgets ------------------------------------------------------------------


ROOT = "org:bench"


def dept_owner(d: int) -> str:
    return f"{ROOT}:d{d:02d}"


def team_owner(d: int, t: int) -> str:
    return f"{ROOT}:d{d:02d}:t{t}"


def owners() -> list[str]:
    """The 100 run owners: 10 departments and their 90 teams (teams of one department are
    siblings, of two departments cousins; a department is its teams' parent)."""
    out = []
    for d in range(N_DEPTS):
        out.append(dept_owner(d))
        out.extend(team_owner(d, t) for t in range(TEAMS_PER_DEPT))
    return out


def _round8(x: float) -> int:
    return max(8, round(x / 8) * 8)


def make_budgets(total_concurrency: int, seed: int = SEED) -> list[Budget]:
    """100 budgets (one per owner) with 105 envelopes whose concurrency sums to about
    `total_concurrency`: each team a `main` envelope (~75% of the total, uneven), each department
    a `pool` its teams share (~25%); five departments also a `burst` envelope with an aggregate
    cap over pool+burst; five teams a GPU-hour cap of a week at full width."""
    rng = random.Random(seed)
    selector = labels_of({"region": REGION})
    team_w = [rng.lognormvariate(0, 0.6) for _ in range(N_DEPTS * TEAMS_PER_DEPT)]
    dept_w = [rng.lognormvariate(0, 0.4) for _ in range(N_DEPTS)]
    team_total, dept_total = 0.75 * total_concurrency, 0.25 * total_concurrency
    budgets: list[Budget] = []
    k = 0
    for d in range(N_DEPTS):
        pool = _round8(dept_total * dept_w[d] / sum(dept_w))
        envs = [Envelope("pool", FLAVOR, selector, pool)]
        caps: tuple[AggregateCap, ...] = ()
        if d < CAPPED_DEPTS:
            burst = _round8(pool / 2)
            envs.append(Envelope("burst", FLAVOR, selector, burst))
            caps = (AggregateCap("total", FLAVOR, ("pool", "burst"), max_concurrency=_round8((pool + burst) * 0.8)),)
        budgets.append(Budget(f"d{d:02d}", dept_owner(d), (ROOT,), None, tuple(envs), caps))
        for t in range(TEAMS_PER_DEPT):
            conc = _round8(team_total * team_w[k] / sum(team_w))
            hours = float(conc * 24 * 7) if k < HOUR_CAPPED_TEAMS else None
            env = Envelope("main", FLAVOR, selector, conc, max_gpu_hours=hours)
            budgets.append(Budget(f"d{d:02d}-t{t}", team_owner(d, t), (dept_owner(d),), None, (env,)))
            k += 1
    return budgets


# --- runs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    run: Run
    duration: int
    """Simulated seconds the workload runs once bound (the bench reports CompleteRun then)."""
    kind: str


def mean_demand() -> float:
    """Expected GPUs per run of the mix (malleable runs counted at their max width)."""
    return 0.70 * (1 + 2 + 4 + 8) / 4 + 0.25 * 40 + 0.05 * 64


def make_runs(n: int, mean_duration: float, seed: int = SEED, namespace: str = "bench") -> list[Arrival]:
    """The seeded run mix: 70% 1-8 GPU ungrouped, 25% 16-64 GPU with groupGPUs 8, 5% malleable
    16->64 step 8 (groupGPUs 8); owners uniform over the 100 owners; exponential durations."""
    rng = random.Random(seed + 1)
    who = owners()
    out = []
    for j in range(n):
        owner = who[rng.randrange(len(who))]
        u = rng.random()
        if u < 0.70:
            spec = RunSpec(owner, FLAVOR, rng.choice((1, 2, 4, 8)))
            kind = "small"
        elif u < 0.95:
            spec = RunSpec(owner, FLAVOR, 8 * rng.randint(2, 8), locality=Locality(group_gpus=8))
            kind = "gang"
        else:
            spec = RunSpec(owner, FLAVOR, 16, locality=Locality(group_gpus=8),
                           malleable=Malleable(min_total=16, max_total=64, step=8, desired=64))
            kind = "malleable"
        duration = max(1, round(rng.expovariate(1.0 / mean_duration)))
        out.append(Arrival(Run(namespace, f"r{j:06d}", spec), duration, kind))
    return out


# --- output ------------------------------------------------------------------------------


def core_version() -> dict[str, object]:
    """Which core is measured: a digest of the source of the imported `jobtree.core` (other
    engineers edit it concurrently), where it was imported from, and the repository's commit and
    whether its libs/jobtree/core differs from that commit. To measure a pinned commit, extract it
    and put it first on the path, e.g.
    `git archive <commit> libs | tar -x -C /tmp/jt && PYTHONPATH=/tmp/jt/libs .venv/bin/python bench/...`."""
    import jobtree.core

    root = Path(__file__).resolve().parent.parent
    core = Path(jobtree.core.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(core.glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "core_dirty": bool(git("status", "--porcelain", "--", "libs/jobtree/core")),
            "core_path": str(core), "core_is_repo": core == root / "libs" / "jobtree" / "core",
            "core_sha256": digest.hexdigest()[:16]}


def machine() -> dict[str, object]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2), "core": core_version()}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    return bool(s) and (s[0].isdigit() or (s[0] in "-+." and len(s) > 1 and s[1].isdigit()))


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c == 0:
            return "0"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 1:
            return f"{c:.2f}"
        return f"{c:.3g}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


class CoreWatch:
    """Notices when the core's source changes during a benchmark (it is edited concurrently)."""

    def __init__(self) -> None:
        self.before = core_version()

    def changed(self) -> bool:
        after = core_version()
        if after["core_sha256"] != self.before["core_sha256"]:
            progress(f"WARNING: libs/jobtree/core changed during the run ({self.before['core_sha256']} -> "
                     f"{after['core_sha256']}); re-run for a clean measurement")
            return True
        return False


def emit_json(obj: dict[str, object]) -> None:
    """One JSON line on stdout (the last line of the output)."""
    print(json.dumps(obj, sort_keys=True), flush=True)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
