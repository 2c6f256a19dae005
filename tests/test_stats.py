"""Paired statistics with the run (seed) as the unit, against hand-computed values on small,
hand-built per-case tables, scipy's own tests and brute-force enumeration (the calibration of the
intervals is tests/test_calibration.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from agcl.report.intervals import (
    T_INTERVAL,
    detectable_delta,
    fixed_set_interval,
    mean_squares,
    minimum_seeds_to_conclude,
    new_patients_interval,
    seeds_needed,
    sign_flip_interval,
    sign_flip_p_at,
    sign_patterns,
    smallest_attainable_p_holm,
    t_interval,
    t_power,
)
from agcl.report.stats import (
    COMPARISON_COLUMNS,
    case_means,
    difference_matrix,
    holm,
    mark,
    paired_comparisons,
    parse_seed_diffs,
    verdict,
)

DIFFS = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]  # 8 positive, distinct
REF_DICE = [0.50, 0.61, 0.72, 0.55, 0.66, 0.77, 0.58, 0.69]
# The example: per-seed mean differences of both signs, mean +0.01375.
SEED_EFFECTS = [0.25, -0.25, 0.19, -0.19, 0.25, -0.22, 0.10, -0.02]


def rows(method, values, *, dataset="la", ratio=0.1, seed=0, cls=1, metric="dice", cases=None):
    cases = cases or [f"c{i}" for i in range(len(values))]
    return [{"dataset": dataset, "method": method, "ratio": ratio, "seed": seed, "case": c,
             "class": cls, metric: v} for c, v in zip(cases, values)]


def table(*row_lists, metric="dice"):
    frame = pd.DataFrame([r for rs in row_lists for r in rs])
    if metric == "dice" and "hd95" not in frame:
        frame["hd95"] = 1.0
    return frame


def grid(method, matrix, seeds=None, **kw):
    """Rows of a seeds x cases matrix of Dice values (seed s = row s unless `seeds` says)."""
    matrix = np.asarray(matrix, dtype=float)
    seeds = range(len(matrix)) if seeds is None else seeds
    return [r for s, values in zip(seeds, matrix) for r in rows(method, values, seed=s, **kw)]


def seed_effect_tables(per_seed_diffs, n_cases=20):
    """Reference 0.6 + small case pattern; other = reference + per-seed effect + a zero-mean case
    pattern, so each seed's mean difference is exactly the given value."""
    case_pattern = 0.01 * np.where(np.arange(n_cases) % 2 == 0, 1.0, -1.0)
    ref = 0.6 + 0.02 * np.sin(np.arange(n_cases))[None, :] + np.zeros((len(per_seed_diffs), 1))
    other = ref + np.asarray(per_seed_diffs)[:, None] + case_pattern[None, :]
    return table(grid("supervised", ref), grid("semi_agcl", other))


def one_row(per_case, **kw):
    out = paired_comparisons(per_case, reference_methods=("supervised",), metrics=("dice",), **kw)
    assert len(out) == 1
    return out.iloc[0]


def brute_force_sign_flip(d):
    d = np.asarray(d)
    observed = abs(d.mean())
    flips = [abs((np.array(s) * d).mean()) for s in itertools.product([1, -1], repeat=d.size)]
    return np.mean([f >= observed - 1e-12 for f in flips])


# --- holm ---

def test_holm_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, monotone
    np.testing.assert_allclose(holm([0.02]), [0.02])


def test_holm_ignores_nan_in_family_size():
    out = holm([0.01, np.nan, 0.04])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.04])
    assert holm([]).size == 0


def test_holm_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


# --- sign-flip test over seeds and the interval that inverts it ---

def sign_flip_p(d):
    d = np.asarray(d, dtype=float)
    return sign_flip_p_at(d, 0.0, sign_patterns(d.size))


