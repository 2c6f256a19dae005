"""Did any run of the demo's recipes collapse? Reads the runs.csv of the robustness overlay
(benchmarks/demo_robustness.yaml: the demo at six seeds, every method with a one-ulp twin) and
prints, per method and ratio, the lowest and median test Dice and the runs below a floor.

    python benchmarks/demo_robustness.py results/demo_robustness/summary/runs.csv [--floor 0.25]

Exit status 1 if a run ends below the floor (the demo's promise: no run below 0.25 Dice).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_csv")
    p.add_argument("--floor", type=float, default=0.25)
    args = p.parse_args(argv)
    runs = pd.read_csv(args.runs_csv)
    table = runs.groupby(["dataset", "method", "ratio"])["dice"].agg(["count", "min", "median"])
    print(table.round(3).to_string())
    low = runs[runs["dice"] < args.floor]
    print(f"\n{len(runs)} runs, {len(low)} below Dice {args.floor}")
    if len(low):
        print(low[["dataset", "method", "ratio", "seed", "dice"]].to_string(index=False))
    return 1 if len(low) else 0


if __name__ == "__main__":
    sys.exit(main())
