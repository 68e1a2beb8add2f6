"""The server as a pipeline: its stages, and the one that bounds throughput.

A multimodal request passes the tokenizer stage (the main process's TokenizerManager or
its tokenizer workers: processing, hashing in the hash pool's threads from 0.5.21, the
write into a shared-memory segment) and then the scheduler loop (every TP rank, in step).
Each stage is served by one or more *servers*: groups of threads that take its requests in
turn (the tokenizer's main thread; its hash pool of n threads; each scheduler rank).

Method (samples carry no timestamps, so per-request times are derived, not seen):
- A server's busy share u (100 - idle, per thread of the group; idle is waiting for work:
  rules.toml) over the window W is the time it spent on the N requests that passed it.
  In steady state every stage passes the same requests, so the server with the largest u
  bounds the server: it saturates first. Its capacity is N / (u W) req/s and its service
  time per request u n W / N for a group of n threads (a pool's capacity is n over that).
- N is counted live where the server lets the kernel count it (mmdiag.live.requests: the
  shared-memory segments its tokenizer creates, one per image feature, 0.5.10+). Without a
  count, the verdict still names the stage that bounds throughput and by what factor
  (the ratio of busy shares), but gives no req/s.
- Intervals: u carries its 95% sampling half-width h (stats.py); N is exact over the
  window, so capacity and service time carry the relative half-width h / u (delta method).
  The bottleneck is called clear when the two stages' busy shares differ by more than
  their half-widths combined.
"""
from __future__ import annotations

import math
from collections import Counter

from ..run import Stage, StageServer
from ..vocab import STAGE_PHASES
from .attribute import RankProfile, RankSamples
from .pyspy import ThreadSamples, main_thread
from .rules import RuleSet
from .stats import shares_pct

TOKENIZER = STAGE_PHASES["tokenizer"]
POOL_THREAD = "sglang-mm-hash"  # 0.5.21+ MultimodalHashExecutor's thread_name_prefix
# Scheduler-side names a tokenizer stack can fall in: its hashing outside the pool (0.5.7-0.5.20's
# synchronous precompute) is the tokenizer's.
_FOLD = {"from_dict": "tokenizer_hash"}


def _tok_phase(phase: str) -> str:
    phase = _FOLD.get(phase, phase)
    return phase if phase in TOKENIZER else "other"


def _counts(threads: list[ThreadSamples | None], rules: RuleSet) -> Counter:
    c: Counter = Counter({p: 0 for p in TOKENIZER})
    for t in threads:
        for stack, n in (t.stacks.items() if t is not None else ()):
            c[_tok_phase(rules.classify(stack)[0])] += n
    return c


def _server(name: str, pid, tids: list[int], rs: RankSamples, rules: RuleSet) -> StageServer:
    per_block = []
    for threads, _ in rs.block_list():
        per_block.append(_counts([threads.get(t) for t in tids], rules))
    pct, ci, _ = shares_pct(per_block, TOKENIZER)
    n = sum(sum(c.values()) for c in per_block)
    return StageServer(name=name, pid=pid, tids=sorted(tids), threads=len(tids), samples=n, phases_pct=pct,
                       phases_ci=ci, busy_pct=round(100.0 - pct["idle"], 2), busy_ci=ci["idle"])


def tokenizer_servers(rs: RankSamples, rules: RuleSet) -> list[StageServer]:
    """A tokenizer process's main thread, and its hash pool: the threads named as 0.5.21+'s
    pool names them, or any other thread seen hashing."""
    main = main_thread(rs.threads, rs.pid)
    out = []
    if main is not None:
        out.append(_server("main thread", rs.pid, [main.tid], rs, rules))
    pool = [tid for tid, t in rs.threads.items() if (main is None or tid != main.tid) and (
        (t.name or "").startswith(POOL_THREAD)
        or any(_tok_phase(rules.classify(s)[0]) == "tokenizer_hash" for s in t.stacks))]
    if pool:
        out.append(_server(f"hash pool ({len(pool)} thread{'s' if len(pool) > 1 else ''})", rs.pid, pool, rs, rules))
    return out


