"""Paired comparisons between methods with the run (seed) as the unit: two-way bootstrap CI,
exact sign-flip test over seeds, Holm.

Design. Two methods trained with the same seed see the same labeled subset, so they are paired
by seed, and within a seed by test case: a seeds x cases matrix of differences (other -
reference; for hd95/asd a negative difference means the other method is better). A method's value
for one seed and case is the metric averaged over the foreground classes (`seed_case_values`).
Only seeds and cases both methods have enter the matrix; the note says what was left out.

Which variance the numbers cover:
- The CI covers run-to-run variance (seeds: initialisation, batch order and labeled subset, as far
  as the seeds vary them) and the sampling of test cases; the design is crossed (every seed is
  evaluated on every case), so the bootstrap resamples seeds and cases independently and takes
  the mean of the resampled submatrix (percentile 95 % interval).
- The p value tests over seeds only: an exact two-sided sign-flip permutation test of the mean of
  the per-seed mean differences (all 2**n sign patterns, scipy.stats.permutation_test; Monte Carlo
  over MC_SIGN_PATTERNS patterns beyond EXACT_MAX_SEEDS seeds). Under "no difference" each seed's
  difference is as likely + as -: the test's unit is the run, so a difference that flips sign from
  seed to seed is not significant however many cases there are.
- Neither covers float/platform noise (see agcl.report.noise and the noise floor) nor the choice
  of labeled subset beyond what the seeds vary.

Minimums (stated in the note of each affected row):
- Test: fewer than MIN_SEEDS_TEST seeds -> p = nan. The smallest attainable two-sided p is
  2 / 2**n, above 0.05 for n < 6, so the test could never reject.
- CI: fewer than MIN_SEEDS_CI seeds -> no CI. Resampling 2 seeds gives 3 distinct seed sets
  ({a, a}, {a, b}, {b, b}): the "interval" only spans the two seeds' own means, whatever the
  run-to-run variance is, which is not a 95 % interval. From 3 seeds the CI is given; below
  MIN_SEEDS_TEST it is flagged approximate (a bootstrap over n units underestimates the variance
  of a mean by (n - 1) / n and has few distinct resamples).
- Holm step-down within a family (dataset x ratio x reference x metric); untestable comparisons
  (p = nan) do not count in the family size.
- Each comparison's generator is seeded from (seed, comparison key), so a CI does not change when
  other methods are added.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
from scipy import stats

from agcl.config import comparison_references

MIN_SEEDS_TEST = 6
MIN_SEEDS_CI = 3
EXACT_MAX_SEEDS = 16  # 2**16 sign patterns enumerated; beyond, Monte Carlo
MC_SIGN_PATTERNS = 100_000
CONFIDENCE_LEVEL = 0.95
GROUP = ["dataset", "method", "ratio"]
FAMILY = ["dataset", "ratio", "reference", "metric"]
COMPARISON_COLUMNS = [
    "dataset", "ratio", "reference", "method", "metric", "n_seeds", "n_cases", "n_nonzero",
    "reference_mean", "method_mean", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
    "seed_diffs", "note",
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


def _counts(indices: np.ndarray, size: int) -> np.ndarray:
    """(B, k) resampled indices in [0, size) -> (B, size) how often each index was drawn."""
    rows = indices.shape[0]
    flat = (indices + size * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size).astype(float)


def two_way_resample_means(matrix, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resampled submatrices: seeds (rows) and cases (columns) each drawn with
    replacement, independently. The mean of M[s_i, c_j] over i, j equals
    (w_s @ M @ w_c) / (S C) with w the draw counts, so no submatrix is materialised."""
    m = np.asarray(matrix, dtype=float)
    n_seeds, n_cases = m.shape
    w_seeds = _counts(rng.integers(0, n_seeds, size=(n_boot, n_seeds)), n_seeds)
    w_cases = _counts(rng.integers(0, n_cases, size=(n_boot, n_cases)), n_cases)
    return np.einsum("bs,sc,bc->b", w_seeds, m, w_cases, optimize=True) / (n_seeds * n_cases)


