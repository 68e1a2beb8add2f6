"""Turn the ranks' gathered outcomes into the Run model (on rank 0)."""
from __future__ import annotations

import math
import os
import platform
import socket
import statistics
from datetime import datetime, timezone
from typing import Any

import torch

from ..run import RankResult, ReplayConfig, ReplayRank, Run, StrategyResult, summarize_ms
from ..trace import TraceHeader, TraceStats
from ..vocab import REPLAY_SCHEMA
from .scheduler import RankOutcome


def latency_hist(values_ms: list[float], bins: int = 40) -> dict[str, list[float]]:
    """Log-spaced histogram, enough for renderers to draw a distribution."""
    values_ms = [v for v in values_ms if math.isfinite(v)]
    if not values_ms:
        return {"edges_ms": [], "counts": []}
    lo, hi = max(min(values_ms), 0.01), max(max(values_ms), 0.02)
    if hi <= lo:
        hi = lo * 1.01
    step = (math.log10(hi) - math.log10(lo)) / bins
    edges = [10 ** (math.log10(lo) + i * step) for i in range(bins + 1)]
    counts = [0] * bins
    for v in values_ms:
        k = min(bins - 1, max(0, int((math.log10(max(v, lo)) - math.log10(lo)) / step))) if step else 0
        counts[k] += 1
    return {"edges_ms": edges, "counts": counts}


def tokenizer_stage(tok: dict[str, dict[int, float]], n: int, workers: int) -> dict[str, float]:
    """The tokenizer side as a pipeline stage: hashing spreads over `workers` threads
    (sha256 releases the GIL), the shared-memory write runs on its loop. Its capacity
    bounds the replay's throughput like the scheduler loop does."""
    hash_s = sum(tok.get("tokenizer_hash", {}).values())
    shm_s = sum(tok.get("tokenizer_shm", {}).values())
    busy = hash_s / workers + shm_s
    if not busy:
        return {}
    mm = len(set(tok.get("tokenizer_hash", {})) | set(tok.get("tokenizer_shm", {})))
    return {"tokenizer_hash": hash_s * 1000.0, "tokenizer_shm": shm_s * 1000.0,
            "per_mm_request": (hash_s + shm_s) / max(mm, 1) * 1000.0, "workers": workers,
            "capacity_rps": n / busy}


def strategy_result(name: str, outcomes: list[RankOutcome], tok: dict[str, dict[int, float]],
                    stats: TraceStats, workers: int = 1) -> StrategyResult:
    """`tok`: tokenizer-side seconds per phase and request index. Latency runs from a
    request's send, so the tokenizer stage the Intake replays (hashing measured before
    the window) is in it. Throughput is the lower of the scheduler loop's and the
    tokenizer stage's capacity."""
    entry = next(o for o in outcomes if o.rank == 0)
    lat_ms, last = [], 0.0
    first = min((a for a, _ in entry.arrivals.values()), default=0.0)
    for rid, (arrival, _idx) in entry.arrivals.items():
        held = max(o.holds.get(rid, math.inf) for o in outcomes)
        last = max(last, held)
        lat_ms.append((held - arrival) * 1000.0)
    duration = max(last - first, 1e-9)
    n = len(entry.arrivals)
    agree = (len({o.digest for o in outcomes}) == 1 and all(o.held == n for o in outcomes)
             and all(o.invalid == 0 for o in outcomes))
    tokenizer = tokenizer_stage(tok, n, workers)
    loop_rps = n / duration
    if tokenizer:
        tokenizer["loop_rps"] = loop_rps
    rps = min(loop_rps, tokenizer.get("capacity_rps", math.inf))
    ranks = [RankResult(rank=o.rank, cpu_s=o.cpu_s, wall_s=o.wall_s, phases_ms=o.phases_ms,
                        replay=ReplayRank(iterations=o.iterations, loop_stall_ms=o.loop_stall_ms,
                                          collectives=o.collectives, bytes_sent=o.bytes_sent,
                                          recv_bytes=o.recv_bytes))
             for o in sorted(outcomes, key=lambda o: o.rank)]
    return StrategyResult(
        name=name, requests=n, duration_s=duration, throughput_rps=rps,
        latency_ms=summarize_ms(lat_ms), ranks=ranks,
        bytes_per_request=(entry.recv_bytes + entry.bytes_sent) / max(n, 1),
        collectives_per_request=entry.collectives / max(n, 1),
        mm_requests=stats.mm_requests, items=stats.items,
        requests_per_iteration=(statistics.fmean(entry.batch_sizes) if entry.batch_sizes else 0.0),
        tokenizer_ms=tokenizer, ranks_agree=agree,
        repeats_rps=[rps], repeats_p99_ms=[summarize_ms(lat_ms)["p99"]],
        latency_hist=latency_hist(lat_ms), recv_cap_hits=entry.cap_hits,
    )


def merge_repeats(runs: list[StrategyResult]) -> StrategyResult:
    """The median-throughput repeat stands for the strategy's other figures; its throughput is
    the repeats' median (with two, their midpoint: analysis.merge.pool pools Runs the same way);
    every repeat's figures are kept."""
    rep = sorted(runs, key=lambda r: r.throughput_rps)[len(runs) // 2]
    rep.repeats_rps = [r.throughput_rps for r in runs]
    rep.throughput_rps = statistics.median(rep.repeats_rps)
    rep.repeats_p99_ms = [r.latency_ms["p99"] for r in runs]
    rep.ranks_agree = all(r.ranks_agree for r in runs)
    return rep


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def assemble_run(results: dict[str, list[StrategyResult]], world: int, job: Any,
                 header: TraceHeader, stats: TraceStats) -> Run:
    o = job.options
    return Run(
        schema=REPLAY_SCHEMA, tp=world,
        strategies={name: merge_repeats(runs) for name, runs in results.items()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=host_info(),
        trace={"path": os.path.abspath(job.trace), "source": header.source, "arrival": header.arrival,
               "model": header.model.get("name"), "requests": stats.requests, "mm_requests": stats.mm_requests,
               "items": stats.items, "mm_bytes": stats.mm_bytes, "modalities": stats.modalities,
               "duration_s": stats.duration_s,  # arrival span: the offered rate of an open loop
               "mean_mm_request_bytes": stats.mm_bytes / max(stats.mm_requests, 1)},
        config=ReplayConfig(
            forward_ms=o.forward_ms, max_concurrency=o.max_concurrency, max_recv_mb=o.max_recv_mb, repeat=o.repeat,
            timeout_s=o.timeout, impl=o.impl,
            launcher=os.environ.get("MMDIAG_LAUNCHER", "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env")),
    )
