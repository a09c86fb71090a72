"""Run every core benchmark and print a summary (`make bench`).

Each benchmark runs in its own subprocess (`bench_admission.py`, `bench_classify.py`,
`bench_memory.py`, `bench_backlog.py`, each with `--json`); its table is passed through, its JSON line collected.
`--quick` runs smoke-test sizes (well under 20 s in all, on one core) — suitable as a smoke test;
the full run takes tens of minutes with the current engine.

    .venv/bin/python bench/run_all.py [--quick] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _world import emit_json, machine, table

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_admission.py", "bench_classify.py", "bench_memory.py", "bench_backlog.py")


def run(script: str, quick: bool) -> tuple[dict[str, object], float]:
    cmd = [sys.executable, str(HERE / script), "--json", *(["--quick"] if quick else [])]
    print(f"$ {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
    s = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - s
    lines = proc.stdout.rstrip("\n").splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        print("\n".join(lines))
        raise SystemExit(f"{script} failed (exit {proc.returncode})")
    print("\n".join(lines[:-1]), flush=True)
    print(flush=True)
    return json.loads(lines[-1]), elapsed


def summary(results: dict[str, dict[str, object]]) -> list[list[object]]:
    rows: list[list[object]] = []
    adm = results["admission"]
    for r in adm["results"]:  # type: ignore[attr-defined]
        best = max(r["admissions_per_s"], r["admissions_per_cpu_s"])
        rows.append([f"admission @ {r['nodes']:,} nodes",
                     f"{r['admissions_per_s']:,} gang admissions/s ({r['admissions_per_cpu_s']:,}/CPU-s)",
                     ">= 5,000/s at 10,000 nodes" if r["nodes"] == 10_000 else "(informational)",
                     ("MET" if best >= 5_000 else "MISSED") if r["nodes"] == 10_000 else "-"])
    cls = results["classify"]
    sizes = cls["results"]  # type: ignore[index]
    rows.append([f"classification {sizes[0]['open_leases']:,} -> {sizes[-1]['open_leases']:,} leases",  # type: ignore[index]
                 f"{sizes[-1]['full_classification_cpu_s'] * 1e3:,.1f} CPU-ms at largest; per-lease x{cls['per_lease_ratio']}, ~N^{cls['exponent']}",  # type: ignore[index]
                 "no faster than linear", "MET" if cls["linear"] else "MISSED"])
    mem = results["memory"]
    at = max(int(mem["maxrss_bytes_at_target"]),  # type: ignore[call-overload]
             int(mem["traced_peak_bytes_at_target"] or 0))  # type: ignore[call-overload]
    rows.append([f"memory @ {mem['target_runs']:,} runs", f"{at / (1 << 20):,.0f} MiB"
                 + (" (extrapolated)" if mem["extrapolated"] else ""),
                 "<= 1 GiB at 80,000 GPUs / 100,000 runs", "MET" if mem["target"]["met"] else "MISSED"])  # type: ignore[index]
    backlog = results["backlog"]
    full = backlog["nodes"] == 2000 and backlog["runs"] == 4000
    rows.append([f"backlog {backlog['nodes']:,} nodes / {backlog['runs']:,} runs",
                 f"{backlog['wall_s']} s ({backlog['attempts']:,} attempts, {backlog['cut_worlds']:,} cut worlds)",
                 "<= 5 s at 2,000 nodes / 4,000 runs" if full else "(informational)",
                 ("MET" if float(backlog["wall_s"]) <= 5 else "MISSED") if full else "-"])  # type: ignore[arg-type]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes, < 20 s in all")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with every result")
    ap.add_argument("--out", type=Path, help="also write the combined JSON to this file")
    args = ap.parse_args()
    s = time.perf_counter()
    results: dict[str, dict[str, object]] = {}
    times: dict[str, float] = {}
    for script in BENCHES:
        got, elapsed = run(script, args.quick)
        results[str(got["bench"])] = got
        times[str(got["bench"])] = round(elapsed, 2)
    total = time.perf_counter() - s
    print(f"Summary{' (quick: smoke-test sizes, not the targets sizes)' if args.quick else ''}")
    print(table(["benchmark", "result", "target", "verdict"], summary(results)))
    moved = [k for k, r in results.items() if r.get("core_changed")]
    if moved:
        print(f"WARNING: the core changed while {', '.join(moved)} ran; re-run for clean numbers")
    print(f"total {total:.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in times.items())})")
    combined = {"bench": "all", "quick": args.quick, "machine": machine(), "seconds": times, "results": results}
    if args.out:
        args.out.write_text(json.dumps(combined, sort_keys=True, indent=1) + "\n")
    if args.json:
        emit_json(combined)


if __name__ == "__main__":
    main()
