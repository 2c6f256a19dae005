"""The interval maths behind every statistical mark of the report (numpy / scipy only, no tables).

Two questions, each with its own interval (agcl.report.stats says which column holds which):

1. **On this test set** (the primary question; what the tables and every published number
   measure): the mean difference over labeled subsets and initialisations, on the fixed test
   cases. The unit is the seed: per-seed mean differences d_1..d_S (each a mean over the test
   cases). Its interval and its p come from one procedure, so a mark can never contradict its bar:
   - S >= MIN_SEEDS_SIGN_FLIP: the exact sign-flip test of the mean (all 2^S sign patterns; a
     fixed Monte Carlo set beyond EXACT_MAX_SEEDS) and the interval that inverts it: every shift
     theta whose sign-flip p of d - theta is >= alpha, found by bisection down to adjacent floats.
     The acceptance set is an interval: each sign pattern accepts theta on an interval that
     contains mean(d) (|sum eps (d - theta)| >= |sum (d - theta)| is a concave quadratic in theta
     that is >= 0 at theta = mean(d)), so p(theta) rises to 1 at mean(d) and falls on both sides.
   - MIN_SEEDS_INTERVAL <= S < MIN_SEEDS_SIGN_FLIP: the sign-flip p cannot fall below 2/2^S >
     0.05, so the t interval over the per-seed means (t with S-1 df) and the one-sample t test,
     which assume normal per-seed means.
   - fewer seeds: no interval and no p.
2. **New patients**: the mean difference over new labeled subsets, initialisations *and test
   patients*. The seeds x cases matrix is a crossed two-way layout d[s,c] = mu + a_s + b_c + e_sc;
   from its seed, case and residual mean squares the variance of the grand mean is
   (MS_seed + MS_case - MS_res) / (S C), with Satterthwaite degrees of freedom. However many seeds
   are added, it cannot shrink below the case term: +-z sd_case / sqrt(C) (`case_floor`).

Planning: the power of the one-sample t test (noncentral t) at a standardised effect
delta = mean / sd(per-seed difference), with Holm's first step (alpha / m) as the level, and the
sign-flip floor 2 m / 2^S that no p_holm can go below, give the seeds a comparison needs
(`seeds_needed`) and the smallest effect a grid can detect (`detectable_effect`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, optimize, stats

ALPHA = 0.05
CONFIDENCE = 1 - ALPHA
POWER = 0.8
MIN_SEEDS_INTERVAL = 3
MIN_SEEDS_SIGN_FLIP = 6
EXACT_MAX_SEEDS = 16  # 2**16 sign patterns enumerated; beyond, a fixed Monte Carlo set
MC_SIGN_PATTERNS = 20_000
MAX_SEEDS_PLANNED = 10_000

SIGN_FLIP = "sign-flip inversion (exact)"
SIGN_FLIP_MC = "sign-flip inversion (Monte Carlo)"
T_INTERVAL = "t over per-seed means (assumes normal per-seed means)"


def sign_patterns(n: int, seed: int = 0) -> np.ndarray:
    """(P, n) matrix of +-1: all 2**n patterns up to EXACT_MAX_SEEDS seeds; beyond, the identity
    and its negation followed by MC_SIGN_PATTERNS seeded random patterns (the same set for every
    theta, so the inverted interval stays an interval)."""
    if n <= EXACT_MAX_SEEDS:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
        return (1 - 2 * bits).astype(float)
    rng = np.random.default_rng([seed, n])
    random = rng.choice([-1.0, 1.0], size=(MC_SIGN_PATTERNS, n))
    return np.vstack([np.ones((1, n)), -np.ones((1, n)), random])


def sign_flip_p_at(d: np.ndarray, theta: float, patterns: np.ndarray) -> float:
    """Two-sided sign-flip p of H0: the per-seed differences d are symmetric about theta: the
    share of sign patterns whose |sum| is at least the observed |sum| of d - theta (ties within
    1e-12 of the scale count as reached, as scipy.stats.permutation_test does)."""
    x = np.asarray(d, dtype=float) - theta
    observed = abs(x.sum())
    tolerance = 1e-12 * max(np.abs(x).sum(), np.finfo(float).tiny)
    return float(np.mean(np.abs(patterns @ x) >= observed - tolerance))


def _boundary(accepted, inside: float, outside: float) -> float:
    """The accepted end of [inside, outside] (inside accepted, outside not), bisected until the
    two ends are adjacent floats: every theta beyond the returned value is rejected."""
    while True:
        mid = inside + (outside - inside) / 2
        if mid in (inside, outside):
            return inside
        if accepted(mid):
            inside = mid
        else:
            outside = mid


def sign_flip_interval(d, alpha: float = ALPHA, patterns: np.ndarray | None = None
                       ) -> tuple[float, float, float]:
    """(low, high, p at 0): the set of shifts the sign-flip test does not reject at `alpha`, and
    the test's p of "no difference"; p < alpha exactly when 0 lies outside [low, high]."""
    d = np.asarray(d, dtype=float)
    patterns = sign_patterns(d.size) if patterns is None else patterns
    center = float(d.mean())
    span = float(np.ptp(d)) + abs(center) + 1.0  # beyond every d: only +-identity reach

    def accepted(theta: float) -> bool:
        return sign_flip_p_at(d, theta, patterns) >= alpha

    low = _boundary(accepted, center, float(d.min()) - span)
    high = _boundary(accepted, center, float(d.max()) + span)
    return low, high, sign_flip_p_at(d, 0.0, patterns)


