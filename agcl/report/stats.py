"""Paired per-case comparisons between methods: Wilcoxon signed-rank, Holm, bootstrap CI.

The unit of analysis is a test case. A method's value for a case is the metric averaged over the
foreground classes, then over seeds (`case_means`); two methods are paired on case id within one
dataset x ratio. Differences are always other - reference, so for hd95/asd a negative difference
means the other method is better.

Conventions (stated once, used everywhere):
- Wilcoxon: two-sided, zero differences dropped first (Wilcoxon's convention, scipy's
  zero_method="wilcox"); scipy's method="auto" then uses the exact null distribution for up to 50
  non-zero differences without ties. Fewer than MIN_PAIRS non-zero differences -> p = nan with a
  note: below 6 the smallest attainable two-sided p (2 / 2**n) is above 0.05, so the test could
  never reject.
- Holm step-down within a family (dataset x ratio x reference x metric); untestable comparisons
  (p = nan) are not counted in the family size.
- Bootstrap: BCa (bias-corrected and accelerated) 95% interval of the mean paired difference, via
  scipy.stats.bootstrap. Each comparison gets its own generator seeded from (seed, comparison key),
  so a CI does not change when other methods are added. Fewer than MIN_PAIRS pairs or all
  differences equal -> nan with a note.
- A case whose value is nan for either method is left out of the pair, and the note says so.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pandas as pd
from scipy import stats

MIN_PAIRS = 6
CONFIDENCE_LEVEL = 0.95
CI_METHOD = "BCa"
GROUP = ["dataset", "method", "ratio"]
FAMILY = ["dataset", "ratio", "reference", "metric"]
COMPARISON_COLUMNS = [
    "dataset", "ratio", "reference", "method", "metric", "n_cases", "n_nonzero",
    "reference_mean", "method_mean", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "note",
]


def _require_columns(frame: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; got {list(frame.columns)}")


def _mean_keeping_nan(frame: pd.DataFrame, keys: list[str], column: str) -> pd.Series:
    """Group mean that stays nan when any member is nan (pandas would silently skip it)."""
    grouped = frame.groupby(keys, sort=True)[column]
    has_nan = frame[column].isna().groupby([frame[k] for k in keys], sort=True).any()
    return grouped.mean().mask(has_nan)


def case_means(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per dataset x method x ratio x case: `metric` averaged over foreground classes, then seeds.

    Rows of class 0 (background), if any, are ignored. Returns columns dataset, method, ratio,
    case, <metric>, n_seeds (number of seeds that evaluated the case).
    """
    _require_columns(per_case, [*GROUP, "seed", "case", "class", metric], "per_case")
    foreground = per_case[per_case["class"] != 0]
    per_seed = _mean_keeping_nan(foreground, [*GROUP, "seed", "case"], metric).reset_index()
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


def wilcoxon_p(differences) -> tuple[float, str]:
    """(two-sided Wilcoxon signed-rank p, note); p = nan with the reason when not testable."""
    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    if d.size == 0:
        return np.nan, "no paired cases"
    if nonzero.size == 0:
        return np.nan, "all differences zero: Wilcoxon undefined"
    if nonzero.size < MIN_PAIRS:
        return np.nan, (f"{nonzero.size} non-zero difference(s) < {MIN_PAIRS}: "
                        "Wilcoxon not run (could never reach p < 0.05)")
    result = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method="auto")
    return float(result.pvalue), ""


def bootstrap_ci(differences, n_boot: int, rng: np.random.Generator) -> tuple[float, float, str]:
    """(low, high, note): BCa 95% interval of the mean difference; nan with the reason if none."""
    d = np.asarray(differences, dtype=float)
    if d.size < MIN_PAIRS:
        return np.nan, np.nan, f"{d.size} pair(s) < {MIN_PAIRS}: no bootstrap CI"
    if np.ptp(d) == 0:
        return np.nan, np.nan, "all differences equal: bootstrap CI degenerate"
    with warnings.catch_warnings():
        # A degenerate BCa interval comes back as nan (with a warning): reported in the note.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((d,), np.mean, n_resamples=n_boot, method=CI_METHOD,
                                 confidence_level=CONFIDENCE_LEVEL, vectorized=True, rng=rng)
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return np.nan, np.nan, f"{CI_METHOD} interval undefined for these differences"
    return low, high, ""


def _comparison_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def compare_pair(reference: pd.Series, other: pd.Series, n_boot: int,
                 rng: np.random.Generator) -> dict:
    """Statistics of other - reference over the cases both have (Series indexed by case id)."""
    pairs = pd.concat([reference, other], axis=1, join="inner", keys=["reference", "other"])
    notes = []
    unmatched = len(reference.index.symmetric_difference(other.index))
    if unmatched:
        notes.append(f"{unmatched} case(s) present for one method only: left out")
    undefined = int(pairs.isna().any(axis=1).sum())
    if undefined:
        notes.append(f"{undefined} case(s) with an undefined value: left out")
        pairs = pairs.dropna()
    d = (pairs["other"] - pairs["reference"]).to_numpy()
    p_value, p_note = wilcoxon_p(d)
    ci_low, ci_high, ci_note = bootstrap_ci(d, n_boot, rng)
    notes += [n for n in (p_note, ci_note) if n and n not in notes]
    return {
        "n_cases": int(d.size),
        "n_nonzero": int(np.count_nonzero(d)),
        "reference_mean": float(pairs["reference"].mean()) if d.size else np.nan,
        "method_mean": float(pairs["other"].mean()) if d.size else np.nan,
        "mean_diff": float(d.mean()) if d.size else np.nan,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "note": "; ".join(notes),
    }


def paired_comparisons(per_case: pd.DataFrame, reference_methods=("semi_agcl", "supervised"),
                       metrics=("dice", "hd95"), n_boot: int = 10000,
                       seed: int = 0) -> pd.DataFrame:
    """One row per dataset x ratio x reference x other method x metric (see module docstring).

    Only dataset x ratio blocks where the reference method has results produce rows; a reference
    absent everywhere gives no rows, not an error.
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected a positive number of resamples, got {n_boot}")
    rows = []
    for metric in metrics:
        means = case_means(per_case, metric)
        for (dataset, ratio), block in means.groupby(["dataset", "ratio"], sort=True):
            by_method = {name: g.set_index("case")[metric]
                         for name, g in block.groupby("method", sort=True)}
            for reference in reference_methods:
                if reference not in by_method:
                    continue
                for other, values in by_method.items():
                    if other == reference:
                        continue
                    key = f"{dataset}|{ratio!r}|{reference}|{other}|{metric}"
                    stats_row = compare_pair(by_method[reference], values, int(n_boot),
                                             _comparison_rng(seed, key))
                    rows.append({"dataset": dataset, "ratio": ratio, "reference": reference,
                                 "method": other, "metric": metric, **stats_row})
    frame = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "p_holm"])
    frame.insert(COMPARISON_COLUMNS.index("p_holm"), "p_holm", np.nan)
    for index in frame.groupby(FAMILY, sort=False).groups.values():
        frame.loc[index, "p_holm"] = holm(frame.loc[index, "p_value"].to_numpy())
    return frame.sort_values(FAMILY + ["method"], kind="stable").reset_index(drop=True)
