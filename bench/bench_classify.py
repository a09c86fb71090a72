"""Cost of one full funding classification as open leases grow (issue 2, item 5; CALCULUS §2).

World: `FundingRules` over the 100 budgets / 105 envelopes of `_world.make_budgets` (a family
of 10 departments and 90 teams, 5 aggregate caps, 5 GPU-hour caps), and N open claims (leases)
held by runs of 1-8 leases each: 70% paid by the owner's own envelope, 20% by a family member's
(the department pool, a sibling team), 10% by a cousin's; 1-8 GPUs each; envelope concurrency
summing to 80% of the GPUs claimed, so the greedy fill both funds and unfunds.

Measured (median of repeats; wall time by time.perf_counter, and this process's CPU time by
time.process_time, which the verdict uses because the benchmark machine may be shared):
- full: `view.invalidate(); view.refresh()` — rank every claim and refill every bound;
- append: `view.add(claim)` + `class_of` of a claim that ranks after every claim of its component
  (the O(bounds) fast path of `FundingView.add`);
- insert: `view.add(claim)` + `refresh()` of an owner-tier claim that ranks first in its component
  (recomputes that component only);
- diagnostic: the full classification again with the cyclic garbage collector disabled (its
  whole-heap passes grow with the heap, so they show up as super-linear cost).
Target (issue 2): classification cost growing no faster than linearly in open leases — checked as
the ratio of the per-lease cost at the largest size to that at the smallest.

    .venv/bin/python bench/bench_classify.py [--sizes 1000 10000 100000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import time
from collections.abc import Callable

from _world import SEED, T0, CoreWatch, emit_json, machine, make_budgets, make_nodes, owners, progress, table
from jobtree.core.family import COUSIN, OWNER
from jobtree.core.funding import FundingView
from jobtree.core.funding_rules import Claim, FundingRules, RunTerms
from jobtree.core.model import Budget, EnvelopeRef, FundingClass, Role

LINEAR_EXPONENT = 1.2
"""Classification CPU time ~ N^e between the smallest and largest size; e at most this counts as
(near-)linear. For reference, N log N over 1k -> 100k is e = 1.11, and the per-lease CPU cost then
grows x1.67: the rank sort is N log N, and a larger working set costs more cache misses per lease
even when the operations per lease are constant."""


def _envelopes_by_owner(rules: FundingRules) -> dict[str, list[EnvelopeRef]]:
    out: dict[str, list[EnvelopeRef]] = {}
    for ref in sorted(rules.envelopes):
        out.setdefault(rules.owner_of[ref], []).append(ref)
    return out


def make_claims(n: int, seed: int) -> tuple[list[Claim], dict[str, RunTerms], list[Budget]]:
    """`n` claims, their runs' terms, and the budgets (concurrency = 80% of GPUs claimed)."""
    rng = random.Random(seed + 2)
    who = owners()
    shape = FundingRules(make_budgets(8_000, seed))
    by_owner = _envelopes_by_owner(shape)
    tier = {(o, p): shape.family.family_tier(o, p) for o in who for p in who}
    near = {o: [p for p in who if tier[o, p] in range(OWNER + 1, COUSIN)] for o in who}
    cousins = {o: [p for p in who if tier[o, p] == COUSIN] for o in who}
    nodes = make_nodes(max(32, n // 4))
    claims: list[Claim] = []
    terms: dict[str, RunTerms] = {}
    r = 0
    while len(claims) < n:
        key = f"bench/r{r:07d}"
        owner = who[rng.randrange(len(who))]
        terms[key] = RunTerms(admitted=T0 + r // 50)
        u = rng.random()
        pool = [owner] if u < 0.70 else (near[owner] or [owner]) if u < 0.90 else (cousins[owner] or [owner])
        payer_owner = pool[rng.randrange(len(pool))]
        payer = rng.choice(by_owner[payer_owner])
        for i in range(min(rng.randint(1, 8), n - len(claims))):
            node = nodes[rng.randrange(len(nodes))]
            role = Role.SPARE if rng.random() < 0.05 else Role.ACTIVE
            claims.append(Claim(f"bench.r{r:07d}.{i:05d}", key, owner, i, role, rng.randint(1, 8), payer,
                                node.labels))
        r += 1
    claimed = sum(c.gpus for c in claims)
    return claims, terms, make_budgets(int(claimed * 0.8), seed)


def _median_time(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of `fn`."""
    wall, cpu = [], []
    for _ in range(repeats):
        s, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def measure(n: int, repeats: int, seed: int) -> dict[str, object]:
    claims, terms, budgets = make_claims(n, seed)
    rules = FundingRules(budgets)
    view = FundingView(rules, terms.__getitem__)
    view.set_clock(T0 + 3600, frozenset())
    s = time.perf_counter()
    for c in claims:
        view.add(c)
    view.refresh()
    build = time.perf_counter() - s

    def full() -> None:
        view.invalidate()
        view.refresh()

    full_s, full_cpu = _median_time(full, repeats)
    gc.collect()
    gc.disable()  # diagnostic: the share of the cyclic garbage collector (whole-heap passes)
    try:
        _, full_cpu_nogc = _median_time(full, repeats)
    finally:
        gc.enable()
    classes: dict[str, int] = {}
    for c in claims:
        cls = view.class_of(c.name).value
        classes[cls] = classes.get(cls, 0) + c.gpus

    # Incremental: a claim ranking last in its component (cousin tier, youngest admission).
    last_admitted = max(t.admitted for t in terms.values()) + 1
    who = owners()
    payer = ("d01-t0", "main")  # a team envelope: cousins (teams of other departments) may draw on it
    claimant = next(o for o in who if rules.tier(o, payer, False) == COUSIN)
    node_labels = claims[0].node_labels
    terms["bench/zlast"] = RunTerms(admitted=last_admitted)
    terms["bench/afirst"] = RunTerms(admitted=T0 - 1)
    append_times: list[float] = []
    insert_times: list[float] = []
    probe_cls: FundingClass | None = None
    reps = max(20, repeats * 10)
    for i in range(reps):
        view.refresh()
        c = Claim(f"bench.zlast.{i:05d}", "bench/zlast", claimant, 0, Role.ACTIVE, 1, payer, node_labels)
        s = time.perf_counter()
        view.add(c)
        probe_cls = view.class_of(c.name)
        append_times.append(time.perf_counter() - s)
        view.remove(c.name)
    owner_payer = payer
    for i in range(max(5, repeats)):
        view.refresh()
        c = Claim(f"bench.afirst.{i:05d}", "bench/afirst", rules.owner_of[owner_payer], 0, Role.ACTIVE, 1,
                  owner_payer, node_labels)
        s = time.perf_counter()
        view.add(c)
        view.refresh()
        insert_times.append(time.perf_counter() - s)
        view.remove(c.name)
    view.refresh()
    comp_claims = sum(1 for c in claims if c.payer == payer)
    return {
        "open_leases": n,
        "envelopes": len(rules.envelopes),
        "budgets": len(rules.budgets),
        "gpus_claimed": sum(c.gpus for c in claims),
        "gpus_by_class": classes,
        "build_s": round(build, 6),
        "full_classification_s": round(full_s, 6),
        "per_lease_us": round(full_s / n * 1e6, 4),
        "full_classification_cpu_s": round(full_cpu, 6),
        "per_lease_cpu_us": round(full_cpu / n * 1e6, 4),
        "full_classification_cpu_nogc_s": round(full_cpu_nogc, 6),
        "per_lease_cpu_nogc_us": round(full_cpu_nogc / n * 1e6, 4),
        "append_last_us": round(statistics.median(append_times) * 1e6, 3),
        "append_last_class": probe_cls.value if probe_cls else None,
        "insert_first_us": round(statistics.median(insert_times) * 1e6, 3),
        "insert_first_component_leases": comp_claims,
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=7,
                    help="repeats of the full classification (at least 100,000/N, at most 100)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (500, 5k leases; 3 repeats)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()
    watch = CoreWatch()
    if args.quick:
        args.sizes, args.repeats = [500, 5_000], 3
    results = []
    for n in args.sizes:
        if not args.quick:
            progress(f"classify: {n:,} open leases")
        repeats = args.repeats if args.quick else min(100, max(args.repeats, 100_000 // n))
        results.append(measure(n, repeats, args.seed))
    print("Funding classification (FundingView over ~100 budgets/envelopes)")
    rows = []
    for r in results:
        by_class: dict[str, int] = r["gpus_by_class"]  # type: ignore[assignment]
        rows.append([r["open_leases"], float(r["full_classification_s"]) * 1e3,  # type: ignore[arg-type]
                     float(r["full_classification_cpu_s"]) * 1e3, r["per_lease_cpu_us"],  # type: ignore[arg-type]
                     r["per_lease_cpu_nogc_us"],
                     r["append_last_us"], r["insert_first_us"], r["insert_first_component_leases"],
                     float(r["build_s"]) * 1e3,  # type: ignore[arg-type]
                     "/".join(str(by_class.get(k, 0)) for k in ("owned", "shared", "unfunded"))])
    print(table(["open leases", "full ms", "full cpu ms", "cpu us/lease", "(gc off)", "append-last us", "insert-first us",
                 "(its comp. leases)", "build ms", "GPUs owned/shared/unfunded"], rows))
    small, large = results[0], results[-1]
    ratio = float(large["per_lease_cpu_us"]) / float(small["per_lease_cpu_us"])  # type: ignore[arg-type]
    n0, n1 = int(small["open_leases"]), int(large["open_leases"])  # type: ignore[call-overload]
    t0, t1 = float(small["full_classification_cpu_s"]), float(large["full_classification_cpu_s"])  # type: ignore[arg-type]
    exponent = math.log(t1 / t0) / math.log(n1 / n0) if n1 > n0 and t0 > 0 else 1.0
    g0, g1 = float(small["full_classification_cpu_nogc_s"]), float(large["full_classification_cpu_nogc_s"])  # type: ignore[arg-type]
    exponent_nogc = math.log(g1 / g0) / math.log(n1 / n0) if n1 > n0 and g0 > 0 else 1.0
    linear = exponent <= LINEAR_EXPONENT
    print(f"per-lease CPU cost {n1:,} vs {n0:,} leases: x{ratio:.2f}; time ~ N^{exponent:.2f} -> "
          f"{'near-linear (target MET)' if linear else 'super-linear (target MISSED)'}; "
          f"with the garbage collector off ~ N^{exponent_nogc:.2f}")
    changed = watch.changed()
    if args.json:
        emit_json({"bench": "classify", "machine": machine(), "core_before": watch.before, "core_changed": changed,
                   "results": results,
                   "per_lease_ratio": round(ratio, 3), "exponent": round(exponent, 3),
                   "exponent_gc_off": round(exponent_nogc, 3), "linear": linear})


if __name__ == "__main__":
    main()
