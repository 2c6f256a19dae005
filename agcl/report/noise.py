"""The noise floor: how far a run moves when only its initial weights move by one ulp.

A twin (config `noise_floor.methods`, names from agcl.config.noise_twins) is the same method,
seed and recipe retrained from weights one ulp away. Per dataset x ratio x twin pair x metric,
the run-level difference twin - method (per seed, mean over the cases both evaluated, each case
averaged over foreground classes, as in agcl.report.stats) shows what float/platform noise alone
does at this scale: a difference between methods below it is not evidence of anything.
rms_diff is the root mean square over seeds, max_abs_diff the largest |difference|.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from agcl.report.stats import difference_matrix, format_seed_diffs, seed_case_tables

NOISE_COLUMNS = ["dataset", "ratio", "twin", "method", "metric", "n_seeds", "n_cases",
                 "rms_diff", "max_abs_diff", "seed_diffs", "note"]


def noise_floor(per_case: pd.DataFrame, twins: dict[str, str],
                metrics=("dice", "hd95")) -> pd.DataFrame:
    """One row per dataset x ratio x (twin, method) x metric where both have runs."""
    rows = []
    for metric in metrics if twins and not per_case.empty else ():
        tables = seed_case_tables(per_case, metric)
        for (dataset, ratio, name), twin in tables.items():
            method = twins.get(name)
            if method is None or (dataset, ratio, method) not in tables:
                continue
            diff, notes = difference_matrix(tables[(dataset, ratio, method)], twin)
            per_seed = diff.mean(axis=1) if diff.shape[1] else diff.iloc[:0].mean(axis=1)
            values = per_seed.to_numpy()
            rows.append({
                "dataset": dataset, "ratio": ratio, "twin": name, "method": method,
                "metric": metric, "n_seeds": len(values), "n_cases": diff.shape[1],
                "rms_diff": float(np.sqrt(np.mean(values ** 2))) if len(values) else np.nan,
                "max_abs_diff": float(np.abs(values).max()) if len(values) else np.nan,
                "seed_diffs": format_seed_diffs(per_seed),
                "note": "; ".join(notes or ([] if len(values) else ["no paired runs"])),
            })
    return pd.DataFrame(rows, columns=NOISE_COLUMNS)


def noise_band(noise: pd.DataFrame) -> dict[tuple, float]:
    """{(dataset, ratio, metric): largest |twin - method| over the twin pairs and seeds}: the
    half-width of the band drawn around 0 in the forest plot."""
    if noise.empty:
        return {}
    finite = noise.dropna(subset=["max_abs_diff"])
    return {(d, round(float(r), 6), m): float(v) for (d, r, m), v in
            finite.groupby(["dataset", "ratio", "metric"])["max_abs_diff"].max().items()}
