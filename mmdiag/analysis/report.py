"""Before against after: `build_report(before, after, criteria) -> Report`.

Which strategies are compared (the default, documented in `mmdiag report --help`):
  1. --before-strategy / --after-strategy when given;
  2. a Run with exactly one strategy: that one (a replay of installed code, a live profile);
  3. before: `commit` (the regression, the baseline) when the Run has it;
     after: the strategy `mmdiag recommend` picks from the after Run;
  4. otherwise an error listing the Run's strategies.

Runs of different schemas (a live profile has no throughput or latency, a replay no
GIL) or different rank counts (per-rank phases and CPU have no counterpart) are not
compared: an error says which and why. Differences are judged with the repeats
(mmdiag.analysis.compare); a difference inside the noise is "not significant".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MmdiagError
from ..run import RankResult, Run, StrategyResult
from ..strategies import BASELINE
from ..units import MB
from ..vocab import PHASES, PROFILE_SCHEMA, REPLAY_SCHEMA
from . import breakdown as B
from .breakdown import json_safe
from . import conditions as L
from .conditions import Side
from .compare import NOT_JUDGED, Comparison, compare_samples
from .criteria import Criterion

PASS, FAIL, NA = "pass", "fail", "n/a"


class ReportError(MmdiagError):
    """Two Runs that cannot be compared, or a strategy that is not in a Run."""


@dataclass
class MetricRow:
    metric: str
    unit: str
    before: float | None
    after: float | None
    change: str         # ratio or difference
    verdict: str        # significance words
    better: bool | None = None


@dataclass
class CriterionResult:
    key: str
    description: str
    threshold: str
    measured: str
    status: str         # pass | fail | n/a
    note: str = ""
    condition: str = L.ANY  # where it means something (mmdiag.analysis.conditions)
    measure_with: str = ""  # n/a: the commands that would measure it


@dataclass
class Report:
    before: Side
    after: Side
    metrics: list[MetricRow]
    phases: list[dict[str, Any]]          # per rank and phase: before/after (ms per request or %)
    phase_unit: str
    criteria: list[CriterionResult]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.status == FAIL for c in self.criteria)

    @property
    def verdict(self) -> str:
        judged = [c for c in self.criteria if c.status != NA]
        if any(c.status == FAIL for c in judged):
            return "FAIL"
        return "PASS" if judged else "NOT JUDGED"

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {"path": s.path, "schema": s.run.schema, "tp": s.run.tp, "strategy": s.strategy,
                    "prefix_cache": s.prefix_cache, "trace": s.run.trace, "created": s.run.created}
        return json_safe({
            "schema": "mmdiag.report/1", "verdict": self.verdict, "passed": self.passed,
            "before": side(self.before), "after": side(self.after),
            "metrics": [asdict(m) for m in self.metrics], "phase_unit": self.phase_unit,
            "phases": self.phases, "criteria": [asdict(c) for c in self.criteria], "notes": self.notes,
        })


# --- choosing what to compare ------------------------------------------------------

def check_comparable(before: Run, after: Run, before_path: str, after_path: str) -> None:
    if before.schema != after.schema:
        kinds = {REPLAY_SCHEMA: "a replay", PROFILE_SCHEMA: "a live profile"}
        raise ReportError(
            f"{before_path} is {kinds.get(before.schema, before.schema)} ({before.schema}) and {after_path} is "
            f"{kinds.get(after.schema, after.schema)} ({after.schema}): throughput and latency exist only in a "
            "replay, GIL shares only in a live profile",
            fix="compare two replays (mmdiag replay) or two live profiles")
    if before.tp != after.tp:
        raise ReportError(
            f"{before_path} has {before.tp} ranks and {after_path} has {after.tp}: per-rank phases and CPU per "
            "rank have no counterpart, and the collective costs differ with the rank count",
            fix="replay (or profile) both at the same --tp")


def _pick(run: Run, path: str, wanted: str | None, default: str | None, label: str) -> tuple[str | None, StrategyResult | None]:
    names = list(run.strategies)
    if wanted:
        if wanted not in run.strategies:
            raise ReportError(f"strategy {wanted!r} is not in this Run", where=path,
                              fix=f"it has: {', '.join(names) or 'none'}")
        return wanted, run.strategies[wanted]
    if len(names) == 1:
        return names[0], run.strategies[names[0]]
    if not names and run.is_profile:
        return None, None
    if default and default in run.strategies:
        return default, run.strategies[default]
    raise ReportError(f"cannot tell which strategy is the {label} one", where=path,
                      fix=f"pick it with --{label}-strategy ({', '.join(names) or 'the Run has none'})")


def choose(before: Run, after: Run, before_path: str, after_path: str, before_strategy: str | None = None,
           after_strategy: str | None = None) -> tuple[Side, Side]:
    check_comparable(before, after, before_path, after_path)
    bname, bres = _pick(before, before_path, before_strategy, BASELINE, "before")
    default_after = None
    if not after_strategy and len(after.strategies) > 1:
        from .recommend import recommend
        rec = recommend([after])
        lead = rec.recommended or rec.leading     # the report is what judges a lead not yet shown to help
        default_after = lead if lead in after.strategies else None
        if default_after == bname and before is after:
            default_after = None
    aname, ares = _pick(after, after_path, after_strategy, default_after, "after")
    if before is after and bname == aname:
        raise ReportError(f"before and after are the same strategy {bname!r} of one Run", where=after_path,
                          fix="pick another with --after-strategy")
    return Side("before", before_path, before, bname, bres), Side("after", after_path, after, aname, ares)


# --- metrics -----------------------------------------------------------------------

def _ratio(b: float | None, a: float | None) -> str:
    if b is None or a is None or _nan(b) or _nan(a):
        return "-"
    if b == 0:
        return "-" if a == 0 else "new"
    return f"{a / b:.2f}x"


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _none(x):
    return None if _nan(x) else x


def _row_plain(metric: str, unit: str, b, a) -> MetricRow:
    return MetricRow(metric, unit, _none(b), _none(a), _ratio(b, a), "")


def _row_judged(metric: str, unit: str, c: Comparison | None, b, a) -> MetricRow:
    if c is None:
        return _row_plain(metric, unit, b, a)
    if c.n_before > 1 or c.n_after > 1:
        # Judged on the repeats: show their means, so the change and the verdict agree.
        metric = f"{metric}, mean of {c.n_before}/{c.n_after} repeats"
    # The comparison's means: with one repeat a side they are that repeat.
    b, a = c.before, c.after
    return MetricRow(metric, unit, _none(b), _none(a), _ratio(b, a), c.verdict(),
                     better=True if c.better else False if c.worse else None)


def _judge(metric: str, b_s: list[float], a_s: list[float], b, a, higher_is_better: bool) -> Comparison | None:
    """One comparison of the repeats (a lone value where a side kept none); None without values."""
    bs = [x for x in (b_s or [b]) if not _nan(x)]
    as_ = [x for x in (a_s or [a]) if not _nan(x)]
    if not bs or not as_:
        return None
    return compare_samples(bs, as_, metric=metric, higher_is_better=higher_is_better)


def throughput_comparison(before: Side, after: Side) -> Comparison | None:
    """After against before request throughput: the one comparison both the table row and
    the throughput_ratio criterion are judged from."""
    bs, as_ = before.result, after.result
    if not (before.has_requests and after.has_requests):
        return None
    return _judge("throughput", bs.repeats_rps, as_.repeats_rps, bs.throughput_rps, as_.throughput_rps, True)


def _max_rank(ranks: list[RankResult], f) -> float | None:
    v = B.max_or_nan(f(r) for r in ranks)
    return None if math.isnan(v) else v


def metrics(before: Side, after: Side, throughput: Comparison | None = None) -> list[MetricRow]:
    """The before/after table; `throughput`: the comparison the criterion uses (computed when None)."""
    rows: list[MetricRow] = []
    bs, as_ = before.result, after.result
    if before.has_requests and after.has_requests:
        thr = throughput if throughput is not None else throughput_comparison(before, after)
        rows.append(_row_judged("throughput", "req/s", thr, bs.throughput_rps, as_.throughput_rps))
        rows.append(_row_plain("p50 latency", "ms", bs.latency_ms.get("p50"), as_.latency_ms.get("p50")))
        p99_b, p99_a = bs.latency_ms.get("p99"), as_.latency_ms.get("p99")
        rows.append(_row_judged("p99 latency", "ms",
                                _judge("p99 latency", bs.repeats_p99_ms, as_.repeats_p99_ms, p99_b, p99_a, False),
                                p99_b, p99_a))
        for q in ("p50", "p99"):   # a live server's bench_serving runs also time the first token
            if f"ttft_{q}" in bs.latency_ms or f"ttft_{q}" in as_.latency_ms:
                rows.append(_row_plain(f"{q} TTFT", "ms", bs.latency_ms.get(f"ttft_{q}"), as_.latency_ms.get(f"ttft_{q}")))
    rows.append(_row_plain("scheduler CPU, busiest rank", "%", _max_rank(before.ranks, B.cpu_pct),
                           _max_rank(after.ranks, B.cpu_pct)))
    for r in sorted({r.rank for r in before.ranks} | {r.rank for r in after.ranks}):
        rb = next((x for x in before.ranks if x.rank == r), None)
        ra = next((x for x in after.ranks if x.rank == r), None)
        rows.append(_row_plain(f"scheduler CPU, rank {r}", "%", B.cpu_pct(rb) if rb else None,
                               B.cpu_pct(ra) if ra else None))
    rows.append(_row_plain("GIL held, busiest rank", "%", _max_rank(before.ranks, lambda r: B.gil(r, "gil_held_pct")),
                           _max_rank(after.ranks, lambda r: B.gil(r, "gil_held_pct"))))
    rows.append(_row_plain("GIL wait, worst rank", "%", _max_rank(before.ranks, lambda r: B.gil(r, "gil_wait_pct")),
                           _max_rank(after.ranks, lambda r: B.gil(r, "gil_wait_pct"))))
    if bs and as_ and before.is_replay:
        rows.append(_row_plain("collectives per request", "", bs.collectives_per_request, as_.collectives_per_request))
        rows.append(_row_plain("MB per request (CPU group)", "MB", bs.bytes_per_request / MB, as_.bytes_per_request / MB))
        rows.append(_row_plain("requests per loop iteration", "", bs.requests_per_iteration, as_.requests_per_iteration))
        # the tokenizer stage's phases (the content hash, the segment write): what xxh3 and pool change
        for what, key in (("hashing", "tokenizer_hash"), ("shared-memory write", "tokenizer_shm")):
            tb = (bs.tokenizer_ms or {}).get(key, 0.0) / max(bs.mm_requests, 1)
            ta = (as_.tokenizer_ms or {}).get(key, 0.0) / max(as_.mm_requests, 1)
            if tb or ta:
                rows.append(_row_plain(f"tokenizer {what} per mm request", "ms", tb, ta))
    rows.append(_row_plain("mm path share, busiest rank", "%", _max_rank(before.ranks, B.mm_share),
                           _max_rank(after.ranks, B.mm_share)))
    return rows


def phase_rows(before: Side, after: Side) -> tuple[list[dict[str, Any]], str]:
    replay = not any(r.profile for r in before.ranks + after.ranks)
    unit = "ms per request" if replay else "% of samples"
    out = []
    for r in sorted({r.rank for r in before.ranks} | {r.rank for r in after.ranks}):
        row: dict[str, Any] = {"rank": r, "before": {}, "after": {}}
        for side, key in ((before, "before"), (after, "after")):
            rk = next((x for x in side.ranks if x.rank == r), None)
            if rk is None:
                continue
            if replay:
                n = max(side.result.requests if side.result else 1, 1)
                row[key] = {p: rk.phases_ms.get(p, 0.0) / n for p in PHASES}
            else:
                row[key] = B.phase_pct(rk)
        out.append(row)
    return out, unit


# --- criteria ----------------------------------------------------------------------

def evaluate(criteria: list[Criterion], before: Side, after: Side,
             throughput: Comparison | None = None) -> list[CriterionResult]:
    """`throughput`: the comparison the table's throughput row shows (computed when None)."""
    thr = throughput if throughput is not None else throughput_comparison(before, after)
    return [_evaluate_one(c, before, after, thr) for c in criteria]