def two_way_bootstrap_ci(matrix, n_boot: int, rng: np.random.Generator) -> tuple[float, float, str]:
    """(low, high, note): percentile 95 % interval of the matrix mean; nan with the reason if the
    matrix has too few seeds (see the module docstring)."""
    m = np.asarray(matrix, dtype=float)
    n_seeds = m.shape[0]
    if m.size == 0:
        return np.nan, np.nan, "no paired runs"
    if n_seeds < MIN_SEEDS_CI:
        return np.nan, np.nan, (f"{n_seeds} seed(s) < {MIN_SEEDS_CI}: no CI (a bootstrap over so "
                                "few runs only spans their own means)")
    means = two_way_resample_means(m, n_boot, rng)
    tail = 100 * (1 - CONFIDENCE_LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    note = "" if n_seeds >= MIN_SEEDS_TEST else (
        f"CI over {n_seeds} seeds: approximate (too few runs to estimate their spread well)")
    return float(low), float(high), note


def sign_flip_p(seed_diffs, rng: np.random.Generator | None = None) -> tuple[float, str]:
    """(two-sided sign-flip permutation p of the mean per-seed difference, note); nan with the
    reason when not testable. Exact for up to EXACT_MAX_SEEDS seeds."""
    d = np.asarray(seed_diffs, dtype=float)
    n = d.size
    if n == 0:
        return np.nan, "no paired runs"
    if n < MIN_SEEDS_TEST:
        return np.nan, (f"{n} seed(s) < {MIN_SEEDS_TEST}: no test (smallest attainable p "
                        f"2/2^{n} = {2 / 2 ** n:.3g} > 0.05)")
    if not np.any(d):
        return np.nan, "all differences zero: no test"
    exact = n <= EXACT_MAX_SEEDS
    result = stats.permutation_test(
        (d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
        vectorized=True, alternative="two-sided",
        n_resamples=np.inf if exact else MC_SIGN_PATTERNS, rng=rng)
    note = "" if exact else f"p by Monte Carlo over {MC_SIGN_PATTERNS} sign patterns"
    return float(result.pvalue), note


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


def _comparison_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def compare_pair(reference: pd.DataFrame, other: pd.DataFrame, n_boot: int,
                 rng: np.random.Generator) -> dict:
    """Statistics of other - reference (both seeds x cases tables; see the module docstring)."""
    diff, notes = difference_matrix(reference, other)
    if diff.shape[1] == 0:
        diff = diff.iloc[:0]  # no complete case: no seed either
    per_seed = diff.mean(axis=1)
    p_value, p_note = sign_flip_p(per_seed.to_numpy(), rng)
    ci_low, ci_high, ci_note = two_way_bootstrap_ci(diff.to_numpy(), n_boot, rng)
    notes += [n for n in (p_note, ci_note) if n and n not in notes]
    kept = (diff.index, diff.columns)
    empty = diff.size == 0
    return {
        "n_seeds": int(diff.shape[0]),
        "n_cases": int(diff.shape[1]),
        "n_nonzero": int(np.count_nonzero(per_seed.to_numpy())),
        "reference_mean": np.nan if empty else float(reference.loc[kept].to_numpy().mean()),
        "method_mean": np.nan if empty else float(other.loc[kept].to_numpy().mean()),
        "mean_diff": np.nan if empty else float(diff.to_numpy().mean()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "seed_diffs": format_seed_diffs(per_seed),
        "note": "; ".join(notes),
    }


def seed_case_tables(per_case: pd.DataFrame, metric: str) -> dict[tuple, pd.DataFrame]:
    """{(dataset, ratio, method): seeds x cases table of `metric`} (see seed_case_values)."""
    values = seed_case_values(per_case, metric)
    return {key: g.pivot(index="seed", columns="case", values=metric)
            for key, g in values.groupby(["dataset", "ratio", "method"], sort=True)}


def paired_comparisons(per_case: pd.DataFrame, reference_methods=None,
                       metrics=("dice", "hd95"), n_boot: int = 10000,
                       seed: int = 0) -> pd.DataFrame:
    """One row per dataset x ratio x reference x other method x metric (see module docstring).

    reference_methods: the grid's agcl.config.comparison_references(config) (its method of
    interest and its lower bound); None: those of the default roles. Only dataset x ratio blocks
    where the reference method has results produce rows; a reference absent everywhere gives no
    rows, not an error.
    """
    if reference_methods is None:
        reference_methods = comparison_references()
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected a positive number of resamples, got {n_boot}")
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
