"""How precise a sampled share is: two different uncertainties, kept apart.

A profile samples each rank at a fixed rate and counts, per phase, the samples
whose stack falls in it. The share it prints answers "what part of THIS window did
the rank spend in X", the question the path's own timers answer over the same window.

- Sampling error (`phases_ci`, the printed +/-): how far the sampled share can be
  from the share of the window's time. py-spy samples once per period (10 ms at
  100 Hz), at a point in the period set by its timer's drift and the target's own
  irregular timing: stratified sampling with one sample per stratum, whose variance
  is never above the binomial p(1-p)/n of independent uniform instants (law of total
  variance: p(1-p) = mean p_s(1-p_s) + var p_s over strata). Long phases sampled many
  times in a row make it smaller still (only their edges are uncertain), so the
  binomial half-width 1.96 sqrt(p(1-p)/n) is an upper bound, and it depends only on
  n = rate x window: 100 Hz for 30 s keeps every share within +/-1.8 points when
  nothing is lost (a loaded host loses samples, and the term below widens it). The
  re-attach between blocks leaves short stretches unsampled (about 50 ms per block, more
  on a loaded host): their content is missed, which adds f^2 p(1-p)/gaps to the variance
  for an unsampled fraction f of the span (sampling_hw). It would
  not hold for a loop periodic at the sampling rate itself (aliasing): the benchmark
  checks coverage against the timers (benchmarks/bench_profile.py).
- Spread (`phases_spread`): how much the share varies between windows of this length,
  from the block-to-block variation (each block one py-spy recording of a few seconds):
  batch means in the ratio-estimator form that allows blocks of unequal size, Student
  t on B-1 degrees of freedom. It holds the load's own fluctuation (Poisson arrivals,
  bursts), which sampling faster does not shrink: the uncertainty about the workload's
  long-run share, not about this window's.
"""
from __future__ import annotations

import math
from functools import lru_cache

Z95 = 1.959963984540054


@lru_cache(maxsize=256)
def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t  # imported here: only a profile needs it, and scipy is slow to import

    return float(t.ppf(0.975, df))


def sampling_hw(p: float, n: int, expected: float | None = None, gaps: int = 1) -> float:
    """95% half-width (fraction) of a share p from n samples of a span that would hold
    `expected` at the rate: the binomial bound, plus the span's unsampled part (py-spy's
    re-attach between blocks, samples it skipped) in `gaps` stretches, whose content the
    share misses: error f * (p_sampled - p_gaps), variance <= f^2 p(1-p) / gaps."""
    if not n:
        return math.nan
    f = max(0.0, 1.0 - n / expected) if expected else 0.0
    return Z95 * math.sqrt(max(p * (1.0 - p), 0.0) * (1.0 / n + f * f / max(1, gaps)))


def block_share(counts: list[int], sizes: list[int], expected: float | None = None) -> tuple[float, float, float]:
    """Share (fraction) of samples in a category over all blocks, its 95% sampling
    half-width (sampling_hw: the blocks' re-attach gaps included when `expected`, the
    samples the span would hold, is known) and its 95% spread half-width (batch means).

    counts[b]: samples of block b in the category; sizes[b]: samples in block b.
    With fewer than two non-empty blocks the spread is unknown (nan)."""
    pairs = [(c, n) for c, n in zip(counts, sizes) if n > 0]
    n_all = sum(n for _, n in pairs)
    if n_all == 0:
        return math.nan, math.nan, math.nan
    p = sum(c for c, _ in pairs) / n_all
    b = len(pairs)
    hw = sampling_hw(p, n_all, expected, b - 1)
    if b < 2:
        return p, hw, math.nan
    resid = sum((c - p * n) ** 2 for c, n in pairs)
    var = b / (b - 1) * resid / (n_all * n_all)
    # A share lies in [0, 1]: a half-width reaching past both ends says nothing more.
    return p, hw, min(t95(b - 1) * math.sqrt(var), max(p, 1.0 - p))


def _pts(h: float) -> float | None:
    return None if math.isnan(h) else round(100.0 * h, 2)


def shares_pct(block_counts: list[dict[str, int]], keys, sizes: list[int] | None = None,
               expected: float | None = None) -> tuple[dict[str, float], dict[str, float | None], dict[str, float | None]]:
    """Per key: share in percent of all samples, its 95% sampling half-width and its
    95% spread half-width, in points. sizes: samples per block (default: the sum of the
    block's counts); expected: samples the span would hold at the rate (see sampling_hw)."""
    sizes = sizes if sizes is not None else [sum(c.values()) for c in block_counts]
    pct, hw, spread = {}, {}, {}
    for k in keys:
        p, h, s = block_share([c.get(k, 0) for c in block_counts], sizes, expected)
        pct[k] = 0.0 if math.isnan(p) else round(100.0 * p, 2)
        hw[k], spread[k] = _pts(h), _pts(s)
    return pct, hw, spread


def duration_for(hw_pts: float, window_s: float, target_pts: float) -> float:
    """The window that would bring a half-width of hw_pts down to target_pts
    (the variance of a mean falls as 1/duration)."""
    return window_s * (hw_pts / target_pts) ** 2


def pm(pct: float | None, hw: float | None, digits: int = 1) -> str:
    """`38.2 +/-1.7` (or `38.2` when the interval is unknown, `-` for no value)."""
    if pct is None:
        return "-"
    if hw is None:
        return f"{pct:.{digits}f}"
    return f"{pct:.{digits}f} +/-{hw:.{digits}f}"
