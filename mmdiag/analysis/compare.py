"""Is a difference real? Significance in the manner of pyperf's compare_to.

Each strategy in a replay keeps one throughput (and one p99) per repeat
(`StrategyResult.repeats_rps`, `repeats_p99_ms`). Two sets of repeats are judged
with Welch's two-sample t-test (unequal variances) at `alpha`, and the 95%
confidence interval of the difference of means is reported beside it:

- significant and better  -> "1.21x faster" (a win);
- significant and worse   -> "1.21x slower";
- inside the noise        -> "not significant": never a win, never a loss;
- fewer than 2 repeats on a side -> "not judged": the noise is unknown, so no
  difference counts as a win (replay with --repeat N to judge).

The test and its t distribution are SciPy's (`scipy.stats.ttest_ind(equal_var=False)`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

ALPHA = 0.05

SIGNIFICANT, NOT_SIGNIFICANT, NOT_JUDGED = "significant", "not significant", "not judged"


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return 1.0
    return float(2.0 * stats.t.sf(abs(t), df))


def t_quantile(p: float, df: float) -> float:
    """The t value with two-sided tail probability 1-p (e.g. p=0.95 -> 95% CI half-width factor)."""
    return float(stats.t.ppf((1.0 + p) / 2.0, df))


@dataclass
class Comparison:
    """After against before for one metric."""
    metric: str
    before: float           # mean of the repeats (or the single value)
    after: float
    n_before: int
    n_after: int
    ratio: float            # after / before
    diff: float             # after - before
    ci95: tuple[float, float] | None  # of the difference of means
    p_value: float | None
    status: str             # significant | not significant | not judged
    higher_is_better: bool

    @property
    def significant(self) -> bool:
        return self.status == SIGNIFICANT

    @property
    def better(self) -> bool:
        """A win: significant AND in the good direction. Never true inside the noise."""
        if not self.significant:
            return False
        return self.diff > 0 if self.higher_is_better else self.diff < 0

    @property
    def worse(self) -> bool:
        if not self.significant:
            return False
        return self.diff < 0 if self.higher_is_better else self.diff > 0

    def verdict(self) -> str:
        """pyperf-style words: '1.21x faster', '1.10x slower', 'not significant', ..."""
        if self.status == NOT_JUDGED:
            return f"{self.ratio:.2f}x, not judged (needs --repeat >= 2 on both sides)"
        if not self.significant:
            return f"not significant ({self.ratio:.2f}x, p={self.p_value:.2f})"
        good, bad = ("faster", "slower") if self.higher_is_better else ("lower", "higher")
        if self.higher_is_better:
            factor = self.ratio if self.diff > 0 else (1 / self.ratio if self.ratio else math.inf)
        else:
            factor = (1 / self.ratio if self.ratio else math.inf) if self.diff < 0 else self.ratio
        word = good if self.better else bad
        return f"{factor:.2f}x {word} (p={self.p_value:.3f})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(significant=self.significant, better=self.better, worse=self.worse, verdict=self.verdict())
        return d


def _mean_var(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.variance(xs, m) if len(xs) > 1 else 0.0)


def compare_samples(before: list[float], after: list[float], *, metric: str = "throughput_rps",
                    higher_is_better: bool = True, alpha: float = ALPHA) -> Comparison:
    """Welch's t-test of after against before. Both lists are per-repeat values."""
    b = [float(x) for x in before if x is not None and not math.isnan(x)]
    a = [float(x) for x in after if x is not None and not math.isnan(x)]
    if not b or not a:
        raise ValueError(f"{metric}: no values to compare")
    mb, vb = _mean_var(b)
    ma, va = _mean_var(a)
    ratio = ma / mb if mb else math.inf
    diff = ma - mb
    if len(b) < 2 or len(a) < 2:
        return Comparison(metric, mb, ma, len(b), len(a), ratio, diff, None, None, NOT_JUDGED, higher_is_better)
    se2 = vb / len(b) + va / len(a)
    if se2 == 0.0:
        # No noise at all on either side: any difference is exact.
        p = 1.0 if diff == 0 else 0.0
        status = SIGNIFICANT if diff != 0 else NOT_SIGNIFICANT
        return Comparison(metric, mb, ma, len(b), len(a), ratio, diff, (diff, diff), p, status, higher_is_better)
    res = stats.ttest_ind(a, b, equal_var=False)
    p = float(res.pvalue)
    lo, hi = res.confidence_interval(0.95)
    status = SIGNIFICANT if p < alpha else NOT_SIGNIFICANT
    return Comparison(metric, mb, ma, len(b), len(a), ratio, diff, (float(lo), float(hi)), p, status,
                      higher_is_better)


def relative_noise(xs: list[float]) -> float | None:
    """Coefficient of variation of the repeats (stdev / mean); None with one repeat."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    return statistics.stdev(xs) / m if m else None