def test_sign_flip_exact_hand_value():
    # |d| = 1..6 (tenths), one negative: sum 9 of 21. A pattern flips a subset of sum k; |21-2k|
    # >= 9 <=> k <= 6 or k >= 15. Subsets of {1..6} with sum <= 6: 1+1+1+2+2+3+4 = 14, and 14 by
    # symmetry with sum >= 15 -> p = 28/64.
    assert sign_flip_p(np.array([1, 2, 3, 4, 5, -6]) / 10) == pytest.approx(28 / 64)
    # every seed the same sign: only the all-+ and all-- patterns are as extreme -> 2 / 2**n
    for n in (6, 8, 11):
        assert sign_flip_p(np.full(n, 0.03)) == pytest.approx(2 / 2 ** n)


def test_sign_flip_matches_brute_force_and_scipy():
    d = np.random.default_rng(4).normal(0.01, 0.05, size=9)
    assert sign_flip_p(d) == pytest.approx(brute_force_sign_flip(d))
    scipy_p = scipy_stats.permutation_test(
        (d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
        n_resamples=np.inf).pvalue
    assert sign_flip_p(d) == pytest.approx(scipy_p)


@pytest.mark.parametrize("n", [6, 8, 12])
def test_sign_flip_interval_is_the_set_the_test_accepts(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        d = rng.normal(0.01, 0.03, size=n)
        low, high, p0 = sign_flip_interval(d)
        patterns = sign_patterns(n)
        assert low < d.mean() < high
        # the ends are accepted, the next floats outward are not: the exact closure
        assert sign_flip_p_at(d, low, patterns) >= 0.05 > sign_flip_p_at(
            d, np.nextafter(low, -np.inf), patterns)
        assert sign_flip_p_at(d, high, patterns) >= 0.05 > sign_flip_p_at(
            d, np.nextafter(high, np.inf), patterns)
        # a grid of shifts: accepted exactly inside
        for theta in np.linspace(d.min() - 0.05, d.max() + 0.05, 61):
            assert (sign_flip_p_at(d, theta, patterns) >= 0.05) == (low <= theta <= high)
        assert p0 == pytest.approx(brute_force_sign_flip(d))
        assert (p0 < 0.05) == (not low <= 0 <= high)


def test_sign_flip_monte_carlo_beyond_exact_limit():
    d = np.random.default_rng(0).normal(0.02, 0.01, size=20)
    low, high, p, procedure, _ = fixed_set_interval(d)
    assert procedure == "sign-flip inversion (Monte Carlo)" and p < 1e-3
    assert low < d.mean() < high and low > 0  # exact 2 / 2**20: all positive


# --- t interval (3-5 seeds) ---

@pytest.mark.parametrize("d", [[0.05, 0.01, 0.03], [0.1, -0.05, 0.02, 0.04, 0.0]])
def test_t_interval_and_test_are_scipys(d):
    low, high, p = t_interval(d)
    result = scipy_stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(0.95)
    assert (low, high, p) == pytest.approx((ci.low, ci.high, result.pvalue))
    assert fixed_set_interval(d)[3] == T_INTERVAL


def test_too_few_seeds_give_no_interval():
    for d in ([], [0.1], [0.1, 0.2]):
        low, high, p, procedure, _ = fixed_set_interval(d)
        assert math.isnan(low) and math.isnan(high) and math.isnan(p) and procedure == ""
    assert "2 seed(s) < 3: no interval" in fixed_set_interval([0.1, 0.2])[4]


# --- new patients: variance components ---

def test_mean_squares_partition_the_total():
    m = np.random.default_rng(3).normal(size=(4, 7))
    ms_seed, ms_case, ms_res = mean_squares(m)
    total = np.sum((m - m.mean()) ** 2)
    assert ms_seed * 3 + ms_case * 6 + ms_res * 18 == pytest.approx(total)
    # a hand value: seeds x cases [[1, 2], [3, 6], [5, 7]]: rows 1.5 4.5 6, cols 3 5, grand 4
    ms_seed, ms_case, ms_res = mean_squares([[1, 2], [3, 6], [5, 7]])
    assert ms_seed == pytest.approx(2 * (2.5 ** 2 + 0.5 ** 2 + 2 ** 2) / 2)  # 10.5
    assert ms_case == pytest.approx(3 * (1 + 1) / 1)  # 6
    # residuals: row 1: (1-1.5-3+4, 2-1.5-5+4) = (0.5, -0.5); row 2 (-0.5, 0.5); row 3 (0, 0)
    assert ms_res == pytest.approx(1.0 / 2)


def test_new_patients_interval_by_hand():
    m = np.array([[1, 2], [3, 6], [5, 7]], dtype=float)
    out = new_patients_interval(m)
    combined = 10.5 + 6 - 0.5  # MS_seed + MS_case - MS_res
    df = combined ** 2 / (10.5 ** 2 / 2 + 6 ** 2 / 1 + 0.5 ** 2 / 2)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(combined / 6)
    assert out["df"] == pytest.approx(df)
    assert (out["low"], out["high"]) == pytest.approx((4 - half, 4 + half))
    assert out["sd_case"] == pytest.approx(math.sqrt((6 - 0.5) / 3))
    assert out["case_floor"] == pytest.approx(1.959964 * out["sd_case"] / math.sqrt(2), rel=1e-6)
    # more seeds of the same case pattern do not narrow it below the case floor
    wide = new_patients_interval(np.tile([0.0, 0.2, -0.2, 0.1], (40, 1))
                                 + np.random.default_rng(0).normal(0, 1e-3, (40, 4)))
    assert wide["high"] - wide["low"] > 2 * wide["case_floor"]
    assert "needs 3" in new_patients_interval(m[:2])["note"]


# --- planning ---

def test_power_and_seeds_needed():
    # one-sample t test at 80 % power: the values of any power table
    assert [seeds_needed(d) for d in (1.0, 0.75, 0.5)] == [10, 16, 34]
    assert [seeds_needed(d, family_size=9) for d in (1.0, 0.75, 0.5)] == [17, 28, 57]
    # the t-power against a simulation of the t test itself
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=(20_000, 10))
    simulated = np.mean(scipy_stats.ttest_1samp(x, 0.0, axis=1).pvalue < 0.05)
    assert t_power(1.0, 10) == pytest.approx(simulated, abs=0.015)
    assert math.isinf(seeds_needed(0.0)) and seeds_needed(0.1) == pytest.approx(787, abs=3)


def test_attainable_p_and_minimum_seeds():
    assert smallest_attainable_p_holm(8, 7) == pytest.approx(14 / 256)
    assert smallest_attainable_p_holm(4, 9) == 0.0  # the t test has no floor
    assert math.isnan(smallest_attainable_p_holm(2, 1))
    assert minimum_seeds_to_conclude(9) == {"t": 3, "sign_flip": 9}  # 18/512 < 0.05
    assert minimum_seeds_to_conclude(1)["sign_flip"] == 6
    assert math.isinf(detectable_delta(8, 7))  # 8 seeds, 7 tests: no row can be significant
    assert detectable_delta(10, 1) == pytest.approx(1.0, abs=0.01)


# --- marks and verdicts ---

def test_marks_follow_the_bar():
    assert mark(0.01, 0.1, 0.2) == "holm"
    assert mark(0.2, 0.1, 0.2) == "unadjusted"  # bar clears 0, Holm does not reject
    assert mark(0.01, -0.1, 0.2) == "none"  # a bar across 0 is never coloured
    assert mark(np.nan, np.nan, np.nan) == "none"


def test_verdicts():
    assert verdict("dice", 0.02, 0.04, 0.01, 0.01) == "better"
    assert verdict("hd95", 0.5, 2.0, 0.01, 1.0) == "worse"  # a larger HD95 is worse
    assert verdict("dice", 0.001, 0.004, 0.01, 0.01) == "better, below the smallest effect"
    assert verdict("dice", -0.04, -0.02, 0.2, 0.01) == "worse, not after Holm"
    assert verdict("dice", -0.005, 0.008, 0.5, 0.01) == "negligible"
    assert verdict("dice", -0.005, 0.03, 0.5, 0.01) == "inconclusive"
    assert verdict("dice", -0.005, 0.03, 0.5, np.nan) == "not significant"
    assert verdict("dice", np.nan, np.nan, np.nan, 0.01) == "no interval"


# --- case_means (figures) and difference_matrix ---

def test_case_means_averages_classes_then_seeds():
    per_case = table(
        rows("supervised", [0.2, 0.4], seed=0, cls=1), rows("supervised", [0.6, 0.8], seed=0, cls=2),
        rows("supervised", [0.4, 0.4], seed=1, cls=1), rows("supervised", [1.0, 0.0], seed=1, cls=2),
        [{"dataset": "la", "method": "supervised", "ratio": 0.1, "seed": 0, "case": "c0",
          "class": 0, "dice": 0.0, "hd95": 1.0}],  # background: ignored
    )
    raw = case_means(per_case)
    assert list(raw.columns) == ["dataset", "method", "ratio", "case", "dice", "n_seeds"]
    out = raw.set_index("case")
    # c0: seed0 (0.2+0.6)/2 = 0.4, seed1 (0.4+1.0)/2 = 0.7 -> 0.55
    # c1: seed0 (0.4+0.8)/2 = 0.6, seed1 (0.4+0.0)/2 = 0.2 -> 0.4
    assert out.loc["c0", "dice"] == pytest.approx(0.55)
    assert out.loc["c1", "dice"] == pytest.approx(0.4)
    assert out["n_seeds"].tolist() == [2, 2]


def test_case_means_keeps_nan_and_names_missing_columns():
    per_case = table(rows("supervised", [0.2, np.nan], cls=1), rows("supervised", [0.4, 0.6], cls=2))
    out = case_means(per_case).set_index("case")
    assert out.loc["c0", "dice"] == pytest.approx(0.3)
    assert math.isnan(out.loc["c1", "dice"])
    with pytest.raises(ValueError, match=r"per_case: missing column\(s\) \['asd'\]"):
        case_means(per_case, "asd")


def test_difference_matrix_keeps_common_complete_part():
    ref = pd.DataFrame([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7], [0.1, 0.1, 0.1]], index=[0, 1, 2],
                       columns=["a", "b", "c"])
    other = pd.DataFrame([[0.6, np.nan, 0.9, 0.0], [0.7, 0.6, 0.8, 0.0]], index=[0, 1],
                         columns=["a", "b", "c", "d"])
    diff, notes = difference_matrix(ref, other)
    assert diff.index.tolist() == [0, 1] and diff.columns.tolist() == ["a", "c"]
    np.testing.assert_allclose(diff.to_numpy(), [[0.1, 0.2], [0.2, 0.1]])
    assert notes == ["seed(s) 2 present for one method only: left out",
                     "1 case(s) present for one method only: left out",
                     "1 case(s) undefined or not evaluated in some seed: left out"]


