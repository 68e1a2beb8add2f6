"""sglang.bench_serving's vocabulary: image dataset options, and its result files.

The presets and defaults are data (profiles/bench_serving.toml), checked against the
wheels' own source by the tests. Only the words are shared; the code is mmdiag's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import ProfileError, json_error
from ..tables import PROFILES_DIR, load_table


@lru_cache(maxsize=1)
def facts() -> dict[str, Any]:
    return load_table(PROFILES_DIR / "bench_serving.toml")


def presets() -> dict[str, tuple[int, int]]:
    """--image-resolution presets: name -> (width, height)."""
    return {k: (int(v[0]), int(v[1])) for k, v in facts()["image_resolution"].items()}


def defaults() -> dict[str, Any]:
    return dict(facts()["defaults"])


@dataclass(frozen=True)
class Resolution:
    """Image sizes bench_serving draws: fixed when min == max, else uniform per side."""
    text: str
    min_wh: tuple[int, int]
    max_wh: tuple[int, int]

    @property
    def fixed(self) -> bool:
        return self.min_wh == self.max_wh


def _one_size(text: str) -> tuple[int, int] | None:
    if text in presets():
        return presets()[text]
    parts = text.strip().lower().split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[1]), int(parts[0])      # "HxW": height first
    return None


def parse_image_resolution(text: str) -> Resolution:
    """4k, 1080p, 720p, 360p, HxW (height first) or random:HxW-HxW."""
    bad = ProfileError(f"--image-resolution {text!r} is not a resolution",
                       fix=f"use {', '.join(presets())}, HxW with the height first (e.g. 700x1120), "
                           "or random:HxW-HxW")
    s = text.strip()
    if s.lower().startswith("random:"):
        bounds = s[len("random:"):].split("-", 1)
        sizes = [_one_size(b) for b in bounds] if len(bounds) == 2 else [None]
        if None in sizes:
            raise bad
        lo, hi = sizes
        if lo[0] > hi[0] or lo[1] > hi[1]:
            raise ProfileError(f"--image-resolution {text!r}: the minimum exceeds the maximum")
        return Resolution(s, lo, hi)
    size = _one_size(s)
    if size is None:
        raise bad
    return Resolution(s, size, size)


def parse_request_rate(value: float | str | None) -> float | None:
    """bench_serving's --request-rate: req/s, or inf (every request at time 0)."""
    if value is None:
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ProfileError(f"--request-rate {value!r} is not a number", fix="give req/s, or inf") from None
    if math.isnan(rate) or rate <= 0:
        raise ProfileError(f"--request-rate must be positive (or inf), got {value!r}")
    return rate


# --- result files (--output-file, JSON lines, one appended per run) --------------

# Keys every release's result line has (0.5.4 .. 0.5.23); p90/p95 came later and are optional.
RESULT_KEYS = ("request_throughput", "completed", "duration", "mean_e2e_latency_ms", "median_e2e_latency_ms",
               "p99_e2e_latency_ms", "median_ttft_ms", "p99_ttft_ms")
# Arguments that must match for result lines to be repeats of one benchmark.
SAME_BENCHMARK = ("backend", "dataset_name", "request_rate", "max_concurrency", "random_input_len",
                  "random_output_len", "random_range_ratio")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def read_results(paths: list[str]) -> list[dict[str, Any]]:
    """bench_serving result lines (several runs of one benchmark = repeats); one-line errors."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = list(enumerate(f, 1))
        except OSError as e:
            raise ProfileError(f"cannot read bench_serving results ({e.strerror})", where=path) from None
        except UnicodeDecodeError:
            raise ProfileError("not a bench_serving result file (not UTF-8 text)", where=path) from None
        for n, line in lines:
            if line.strip():
                runs.append(_result_line(line, f"{path}:{n}"))
    if not runs:
        raise ProfileError("no bench_serving results", where=", ".join(paths),
                           fix="run python -m sglang.bench_serving ... --output-file FILE")
    first = runs[0]
    for r in runs[1:]:
        for key in SAME_BENCHMARK:
            if r.get(key) != first.get(key):
                raise ProfileError(f"{key} is {r.get(key)!r} here and {first.get(key)!r} in {first['_where']}: "
                                   "not repeats of one benchmark", where=r["_where"],
                                   fix="give one benchmark's runs per side (bench_serving appends each run to its file)")
    return runs


def _result_line(line: str, where: str) -> dict[str, Any]:
    try:
        d = json.loads(line)   # Python's json: bench_serving writes request_rate inf as Infinity
    except json.JSONDecodeError as e:
        raise ProfileError(f"not a bench_serving result line ({json_error(e)})", where=where) from None
    if not isinstance(d, dict):
        raise ProfileError("not a bench_serving result line (not a JSON object)", where=where)
    for key in RESULT_KEYS:
        if not (_number(d.get(key)) and math.isfinite(d[key]) and d[key] >= 0):
            raise ProfileError(f"field {key!r}: expected a finite number >= 0, got {d.get(key)!r}", where=where,
                               fix="give result files written by bench_serving --output-file")
    if not isinstance(d["completed"], int):
        raise ProfileError(f"field 'completed': expected a whole number of requests, got {d['completed']!r}",
                           where=where)
    if d["completed"] < 1 or d["duration"] <= 0 or d["request_throughput"] <= 0:
        raise ProfileError("the run completed no requests", where=where)
    rate, conc = d.get("request_rate"), d.get("max_concurrency")
    if rate is not None and not (_number(rate) and rate > 0):
        raise ProfileError(f"field 'request_rate': expected req/s > 0 or Infinity, got {rate!r}", where=where)
    if conc is not None and not (isinstance(conc, int) and not isinstance(conc, bool) and conc >= 1):
        raise ProfileError(f"field 'max_concurrency': expected a whole number >= 1, got {conc!r}", where=where)
    d["_where"] = where
    return d


def arrival_of(run: dict[str, Any]) -> dict[str, Any]:
    """The load bench_serving offered, in the trace's arrival words."""
    rate, conc = run.get("request_rate"), run.get("max_concurrency")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0:
        arrival: dict[str, Any] = {"mode": "poisson", "request_rate": float(rate)}
        if conc:
            arrival["max_concurrency"] = int(conc)
        return arrival
    return {"mode": "closed", "max_concurrency": int(conc) if conc else int(run["completed"])}


