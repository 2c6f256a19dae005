"""Run-to-run spread at a fixed labeled subset: what the one-ulp twins measure.

A twin (config `noise_floor.methods`, names from agcl.config.noise_twins) is the same method,
seed, labeled subset and recipe retrained from weights one ulp away: a fresh draw of the
training's chaos (initialisation-scale perturbations grow through thousands of steps), not float
noise to subtract from a difference. Its variance is already part of the seed-to-seed variance
that every interval of agcl.report.stats covers, so nothing here is a decision rule.

Per dataset x ratio x (twin, method) x metric, from the per-seed differences t_s = twin - method
(mean over the cases both evaluated, each case averaged over foreground classes, as in
agcl.report.stats):
- rms_diff: sqrt(mean t_s^2), on the scale of the per-seed differences between two methods (the
  grey dots of the forest plot): what two runs differing only by chaos give;
- se_of_mean: rms_diff / sqrt(S), on the scale of a mean over S seeds;
- chaos_sd: rms_diff / sqrt(2), one run's chaos (each of the two runs has its own);
- seed_sd: the standard deviation over seeds of the method's own per-run means on the same cases
  (chaos plus the choice of labeled subset);
- chaos_share: chaos_sd^2 / seed_sd^2, capped at 1: the share of the method's seed-to-seed
  variance that optimisation chaos alone explains (the rest: which cases were labeled). With few
  seeds both variances are rough; the share is a description, not an estimate with an interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from agcl.eval.metric_table import COMPARED
from agcl.report.stats import difference_matrix, format_seed_diffs, seed_case_tables

RUN_TO_RUN_COLUMNS = ["dataset", "ratio", "twin", "method", "metric", "n_seeds", "n_cases",
                      "rms_diff", "se_of_mean", "chaos_sd", "seed_sd", "chaos_share",
                      "seed_diffs", "note"]


def run_to_run(per_case: pd.DataFrame, twins: dict[str, str],
               metrics=COMPARED) -> pd.DataFrame:
    """One row per dataset x ratio x (twin, method) x metric where both have runs."""
    rows = []
    for metric in metrics if twins and not per_case.empty else ():
        tables = seed_case_tables(per_case, metric)
        for (dataset, ratio, name), twin in tables.items():
            method = twins.get(name)
            if method is None or (dataset, ratio, method) not in tables:
                continue
            own = tables[(dataset, ratio, method)]
            diff, notes = difference_matrix(own, twin)
            per_seed = diff.mean(axis=1) if diff.shape[1] else diff.iloc[:0].mean(axis=1)
            values = per_seed.to_numpy()
            n = len(values)
            rms = float(np.sqrt(np.mean(values ** 2))) if n else math.nan
            method_runs = own.loc[diff.index, diff.columns].mean(axis=1).to_numpy()
            seed_sd = float(np.std(method_runs, ddof=1)) if n > 1 else math.nan
            chaos_sd = rms / math.sqrt(2) if n else math.nan
            share = (min(1.0, chaos_sd ** 2 / seed_sd ** 2)
                     if n > 1 and seed_sd > 0 else math.nan)
            rows.append({
                "dataset": dataset, "ratio": ratio, "twin": name, "method": method,
                "metric": metric, "n_seeds": n, "n_cases": diff.shape[1],
                "rms_diff": rms, "se_of_mean": rms / math.sqrt(n) if n else math.nan,
                "chaos_sd": chaos_sd, "seed_sd": seed_sd, "chaos_share": share,
                "seed_diffs": format_seed_diffs(per_seed),
                "note": "; ".join(notes or ([] if n else ["no paired runs"])),
            })
    return pd.DataFrame(rows, columns=RUN_TO_RUN_COLUMNS)