def t_interval(d, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(low, high, p): the t interval of the mean of d (S - 1 df) and the one-sample t test's
    two-sided p of mean 0; identical values give a zero-width interval and p 0 (or 1 at 0)."""
    d = np.asarray(d, dtype=float)
    n, mean = d.size, float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return mean, mean, (1.0 if mean == 0 else 0.0)
    q = float(stats.t.ppf(1 - alpha / 2, n - 1))
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return mean - q * se, mean + q * se, p


def fixed_set_interval(d, alpha: float = ALPHA) -> tuple[float, float, float, str, str]:
    """(low, high, p, procedure, note) for the mean of the per-seed values d on this test set
    (see the module docstring); nan with the reason below MIN_SEEDS_INTERVAL seeds. Used for
    differences (p tests 0) and for one method's per-run values (the p is then not used)."""
    d = np.asarray(d, dtype=float)
    n = d.size
    if n == 0:
        return math.nan, math.nan, math.nan, "", "no paired runs"
    if n < MIN_SEEDS_INTERVAL:
        return math.nan, math.nan, math.nan, "", (
            f"{n} seed(s) < {MIN_SEEDS_INTERVAL}: no interval and no test (too few runs to "
            "estimate their spread)")
    if n < MIN_SEEDS_SIGN_FLIP:
        low, high, p = t_interval(d, alpha)
        return low, high, p, T_INTERVAL, ""
    low, high, p = sign_flip_interval(d, alpha)
    return low, high, p, SIGN_FLIP if n <= EXACT_MAX_SEEDS else SIGN_FLIP_MC, ""


def mean_squares(matrix) -> tuple[float, float, float]:
    """(MS_seed, MS_case, MS_residual) of a complete seeds x cases matrix (two-way ANOVA without
    replication)."""
    m = np.asarray(matrix, dtype=float)
    s, c = m.shape
    grand = m.mean()
    rows, cols = m.mean(axis=1), m.mean(axis=0)
    residual = m - rows[:, None] - cols[None, :] + grand
    return (c * float(np.sum((rows - grand) ** 2)) / (s - 1),
            s * float(np.sum((cols - grand) ** 2)) / (c - 1),
            float(np.sum(residual ** 2)) / ((s - 1) * (c - 1)))


def new_patients_interval(matrix, alpha: float = ALPHA) -> dict:
    """Variance-components interval of the grand mean for new seeds and new test patients:
    {low, high, df, sd_case, case_floor, note} (see the module docstring). The variance of the
    grand mean is never taken below the residual term MS_res / (S C) (negative components
    truncated at 0, df then that of the residual)."""
    m = np.asarray(matrix, dtype=float)
    out = {"low": math.nan, "high": math.nan, "df": math.nan, "sd_case": math.nan,
           "case_floor": math.nan, "note": ""}
    if m.ndim != 2 or m.shape[0] < MIN_SEEDS_INTERVAL or m.shape[1] < 2:
        out["note"] = (f"no new-patients interval ({m.shape[0] if m.ndim == 2 else 0} seed(s), "
                       f"{m.shape[1] if m.ndim == 2 else 0} case(s); needs "
                       f"{MIN_SEEDS_INTERVAL} and 2)")
        return out
    s, c = m.shape
    ms_seed, ms_case, ms_res = mean_squares(m)
    combined = ms_seed + ms_case - ms_res
    z = float(stats.norm.ppf(1 - alpha / 2))
    sd_case = math.sqrt(max(ms_case - ms_res, 0.0) / s)
    out.update(sd_case=sd_case, case_floor=z * sd_case / math.sqrt(c))
    if combined > ms_res:
        denominator = (ms_seed ** 2 / (s - 1) + ms_case ** 2 / (c - 1)
                       + ms_res ** 2 / ((s - 1) * (c - 1)))
        df = combined ** 2 / denominator
    else:
        combined, df = ms_res, float((s - 1) * (c - 1))
    if combined == 0:
        grand = float(m.mean())
        out.update(low=grand, high=grand, df=df)
        return out
    half = float(stats.t.ppf(1 - alpha / 2, df)) * math.sqrt(combined / (s * c))
    out.update(low=float(m.mean()) - half, high=float(m.mean()) + half, df=df)
    return out


# --- planning --------------------------------------------------------------------------------
def smallest_attainable_p_holm(n_seeds: int, family_size: int) -> float:
    """The smallest p_holm any row of a family of `family_size` tests at `n_seeds` seeds can
    reach: 2 m / 2^S with the sign-flip test (S >= MIN_SEEDS_SIGN_FLIP), 0 with the t test
    (3-5 seeds: no floor, at the price of its normality assumption), nan without a test."""
    if n_seeds < MIN_SEEDS_INTERVAL or family_size < 1:
        return math.nan
    if n_seeds < MIN_SEEDS_SIGN_FLIP:
        return 0.0
    return min(1.0, family_size * 2.0 * 2.0 ** -min(n_seeds, 1000))


def t_power(delta: float, n_seeds: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t test at standardised effect delta with n seeds."""
    if n_seeds < 2:
        return 0.0
    df = n_seeds - 1
    q = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(delta) * math.sqrt(n_seeds)
    if df > 300:  # the t is normal to 3 digits here, where scipy's nct and the integral falter
        return float(stats.norm.sf(q - nc) + stats.norm.cdf(-q - nc))
    power = float(stats.nct.sf(q, df, nc) + stats.nct.cdf(-q, df, nc))
    if math.isfinite(power):
        return power
    # scipy's noncentral t returns nan far in its tails: integrate over the chi-square instead,
    # |T| > q  <=>  |Z + nc| > q sqrt(V / df)
    def reject(v: float) -> float:
        u = q * math.sqrt(v / df)
        return float(stats.norm.cdf(-u - nc) + stats.norm.sf(u - nc)) * stats.chi2.pdf(v, df)

    return float(integrate.quad(reject, 0, math.inf)[0])


def can_conclude(n_seeds: int, family_size: int, alpha: float = ALPHA) -> bool:
    floor = smallest_attainable_p_holm(n_seeds, family_size)
    return not math.isnan(floor) and floor < alpha


def seeds_needed(delta: float, family_size: int = 1, power: float = POWER,
                 alpha: float = ALPHA) -> float:
    """The fewest seeds with `power` to detect a standardised effect `delta` under Holm with
    `family_size` tests (level alpha / m, Holm's first step: conservative for the others), counting
    only seed numbers at which the family's test can reject at all; inf beyond MAX_SEEDS_PLANNED
    or for delta 0 / nan."""
    if not np.isfinite(delta) or delta == 0:
        return math.inf
    level = alpha / max(family_size, 1)

    def enough(n: int) -> bool:
        return can_conclude(n, family_size, alpha) and t_power(delta, n, level) >= power

    linear_until = 64  # below, the sign-flip floor makes `enough` non-monotone (5 -> 6 seeds)
    for n in range(MIN_SEEDS_INTERVAL, linear_until + 1):
        if enough(n):
            return n
    if not enough(MAX_SEEDS_PLANNED):
        return math.inf
    low, high = linear_until, MAX_SEEDS_PLANNED  # enough(low) false, enough(high) true
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def minimum_seeds_to_conclude(family_size: int, alpha: float = ALPHA) -> dict[str, int]:
    """{'t': fewest seeds with any test (3: the t test has no floor), 'sign_flip': fewest seeds at
    which the distribution-free sign-flip test can reach p_holm < alpha}."""
    n = MIN_SEEDS_SIGN_FLIP
    while smallest_attainable_p_holm(n, family_size) >= alpha:
        n += 1
    return {"t": MIN_SEEDS_INTERVAL, "sign_flip": n}


def detectable_delta(n_seeds: int, family_size: int = 1, power: float = POWER,
                     alpha: float = ALPHA) -> float:
    """The smallest standardised effect detected with `power` at n seeds under Holm with
    `family_size` tests; inf where no row of the family can be significant."""
    if not can_conclude(n_seeds, family_size, alpha):
        return math.inf
    level = alpha / max(family_size, 1)
    high = 1.0
    while t_power(high, n_seeds, level) < power:  # bracket the root (power rises with delta)
        high *= 2
    return float(optimize.brentq(lambda d: t_power(d, n_seeds, level) - power, 1e-9, high))
