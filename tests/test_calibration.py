"""The report's intervals are calibrated at the seed counts the configs ship (3) and beyond (5, 8):
a seeded simulation (agcl.report.calibration) through the report's own per-comparison code, and
the same assertions shown to fail on the procedure they replaced (a two-way bootstrap interval
beside a sign-flip p from 6 seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agcl.report.calibration import Cell, calibrate
from agcl.report.intervals import sign_flip_interval

REPLICATES = 1000
# sd of the seed effect, the case effect and the residual (the ranges, both extremes and
# the middle), 20 test cases
REGIMES = {"seeds dominate": (0.06, 0.02, 0.02), "cases dominate": (0.01, 0.10, 0.05),
           "mixed": (0.03, 0.05, 0.03)}


def cell(regime, n_seeds, mu=0.03, null=False):
    return Cell(n_seeds, 20, *REGIMES[regime], mu=mu, null_on_test_set=null)


@pytest.mark.parametrize("n_seeds", [3, 5, 8])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_intervals_cover_and_marks_agree(regime, n_seeds):
    out = calibrate(cell(regime, n_seeds), REPLICATES)
    assert 0.92 <= out["coverage_test_set"] <= 0.98, out
    assert 0.90 <= out["coverage_new_patients"] <= 0.98, out
    assert out["disagreements"] == 0, out


@pytest.mark.parametrize("regime", ["seeds dominate", "cases dominate"])
def test_false_positive_rate_on_this_test_set_at_8_seeds(regime):
    out = calibrate(cell(regime, 8, mu=0.0, null=True), REPLICATES)
    assert out["rejection_rate"] <= 0.07 and out["claims_rate"] <= 0.07, out
    assert out["disagreements"] == 0


# --- the replaced procedure fails the same assertions -------------------------------------------

def old_two_way_bootstrap(matrix, n_boot=2000, seed=0):
    """The interval the report drew before: resample seeds and cases independently, percentile
    95 % of the resampled means; beside it, the sign-flip p from 6 seeds (nan below)."""
    rng = np.random.default_rng(seed)
    s, c = matrix.shape
    w_s = np.stack([np.bincount(r, minlength=s) for r in rng.integers(0, s, (n_boot, s))])
    w_c = np.stack([np.bincount(r, minlength=c) for r in rng.integers(0, c, (n_boot, c))])
    means = np.einsum("bs,sc,bc->b", w_s, matrix, w_c) / (s * c)
    low, high = np.percentile(means, [2.5, 97.5])
    p = sign_flip_interval(matrix.mean(axis=1))[2] if s >= 6 else math.nan
    return {"ci_low": low, "ci_high": high, "p_value": p, "np_low": low, "np_high": high}


def test_the_old_two_way_bootstrap_fails_these_assertions():
    replicates = 300
    at_3 = calibrate(cell("seeds dominate", 3), replicates, procedure=old_two_way_bootstrap)
    assert at_3["coverage_test_set"] < 0.92 and at_3["coverage_new_patients"] < 0.90, at_3
    null_8 = calibrate(cell("seeds dominate", 8, mu=0.0, null=True), replicates,
                       procedure=old_two_way_bootstrap)
    assert null_8["claims_rate"] > 0.07, null_8  # its bar cleared 0 too often
    # a 3-point effect with case sd 0.10: red points whose bar crosses 0
    effect_8 = calibrate(cell("cases dominate", 8), replicates, procedure=old_two_way_bootstrap)
    assert effect_8["disagreements"] > 0.2 * replicates, effect_8