def _json_safe(v: Any) -> Any:
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def with_bench(profile: Any, paths: list[str], where: str) -> Any:
    """A live profile (mmdiag.profile/2) with the bench_serving runs it was taken during:
    throughput and E2E/TTFT latency per run (the repeats), CPU and GIL per rank from the
    profile. A new Run; the profile is not changed."""
    import copy
    import statistics

    from ..analysis import breakdown as B
    from ..run import StrategyResult

    if not profile.is_profile:
        raise ProfileError(f"is {profile.schema}, not a live profile: bench_serving results go with the "
                           "profile taken during those runs (mmdiag profile --pid PID --json FILE)", where=where)
    runs = read_results(paths)
    run = copy.deepcopy(profile)
    name, base = next(iter(run.strategies.items()), ("live", None))
    ranks = base.ranks if base is not None else (run.ranks or [])

    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in runs)

    dur = mean("duration")
    for r in ranks:
        # The profile's CPU share over a bench run, so CPU-ms per request = share x duration / completed.
        pct = B.cpu_pct(r)
        if not math.isnan(pct):
            r.cpu_s, r.wall_s = pct / 100.0 * dur, dur
    latency = {"p50": mean("median_e2e_latency_ms"), "p99": mean("p99_e2e_latency_ms"),
               "mean": mean("mean_e2e_latency_ms"), "ttft_p50": mean("median_ttft_ms"),
               "ttft_p99": mean("p99_ttft_ms")}
    if all(_number(r.get("p90_e2e_latency_ms")) for r in runs):
        latency["p90"] = mean("p90_e2e_latency_ms")
    completed = max(int(r["completed"]) for r in runs)
    run.strategies = {name: StrategyResult(
        name=name, requests=completed, duration_s=dur, throughput_rps=mean("request_throughput"),
        latency_ms=latency, ranks=ranks, repeats_rps=[float(r["request_throughput"]) for r in runs],
        repeats_p99_ms=[float(r["p99_e2e_latency_ms"]) for r in runs])}
    first = runs[0]
    run.trace = {"path": None, "requests": completed, "arrival": arrival_of(first),
                 "source": {"tool": "sglang.bench_serving", "files": list(paths),
                            **{k: _json_safe(first.get(k)) for k in SAME_BENCHMARK}}}
    run.config.bench_serving = {"runs": [{k: _json_safe(r.get(k)) for k in ("_where", *RESULT_KEYS)} for r in runs]}
    return run


def bench_command(run: Any, load_flag: str) -> str:
    """How to re-run a Run's benchmark under another load (`load_flag`), for an n/a's advice."""
    src = run.trace.get("source") or {}
    args = " ".join(f"--{k.replace('_', '-')} {src[k]}" for k in ("backend", "dataset_name") if src.get(k))
    return (f"python -m sglang.bench_serving {args} {load_flag} --output-file RESULTS.jsonl (3 runs per side, "
            "each with `mmdiag profile --pid PID --json PROFILE.json` during it), then "
            "mmdiag report BEFORE_PROFILE.json AFTER_PROFILE.json --before-bench ... --after-bench ...")
