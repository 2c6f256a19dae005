"""Paired comparisons between methods with the run (seed) as the unit: per comparison, one
interval and one test for this test set, a second interval for new patients, effect sizes, and
what the seeds could have detected.

Design. Two methods trained with the same seed see the same labeled subset, so they are paired
by seed, and within a seed by test case: a seeds x cases matrix of differences (other -
reference; for hd95/asd a negative difference means the other method is better). A method's value
for one seed and case is the metric averaged over the foreground classes (`seed_case_values`).
Only seeds and cases both methods have enter the matrix; the note says what was left out.

Columns of stats.csv (agcl.report.intervals has the maths):
- ci_low, ci_high, p_value, p_holm (`interval` names the procedure): the primary question, the
  mean difference on this test set over labeled subsets and initialisations. Interval and p come
  from one procedure (sign-flip inversion from 6 seeds, t over per-seed means at 3-5, none
  below), so p_value < 0.05 exactly when the interval excludes 0. p_holm: Holm step-down within
  a family (dataset x ratio x reference x metric); untestable comparisons do not count.
- np_low, np_high, np_df: new patients (new labeled subsets, initialisations and test cases),
  variance components with Satterthwaite df; case_floor is the half-width that the case count
  alone sets (no number of seeds narrows it), sd_case the case-to-case sd behind it.
- seeds_won ("k/S": seeds on which the method is better), seed_sd (sd of the per-seed
  differences), delta (mean / seed_sd), median_case_diff (median over cases of the per-case
  difference averaged over seeds: robust to a few failed cases, for HD95 most).
- smallest_effect (config stats.smallest_effect) and verdict (`verdict`).
- family_size, min_p_holm (the smallest p_holm this family could reach at its seeds),
  seeds_needed (seeds for 80 % power to detect smallest_effect at this row's seed_sd under Holm).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from agcl.config import comparison_references
from agcl.eval.metric_table import COMPARED, LOWER_IS_BETTER, TABLE
from agcl.report.intervals import (
    ALPHA,
    fixed_set_interval,
    new_patients_interval,
    seeds_needed,
    smallest_attainable_p_holm,
)

GROUP = ["dataset", "method", "ratio"]
FAMILY = ["dataset", "ratio", "reference", "metric"]
# metrics where a smaller value is better (a negative difference favours the method)
DEFAULT_SMALLEST_EFFECT = {name: m.smallest_effect for name, m in TABLE.items()}
COMPARISON_COLUMNS = [
    "dataset", "ratio", "reference", "method", "metric", "n_seeds", "n_cases", "n_nonzero",
    "reference_mean", "method_mean", "mean_diff", "interval", "ci_low", "ci_high", "p_value",
    "p_holm", "np_low", "np_high", "np_df", "sd_case", "case_floor", "seeds_won", "seed_sd",
    "delta", "median_case_diff", "smallest_effect", "verdict", "family_size", "min_p_holm",
    "seeds_needed", "seed_diffs", "note",
]
# Marks of the forest plot and the table: a mark is "holm" only if its bar excludes 0 (p_holm >=
# p_value), "unadjusted" when the bar excludes 0 but Holm does not reject, else "none".
MARKS = ("holm", "unadjusted", "none")


def _require_columns(frame: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; got {list(frame.columns)}")


def _mean_keeping_nan(frame: pd.DataFrame, keys: list[str], column: str) -> pd.Series:
    """Group mean that stays nan when any member is nan (pandas would silently skip it)."""
    grouped = frame.groupby(keys, sort=True)[column]
    has_nan = frame[column].isna().groupby([frame[k] for k in keys], sort=True).any()
    return grouped.mean().mask(has_nan)


def seed_case_values(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per dataset x method x ratio x seed x case: `metric` averaged over foreground classes
    (class 0, background, ignored; nan if any class is nan)."""
    _require_columns(per_case, [*GROUP, "seed", "case", "class", metric], "per_case")
    foreground = per_case[per_case["class"] != 0]
    return _mean_keeping_nan(foreground, [*GROUP, "seed", "case"], metric).reset_index()


