"""Print the top functions of a cProfile dump by cumulative and by total (own) time.

    .venv/bin/python -m cProfile -o /tmp/adm.prof bench/bench_admission.py --nodes 1000
    .venv/bin/python bench/pstats_top.py /tmp/adm.prof [--top 15]
"""

from __future__ import annotations

import argparse
import pstats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--exclude", default=r"bench/|builtins\.exec|<module>",
                    help="regex of entries to leave out (default: the benchmark harness itself)")
    args = ap.parse_args()
    keep = f"^(?!.*(?:{args.exclude}))" if args.exclude else ""
    for key in ("cumulative", "tottime"):
        print(f"=== top {args.top} by {key} ===")
        pstats.Stats(args.profile).sort_stats(key).print_stats(keep, args.top)


if __name__ == "__main__":
    main()
