"""Console tables (tabulate) for Runs."""
from __future__ import annotations

import math

from tabulate import tabulate

from .. import units
from ..run import Run, StrategyResult
from ..strategies import BASELINE
from ..vocab import CONTRACT_PHASES


def _f(x: float, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def summary_table(run: Run, fmt: str = "simple") -> str:
    base = run.strategies.get(BASELINE)
    rows = []
    for name, s in run.strategies.items():
        vs = f"{s.throughput_rps / base.throughput_rps:.2f}x" if base and base.throughput_rps else "-"
        cpu = sum(r.cpu_s for r in s.ranks)
        rps = _f(s.throughput_rps, 2)
        if len(s.repeats_rps) > 1:
            rps += f" ±{_spread(s.repeats_rps):.2f}"
        rows.append([name, rps, vs, _f(s.latency_ms["p50"]), _f(s.latency_ms["p99"]),
                     _f(units.mb(s.bytes_per_request)), _f(s.collectives_per_request, 2),
                     _f(s.requests_per_iteration), _f(cpu, 2),
                     {True: "yes", False: "NO", None: "-"}[s.ranks_agree]])
    return tabulate(rows, headers=["strategy", "req/s", f"vs {BASELINE}", "p50 ms", "p99 ms", "MB/req",
                                   "coll/req", "req/iter", "CPU s (all ranks)", "ranks agree"],
                    tablefmt=fmt, disable_numparse=True)


def _spread(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def phase_table(run: Run, fmt: str = "simple") -> str:
    rows = []
    for name, s in run.strategies.items():
        for r in s.ranks:
            per = lambda p: r.phases_ms.get(p, 0.0) / max(s.requests, 1)  # noqa: E731
            rows.append([name, r.rank] + [_f(per(p), 2) for p in CONTRACT_PHASES]
                        + [_f(per("forward"), 2), _f(per("idle"), 2), _f(r.cpu_s, 2),
                           _f(100.0 * r.cpu_s / r.wall_s if r.wall_s else math.nan, 0),
                           _f((r.replay.loop_stall_ms if r.replay else {}).get("p99", math.nan), 1)])
    return tabulate(rows, headers=["strategy", "rank"] + [f"{p}" for p in CONTRACT_PHASES]
                    + ["forward", "idle", "CPU s", "CPU %", "stall p99"],
                    tablefmt=fmt, disable_numparse=True)


def render_run(run: Run) -> str:
    t = run.trace
    head = (f"replay of {t.get('requests')} requests ({t.get('mm_requests')} multimodal, "
            f"{_f(units.mb(t.get('mean_mm_request_bytes', 0)))} MB of features each) "
            f"at tp {run.tp} on {run.host.get('hostname')} ({run.host.get('cpus')} cores)")
    parts = [head, "", summary_table(run), "",
             "phase time per request, ms (recv = the every-version request broadcast; "
             "pickle/broadcast/unpickle = the strategy's own collective)", "", phase_table(run)]
    tok = [(n, s.tokenizer_ms) for n, s in run.strategies.items() if s.tokenizer_ms]
    for n, tk in tok:
        what = " + ".join(w for w, k in (("hashing", "tokenizer_hash"), ("shared-memory write", "tokenizer_shm"))
                          if tk.get(k, 1.0))
        parts.append(f"\n{n}: tokenizer-side {what} {_f(tk['per_mm_request'], 2)} ms per multimodal request "
                     f"(the tokenizer stage caps at {_f(tk['capacity_rps'])} req/s with "
                     f"{tk.get('workers', 1)} hashing worker(s); throughput is the lower of it and the loop's)")
    bad = [n for n, s in run.strategies.items() if s.ranks_agree is False]
    if bad:
        parts.append(f"\nWARNING: ranks disagree on hashes/pad values for: {', '.join(bad)}")
    return "\n".join(parts)


def strategy_line(s: StrategyResult) -> str:
    return f"{s.name}: {s.throughput_rps:.2f} req/s, p99 {s.latency_ms['p99']:.1f} ms"
