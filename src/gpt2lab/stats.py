"""The statistics of results repeated over seeds, which every summary reports (sweep, ablation, lr sweep, search):
a sample's mean, standard deviation and Student-t confidence interval; the difference of two means with Welch's
t-test (no equal-variance assumption: an option and its baseline need not vary alike over seeds), and Holm's
adjustment when several options are tested against one baseline; and the LR
sensitivity of Wortsman et al. 2023. scipy computes them (imported when first needed: a training run never loads
it; it comes with the sweeps extra). With one run there is no spread, so no interval and no
test: those are None (shown as `–`), never an error."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean, stdev

CONFIDENCE = 0.95  # of every interval reported
ALPHA = 0.05  # the default significance level of a verdict (SummarizeSweep's and summarize.py's --alpha)


@dataclass(frozen=True)
class Sample:
    """Final losses of n runs that differ only in their seed."""

    n: int
    mean: float
    sd: float | None  # with n − 1 in the denominator; None for n = 1
    ci: float | None  # half-width of the CONFIDENCE interval of the mean: t(n − 1) · sd / √n

    def __str__(self) -> str:  # 7.0536 ± 0.0123
        return f"{self.mean:.4f} ± {self.ci:.4f}" if self.ci is not None else f"{self.mean:.4f}"


def describe(values: Sequence[float]) -> Sample:
    if not values:
        raise ValueError("no values: a sample needs at least one run")
    n, mean = len(values), fmean(values)
    if n < 2:
        return Sample(n, mean, None, None)
    from scipy import stats

    sd = stdev(values)
    return Sample(n, mean, sd, float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Difference:
    """mean(a) − mean(b), its CONFIDENCE interval and Welch's two-sided p-value."""

    delta: float
    ci: float | None  # half-width: t(ν) · √(s_a²/n_a + s_b²/n_b), ν the Welch–Satterthwaite degrees of freedom
    p: float | None

    def significant(self, alpha: float) -> bool | None:
        return None if self.p is None else self.p < alpha

    def __str__(self) -> str:  # +0.1234 ± 0.0456
        return f"{self.delta:+.4f} ± {self.ci:.4f}" if self.ci is not None else f"{self.delta:+.4f}"


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's t-test of a against b (scipy.stats.ttest_ind, equal_var=False); no interval and no p without two
    runs on each side, or when neither side varies at all (identical runs: a t of 0/0)."""
    delta = fmean(a) - fmean(b)
    if len(a) < 2 or len(b) < 2 or stdev(a) == stdev(b) == 0:
        return Difference(delta, None, None)
    from scipy import stats

    test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(CONFIDENCE)  # with the Welch–Satterthwaite df
    return Difference(delta, float(high - low) / 2, float(test.pvalue))


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (Holm 1979) of a family of tests, in their order: the k-th smallest of the
    m p-values × (m − k + 1), made non-decreasing in that order and at most 1. A verdict `adjusted p < α` for each
    keeps the chance of even one false "yes" in the family at most α, as m tests at α each do not (9 options
    against one baseline at 0.05: a 37% chance of a false "yes"). None (no test) is not counted in m and stays None."""
    tested = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    adjusted, running = list(ps), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted


def verdict(difference: Difference, alpha: float) -> str:
    """A table's cell: `**yes** (p = 0.003)`, `no (p = 0.41)`, or `–` without a test."""
    if difference.p is None:
        return "–"
    return f"{'**yes**' if difference.significant(alpha) else 'no'} (p = {difference.p:.2g})"


def lr_sensitivity(losses: Sequence[float], init_loss: float) -> float:
    """Wortsman et al. 2023 (arXiv 2309.14322, §2): E over a log-spaced grid of learning rates η of
    [min(ℓ(η), ℓ₀) − ℓ*], with ℓ(η) the final loss at η, ℓ₀ the loss at initialization and ℓ* = min over the grid
    of ℓ(η): how much is lost, on average, by not picking the best lr. A run that diverged (nan, inf) or ended
    above ℓ₀ counts as ℓ₀, as if it had not trained at all. `losses`: one per grid point, the grid log-spaced."""
    capped = [min(loss, init_loss) if math.isfinite(loss) else init_loss for loss in losses]
    best = min(capped)
    return fmean(loss - best for loss in capped)
