"""Coverage of the report's intervals over the whole simulation grid of issue 23 (the suite's
tests/test_calibration.py checks a few cells of it; this prints them all).

Cells: seed sd {0.01, 0.03, 0.06} x case sd {0.02, 0.05, 0.10} x residual sd {0.02, 0.05} x
seeds {3, 5, 8, 12} x cases {20, 40}, `--replicates` matrices each (agcl.report.calibration).
Prints CSV: the cell, coverage of the primary (test-set) interval at mu = 0.03, coverage of the
new-patients interval, the p < 0.05 rate with the test-set mean at 0, and mark / bar
disagreements; then the range of each column per seed count.

    python benchmarks/stats_calibration.py --replicates 1000
"""

from __future__ import annotations

import argparse
import itertools
import sys

import pandas as pd

from agcl.report.calibration import Cell, calibrate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = []
    for sd_seed, sd_case, sd_res, seeds, cases in itertools.product(
            (0.01, 0.03, 0.06), (0.02, 0.05, 0.10), (0.02, 0.05), (3, 5, 8, 12), (20, 40)):
        effect = calibrate(Cell(seeds, cases, sd_seed, sd_case, sd_res, mu=0.03),
                           args.replicates)
        null = calibrate(Cell(seeds, cases, sd_seed, sd_case, sd_res, null_on_test_set=True),
                         args.replicates)
        rows.append({"sd_seed": sd_seed, "sd_case": sd_case, "sd_residual": sd_res,
                     "seeds": seeds, "cases": cases,
                     "coverage_test_set": effect["coverage_test_set"],
                     "coverage_new_patients": effect["coverage_new_patients"],
                     "null_rejection": null["rejection_rate"],
                     "disagreements": effect["disagreements"] + null["disagreements"]})
        print(",".join(str(v) for v in rows[-1].values()), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(sys.stdout, index=False)
    ranges = table.groupby("seeds")[["coverage_test_set", "coverage_new_patients",
                                     "null_rejection", "disagreements"]].agg(["min", "max"])
    print(ranges.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