def _cmp(c: Criterion, v: float) -> bool:
    return v <= c.value if c.field == "max" else v >= c.value


def _evaluate_one(c: Criterion, before: Side, after: Side, thr: Comparison | None) -> CriterionResult:
    res = CriterionResult(c.key, c.description, c.threshold(), "n/a", NA, condition=c.condition)
    why_not = L.judgeable(c.condition, before, after)
    if why_not is not None:
        res.note = f"n/a: {why_not}"
        res.measure_with = L.remeasure(c.condition, before, after)
        return res
    ranks = after.ranks
    if c.key == "cpu_per_request_ratio":
        _cpu_per_request(res, c, before, after)
    elif c.key == "scheduler_cpu_pct":
        vals = [(r.rank, B.cpu_pct(r)) for r in ranks if not _nan(B.cpu_pct(r))]
        if vals:
            rank, worst = max(vals, key=lambda x: x[1])
            res.measured = f"{worst:.0f}% (rank {rank}; all: " + ", ".join(f"{v:.0f}" for _, v in vals) + ")"
            res.status = PASS if _cmp(c, worst) else FAIL
        else:
            res.note = "no CPU measurement in the after Run"
    elif c.key == "gil_wait_pct":
        vals = [(r.rank, B.gil(r, "gil_wait_pct")) for r in ranks if B.gil(r, "gil_wait_pct") is not None]
        if vals:
            rank, worst = max(vals, key=lambda x: x[1])
            res.measured = f"{worst:.1f}% (rank {rank})"
            res.status = PASS if _cmp(c, worst) else FAIL
        else:
            res.note = "no GIL measurement (a replay has none; profile without --no-gil)"
    elif c.key == "p99_latency_ms":
        if after.has_requests and not _nan(after.result.latency_ms.get("p99")):
            v = after.result.latency_ms["p99"]
            reps = [x for x in after.result.repeats_p99_ms if not _nan(x)]
            if len(reps) > 1:  # the same figure the before/after table judges
                v = sum(reps) / len(reps)
            res.measured = f"{v:,.0f} ms" + (f" (mean of {len(reps)} repeats)" if len(reps) > 1 else "")
            res.status = PASS if _cmp(c, v) else FAIL
        else:
            res.note = ("no latency in a live profile (replay for latency, or attach the bench_serving "
                        "results of the profiled runs: --before-bench, --after-bench)")
    elif c.key == "throughput_ratio":
        b = before.result
        if thr is not None and b is not None and thr.before and not _nan(thr.before):
            # Pass only when the mean ratio meets the target. The comparison (the table's
            # throughput row) only says how sure a shortfall is; less evidence never passes.
            ratio = thr.ratio
            means = "; means of the repeats" if thr.n_before > 1 or thr.n_after > 1 else ""
            res.measured = f"{ratio:.2f}x ({thr.after:.2f} / {thr.before:.2f} req/s{means})"
            if _cmp(c, ratio):
                res.status = PASS
            else:
                res.status = FAIL
                if thr.status == NOT_JUDGED:
                    res.note = (f"inconclusive: short of {c.value:g}x with one repeat, the noise is unknown "
                                "(replay with --repeat 3 or more)")
                elif _shortfall_significant(thr, c.value):
                    res.note = f"significantly below {c.value:g}x (95% CI of the change: {_ci(thr)})"
                else:
                    res.note = (f"inconclusive: short of {c.value:g}x but inside the noise (95% CI of the change: "
                                f"{_ci(thr)}); replay with more --repeat (5 or more) to decide")
        else:
            res.note = ("no throughput in a live profile (replay for throughput, or attach the bench_serving "
                        "results of the profiled runs: --before-bench, --after-bench)")
    elif c.key == "ranks_agree":
        v = after.result.ranks_agree if after.result is not None else None
        if v is not None:
            res.measured = "yes" if v else "NO"
            res.status = PASS if (v or not c.value) else FAIL
        else:
            res.note = "not checked in this Run"
    return res


