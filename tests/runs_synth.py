"""Synthetic Runs with known numbers, built from the Run model's own dataclasses
(shared by test_recommend.py and test_report.py)."""
from __future__ import annotations

import random

from mmdiag.replay.assemble import latency_hist
from mmdiag.run import ProfileRank, RankResult, ReplayRank, Run, StrategyResult, summarize_ms
from mmdiag.vocab import PHASES, PROFILE_SCHEMA, REPLAY_SCHEMA

from mmdiag.units import MB  # the tool's one size unit (10^6 bytes)


def rank(r, cpu_pct=50.0, wall_s=10.0, collectives=0, bytes_sent=0, **phases_ms):
    ph = {p: 0.0 for p in PHASES}
    ph.update(phases_ms)
    return RankResult(rank=r, cpu_s=cpu_pct / 100 * wall_s, wall_s=wall_s, phases_ms=ph,
                      replay=ReplayRank(collectives=collectives, bytes_sent=bytes_sent))


def strategy(name, rps, ranks, *, requests=100, p99=None, coll=0.0, bytes_per_request=0.0, r_iter=4.0,
             tokenizer=None, agree=True, seed=0):
    rps = list(rps)
    rng = random.Random(seed)
    mean = sum(rps) / len(rps)
    lat = [rng.lognormvariate(0, 0.4) * 1000.0 / mean for _ in range(requests)]
    lm = summarize_ms(lat)
    if p99 is not None:
        lm["p99"] = p99
    rep = sorted(rps)[len(rps) // 2]
    for r in ranks:   # every rank ran for the strategy's duration, at its CPU share
        pct, r.wall_s = (r.cpu_s / r.wall_s if r.wall_s else 0.0), requests / rep
        r.cpu_s = pct * r.wall_s
    return StrategyResult(name=name, requests=requests, duration_s=requests / rep, throughput_rps=rep,
                          latency_ms=lm, ranks=ranks, bytes_per_request=bytes_per_request,
                          collectives_per_request=coll, mm_requests=requests, items=requests,
                          requests_per_iteration=r_iter, tokenizer_ms=tokenizer or {}, ranks_agree=agree,
                          repeats_rps=rps, repeats_p99_ms=[lm["p99"] * (1 + 0.01 * i) for i in range(len(rps))],
                          latency_hist=latency_hist(lat))


def replay_run(strategies, *, tp, mean_mb, requests=100, mode="closed", rate=None):
    """`rate`: an open loop (Poisson arrivals at `rate` req/s over requests / rate seconds)."""
    arrival = {"mode": "poisson", "request_rate": rate} if rate else {"mode": mode}
    return Run(schema=REPLAY_SCHEMA, tp=tp, strategies={s.name: s for s in strategies},
               created="2026-01-01T00:00:00+00:00", host={"hostname": "synthetic", "cpus": 64},
               trace={"path": "/synthetic/trace.jsonl", "source": {"profile": "synthetic"}, "requests": requests,
                      "mm_requests": requests, "items": requests, "mm_bytes": int(mean_mb * MB * requests),
                      "mean_mm_request_bytes": mean_mb * MB, "arrival": arrival,
                      "duration_s": requests / rate if rate else 0.0},
               config={"repeat": max(len(s.repeats_rps) for s in strategies)})


def video_run(tp=4):
    """Large video (90 MB per request, 100 requests) where the measured numbers show the
    broadcast paying: every rank hashing at once is slow (12 ms/MB, they share cores),
    the entry rank alone hashes at 4 ms/MB, sending costs 1 ms/MB + 20 ms per collective,
    and batch measures fastest. precompute measures faster still but its single
    tokenizer process caps it at 1.5 req/s."""
    n, mb = 100, 90.0
    total_mb = n * mb
    every = [rank(r, cpu_pct=95, recv=3000, from_dict=12 * total_mb, forward=500) for r in range(tp)]
    commit = [rank(0, cpu_pct=70, recv=3000, from_dict=4 * total_mb, pickle=0.5 * total_mb + 1000,
                   broadcast=0.3 * total_mb + 1000, forward=500, collectives=n, bytes_sent=int(total_mb * MB))] + \
             [rank(r, cpu_pct=40, recv=3000, broadcast=4.8 * total_mb, unpickle=0.2 * total_mb, forward=500)
              for r in range(1, tp)]
    batch = [rank(0, cpu_pct=65, recv=3000, from_dict=4 * total_mb, pickle=0.5 * total_mb + 25 * 10,
                  broadcast=0.3 * total_mb + 25 * 10, forward=500, collectives=25, bytes_sent=int(total_mb * MB))] + \
            [rank(r, cpu_pct=35, recv=3000, broadcast=4.8 * total_mb, unpickle=0.2 * total_mb, forward=500)
             for r in range(1, tp)]
    pre = [rank(r, cpu_pct=20, recv=3000, forward=500) for r in range(tp)]
    return replay_run([
        strategy("revert", [1.00, 1.02, 0.98], every, requests=n, bytes_per_request=mb * MB),
        strategy("commit", [1.60, 1.62, 1.58], commit, requests=n, coll=1.0, bytes_per_request=2 * mb * MB),
        strategy("dict", [0.90, 0.92, 0.88], [rank(r, cpu_pct=95, recv=3000, from_dict=12 * total_mb) for r in range(tp)],
                 requests=n, coll=1.0, bytes_per_request=2 * mb * MB),
        strategy("batch", [1.90, 1.93, 1.88], batch, requests=n, coll=0.25, bytes_per_request=2 * mb * MB),
        strategy("precompute", [2.50, 2.55, 2.45], pre, requests=n, bytes_per_request=mb * MB,
                 tokenizer={"tokenizer_hash": 360 * n, "per_mm_request": 360.0, "capacity_rps": 1.5}),
    ], tp=tp, mean_mb=mb, requests=n)


def profile_run(ranks_pct, tp=None, gil_wait=None, cpu=None):
    """A live profile: per-rank phase shares only."""
    ranks = []
    for i, pct in enumerate(ranks_pct):
        full = {p: 0.0 for p in PHASES}
        full.update(pct)
        wall = 30.0   # a share of wall time is that much of the window, as the profiler writes it
        ranks.append(RankResult(rank=i, wall_s=wall, phases_ms={p: v * wall * 10.0 for p, v in full.items()},
                                profile=ProfileRank(phases_pct=full, gil_held_pct=50.0,
                                gil_wait_pct=(gil_wait[i] if gil_wait else 5.0),
                                cpu_pct=(cpu[i] if cpu else 50.0), samples=1000)))
    s = StrategyResult(name="commit", requests=0, duration_s=30.0, throughput_rps=float("nan"),
                       latency_ms={"p50": float("nan"), "p99": float("nan")}, ranks=ranks)
    return Run(schema=PROFILE_SCHEMA, tp=tp or len(ranks), strategies={"commit": s}, host={"hostname": "server"})
