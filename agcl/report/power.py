"""What a grid's seeds can conclude, before it runs: per comparison family of the report
(dataset x ratio x reference x metric), the tests Holm corrects for, the smallest p_holm the
seeds allow, the effect detected with 80 % power and the seeds needed for the config's smallest
effect worth detecting, at the per-seed sd measured in the grid's stats.csv where one exists,
else the config's stated prior (stats.prior_seed_sd). `agcl plan` prints it."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from agcl.config import Layout, comparison_references, expected_runs, noise_twins
from agcl.eval.metric_table import TABLE
from agcl.report.intervals import (
    detectable_delta,
    minimum_seeds_to_conclude,
    seeds_needed,
    smallest_attainable_p_holm,
)

PLANNED_METRICS = {name: (m.word, m.scale, m.unit) for name, m in TABLE.items() if m.compared}


def comparison_families(config: dict) -> list[dict]:
    """The report's comparison families of a config: per dataset x ratio x reference (the
    config's roles), the methods compared with the reference there (twins are not methods) and
    the seeds."""
    twins = noise_twins(config)
    trained: dict[tuple[str, float], set[str]] = {}
    for dataset, method, ratio, _ in expected_runs(config):
        if method not in twins:
            trained.setdefault((dataset, float(ratio)), set()).add(method)
    families = []
    for (dataset, ratio), methods in sorted(trained.items()):
        for reference in comparison_references(config):
            if reference in methods and len(methods) > 1:
                families.append({"dataset": dataset, "ratio": ratio, "reference": reference,
                                 "tests": len(methods) - 1, "seeds": len(config["seeds"])})
    return families


def measured_seed_sd(config: dict, root: str | Path = ".") -> pd.DataFrame:
    """The grid's stats.csv (agcl aggregate) where it exists, else an empty table."""
    path = Layout(config, root).results / "summary" / "stats.csv"
    if not path.exists():
        return pd.DataFrame(columns=["dataset", "ratio", "reference", "metric", "seed_sd"])
    try:
        stats = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["dataset", "ratio", "reference", "metric", "seed_sd"])
    return stats if "seed_sd" in stats else stats.iloc[:0]


def statistics_plan(config: dict, root: str | Path = ".") -> pd.DataFrame:
    """One row per comparison family and metric (Dice in points): tests, seeds, the smallest
    attainable p_holm, the per-seed sd used and where it comes from, the smallest effect detected
    with 80 % power, the seeds needed for the config's smallest effect, and the fewest seeds at
    which the distribution-free sign-flip test can conclude at all."""
    measured = measured_seed_sd(config, root)
    stats_cfg = config.get("stats", {})
    rows = []
    for family in comparison_families(config):
        for metric, (title, scale, unit) in PLANNED_METRICS.items():
            m, seeds = family["tests"], family["seeds"]
            here = measured[(measured["dataset"] == family["dataset"])
                            & (measured["ratio"].round(6) == round(family["ratio"], 6))
                            & (measured["reference"] == family["reference"])
                            & (measured["metric"] == metric)]["seed_sd"].dropna() \
                if len(measured) else pd.Series(dtype=float)
            if len(here):
                sd, source = float(here.median()), f"measured ({len(here)} comparisons)"
            else:
                sd = float(stats_cfg.get("prior_seed_sd", {}).get(metric, math.nan))
                source = "prior"
            effect = float(stats_cfg.get("smallest_effect", {}).get(metric, math.nan))
            floor = smallest_attainable_p_holm(seeds, m)
            detectable = detectable_delta(seeds, m) * sd
            needed = seeds_needed(effect / sd, m) if sd > 0 and effect > 0 else math.nan
            rows.append({
                "dataset": family["dataset"], "labels": f"{100 * family['ratio']:g}%",
                "reference": family["reference"], "metric": title, "tests": m, "seeds": seeds,
                "min p_holm": "-" if math.isnan(floor) else
                ("no floor (t)" if floor == 0 else f"{floor:.3g}"),
                "per-seed sd": f"{sd * scale:.2f}{unit} {source}",
                "detectable (80%)": "none" if math.isinf(detectable) else
                f"{detectable * scale:.2f}{unit}",
                "smallest effect": f"{effect * scale:.2f}{unit}",
                "seeds for it": "-" if math.isnan(needed) else
                ("> 10000" if math.isinf(needed) else str(int(needed))),
                "min seeds (sign-flip)": minimum_seeds_to_conclude(m)["sign_flip"],
            })
    return pd.DataFrame(rows)
