"""A live profile's findings, in words with their numbers: computed from the Run
whenever it is shown (`findings(run)`), never stored in it.

A finding claims a share only when it is above its threshold by more than its
95% interval, and a difference between ranks only when it is larger than the
two intervals combined; the numbers are printed with their intervals. What a
strategy is comes from its module (its `summary`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean
from typing import Any

from ..live.stats import pm, sampling_hw
from ..run import ProfileRank, Run
from ..strategies import REGISTRY

UNKNOWN = "no multimodal frames were sampled (no multimodal traffic in the window, or another code path)"
MIN_PCT = 5.0
MIN_PHASE_SAMPLES = 10


def rank_list(ranks: list[int]) -> str:
    rs = sorted(ranks)
    if len(rs) == 1:
        return f"rank {rs[0]}"
    if rs == list(range(rs[0], rs[-1] + 1)):
        return f"ranks {rs[0]}..{rs[-1]}"
    return "ranks " + ", ".join(map(str, rs))


def _verb(xs: list, one: str, many: str) -> str:
    return one if len(xs) == 1 else many


def _spread(vals: list[float]) -> str:
    return f" ({min(vals):.0f}-{max(vals):.0f}%)" if len(vals) > 1 and max(vals) - min(vals) >= 1 else ""


@dataclass
class RankProfile:
    """One profiled rank as the findings read it: its number and its profile part."""
    rank: int
    part: ProfileRank

    def __getattr__(self, name: str) -> Any:
        return getattr(self.part, name)


def strategy_words(name: str) -> str:
    cls = REGISTRY.get(name)
    return cls.summary if cls is not None else UNKNOWN if name == "unknown" else name


def findings(run: Run) -> list[str]:
    """The findings of a live profile (none for a Run without profiled ranks)."""
    ranks = [RankProfile(r.rank, r.profile) for r in run.ranks or [] if r.profile is not None]
    if not ranks:
        return []
    live = run.live
    return rank_findings(ranks, next(iter(run.strategies)), {p.rank: p.cpu_pct for p in ranks},
                         live.exited if live else [], live.notes if live else [])


def _ci(p: RankProfile, k: str) -> float | None:
    """The share's 95% half-width; None where the Run has none (an older file): printed
    without a +/-, never as +/-0.0."""
    return p.phases_ci.get(k) if p.phases_ci else None


def _mean_ci(ps: list[RankProfile], k: str) -> float | None:
    """Half-width of the mean share over ranks (independent ranks' intervals)."""
    hs = [_ci(p, k) for p in ps]
    return None if not hs or None in hs else math.sqrt(sum(h * h for h in hs)) / len(hs)


def above(share: float, hw: float | None, threshold: float) -> bool:
    """The share is above `threshold` by more than its interval (no interval: the share alone)."""
    return share - (hw or 0.0) >= threshold


def differs(a: float, ha: float | None, b: float, hb: float | None) -> bool:
    """Two shares differ by more than their intervals combined."""
    ha, hb = ha or 0.0, hb or 0.0
    return abs(a - b) > math.sqrt(ha * ha + hb * hb)


def _wait_findings(profiles: list[RankProfile]) -> list[str]:
    """Ranks that spend a real share of their time waiting (collectives, polls, spins)."""
    out = []
    for p in profiles:
        total, hw = p.wait_pct.get("all", 0.0), p.wait_ci.get("all") or 0.0
        if not above(total, hw, MIN_PCT):
            continue
        where = sorted(((v, k) for k, v in p.wait_pct.items() if k != "all" and v >= 1.0), reverse=True)
        out.append(f"rank {p.rank} waits {pm(total, hw)}% of its time ("
                   + ", ".join(f"{k} {v:.0f}%" for v, k in where)
                   + "): in collectives for other ranks or polling for work, counted in the phase it waits for, "
                     "not as work")
    return out


def _gil_findings(profiles: list[RankProfile]) -> list[str]:
    """GIL by phase, pooled over ranks, and ranks whose main thread may wait for it."""
    out: list[str] = []
    pooled: dict[str, tuple[float, int]] = {}
    for p in profiles:
        for k, g in p.phase_gil_pct.items():
            n = p.phase_counts.get(k, 0)
            if g is not None and n:
                held, tot = pooled.get(k, (0.0, 0))
                pooled[k] = (held + g * n / 100.0, tot + n)
    gil = {k: 100.0 * h / n for k, (h, n) in pooled.items() if n >= MIN_PHASE_SAMPLES}
    # A phase's GIL share is a proportion of its own samples: binomial 95% half-width.
    ci = {k: 100.0 * sampling_hw(gil[k] / 100.0, pooled[k][1]) for k in gil}
    if "from_dict" in gil and any(k in gil for k in ("pickle", "unpickle")):
        other = "pickle" if "pickle" in gil else "unpickle"
        fd, hw = gil["from_dict"], ci["from_dict"]
        verb = ("releases the GIL" if fd + hw < 50 else "mostly holds the GIL" if fd - hw > 50
                else "holds the GIL about half the time")
        out.append(f"hashing {verb} (from_dict held it in {pm(fd, hw, 0)}% of its samples) "
                   f"while {other} holds it ({pm(gil[other], ci[other], 0)}%)")
    elif gil:
        out.append("GIL held by phase: " + ", ".join(f"{k} {pm(v, ci[k], 0)}%"
                                                     for k, v in sorted(gil.items(), key=lambda kv: -kv[1])))
    for p in profiles:
        w, hw = p.gil_wait_pct, p.gil_wait_ci
        if w and above(w, hw, MIN_PCT):
            who = ", ".join(t["name"] or str(t["tid"]) for t in p.threads if t.get("gil_held_pct"))
            out.append(f"rank {p.rank}: up to {pm(w, hw, 0)}% of the main thread's time may be GIL wait "
                       f"(held by: {who or 'other threads'})")
    return out


def rank_findings(profiles: list[RankProfile], strategy: str, cpu: dict[int, float | None],
                  exited: list[dict] | None = None, notes: list[str] | None = None) -> list[str]:
    out: list[str] = []
    if not profiles:
        return out
    out.append(f"multimodal path: {strategy}: {strategy_words(strategy)}")
    entry = min(p.rank for p in profiles)
    rest = [p for p in profiles if p.rank != entry]
    first = next(p for p in profiles if p.rank == entry)
    ph = lambda p, k: p.phases_pct.get(k, 0.0)  # noqa: E731

    if rest:
        b = [ph(p, "broadcast") for p in rest]
        hb = _mean_ci(rest, "broadcast")
        if above(mean(b), hb, MIN_PCT):
            out.append(f"{rank_list([p.rank for p in rest])} {_verb(rest, 'spends', 'spend')} {pm(mean(b), hb)}% of "
                       f"{_verb(rest, 'its', 'their')} time{_spread(b)} waiting on rank {entry} in "
                       f"broadcast_object_list (rank {entry}: {pm(ph(first, 'broadcast'), _ci(first, 'broadcast'))}%)")
    fd = {p.rank: ph(p, "from_dict") for p in profiles}
    if any(above(ph(p, "from_dict"), _ci(p, "from_dict"), MIN_PCT) for p in profiles):
        hi = max(rest, key=lambda p: fd[p.rank]) if rest else None
        if hi is not None and above(fd[entry], _ci(first, "from_dict"), MIN_PCT) and fd[hi.rank] < 1.0 \
                and differs(fd[entry], _ci(first, "from_dict"), fd[hi.rank], _ci(hi, "from_dict")):
            out.append(f"rank {entry} spends {pm(fd[entry], _ci(first, 'from_dict'))}% in from_dict (feature hashing) "
                       f"while {rank_list([p.rank for p in rest])} {_verb(rest, 'spends', 'spend')} under 1%: "
                       "materialization runs once, on the entry rank")
        else:
            vals = list(fd.values())
            out.append(f"from_dict (materialization, sha256 hashing) takes {pm(mean(vals), _mean_ci(profiles, 'from_dict'))}% "
                       f"of each rank's time{_spread(vals)}")
    pk, up = ph(first, "pickle"), [ph(p, "unpickle") for p in rest]
    if above(pk, _ci(first, "pickle"), MIN_PCT) or (up and above(mean(up), _mean_ci(rest, "unpickle"), MIN_PCT)):
        s = f"rank {entry} pickles for {pm(pk, _ci(first, 'pickle'))}% of its time"
        if up:
            s += (f"; {rank_list([p.rank for p in rest])} {_verb(rest, 'unpickles', 'unpickle')} for "
                  f"{pm(mean(up), _mean_ci(rest, 'unpickle'))}%{_spread(up)}")
        out.append(s + " (the strategy's own collective)")
    if any(above(ph(p, "recv"), _ci(p, "recv"), MIN_PCT) for p in profiles):
        s = (f"the request receive (recv_requests / broadcast_pyobj) takes {pm(ph(first, 'recv'), _ci(first, 'recv'))}% "
             f"on rank {entry}")
        if rest:
            r2 = [ph(p, "recv") for p in rest]
            s += (f" and {pm(mean(r2), _mean_ci(rest, 'recv'))}%{_spread(r2)} on {rank_list([p.rank for p in rest])} "
                  f"(waiting for rank {entry}'s requests included)")
        out.append(s)
    # The shared-memory receive (0.5.10+): one finding per phase a rank spends a real share in.
    for k, what in (("shm_open", "opening each feature's segment"),
                    ("shm_sync", "waiting at the barrier until every rank has opened its segments, and in the "
                                 "failure all_reduce"),
                    ("shm_map", "mapping the segments")):
        if any(above(ph(p, k), _ci(p, k), MIN_PCT) for p in profiles):
            parts = ", ".join(f"rank {p.rank} {pm(ph(p, k), _ci(p, k))}%" for p in profiles)
            out.append(f"{k} ({what}): {parts}")
    if any(above(ph(p, "idle"), _ci(p, "idle"), MIN_PCT) for p in profiles):
        parts = ", ".join(f"rank {p.rank} {pm(ph(p, 'idle'), _ci(p, 'idle'))}%" for p in profiles)
        out.append(f"idle (waiting for requests): {parts}")
    out.extend(_gil_findings(profiles))
    out.extend(_wait_findings(profiles))
    pinned = [(r, c) for r, c in sorted(cpu.items()) if c is not None and c >= 90.0]
    if pinned:
        out.append("scheduler CPU pinned: " + ", ".join(f"rank {r} {c:.0f}%" for r, c in pinned))
    for p in profiles:
        if ph(p, "other") >= 30.0 and p.unmatched_top:
            top = ", ".join(f"{n} ({c})" for n, c in p.unmatched_top[:3])
            out.append(f"rank {p.rank}: {ph(p, 'other'):.0f}% of samples match no phase rule (most in: {top})")
    for e in exited or []:
        out.append(f"{e.get('who') or 'rank ' + str(e['rank'])} (pid {e['pid']}) exited during the window; "
                   f"kept its {e['samples']} samples (about {e['sampled_s']:.1f} s)")
    out.extend(notes or [])
    return out