def cpu_ms_per_request(side: Side) -> tuple[int, float] | None:
    """(rank, CPU-ms per request) of the rank that spends the most CPU per request served."""
    n = side.result.requests if side.result is not None else 0
    vals = [(r.rank, 1000.0 * r.cpu_s / n) for r in side.ranks if n and r.cpu_s]
    return max(vals, key=lambda x: x[1]) if vals else None


def _cpu_per_request(res: CriterionResult, c: Criterion, before: Side, after: Side) -> None:
    b, a = cpu_ms_per_request(before), cpu_ms_per_request(after)
    if b is None or a is None or b[1] <= 0:
        res.note = "no CPU time per request in one of the Runs (a live profile serves no counted requests)"
        return
    ratio = a[1] / b[1]
    res.measured = f"{ratio:.2f}x ({a[1]:.1f} / {b[1]:.1f} CPU-ms per request, busiest ranks {a[0]} / {b[0]})"
    res.status = PASS if _cmp(c, ratio) else FAIL


def _shortfall_significant(thr: Comparison, target: float) -> bool:
    """Is after significantly below target x before? The 95% CI of (after - before), from the
    same Welch comparison as the table, lies wholly below (target - 1) x the before mean."""
    if thr.ci95 is None:
        return False
    return thr.ci95[1] < (target - 1.0) * thr.before


