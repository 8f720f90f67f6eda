"""The statistics every summary reports, against values worked out here by hand from their textbook formulas: the
Student-t interval of a mean (n − 1 degrees of freedom), Welch's test (unpooled variances, Welch–Satterthwaite
degrees of freedom), Holm's adjustment for several options against one baseline and Wortsman et al.'s LR
sensitivity."""

import math

import pytest
from scipy import stats as scipy_stats

from gpt2lab.stats import describe, holm, lr_sensitivity, verdict, welch

T_975_DF2 = 4.302653  # the 97.5% quantile of Student's t with 2 degrees of freedom, from a t table


def test_a_samples_interval_is_students_t_with_n_minus_1_degrees_of_freedom():
    sample = describe([1.0, 2.0, 4.0])
    # mean 7/3; deviations −4/3, −1/3, 5/3; sd² = (16 + 1 + 25) / 9 / (3 − 1) = 7/3
    assert sample.n == 3 and sample.mean == pytest.approx(7 / 3)
    assert sample.sd == pytest.approx(math.sqrt(7 / 3))
    assert sample.ci == pytest.approx(T_975_DF2 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-6)  # = 3.7946
    assert str(sample) == "2.3333 ± 3.7946"


def test_welchs_test_uses_each_sides_own_variance_and_the_welch_satterthwaite_degrees_of_freedom():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0]  # variances 2.5 and 50, sizes 5 and 2: pooling would mislead
    difference = welch(a, b)
    se2 = 2.5 / 5 + 50 / 2  # 25.5
    df = se2**2 / ((2.5 / 5) ** 2 / (5 - 1) + (50 / 2) ** 2 / (2 - 1))  # 1.0402
    t = (3 - 15) / math.sqrt(se2)  # −2.376
    assert df == pytest.approx(1.0402, abs=1e-4)
    assert difference.delta == pytest.approx(-12)
    assert difference.p == pytest.approx(2 * scipy_stats.t.cdf(t, df), rel=1e-9)  # 0.25: not significant
    assert difference.ci == pytest.approx(scipy_stats.t.ppf(0.975, df) * math.sqrt(se2), rel=1e-9)
    # a pooled variance, (4·2.5 + 1·50) / 5 = 12 with 5 df, would call this significant at p = 0.009
    pooled_t = -12 / math.sqrt(12 * (1 / 5 + 1 / 2))
    assert 2 * scipy_stats.t.cdf(pooled_t, 5) < 0.01 and difference.p > 0.2
    assert not difference.significant(0.05) and verdict(difference, 0.05) == "no (p = 0.25)"


def test_a_clear_difference_is_significant_and_its_interval_excludes_zero():
    a, b = [6.20, 6.23, 6.18], [6.32, 6.33, 6.30]
    difference = welch(a, b)
    va, vb = 0.000633333 / 3, 0.000233333 / 3  # each sample's variance / n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert difference.p == pytest.approx(2 * scipy_stats.t.sf(0.11333333 / math.sqrt(va + vb), df), rel=1e-4)
    assert difference.significant(0.05) and verdict(difference, 0.05).startswith("**yes** (p = 0.00")
    assert difference.delta + difference.ci < 0


def test_one_run_has_no_interval_and_no_test_shown_as_such():
    one = describe([7.0])
    assert (one.n, one.mean, one.sd, one.ci) == (1, 7.0, None, None) and str(one) == "7.0000"
    for difference in (welch([7.0], [6.0, 6.1]), welch([6.0, 6.1], [7.0]), welch([1.0, 1.0], [2.0, 2.0])):
        assert difference.p is None and difference.ci is None and difference.significant(0.05) is None
        assert verdict(difference, 0.05) == "–"
    assert welch([7.0], [6.0, 6.2]).delta == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no values"):
        describe([])


def test_lr_sensitivity_is_the_mean_shortfall_from_the_best_lr_with_diverged_runs_at_the_initial_loss():
    # final losses on a log-spaced lr grid; one run diverged (nan), one ended above the loss at init (12 > 10)
    losses, init_loss = [5.0, 4.0, 3.5, 3.8, math.nan, 12.0], 10.0
    # E[min(ℓ(η), ℓ₀) − ℓ*] = mean(1.5, 0.5, 0, 0.3, 6.5, 6.5) with ℓ* = 3.5
    assert lr_sensitivity(losses, init_loss) == pytest.approx(15.3 / 6)
    assert lr_sensitivity([4.0, 4.0, 4.0], init_loss) == 0  # insensitive: every lr as good as the best
    assert lr_sensitivity([math.inf, 11.0], init_loss) == 0  # nothing trains: every lr is the init loss


def test_holm_multiplies_the_kth_smallest_p_by_m_minus_k_plus_1_and_keeps_the_order():
    # sorted: 0.005 × 4 = 0.02, 0.01 × 3 = 0.03, 0.03 × 2 = 0.06, 0.04 × 1 = 0.04 → raised to 0.06, never below
    # the one before; None (no test, e.g. the baseline) is not one of the m = 4
    assert holm([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.03, None, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.5]) == [1.0, 1.0]  # 0.5 × 2, capped at 1
    assert holm([0.02]) == [0.02] and holm([None]) == [None] and holm([]) == []
    # at α = 0.05 all four would pass unadjusted; adjusted, only the two smallest
    assert [p < 0.05 for p in holm([0.01, 0.04, 0.03, 0.005])] == [True, False, False, True]
