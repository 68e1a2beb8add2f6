"""How precise a sampled share is: 95% intervals from blocks of consecutive samples.

A profile samples each rank at a fixed rate and counts, per phase, the samples
whose stack falls in it. Consecutive samples are not independent draws: a hash
of one 18.8 MB image lasts about 40 ms (4 samples at 100 Hz), a wait in a
broadcast lasts as long as the entry rank's work, and arrivals come in bursts
lasting seconds. With positive autocorrelation the variance of a share is the
binomial p(1-p)/n times 1 + 2*sum(rho_k), so the binomial formula understates it.

mmdiag records each rank in consecutive blocks (each block one py-spy recording
of a few seconds, far longer than a loop iteration, so block shares are nearly
independent) and estimates the variance of a share from the spread of the
block shares: batch means, in the ratio-estimator form that allows blocks of
unequal size, with Student's t on B-1 degrees of freedom. The spread includes
the target's own fluctuation over the window, which is what "how much of its
time does this rank spend in X" is uncertain about. The half-width reported is
never below the binomial one (the floor for independent samples), so a window
with too few blocks does not look precise by luck.
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


def binomial_hw(p: float, n: int) -> float:
    """95% half-width (fraction) of a share p from n independent samples."""
    return Z95 * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else math.nan


def block_share(counts: list[int], sizes: list[int]) -> tuple[float, float]:
    """Share (fraction) of samples in a category over all blocks and its 95%
    half-width: batch means on the ratio estimator, floored at the binomial.

    counts[b]: samples of block b in the category; sizes[b]: samples in block b.
    With fewer than two non-empty blocks only the binomial half-width is known."""
    pairs = [(c, n) for c, n in zip(counts, sizes) if n > 0]
    n_all = sum(n for _, n in pairs)
    if n_all == 0:
        return math.nan, math.nan
    p = sum(c for c, _ in pairs) / n_all
    floor = binomial_hw(p, n_all)
    b = len(pairs)
    if b < 2:
        return p, floor
    resid = sum((c - p * n) ** 2 for c, n in pairs)
    var = b / (b - 1) * resid / (n_all * n_all)
    # A share lies in [0, 1]: a half-width reaching past both ends says nothing more.
    return p, min(max(t95(b - 1) * math.sqrt(var), floor), max(p, 1.0 - p))


def shares_pct(block_counts: list[dict[str, int]], keys, sizes: list[int] | None = None
               ) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per key: share in percent of all samples, and its 95% half-width in points.
    sizes: samples per block (default: the sum of the block's counts)."""
    sizes = sizes if sizes is not None else [sum(c.values()) for c in block_counts]
    pct, hw = {}, {}
    for k in keys:
        p, h = block_share([c.get(k, 0) for c in block_counts], sizes)
        pct[k] = 0.0 if math.isnan(p) else round(100.0 * p, 2)
        hw[k] = None if math.isnan(h) else round(100.0 * h, 2)
    return pct, hw


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