# --- paired_comparisons ---

def test_seed_effects_of_both_signs_are_not_significant():
    row = one_row(seed_effect_tables(SEED_EFFECTS))
    assert row["n_seeds"] == 8 and row["n_cases"] == 20
    assert row["mean_diff"] == pytest.approx(0.01375)
    assert row["p_value"] == pytest.approx(brute_force_sign_flip(SEED_EFFECTS))
    assert row["p_value"] > 0.5  # the old per-case design gave p_holm 7e-5
    assert row["interval"] == "sign-flip inversion (exact)"
    assert row["ci_low"] < 0 < row["ci_high"] and row["ci_high"] - row["ci_low"] > 0.15
    assert row["seeds_won"] == "4/8" and row["verdict"] == "inconclusive"
    assert row["delta"] == pytest.approx(np.mean(SEED_EFFECTS) / np.std(SEED_EFFECTS, ddof=1))
    # the case pattern is +-0.01 around each seed's effect: the per-case median is the mean's
    assert row["median_case_diff"] == pytest.approx(0.01375, abs=0.0101)
    diffs = parse_seed_diffs(row["seed_diffs"])
    assert list(diffs) == list(range(8))
    np.testing.assert_allclose(list(diffs.values()), SEED_EFFECTS, atol=1e-6)