def case_means(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per dataset x method x ratio x case: `metric` averaged over foreground classes, then seeds
    (for figures; the statistics keep the seeds apart). Columns dataset, method, ratio, case,
    <metric>, n_seeds (number of seeds that evaluated the case)."""
    per_seed = seed_case_values(per_case, metric)
    keys = [*GROUP, "case"]
    out = _mean_keeping_nan(per_seed, keys, metric).to_frame()
    out["n_seeds"] = per_seed.groupby(keys, sort=True)["seed"].nunique()
    return out.reset_index()


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values; nan entries stay nan and do not count in the family.

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)), m = number of
    non-nan p-values.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"holm: expected a 1-D sequence of p-values, got shape {p.shape}")
    tested = ~np.isnan(p)
    values = p[tested]
    if ((values < 0) | (values > 1)).any():
        raise ValueError(f"holm: p-values must lie in [0, 1], got {values.tolist()}")
    order = np.argsort(values, kind="stable")
    m = values.size
    scaled = (m - np.arange(m)) * values[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.full(p.shape, np.nan)
    out[tested] = adjusted
    return out


def difference_matrix(reference: pd.DataFrame, other: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(seeds x cases matrix of other - reference, notes on what was left out).

    Both inputs are seeds x cases tables (index seed, columns case). Seeds or cases present for
    one method only are left out, then every case that is undefined (nan) or absent in any kept
    seed, so the matrix is complete (the crossed design the bootstrap resamples).
    """
    notes = []
    seeds = reference.index.intersection(other.index).sort_values()
    only = reference.index.symmetric_difference(other.index)
    if len(only):
        notes.append(f"seed(s) {', '.join(map(str, sorted(only)))} present for one method only: "
                     "left out")
    cases = reference.columns.intersection(other.columns).sort_values()
    unmatched = len(reference.columns.symmetric_difference(other.columns))
    if unmatched:
        notes.append(f"{unmatched} case(s) present for one method only: left out")
    diff = other.loc[seeds, cases] - reference.loc[seeds, cases]
    incomplete = diff.columns[diff.isna().any(axis=0)]
    if len(incomplete):
        notes.append(f"{len(incomplete)} case(s) undefined or not evaluated in some seed: left out")
        diff = diff.drop(columns=incomplete)
    return diff, notes


def format_seed_diffs(diffs: pd.Series) -> str:
    """'seed:value;...' (6 significant digits): readable in the CSV, read back by parse_seed_diffs."""
    return ";".join(f"{seed}:{value:.6g}" for seed, value in diffs.items())


def parse_seed_diffs(text) -> dict[int, float]:
    """The inverse of format_seed_diffs; empty or missing text -> {}."""
    if not isinstance(text, str) or not text:
        return {}
    out = {}
    for item in text.split(";"):
        seed, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"seed_diffs: expected 'seed:value' items, got {item!r} in {text!r}")
        out[int(seed)] = float(value)
    return out



