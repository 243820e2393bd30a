"""The paired sign-flip test and Welch's t-test against brute-force enumeration and scipy."""

import itertools

import numpy as np
import pytest

from sketchtune.evaluate.stats import sign_flip_p, verdict, welch_p

scipy_stats = pytest.importorskip("scipy.stats")


def brute_force_p(d) -> float:
    d = [x for x in d if x != 0]
    observed = abs(sum(d))
    sums = [abs(sum(s * x for s, x in zip(signs, d, strict=True)))
            for signs in itertools.product((-1, 1), repeat=len(d))]
    return sum(s >= observed - 1e-9 for s in sums) / len(sums)


def test_exact_paths_match_brute_force_enumeration():
    rng = np.random.default_rng(3)
    floats = rng.normal(0.3, 1.0, 12)  # few items: all patterns enumerated
    assert sign_flip_p(floats) == pytest.approx(brute_force_p(floats), abs=1e-12)
    counts = rng.integers(-3, 4, 15)  # per-item correct counts over 3 seeds: by convolution
    assert sign_flip_p(counts) == pytest.approx(brute_force_p(counts), abs=1e-12)


def test_zero_one_outcomes_give_the_exact_mcnemar_test():
    a = np.array([1] * 40 + [0] * 25 + [1] * 300 + [0] * 135)
    b = np.array([0] * 40 + [1] * 25 + [1] * 300 + [0] * 135)  # 40 vs 25 discordant
    assert sign_flip_p(a - b) == pytest.approx(scipy_stats.binomtest(40, 65).pvalue, rel=1e-9)


def test_exact_path_matches_scipy_permutation_test():
    d = np.random.default_rng(5).normal(0.2, 1.0, 14)
    scipy_p = scipy_stats.permutation_test(
        (d,), np.sum, permutation_type="samples", n_resamples=2**14
    ).pvalue
    assert sign_flip_p(d) == pytest.approx(scipy_p, abs=1e-9)


def test_monte_carlo_path_is_within_its_error_of_the_exact_value():
    d = np.random.default_rng(9).normal(0.4, 1.0, 18)  # above EXACT_UP_TO: random patterns
    exact = brute_force_p(d)
    assert 0.01 < exact < 0.5  # a p-value the test can get wrong
    assert sign_flip_p(d) == pytest.approx(exact, abs=0.012)


def test_clear_and_null_differences():
    rng = np.random.default_rng(11)
    assert sign_flip_p(rng.normal(0.5, 1.0, 500)) < 1e-3
    assert sign_flip_p([0.0, 0.0]) == 1.0
    assert sign_flip_p(rng.normal(0.0, 1.0, 500)) > 0.001  # null: rarely tiny


def test_verdict_words():
    assert verdict(-0.1, 0.01, lower_is_better=True) == "better"
    assert verdict(-0.1, 0.01, lower_is_better=False) == "worse"
    assert verdict(0.2, 0.2, lower_is_better=True) == "within noise"
    assert verdict(0.2, 0.049, lower_is_better=True) == "worse"


@pytest.mark.parametrize("sizes", [(2, 2), (3, 3), (3, 5), (10, 4), (60, 50)])
def test_welch_matches_scipy_over_sizes_spreads_and_gaps(sizes):
    rng = np.random.default_rng(sum(sizes))
    for _ in range(50):
        a = rng.normal(0.0, rng.uniform(0.1, 3.0), sizes[0])
        b = rng.normal(rng.uniform(-3.0, 3.0), rng.uniform(0.1, 3.0), sizes[1])
        expected = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
        assert welch_p(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_welch_edge_cases():
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert welch_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two values"):
        welch_p([1.0], [1.0, 2.0])