def test_effect_on_every_seed_is_significant_with_exact_p():
    effects = [0.05, 0.04, 0.06, 0.05, 0.03, 0.07, 0.05]
    row = one_row(seed_effect_tables(effects))
    assert row["p_value"] == pytest.approx(2 / 2 ** 7) and row["p_holm"] == pytest.approx(2 / 128)
    assert 0 < row["ci_low"] < np.mean(effects) < row["ci_high"] and row["note"] == ""
    assert row["reference_mean"] == pytest.approx(0.6 + 0.02 * np.sin(np.arange(20)).mean())
    assert row["seeds_won"] == "7/7" and row["verdict"] == "better"
    assert row["np_low"] < row["ci_low"] and row["np_high"] > row["ci_high"]  # new cases too
    assert (row["family_size"], row["min_p_holm"]) == (1, pytest.approx(2 / 128))


def test_three_to_five_seeds_give_a_t_interval_and_its_p():
    effects = [0.05, 0.04, 0.06, 0.05, 0.03]
    row = one_row(seed_effect_tables(effects))
    result = scipy_stats.ttest_1samp(effects, 0.0)
    assert row["interval"] == T_INTERVAL and row["p_value"] == pytest.approx(result.pvalue)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(result.confidence_interval()))
    assert row["p_holm"] < 0.05 and row["verdict"] == "better"  # no floor at 5 seeds
    two = one_row(seed_effect_tables([0.05, 0.04]))
    assert math.isnan(two["ci_low"]) and math.isnan(two["p_value"])
    assert "2 seed(s) < 3: no interval and no test" in two["note"]
    assert two["mean_diff"] == pytest.approx(0.045) and two["verdict"] == "no interval"