def better_sign(metric: str) -> float:
    """+1 where a larger value is better (dice, jaccard), -1 where smaller is (hd95, asd)."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def matrix_statistics(matrix, metric: str = "dice") -> dict:
    """Every per-comparison number of a complete seeds x cases difference matrix (numpy), with
    the notes of what could not be computed (see the module docstring)."""
    m = np.asarray(matrix, dtype=float)
    n_seeds = m.shape[0] if m.ndim == 2 and m.size else 0
    per_seed = m.mean(axis=1) if n_seeds else np.empty(0)
    notes = []
    if n_seeds and not np.any(per_seed):
        low = high = 0.0
        p_value, procedure = math.nan, ""
        notes.append("all differences zero: no test")
    else:
        low, high, p_value, procedure, note = fixed_set_interval(per_seed)
        notes.append(note)
    new = new_patients_interval(m) if n_seeds else {
        "low": math.nan, "high": math.nan, "df": math.nan, "sd_case": math.nan,
        "case_floor": math.nan, "note": ""}
    if n_seeds >= 3:
        notes.append(new["note"])
    sign = better_sign(metric)
    seed_sd = float(per_seed.std(ddof=1)) if n_seeds > 1 else math.nan
    return {
        "n_seeds": n_seeds,
        "n_cases": int(m.shape[1]) if n_seeds else 0,
        "n_nonzero": int(np.count_nonzero(per_seed)),
        "mean_diff": float(per_seed.mean()) if n_seeds else math.nan,
        "interval": procedure, "ci_low": low, "ci_high": high, "p_value": p_value,
        "np_low": new["low"], "np_high": new["high"], "np_df": new["df"],
        "sd_case": new["sd_case"], "case_floor": new["case_floor"],
        "seeds_won": f"{int(np.sum(sign * per_seed > 0))}/{n_seeds}" if n_seeds else "",
        "seed_sd": seed_sd,
        "delta": float(per_seed.mean()) / seed_sd if n_seeds > 1 and seed_sd > 0 else math.nan,
        "median_case_diff": float(np.median(m.mean(axis=0))) if n_seeds else math.nan,
        "notes": [n for n in notes if n],
    }


def mark(p_holm, ci_low, ci_high) -> str:
    """The mark of a comparison (MARKS): from the primary interval and Holm's p, so its colour
    never contradicts its bar."""
    if pd.isna(ci_low) or pd.isna(ci_high) or ci_low <= 0 <= ci_high:
        return "none"
    return "holm" if not pd.isna(p_holm) and p_holm < ALPHA else "unadjusted"


def verdict(metric: str, ci_low, ci_high, p_holm, smallest_effect) -> str:
    """One phrase per row, the method against the reference (see the module docstring):
    better / worse (Holm), ... not after Holm, negligible (interval within +-smallest_effect),
    inconclusive (interval spans 0 and the smallest effect), not significant (no smallest
    effect configured), no interval."""
    state = mark(p_holm, ci_low, ci_high)
    if pd.isna(ci_low) or pd.isna(ci_high):
        return "no interval"
    effect = None if pd.isna(smallest_effect) else float(smallest_effect)
    if state != "none":
        word = "better" if better_sign(metric) * ci_low > 0 else "worse"
        text = word if state == "holm" else f"{word}, not after Holm"
        if effect is not None and max(abs(ci_low), abs(ci_high)) < effect:
            text += ", below the smallest effect"
        return text
    if effect is None:
        return "not significant"
    return "negligible" if -effect < ci_low and ci_high < effect else "inconclusive"


def compare_pair(reference: pd.DataFrame, other: pd.DataFrame, metric: str = "dice") -> dict:
    """Statistics of other - reference (both seeds x cases tables; see the module docstring)."""
    diff, notes = difference_matrix(reference, other)
    if diff.shape[1] == 0:
        diff = diff.iloc[:0]  # no complete case: no seed either
    numbers = matrix_statistics(diff.to_numpy(), metric)
    notes += [n for n in numbers.pop("notes") if n not in notes]
    kept = (diff.index, diff.columns)
    empty = diff.size == 0
    return {
        **numbers,
        "reference_mean": np.nan if empty else float(reference.loc[kept].to_numpy().mean()),
        "method_mean": np.nan if empty else float(other.loc[kept].to_numpy().mean()),
        "seed_diffs": format_seed_diffs(diff.mean(axis=1)),
        "note": "; ".join(notes),
    }


def seed_case_tables(per_case: pd.DataFrame, metric: str) -> dict[tuple, pd.DataFrame]:
    """{(dataset, ratio, method): seeds x cases table of `metric`} (see seed_case_values)."""
    values = seed_case_values(per_case, metric)
    return {key: g.pivot(index="seed", columns="case", values=metric)
            for key, g in values.groupby(["dataset", "ratio", "method"], sort=True)}


def _seeds_needed_for(effect, seed_sd, family_size) -> float:
    if pd.isna(effect) or pd.isna(seed_sd) or seed_sd <= 0:
        return math.nan
    return float(seeds_needed(float(effect) / float(seed_sd), max(int(family_size), 1)))


def paired_comparisons(per_case: pd.DataFrame, reference_methods=None,
                       metrics=COMPARED, smallest_effect: dict | None = None
                       ) -> pd.DataFrame:
    """One row per dataset x ratio x reference x other method x metric (see module docstring).

    reference_methods: the grid's agcl.config.comparison_references(config) (its method of
    interest and its lower bound); None: those of the default roles. smallest_effect: config
    stats.smallest_effect ({metric: effect}); None: DEFAULT_SMALLEST_EFFECT. Only dataset x ratio
    blocks where the reference method has results produce rows; a reference absent everywhere
    gives no rows, not an error.
    """
    if reference_methods is None:
        reference_methods = comparison_references()
    effects = DEFAULT_SMALLEST_EFFECT if smallest_effect is None else smallest_effect
    rows = []
    for metric in metrics:
        tables = seed_case_tables(per_case, metric)
        blocks = sorted({(d, r) for d, r, _ in tables})
        for dataset, ratio in blocks:
            by_method = {m: t for (d, r, m), t in tables.items() if (d, r) == (dataset, ratio)}
            for reference in reference_methods:
                if reference not in by_method:
                    continue
                for other, values in by_method.items():
                    if other == reference:
                        continue
                    rows.append({"dataset": dataset, "ratio": ratio, "reference": reference,
                                 "method": other, "metric": metric,
                                 "smallest_effect": effects.get(metric, np.nan),
                                 **compare_pair(by_method[reference], values, metric)})
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    for index in frame.groupby(FAMILY, sort=False).groups.values():
        p = frame.loc[index, "p_value"].to_numpy(dtype=float)
        size = int(np.sum(~np.isnan(p)))
        frame.loc[index, "p_holm"] = holm(p)
        frame.loc[index, "family_size"] = size
        frame.loc[index, "min_p_holm"] = [smallest_attainable_p_holm(int(n), size)
                                          for n in frame.loc[index, "n_seeds"]]
    if len(frame):
        frame["seeds_needed"] = [_seeds_needed_for(e, sd, m) for e, sd, m in
                                 zip(frame["smallest_effect"], frame["seed_sd"],
                                     frame["family_size"])]
        frame["verdict"] = [verdict(*args) for args in
                            zip(frame["metric"], frame["ci_low"], frame["ci_high"],
                                frame["p_holm"], frame["smallest_effect"])]
    return frame.sort_values(FAMILY + ["method"], kind="stable").reset_index(drop=True)
