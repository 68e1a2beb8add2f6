"""The profile's intervals mean what the README says: the printed +/- covers the share
of the window's time (what the path's own timers measure) about 95% of the time, and
the load's variation between blocks goes to the spread, not to that interval."""
from __future__ import annotations

import bisect
import random
from collections import Counter

from mmdiag.live.profile import DEFAULT_BLOCK_S, DEFAULT_DURATION_S, DEFAULT_RATE_HZ, TARGET_CI_PTS
import pytest

from mmdiag.live.stats import sampling_hw, shares_pct

PHASES = ("recv", "hash", "idle")
GAP_S = 0.05  # py-spy's re-attach between blocks samples nothing (more on a loaded host)


def _path(rng: random.Random, window: float, scale: float = 1.0) -> tuple[list[float], list[str]]:
    """Episodes of a bursty server: per 2 s the arrival load changes, so the idle share
    varies a lot between blocks; recv and hash episodes last a few samples each (times
    `scale`: larger images, longer waits)."""
    starts, phases, t = [], [], 0.0
    while t < window:
        busy = rng.choice((0.2, 0.5, 0.8))  # this stretch's load
        end = t + 2.0
        while t < end:
            if rng.random() < busy:
                for ph, mean in (("recv", 0.012), ("hash", 0.040)):
                    starts.append(t), phases.append(ph)
                    t += rng.expovariate(1.0 / (mean * scale))
            else:
                starts.append(t), phases.append("idle")
                t += rng.expovariate(1.0 / (0.030 * scale))
    return starts, phases


def _truth(starts, phases, window) -> dict[str, float]:
    ends = starts[1:] + [window]
    tot = Counter()
    for s, e, ph in zip(starts, ends, phases):
        tot[ph] += max(0.0, min(e, window) - s)
    return {p: 100.0 * tot[p] / window for p in PHASES}


def _sample(rng, starts, phases, window, rate, block_s, gap) -> list[Counter]:
    """py-spy's timer: one sample per period from a random phase, a little jitter,
    nothing during the re-attach at each block's start."""
    period, blocks = 1.0 / rate, []
    b0 = 0.0
    while b0 < window - 1e-9:
        c, t = Counter(), b0 + (gap if b0 else 0.0) + rng.uniform(0, period)
        while t < min(b0 + block_s, window):
            c[phases[bisect.bisect_right(starts, t + rng.uniform(-5e-4, 5e-4)) - 1]] += 1
            t += period
        blocks.append(c)
        b0 += block_s
    return blocks


@pytest.mark.parametrize("gap,scale", [(GAP_S, 1.0), (0.3, 5.0)])
def test_sampling_interval_covers_the_windows_share_and_load_goes_to_spread(gap, scale):
    """At the defaults, and with long re-attach gaps (a loaded host) in a load of long
    episodes, whose content the share misses: the interval must widen with the gaps to keep
    covering the window's share (the binomial alone covers 83-91% there)."""
    rng = random.Random(12)
    window, rate = DEFAULT_DURATION_S, DEFAULT_RATE_HZ
    inside, n, ci_sum, spread_sum = Counter(), 0, Counter(), Counter()
    for _ in range(150):
        starts, phases = _path(rng, window, scale)
        truth = _truth(starts, phases, window)
        blocks = _sample(rng, starts, phases, window, rate, DEFAULT_BLOCK_S, gap)
        pct, ci, spread = shares_pct(blocks, PHASES, expected=rate * window)
        n += 1
        for p in PHASES:
            inside[p] += abs(pct[p] - truth[p]) <= ci[p]
            ci_sum[p] += ci[p]
            spread_sum[p] += spread[p]
    for p in PHASES:
        assert inside[p] / n >= 0.93, f"{p}: the +/- covered the window's share in {inside[p]} of {n} windows"
        if gap == GAP_S:
            assert ci_sum[p] / n <= TARGET_CI_PTS, f"{p}: mean interval +/-{ci_sum[p] / n:.2f} at the defaults"
    # The load swings between blocks: that is spread, several times the sampling error of the share.
    assert spread_sum["idle"] > 2 * ci_sum["idle"]


def test_defaults_meet_the_two_point_target_for_any_share():
    blocks = int(DEFAULT_DURATION_S / DEFAULT_BLOCK_S)
    n = int(DEFAULT_RATE_HZ * (DEFAULT_DURATION_S - (blocks - 1) * GAP_S))
    assert 100.0 * sampling_hw(0.5, n, DEFAULT_RATE_HZ * DEFAULT_DURATION_S, blocks - 1) <= TARGET_CI_PTS