def test_missing_seeds_and_cases_are_left_out_with_note():
    ref = 0.6 + np.zeros((7, 6))
    other = ref[:6, :5] + 0.02
    other[3, 0] = np.nan  # undefined in one seed: the whole case goes
    per_case = table(grid("supervised", ref), grid("semi_agcl", other))
    row = one_row(per_case)
    assert (row["n_seeds"], row["n_cases"]) == (6, 4)
    assert "seed(s) 6 present for one method only" in row["note"]
    assert "1 case(s) present for one method only" in row["note"]
    assert "1 case(s) undefined or not evaluated in some seed" in row["note"]
    assert row["mean_diff"] == pytest.approx(0.02) and row["p_value"] == pytest.approx(2 / 64)


def test_both_directions_and_columns():
    out = paired_comparisons(seed_effect_tables([0.05, 0.04, 0.06, 0.05, 0.03, 0.07]),
                             metrics=("dice",))
    assert list(out.columns) == COMPARISON_COLUMNS and len(out) == 2
    fwd = out[out["reference"] == "supervised"].iloc[0]
    back = out[out["reference"] == "semi_agcl"].iloc[0]
    assert back["mean_diff"] == pytest.approx(-fwd["mean_diff"])
    assert back["p_value"] == pytest.approx(fwd["p_value"])
    assert back["ci_low"] == pytest.approx(-fwd["ci_high"])  # the inverted test is symmetric
    assert back["np_low"] == pytest.approx(-fwd["np_high"])


def test_results_are_deterministic_and_per_comparison():
    per_case = seed_effect_tables(SEED_EFFECTS)
    first = paired_comparisons(per_case, metrics=("dice",))
    pd.testing.assert_frame_equal(first, paired_comparisons(per_case, metrics=("dice",)))
    # adding a method leaves the existing comparisons' intervals unchanged
    extra = table(grid("ua_mt", 0.5 + np.zeros((8, 20))))
    wider = paired_comparisons(pd.concat([per_case, extra]), metrics=("dice",))
    same = wider[wider["method"].isin(["semi_agcl", "supervised"])
                 & wider["reference"].isin(["semi_agcl", "supervised"])]
    np.testing.assert_array_equal(same["ci_low"].to_numpy(), first["ci_low"].to_numpy())


