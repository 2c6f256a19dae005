"""Paired statistics against hand-computed values on small per-case tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from agcl.report.stats import (
    COMPARISON_COLUMNS,
    bootstrap_ci,
    case_means,
    holm,
    paired_comparisons,
    wilcoxon_p,
)

DIFFS = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]  # 8 positive, distinct
REF_DICE = [0.50, 0.61, 0.72, 0.55, 0.66, 0.77, 0.58, 0.69]


def rows(method, values, *, dataset="la", ratio=0.1, seed=0, cls=1, metric="dice", cases=None):
    cases = cases or [f"c{i}" for i in range(len(values))]
    return [{"dataset": dataset, "method": method, "ratio": ratio, "seed": seed, "case": c,
             "class": cls, metric: v} for c, v in zip(cases, values)]


def table(*row_lists, metric="dice"):
    frame = pd.DataFrame([r for rs in row_lists for r in rs])
    if metric == "dice" and "hd95" not in frame:
        frame["hd95"] = 1.0
    return frame


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


# --- wilcoxon / bootstrap building blocks ---

def test_wilcoxon_exact_hand_cases():
    p, note = wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert p == pytest.approx(2 / 64) and note == ""
    # |d| ranks 1..6, negative rank sum W = 2; subsets of {1..6} with sum <= 2: {}, {1}, {2}
    p, _ = wilcoxon_p([1, -2, 3, 4, 5, 6])
    assert p == pytest.approx(2 * 3 / 64)


def test_wilcoxon_matches_scipy_and_drops_zeros():
    d = np.random.default_rng(3).normal(0.02, 0.05, size=25)
    assert wilcoxon_p(d)[0] == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-12)
    with_zeros = np.concatenate([[0.0, 0.0], np.arange(1, 7) / 10])
    assert wilcoxon_p(with_zeros)[0] == pytest.approx(2 / 64)


def test_wilcoxon_degenerate_gives_nan_with_note():
    p, note = wilcoxon_p([0.3])
    assert math.isnan(p) and "1 non-zero" in note
    p, note = wilcoxon_p([0.0] * 8)
    assert math.isnan(p) and "all differences zero" in note
    p, note = wilcoxon_p([])
    assert math.isnan(p) and "no paired cases" in note


def test_bootstrap_is_bca_and_contains_mean():
    d = np.asarray(DIFFS)
    low, high, note = bootstrap_ci(d, 2000, np.random.default_rng(1))
    ref = sps.bootstrap((d,), np.mean, n_resamples=2000, method="BCa",
                        rng=np.random.default_rng(1)).confidence_interval
    assert (low, high) == pytest.approx((ref.low, ref.high)) and note == ""
    assert low < d.mean() < high
    low, high, note = bootstrap_ci([0.02] * 8, 2000, np.random.default_rng(1))
    assert math.isnan(low) and math.isnan(high) and "all differences equal" in note


# --- case_means ---

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


# --- paired_comparisons ---

def paired_table(**kw):
    return table(rows("supervised", REF_DICE, **kw),
                 rows("semi_agcl", [r + d for r, d in zip(REF_DICE, DIFFS)], **kw))


def test_paired_comparison_hand_values():
    out = paired_comparisons(paired_table(), metrics=("dice",), n_boot=2000)
    assert list(out.columns) == COMPARISON_COLUMNS
    assert len(out) == 2  # each method once as reference
    row = out[out["reference"] == "supervised"].iloc[0]
    assert row["method"] == "semi_agcl" and row["n_cases"] == 8 and row["n_nonzero"] == 8
    assert row["mean_diff"] == pytest.approx(0.045)
    assert row["reference_mean"] == pytest.approx(np.mean(REF_DICE))
    assert row["p_value"] == pytest.approx(2 / 256)  # exact: all 8 differences positive
    assert row["p_holm"] == pytest.approx(2 / 256)  # family of one
    assert row["ci_low"] < 0.045 < row["ci_high"] and row["note"] == ""
    back = out[out["reference"] == "semi_agcl"].iloc[0]
    assert back["mean_diff"] == pytest.approx(-0.045)
    assert back["ci_low"] == pytest.approx(-row["ci_high"], abs=0.01)


def test_bootstrap_is_deterministic_and_per_comparison():
    per_case = paired_table()
    first = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=7)
    again = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=7)
    pd.testing.assert_frame_equal(first, again)
    other_seed = paired_comparisons(per_case, metrics=("dice",), n_boot=2000, seed=8)
    assert not np.allclose(first["ci_low"], other_seed["ci_low"])
    # adding a method leaves the existing comparisons' intervals unchanged
    bigger = pd.concat([per_case, table(rows("ua_mt", [v - 0.1 for v in REF_DICE]))])
    wider = paired_comparisons(bigger, metrics=("dice",), n_boot=2000, seed=7)
    same = wider[wider["method"].isin(["semi_agcl", "supervised"])
                 & wider["reference"].isin(["semi_agcl", "supervised"])]
    np.testing.assert_array_equal(same["ci_low"].to_numpy(), first["ci_low"].to_numpy())


def test_holm_family_is_dataset_ratio_reference_metric():
    others = [table(rows(m, [r + d for r, d in zip(REF_DICE, DIFFS)]))
              for m in ("semi_agcl", "mean_teacher", "ua_mt")]
    per_case = pd.concat([table(rows("supervised", REF_DICE)), *others])
    out = paired_comparisons(per_case, reference_methods=("supervised",),
                             metrics=("dice", "hd95"), n_boot=200)
    dice = out[out["metric"] == "dice"]
    assert len(dice) == 3
    np.testing.assert_allclose(dice["p_value"], 2 / 256)
    np.testing.assert_allclose(dice["p_holm"], 3 * 2 / 256)  # three tests, all equal p
    hd95 = out[out["metric"] == "hd95"]  # identical hd95 everywhere: untestable family
    assert hd95["p_value"].isna().all() and hd95["p_holm"].isna().all()
    assert hd95["note"].str.contains("all differences zero").all()


def test_missing_reference_and_methods():
    no_ref = table(rows("mean_teacher", REF_DICE), rows("ua_mt", REF_DICE))
    out = paired_comparisons(no_ref, n_boot=100)
    assert out.empty and list(out.columns) == COMPARISON_COLUMNS
    # reference only at ratio 0.1: no rows for 0.05
    per_case = pd.concat([paired_table(), table(rows("semi_agcl", REF_DICE, ratio=0.05))])
    out = paired_comparisons(per_case, reference_methods=("supervised",), metrics=("dice",),
                             n_boot=100)
    assert out["ratio"].tolist() == [0.1]


def test_unmatched_and_undefined_cases_are_left_out_with_note():
    other = [r + d for r, d in zip(REF_DICE, DIFFS)]
    other[0] = np.nan
    per_case = table(rows("supervised", REF_DICE),
                     rows("semi_agcl", other[:7], cases=[f"c{i}" for i in range(7)]))
    row = paired_comparisons(per_case, reference_methods=("supervised",), metrics=("dice",),
                             n_boot=200).iloc[0]
    assert row["n_cases"] == 6
    assert row["mean_diff"] == pytest.approx(np.mean(DIFFS[1:7]))
    assert "1 case(s) present for one method only" in row["note"]
    assert "1 case(s) with an undefined value" in row["note"]
    assert row["p_value"] == pytest.approx(2 / 64)


def test_degenerate_inputs_give_nan_with_note():
    one_pair = table(rows("supervised", [0.5]), rows("semi_agcl", [0.7]))
    row = paired_comparisons(one_pair, reference_methods=("supervised",), metrics=("dice",),
                             n_boot=100).iloc[0]
    assert row["n_cases"] == 1 and row["mean_diff"] == pytest.approx(0.2)
    assert math.isnan(row["p_value"]) and math.isnan(row["ci_low"]) and math.isnan(row["p_holm"])
    assert "1 non-zero difference(s) < 6" in row["note"] and "1 pair(s) < 6" in row["note"]
    equal = table(rows("supervised", REF_DICE), rows("semi_agcl", REF_DICE))
    row = paired_comparisons(equal, reference_methods=("supervised",), metrics=("dice",),
                             n_boot=100).iloc[0]
    assert row["mean_diff"] == 0 and math.isnan(row["p_value"]) and math.isnan(row["ci_high"])
    assert "all differences zero" in row["note"] and "all differences equal" in row["note"]


def test_bad_n_boot_rejected():
    with pytest.raises(ValueError, match="n_boot"):
        paired_comparisons(paired_table(), n_boot=0)
