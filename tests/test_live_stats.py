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


# --- findings claim only what their intervals show ------------------------------------

def _profile(shares, ci, **extra):
    from runs_synth import profile_run
    run = profile_run([shares] * 2)
    for r in run.ranks:
        r.profile.phases_ci = {k: ci for k in shares}
        for k, v in extra.items():
            setattr(r.profile, k, v)
    return run


def test_a_share_inside_its_interval_of_the_threshold_is_not_claimed():
    from mmdiag.analysis.findings import findings
    near = findings(_profile({"recv": 6.0, "forward": 30.0, "idle": 64.0}, ci=1.5))   # 6 - 1.5 < 5
    clear = findings(_profile({"recv": 8.0, "forward": 30.0, "idle": 62.0}, ci=1.5))  # 8 - 1.5 >= 5
    assert not any("request receive" in f for f in near), near
    assert any("request receive" in f and "8.0 +/-1.5%" in f for f in clear), clear


def test_gil_wait_is_claimed_only_past_its_interval_and_printed_with_it():
    from mmdiag.analysis.findings import findings
    base = {"recv": 20.0, "forward": 30.0, "idle": 50.0}
    inside = findings(_profile(base, ci=1.0, gil_wait_pct=6.0, gil_wait_ci=2.0))
    past = findings(_profile(base, ci=1.0, gil_wait_pct=9.0, gil_wait_ci=2.0))
    assert not any("GIL wait" in f for f in inside), inside
    assert any("up to 9 +/-2% of the main thread's time may be GIL wait" in f for f in past), past


def test_hashing_and_the_gil_is_judged_against_half_with_its_interval():
    from mmdiag.analysis.findings import findings

    def gil_finding(from_dict_gil, samples):
        run = _profile({"from_dict": 40.0, "pickle": 20.0, "forward": 10.0, "idle": 30.0}, ci=1.0,
                       phase_gil_pct={"from_dict": from_dict_gil, "pickle": 95.0}, samples=samples)
        return next(f for f in findings(run) if f.startswith("hashing"))

    # 2 ranks x 400 from_dict samples: +/-3.5 points near half
    assert gil_finding(47.0, 1000).startswith("hashing holds the GIL about half the time (from_dict held it in 47 +/-3%")
    assert gil_finding(45.0, 1000).startswith("hashing releases")
    assert gil_finding(80.0, 1000).startswith("hashing mostly holds")
