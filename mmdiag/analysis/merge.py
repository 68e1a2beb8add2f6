"""Merge replay Runs that measured the same thing into one: `merge_replays(runs)`.

Runs of one trace, at one rank count, on one host, with the same replay settings
measure the same workload; their strategies (and the repeats of a strategy replayed
in several Runs) pool into one Run. Any other Run is left out, with the reason.
The first replay Run given is the reference. A strategy's own settings (`cond`'s
threshold) must match too: a strategy replayed with others is left out of the pool,
with the reason, and the merged Run describes each strategy as it was measured.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

from ..run import Run, StrategyResult
from ..vocab import AXES

# Replay settings that change what a strategy measures.
SETTINGS = ("impl", "forward_ms", "max_concurrency", "max_recv_mb", "transport", "tokenizer_workers", "skip_hash",
            "shm_map", *AXES)
# A strategy's own settings, in config.strategies.<name>: what its measurement depends on.
STRATEGY_SETTINGS = {"cond": ("threshold", "bytes")}
# What makes two traces the same workload (the file may have moved).
TRACE_KEYS = ("requests", "mm_requests", "items", "mm_bytes", "arrival", "source")


@dataclass
class Merged:
    run: Run | None
    used: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)   # (Run, why)

    def notes(self) -> list[str]:
        if len(self.used) + len(self.left_out) < 2:
            return []
        out = [f"measurements merged from {len(self.used)} Run(s): {', '.join(self.used)}"]
        out += [f"left out {name}: {why}" for name, why in self.left_out]
        return out


def label(run: Run, i: int) -> str:
    return run.path or f"Run {i + 1}"


def _differs(ref: Run, run: Run) -> str | None:
    if run.tp != ref.tp:
        return f"tp {run.tp}, not {ref.tp} (collective costs differ with the rank count)"
    for k in TRACE_KEYS:
        if run.trace.get(k) != ref.trace.get(k):
            return f"another trace ({k} differs)"
    if run.host.get("hostname") != ref.host.get("hostname"):
        return f"measured on host {run.host.get('hostname')!r}, not {ref.host.get('hostname')!r}"
    for k in SETTINGS:
        mine, theirs = run.config.setting(k), ref.config.setting(k)
        if mine != theirs:
            return f"replayed with another {k} ({mine!r}, not {theirs!r})"
    return None


def _setting(run: Run, name: str):
    key = STRATEGY_SETTINGS.get(name)
    if key is None:
        return None
    d = run.described(name)
    for k in key:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def pool(results: list[StrategyResult]) -> StrategyResult:
    """One strategy replayed in several Runs: every repeat counts, and the throughput is the
    pooled repeats' median (as one Run's is its own repeats': replay.assemble.merge_repeats), so
    the figure shown is the one the verdict ranks, not one Run's; the Run whose own throughput
    is the median stands for the per-rank figures."""
    if len(results) == 1:
        return results[0]
    rep = sorted(results, key=lambda s: s.throughput_rps if s.throughput_rps is not None else 0.0)[len(results) // 2]
    agree = [s.ranks_agree for s in results]
    repeats = _finite(x for s in results for x in (s.repeats_rps or [s.throughput_rps]))
    return replace(rep, repeats_rps=repeats, throughput_rps=statistics.median(repeats) if repeats
                   else rep.throughput_rps,
                   repeats_p99_ms=_finite(x for s in results for x in s.repeats_p99_ms),
                   ranks_agree=None if None in agree else all(agree))


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and x == x]


def merge_replays(runs: list[Run]) -> Merged:
    replays = [(i, r) for i, r in enumerate(runs) if r.is_replay]
    if not replays:
        return Merged(None)
    ref = replays[0][1]
    m = Merged(None)
    by_name: dict[str, list[StrategyResult]] = {}
    first: dict[str, tuple[str, Run]] = {}   # the first Run that measured each strategy: its settings rule
    for i, run in replays:
        why = _differs(ref, run)
        if why:
            m.left_out.append((label(run, i), why))
            continue
        m.used.append(label(run, i))
        for name, s in run.strategies.items():
            if not isinstance(s.throughput_rps, (int, float)) or s.throughput_rps != s.throughput_rps:
                m.left_out.append((f"{label(run, i)} `{name}`", "no throughput measured"))
                continue
            ref_label, ref_s = first.setdefault(name, (label(run, i), run))
            mine, theirs = _setting(run, name), _setting(ref_s, name)
            if mine != theirs:
                m.left_out.append((f"{label(run, i)} `{name}`", f"replayed with another {STRATEGY_SETTINGS[name][0]} "
                                   f"({mine!r}, not {theirs!r} as in {ref_label})"))
                continue
            by_name.setdefault(name, []).append(s)
    described = {n: first[n][1].described(n) for n in by_name}
    config = replace(ref.config, strategies={n: d for n, d in described.items() if d})
    m.run = replace(ref, config=config, strategies={n: pool(ss) for n, ss in by_name.items()})
    return m
