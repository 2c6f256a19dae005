"""Does each interval mean what it says? A seeded simulation of the seeds x cases difference
matrices the report compares, run through the report's own per-comparison code
(agcl.report.stats.matrix_statistics and mark).

Model: d[s, c] = mu + a_s + b_c + e_sc with a_s ~ N(0, sd_seed) (labeled subset and
initialisation), b_c ~ N(0, sd_case) (the test patient), e_sc ~ N(0, sd_residual). Two targets:
- on this test set: mu + mean_c b_c (the test cases are fixed; the primary interval);
- new patients: mu (the new-patients interval).
With `null_on_test_set` the case effects are centred so the test-set target is exactly 0: the
rate of p < 0.05 is then the test's false-positive rate on this test set.

Used by tests/test_calibration.py (a few cells, under a minute) and
benchmarks/stats_calibration.py (the whole grid the issue measured, printed as a table).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agcl.report.stats import mark, matrix_statistics


@dataclass(frozen=True)
class Cell:
    n_seeds: int
    n_cases: int
    sd_seed: float
    sd_case: float
    sd_residual: float
    mu: float = 0.0
    null_on_test_set: bool = False


def simulate(cell: Cell, replicates: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """(matrices (R, S, C), test-set targets (R,)) for one cell of the model."""
    shape = (replicates, cell.n_seeds, cell.n_cases)
    a = rng.normal(0.0, cell.sd_seed, size=(replicates, cell.n_seeds, 1))
    b = rng.normal(0.0, cell.sd_case, size=(replicates, 1, cell.n_cases))
    if cell.null_on_test_set:
        b = b - b.mean(axis=2, keepdims=True)
    e = rng.normal(0.0, cell.sd_residual, size=shape)
    return cell.mu + a + b + e, cell.mu + b.mean(axis=(1, 2))


def calibrate(cell: Cell, replicates: int = 1000, seed: int = 0, procedure=None) -> dict:
    """Coverage and error rates of a procedure over `replicates` simulated matrices.

    procedure(matrix) -> {ci_low, ci_high, p_value, np_low, np_high} (default: the report's
    matrix_statistics). Returns coverage_test_set (primary interval covers the test-set target),
    coverage_new_patients, rejection_rate (p < 0.05), claims_rate (primary interval excludes 0)
    and disagreements (replicates whose mark colour, from p as Holm's p of a one-comparison
    family, contradicts the primary bar: a red mark across 0 or a blue mark clear of 0).
    """
    procedure = procedure or matrix_statistics
    rng = np.random.default_rng([seed, cell.n_seeds, cell.n_cases,
                                 *np.round(np.array([cell.sd_seed, cell.sd_case,
                                                     cell.sd_residual, cell.mu]) * 1e4)
                                 .astype(int).tolist()])
    matrices, targets = simulate(cell, replicates, rng)
    covered = covered_new = rejected = claims = disagree = 0
    for matrix, target in zip(matrices, targets):
        out = procedure(matrix)
        low, high, p = out["ci_low"], out["ci_high"], out["p_value"]
        covered += bool(low <= target <= high)
        covered_new += bool(out["np_low"] <= cell.mu <= out["np_high"])
        significant = bool(p < 0.05)
        rejected += significant
        excludes_zero = not low <= 0 <= high
        claims += excludes_zero
        # the report colours a mark red when p_holm < 0.05 (here p_holm = p)
        drawn_red = mark(p, low, high) == "holm"
        disagree += (significant != excludes_zero) or (drawn_red != significant)
    return {"coverage_test_set": covered / replicates,
            "coverage_new_patients": covered_new / replicates,
            "rejection_rate": rejected / replicates, "claims_rate": claims / replicates,
            "disagreements": disagree}
