"""Confidence intervals for accuracies, and the tests that compare two methods: paired over
items, and Welch's over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1], sane at 0 or n)."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# Paired comparisons of two methods over the same test items.
ALPHA = 0.05  # the significance level behind the tables' better / worse / within noise
EXACT_UP_TO = 16  # nonzero differences: all 2**n sign patterns are enumerated
FLIPS = 20_000  # random sign patterns above that (the p-value's Monte Carlo error: < 0.004)
_LATTICE_LIMIT = 10**6  # integer differences summing to at most this: exact by convolution


def sign_flip_p(differences: Sequence[float], flips: int = FLIPS, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip (randomisation) test of "no difference".

    Under the null each item's difference (method A minus method B) is as likely negated, so the
    statistic |Σ d| is compared with its distribution over the 2**n sign patterns. Exact for
    integer differences (per-item counts of correct answers: for 0/1 outcomes this is the exact
    McNemar test) and for few items; otherwise `flips` random patterns, counted with the
    observed one so the p-value is never 0. Zero differences carry no sign and drop out.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if np.all(d == np.round(d)) and np.abs(d).sum() <= _LATTICE_LIMIT:
        return _exact_integer(np.abs(d).astype(np.int64), int(abs(d.sum())))
    observed = abs(d.sum()) * (1 - 1e-12)  # float slack: a pattern equal to it counts
    if d.size <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, flips, 1000):  # chunks keep the sign matrix small
        signs = rng.choice((-1.0, 1.0), size=(min(1000, flips - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (hits + 1) / (flips + 1)


def _exact_integer(magnitudes: np.ndarray, observed: int) -> float:
    """P(|Σ ±m_i| >= observed) with independent fair signs, by convolving the sums' counts."""
    total = int(magnitudes.sum())
    probs = np.zeros(2 * total + 1)  # index s + total holds P(sum = s)
    probs[total] = 1.0
    for m in magnitudes:
        probs = 0.5 * (np.roll(probs, m) + np.roll(probs, -m))  # never wraps: |sum| <= total
    sums = np.arange(-total, total + 1)
    return float(min(1.0, probs[np.abs(sums) >= observed].sum()))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that two samples (here: one metric's per-seed values
    of two methods) share a mean, their variances not assumed equal. The Welch-Satterthwaite
    degrees of freedom are fractional; the t tail comes from the incomplete beta function.
    Needs two values a side; with no spread at all it is 1 for equal means, else 0."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values per sample")
    var_a, var_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    gap = float(np.mean(a) - np.mean(b))
    if var_a + var_b == 0:
        return 1.0 if gap == 0 else 0.0
    t = gap / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))  # P(|T_df| >= |t|)


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction
    (modified Lentz), on the side of the symmetry I_x(a, b) = 1 - I_(1-x)(b, a) where it
    converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _incomplete_beta(b, a, 1 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def verdict(difference: float, p: float, lower_is_better: bool, alpha: float = ALPHA) -> str:
    """The table's word for method A against method B given A - B and the test's p-value."""
    if p >= alpha:
        return "within noise"
    return "better" if (difference < 0) == lower_is_better else "worse"