def test_holm_family_is_dataset_ratio_reference_metric():
    ref = np.array([REF_DICE] * 8)
    others = [table(grid(m, ref + np.array(DIFFS)[:, None])) for m in ("semi_agcl", "mt", "ua_mt")]
    per_case = pd.concat([table(grid("supervised", ref)), *others])
    out = paired_comparisons(per_case, reference_methods=("supervised",),
                             metrics=("dice", "hd95"))
    dice = out[out["metric"] == "dice"]
    assert len(dice) == 3
    np.testing.assert_allclose(dice["p_value"], 2 / 256)
    np.testing.assert_allclose(dice["p_holm"], 3 * 2 / 256)  # three tests, all equal p
    assert (dice["family_size"] == 3).all()
    np.testing.assert_allclose(dice["min_p_holm"], 3 * 2 / 256)
    hd95 = out[out["metric"] == "hd95"]  # identical hd95 everywhere: untestable family
    assert hd95["p_value"].isna().all() and hd95["p_holm"].isna().all()
    assert hd95["note"].str.contains("all differences zero").all()
    assert (hd95["ci_low"] == 0).all() and (hd95["ci_high"] == 0).all()  # no spread at all
    assert (hd95["verdict"] == "negligible").all()


def test_missing_reference_and_methods():
    no_ref = table(rows("mean_teacher", REF_DICE), rows("ua_mt", REF_DICE))
    out = paired_comparisons(no_ref, )
    assert out.empty and list(out.columns) == COMPARISON_COLUMNS
    # reference only at ratio 0.1: no rows for 0.05
    per_case = pd.concat([seed_effect_tables(SEED_EFFECTS),
                          table(rows("semi_agcl", REF_DICE, ratio=0.05))])
    out = paired_comparisons(per_case, reference_methods=("supervised",), metrics=("dice",),
                             )
    assert out["ratio"].tolist() == [0.1]


def test_degenerate_inputs_give_nan_with_note():
    row = one_row(table(rows("supervised", [0.5]), rows("semi_agcl", [0.7])))
    assert (row["n_seeds"], row["n_cases"]) == (1, 1) and row["mean_diff"] == pytest.approx(0.2)
    assert math.isnan(row["p_value"]) and math.isnan(row["ci_low"]) and math.isnan(row["p_holm"])
    assert "1 seed(s) < 3: no interval and no test" in row["note"]
    nothing = one_row(table(rows("supervised", [np.nan]), rows("semi_agcl", [0.7])))
    assert nothing["n_seeds"] == 0 and math.isnan(nothing["mean_diff"])
    assert "no paired runs" in nothing["note"]


def test_bad_seed_diffs_rejected():
    with pytest.raises(ValueError, match="seed_diffs"):
        parse_seed_diffs("0:0.1;oops")
    assert parse_seed_diffs(np.nan) == {}


def test_the_references_are_the_configs_roles():
    from agcl.config import comparison_references

    ref = np.array([REF_DICE] * 8)
    per_case = pd.concat([table(grid(m, ref + shift)) for m, shift in
                          (("supervised", 0.0), ("mean_teacher", 0.01), ("bcp", 0.02),
                           ("semi_agcl", 0.03))])
    config = {"methods": ["supervised", "mean_teacher", "bcp", "semi_agcl"],
              "roles": {"lower_bound": "mean_teacher", "method_of_interest": "bcp"}}
    assert comparison_references(config) == ("bcp", "mean_teacher")
    out = paired_comparisons(per_case, comparison_references(config), metrics=("dice",),
                             )
    assert set(out["reference"]) == {"bcp", "mean_teacher"}
    assert len(out) == 2 * 3  # each reference against the three other methods
    # the default references are those of the default roles
    default = paired_comparisons(per_case, metrics=("dice",), )
    assert set(default["reference"]) == {"semi_agcl", "supervised"}
