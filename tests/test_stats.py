"""Paired statistics with the run (seed) as the unit, against hand-computed values on small,
hand-built per-case tables."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pandas as pd
import pytest

from agcl.report.stats import (
    COMPARISON_COLUMNS,
    case_means,
    difference_matrix,
    holm,
    paired_comparisons,
    parse_seed_diffs,
    sign_flip_p,
    two_way_bootstrap_ci,
    two_way_resample_means,
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


# --- sign-flip test over seeds ---

def test_sign_flip_exact_hand_value():
    # |d| = 1..6 (tenths), one negative: sum 9 of 21. A pattern flips a subset of sum k; |21-2k|
    # >= 9 <=> k <= 6 or k >= 15. Subsets of {1..6} with sum <= 6: 1+1+1+2+2+3+4 = 14, and 14 by
    # symmetry with sum >= 15 -> p = 28/64.
    p, note = sign_flip_p(np.array([1, 2, 3, 4, 5, -6]) / 10)
    assert p == pytest.approx(28 / 64) and note == ""
    # every seed the same sign: only the all-+ and all-- patterns are as extreme -> 2 / 2**n
    for n in (6, 8, 11):
        assert sign_flip_p(np.full(n, 0.03))[0] == pytest.approx(2 / 2 ** n)


def test_sign_flip_matches_brute_force_enumeration():
    d = np.random.default_rng(4).normal(0.01, 0.05, size=9)
    assert sign_flip_p(d)[0] == pytest.approx(brute_force_sign_flip(d))


def test_sign_flip_too_few_seeds_and_degenerate():
    p, note = sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5])
    assert math.isnan(p) and "5 seed(s) < 6: no test" in note and "0.0625" in note
    p, note = sign_flip_p([0.0] * 8)
    assert math.isnan(p) and "all differences zero" in note
    assert math.isnan(sign_flip_p([])[0])


def test_sign_flip_monte_carlo_beyond_exact_limit():
    d = np.full(20, 0.02)
    p, note = sign_flip_p(d, np.random.default_rng(0))
    assert "Monte Carlo over 100000 sign patterns" in note
    assert p < 1e-4  # exact 2/2**20; Monte Carlo: (1 + hits) / (1 + resamples)


# --- two-way bootstrap ---

def exact_two_way_distribution(m):
    """Every (seed draw, case draw) of a small matrix, equally likely: the exact bootstrap law."""
    n_s, n_c = m.shape
    return np.array([m[np.ix_(s, c)].mean()
                     for s in itertools.product(range(n_s), repeat=n_s)
                     for c in itertools.product(range(n_c), repeat=n_c)])


def test_two_way_bootstrap_matches_brute_force():
    m = np.array([[0.1, 0.4], [-0.2, 0.0], [0.3, 0.9]])
    exact = exact_two_way_distribution(m)  # 27 * 4 = 108 outcomes
    means = two_way_resample_means(m, 200_000, np.random.default_rng(2))
    assert means.mean() == pytest.approx(exact.mean(), abs=2e-3)
    assert means.var() == pytest.approx(exact.var(), rel=0.02)
    low, high, note = two_way_bootstrap_ci(m, 200_000, np.random.default_rng(2))
    # percentile endpoints: exact CDF at low reaches 2.5 %, just below it stays under 2.5 %
    assert (exact <= low + 1e-12).mean() >= 0.025 - 0.003
    assert (exact < low - 1e-12).mean() <= 0.025 + 0.003
    assert (exact >= high - 1e-12).mean() >= 0.025 - 0.003
    assert "approximate" in note  # 3 seeds < 6


def test_two_way_bootstrap_resamples_seeds_and_cases():
    # additive matrix a_s + b_c: bootstrap variance = var(a)/S + var(b)/C (population variances)
    a, b = np.array([0.0, 0.3, -0.1, 0.2, 0.1, -0.3]), np.linspace(-0.05, 0.05, 10)
    means = two_way_resample_means(a[:, None] + b[None, :], 100_000, np.random.default_rng(5))
    assert means.var() == pytest.approx(a.var() / 6 + b.var() / 10, rel=0.03)
    # constant rows: resampling cases alone would give a zero-width interval
    low, high, _ = two_way_bootstrap_ci(np.repeat(a[:, None], 10, axis=1), 5000,
                                        np.random.default_rng(1))
    assert high - low > 0.2


def test_two_way_bootstrap_too_few_seeds_and_speed():
    low, high, note = two_way_bootstrap_ci(np.ones((2, 5)), 1000, np.random.default_rng(0))
    assert math.isnan(low) and math.isnan(high) and "2 seed(s) < 3: no CI" in note
    start = time.perf_counter()
    for _ in range(20):  # a demo has ~100 comparisons of this size
        two_way_bootstrap_ci(np.random.default_rng(0).normal(size=(8, 40)), 10_000,
                             np.random.default_rng(1))
    assert time.perf_counter() - start < 5


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
    assert row["ci_low"] < 0 < row["ci_high"] and row["ci_high"] - row["ci_low"] > 0.15
    diffs = parse_seed_diffs(row["seed_diffs"])
    assert list(diffs) == list(range(8))
    np.testing.assert_allclose(list(diffs.values()), SEED_EFFECTS, atol=1e-6)


def test_effect_on_every_seed_is_significant_with_exact_p():
    effects = [0.05, 0.04, 0.06, 0.05, 0.03, 0.07, 0.05]
    row = one_row(seed_effect_tables(effects))
    assert row["p_value"] == pytest.approx(2 / 2 ** 7) and row["p_holm"] == pytest.approx(2 / 128)
    assert 0 < row["ci_low"] < np.mean(effects) < row["ci_high"] and row["note"] == ""
    assert row["reference_mean"] == pytest.approx(0.6 + 0.02 * np.sin(np.arange(20)).mean())


def test_too_few_seeds_gives_no_p_with_the_reason():
    row = one_row(seed_effect_tables([0.05, 0.04, 0.06, 0.05, 0.03]))
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"])
    assert "5 seed(s) < 6: no test" in row["note"] and "approximate" in row["note"]
    assert row["ci_low"] > 0  # a CI is still given from 3 seeds
    two = one_row(seed_effect_tables([0.05, 0.04]))
    assert math.isnan(two["ci_low"]) and "2 seed(s) < 3: no CI" in two["note"]
    assert two["mean_diff"] == pytest.approx(0.045)


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
                             metrics=("dice",), n_boot=2000)
    assert list(out.columns) == COMPARISON_COLUMNS and len(out) == 2
    fwd = out[out["reference"] == "supervised"].iloc[0]
    back = out[out["reference"] == "semi_agcl"].iloc[0]
    assert back["mean_diff"] == pytest.approx(-fwd["mean_diff"])
    assert back["p_value"] == pytest.approx(fwd["p_value"])
    assert back["ci_low"] == pytest.approx(-fwd["ci_high"], abs=0.005)


def test_bootstrap_is_deterministic_and_per_comparison():
    per_case = seed_effect_tables(SEED_EFFECTS)
    first = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=7)
    again = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=7)
    pd.testing.assert_frame_equal(first, again)
    other_seed = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=8)
    assert not np.allclose(first["ci_low"], other_seed["ci_low"])
    # adding a method leaves the existing comparisons' intervals unchanged
    extra = table(grid("ua_mt", 0.5 + np.zeros((8, 20))))
    wider = paired_comparisons(pd.concat([per_case, extra]), metrics=("dice",), n_boot=2000,
                               seed=7)
    same = wider[wider["method"].isin(["semi_agcl", "supervised"])
                 & wider["reference"].isin(["semi_agcl", "supervised"])]
    np.testing.assert_array_equal(same["ci_low"].to_numpy(), first["ci_low"].to_numpy())


def test_holm_family_is_dataset_ratio_reference_metric():
    ref = np.array([REF_DICE] * 8)
    others = [table(grid(m, ref + np.array(DIFFS)[:, None])) for m in ("semi_agcl", "mt", "ua_mt")]
    per_case = pd.concat([table(grid("supervised", ref)), *others])
    out = paired_comparisons(per_case, reference_methods=("supervised",),
                             metrics=("dice", "hd95"), n_boot=200)
    dice = out[out["metric"] == "dice"]
    assert len(dice) == 3
    np.testing.assert_allclose(dice["p_value"], 2 / 256)
    np.testing.assert_allclose(dice["p_holm"], 3 * 2 / 256)  # three tests, all equal p
    hd95 = out[out["metric"] == "hd95"]  # identical hd95 everywhere: untestable family
    assert hd95["p_value"].isna().all() and hd95["p_holm"].isna().all()
    assert hd95["note"].str.contains("all differences zero").all()
    assert (hd95["ci_low"] == 0).all() and (hd95["ci_high"] == 0).all()  # no spread at all


def test_missing_reference_and_methods():
    no_ref = table(rows("mean_teacher", REF_DICE), rows("ua_mt", REF_DICE))
    out = paired_comparisons(no_ref, n_boot=100)
    assert out.empty and list(out.columns) == COMPARISON_COLUMNS
    # reference only at ratio 0.1: no rows for 0.05
    per_case = pd.concat([seed_effect_tables(SEED_EFFECTS),
                          table(rows("semi_agcl", REF_DICE, ratio=0.05))])
    out = paired_comparisons(per_case, reference_methods=("supervised",), metrics=("dice",),
                             n_boot=100)
    assert out["ratio"].tolist() == [0.1]


def test_degenerate_inputs_give_nan_with_note():
    row = one_row(table(rows("supervised", [0.5]), rows("semi_agcl", [0.7])), n_boot=100)
    assert (row["n_seeds"], row["n_cases"]) == (1, 1) and row["mean_diff"] == pytest.approx(0.2)
    assert math.isnan(row["p_value"]) and math.isnan(row["ci_low"]) and math.isnan(row["p_holm"])
    assert "1 seed(s) < 6: no test" in row["note"] and "1 seed(s) < 3: no CI" in row["note"]
    nothing = one_row(table(rows("supervised", [np.nan]), rows("semi_agcl", [0.7])), n_boot=100)
    assert nothing["n_seeds"] == 0 and math.isnan(nothing["mean_diff"])
    assert "no paired runs" in nothing["note"]


def test_bad_n_boot_and_seed_diffs_rejected():
    with pytest.raises(ValueError, match="n_boot"):
        paired_comparisons(seed_effect_tables(SEED_EFFECTS), n_boot=0)
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
                             n_boot=100)
    assert set(out["reference"]) == {"bcp", "mean_teacher"}
    assert len(out) == 2 * 3  # each reference against the three other methods
    # the default references are those of the default roles
    default = paired_comparisons(per_case, metrics=("dice",), n_boot=100)
    assert set(default["reference"]) == {"semi_agcl", "supervised"}