def scheduler_servers(profiles: list[RankProfile]) -> list[StageServer]:
    return [StageServer(name=f"rank {p.rank}", pid=p.pid, tids=[p.pid] if p.pid else [], samples=p.samples,
                        phases_pct=dict(p.phases_pct), phases_ci=dict(p.phases_ci),
                        busy_pct=round(100.0 - p.phases_pct.get("idle", 0.0), 2), busy_ci=p.phases_ci.get("idle"))
            for p in profiles]


def _stage(role: str, servers: list[StageServer], requests: int | None, window: float | None) -> Stage:
    b = max(servers, key=lambda s: s.busy_pct)
    st = Stage(role=role, pids=sorted({s.pid for s in servers if s.pid is not None}), servers=servers,
               bound_by=b.name, phases_pct=dict(b.phases_pct), phases_ci=dict(b.phases_ci),
               busy_pct=b.busy_pct, busy_ci=b.busy_ci)
    u = b.busy_pct / 100.0
    if requests and window and u > 0:
        rel = (b.busy_ci or 0.0) / b.busy_pct
        st.service_ms = round(1000.0 * u * b.threads * window / requests, 2)
        st.capacity_rps = round(requests / (u * window), 2)
        st.service_ci = round(st.service_ms * rel, 2) if b.busy_ci is not None else None
        st.capacity_ci = round(st.capacity_rps * rel, 2) if b.busy_ci is not None else None
    return st


def build_stages(tokenizers: list[RankSamples], profiles: list[RankProfile], rules: RuleSet,
                 requests: int | None, window: float | None) -> list[Stage]:
    """The tokenizer stage (every tokenizer process's servers) and the scheduler loop."""
    out = []
    tok = [s for rs in tokenizers for s in tokenizer_servers(rs, rules) if s.samples]
    if len(tokenizers) > 1:  # several tokenizer workers share the requests: name each server by its process
        for s in tok:
            s.name = f"pid {s.pid} {s.name}"
    if tok:
        out.append(_stage("tokenizer", tok, requests, window))
    sched = [s for s in scheduler_servers(profiles) if s.samples]
    if sched:
        out.append(_stage("scheduler", sched, requests, window))
    return out


def _name(st: Stage) -> str:
    return "the scheduler loop" if st.role == "scheduler" else f"the {st.role} stage"


def _rate(v: float | None, ci: float | None) -> str:
    if v is None:
        return "-"
    digits = 0 if v >= 100 else 1
    return f"{v:.{digits}f}" + ("" if ci is None else f" +/- {ci:.{digits}f}")


def bottleneck(stages: list[Stage], requests: int | None, window: float | None) -> dict | None:
    """Which stage bounds throughput, by how much, and the sentence that says so."""
    if len(stages) < 2:
        return None
    ranked = sorted(stages, key=lambda s: -s.busy_pct)
    b, o = ranked[0], ranked[1]
    ratio = (b.busy_pct / o.busy_pct) if o.busy_pct > 0 else math.inf
    clear = b.busy_pct - o.busy_pct > math.hypot(b.busy_ci or 0.0, o.busy_ci or 0.0)
    if b.capacity_rps is not None:
        text = (f"{_name(b)} caps at {_rate(b.capacity_rps, b.capacity_ci)} req/s ({b.bound_by} "
                f"{b.busy_pct:.0f}% busy); {_name(o)} would take {_rate(o.capacity_rps, o.capacity_ci)}")
    else:
        text = (f"{_name(b)} bounds throughput ({b.bound_by} {b.busy_pct:.0f}% busy); {_name(o)} "
                f"({o.bound_by} {o.busy_pct:.0f}% busy) would take {ratio:.1f}x its rate "
                "(no request count in this window, so no req/s: see mmdiag.live.requests)")
    if not clear:
        text += f"; not clear: their busy shares overlap within their 95% intervals"
    return {"stage": b.role, "server": b.bound_by, "busy_pct": b.busy_pct, "busy_ci": b.busy_ci,
            "capacity_rps": b.capacity_rps, "capacity_ci": b.capacity_ci, "next": o.role,
            "next_capacity_rps": o.capacity_rps, "next_capacity_ci": o.capacity_ci,
            "ratio": None if math.isinf(ratio) else round(ratio, 2), "clear": clear,
            "requests": requests, "window_s": window, "text": text}