def _ci(thr: Comparison) -> str:
    lo, hi = thr.ci95 or (math.nan, math.nan)
    return f"{lo:+.2f} to {hi:+.2f} req/s"


def build_report(before: Run, after: Run, criteria: list[Criterion], *, before_path: str = "before",
                 after_path: str = "after", before_strategy: str | None = None,
                 after_strategy: str | None = None) -> Report:
    b, a = choose(before, after, before_path, after_path, before_strategy, after_strategy)
    phases, unit = phase_rows(b, a)
    thr = throughput_comparison(b, a)   # one comparison for the table row and the criterion
    rep = Report(b, a, metrics(b, a, thr), phases, unit, evaluate(criteria, b, a, thr))
    if b.has_requests and not b.is_replay:   # live: bench_serving runs are the repeats
        for s in (b, a):
            if s.result and len(s.result.repeats_rps) < 2:
                rep.notes.append(f"{s.label} has one bench_serving run: differences are not judged "
                                 "(run the benchmark 3 times; each run appends a line to its --output-file)")
    if b.is_replay:
        for s in (b, a):
            if s.result and len(s.result.repeats_rps) < 2:
                rep.notes.append(f"{s.label} has one repeat: differences are not judged (replay with --repeat 3)")
        if b.run.trace.get("path") != a.run.trace.get("path") or \
                b.run.trace.get("requests") != a.run.trace.get("requests"):
            rep.notes.append("the two replays ran different traces: compare with care")
        if b.run.host.get("hostname") != a.run.host.get("hostname"):
            rep.notes.append("the two Runs come from different hosts")
    if any(c.status == NA for c in rep.criteria):
        rep.notes.append("n/a: the Runs have no such measurement, or not under a load where it means something; "
                         "neither a pass nor a fail")
    for cmd in dict.fromkeys(c.measure_with for c in rep.criteria if c.measure_with):
        keys = ", ".join(c.key for c in rep.criteria if c.measure_with == cmd)
        rep.notes.append(f"to judge {keys}: {cmd}")
    return rep
