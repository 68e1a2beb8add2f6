"""Per-rank phase breakdown: where each rank's scheduler time goes.

Works on both collectors' ranks alike: each has wall time per phase (`phases_ms`)
over its `wall_s`, so a phase share means one thing, the share of the rank's wall
time, whether timed by the replay or sampled by py-spy (whose samples are evenly
spread over wall time). Everything here returns plain numbers keyed by the one
vocabulary.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from ..run import RankResult, Run, StrategyResult
from ..vocab import PHASES

# The multimodal path proper: what the strategies change (recv is the every-version transport).
MM_PHASES = ("from_dict", "pickle", "broadcast", "unpickle")
# The strategy's own collective: serialize, wait, deserialize.
COMM_PHASES = ("pickle", "broadcast", "unpickle")


def phase_pct(rank: RankResult) -> dict[str, float]:
    """Share of the rank's wall time per phase, in percent (sums to ~100: the phases cover
    the loop, idle included). Without a wall time, of the phases' sum."""
    total = rank.wall_s * 1000.0 if rank.wall_s > 0 else sum(rank.phases_ms.get(p, 0.0) for p in PHASES)
    if total <= 0:
        return {p: 0.0 for p in PHASES}
    return {p: 100.0 * rank.phases_ms.get(p, 0.0) / total for p in PHASES}


def busy_pct(rank: RankResult) -> float:
    return 100.0 - phase_pct(rank).get("idle", 0.0)


def share_of_busy(rank: RankResult, phases: Iterable[str]) -> float:
    """Percent of the rank's busy (non-idle) time spent in `phases`."""
    pct = phase_pct(rank)
    busy = sum(v for k, v in pct.items() if k != "idle")
    return 100.0 * sum(pct.get(p, 0.0) for p in phases) / busy if busy > 0 else 0.0


def mm_share(rank: RankResult) -> float:
    return share_of_busy(rank, MM_PHASES)


def cpu_pct(rank: RankResult) -> float:
    """Scheduler CPU of the rank as a percent of one core (nan when unknown): RankResult.cpu_pct."""
    return rank.cpu_pct


def gil(rank: RankResult, key: str) -> float | None:
    """gil_held_pct / gil_wait_pct of a profiled rank; None where not measured (a replay)."""
    return getattr(rank.profile, key) if rank.profile is not None else None


def max_or_nan(xs: Iterable[float | None]) -> float:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return max(vals) if vals else math.nan


def ranks_of(run: Run, strategy: str | None = None) -> list[RankResult]:
    if strategy is not None:
        return run.strategies[strategy].ranks
    return run.ranks or []


def per_request_ms(s: StrategyResult, rank: RankResult, phase: str) -> float:
    return rank.phases_ms.get(phase, 0.0) / max(s.requests, 1)


def rank_rows(s: StrategyResult) -> list[dict[str, float]]:
    """One row per rank: phase share (%), and for replays ms per request, CPU %, GIL."""
    rows = []
    for r in s.ranks:
        pct = phase_pct(r)
        rows.append({
            "rank": r.rank,
            "pct": pct,
            "ms_per_request": ({p: per_request_ms(s, r, p) for p in PHASES} if r.profile is None else None),
            "mm_share_pct": mm_share(r),
            "cpu_pct": cpu_pct(r),
            "gil_held_pct": gil(r, "gil_held_pct"),
            "gil_wait_pct": gil(r, "gil_wait_pct"),
        })
    return rows


def json_safe(d: Any) -> Any:
    """A copy of `d` that JSON can hold: tuples as lists, NaN and infinities as None.
    (The one helper for every to_dict in mmdiag.analysis.)"""
    if isinstance(d, dict):
        return {k: json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_safe(v) for v in d]
    if isinstance(d, float) and (math.isnan(d) or math.isinf(d)):
        return None
    return d
