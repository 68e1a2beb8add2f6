"""The one result model: a Run.

Both collectors produce it (the replay harness, `mmdiag.replay`, and the live
profiler, `mmdiag.live`), every analysis and renderer reads it, and it is saved
as JSON with a schema version. Keys named in the issue tracker's contract:
`schema`, `tp`, `strategies.<name>.{throughput_rps, latency_ms.{p50,p99}, ranks[]}`
and per rank `rank`, `cpu_s`, `phases_ms.{recv,from_dict,pickle,broadcast,unpickle}`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RunFileError
from .fileio import write_json_atomic, write_lines_atomic, write_text_atomic  # noqa: F401 - re-exported
from .vocab import PHASES, PROFILE_SCHEMA, REPLAY_SCHEMA

KNOWN_SCHEMAS = (REPLAY_SCHEMA, PROFILE_SCHEMA)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize_ms(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values_ms, 50),
        "p90": percentile(values_ms, 90),
        "p99": percentile(values_ms, 99),
        "mean": sum(values_ms) / len(values_ms) if values_ms else math.nan,
        "max": max(values_ms) if values_ms else math.nan,
    }


@dataclass
class RankResult:
    rank: int
    cpu_s: float = 0.0
    wall_s: float = 0.0
    phases_ms: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    # Main-loop iterations and how long each took beyond the forward step.
    iterations: int = 0
    loop_stall_ms: dict[str, float] = field(default_factory=dict)
    # The strategy's own collectives (the recv broadcast is counted apart).
    collectives: int = 0
    bytes_sent: int = 0
    recv_bytes: int = 0
    # Filled by the live profiler; None in a replay.
    pid: int | None = None
    title: str | None = None
    samples: int | None = None
    phases_pct: dict[str, float] | None = None
    # 95% half-width of each phases_pct share, in points (live/stats.py).
    phases_ci: dict[str, float | None] | None = None
    gil_held_pct: float | None = None
    gil_wait_pct: float | None = None
    cpu_pct: float | None = None

    @property
    def busy_ms(self) -> float:
        return sum(v for k, v in self.phases_ms.items() if k != "idle")


@dataclass
class StrategyResult:
    name: str
    requests: int
    duration_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    ranks: list[RankResult]
    # Per request, bytes that crossed the CPU group and collectives issued.
    bytes_per_request: float = 0.0
    collectives_per_request: float = 0.0
    mm_requests: int = 0
    items: int = 0
    requests_per_iteration: float = 0.0
    # Time the tokenizer side spent (precompute hashing), in ms over the run.
    tokenizer_ms: dict[str, float] = field(default_factory=dict)
    # Every rank ended with the same hashes and pad values for every request.
    ranks_agree: bool | None = None
    # One throughput per repeat (pyperf style): compare_to judges with these.
    repeats_rps: list[float] = field(default_factory=list)
    repeats_p99_ms: list[float] = field(default_factory=list)
    # Latency histogram (ms edges, counts) for renderers that draw distributions.
    latency_hist: dict[str, list[float]] = field(default_factory=dict)
    # Loop iterations in which the entry rank's --max-recv-mb cap held requests back.
    recv_cap_hits: int = 0

    def rank(self, r: int) -> RankResult:
        return next(x for x in self.ranks if x.rank == r)


@dataclass
class Run:
    schema: str
    tp: int
    strategies: dict[str, StrategyResult]
    created: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # A live profile's ranks (mirrors its single strategy entry for the contract).
    ranks: list[RankResult] | None = None
    findings: list[str] = field(default_factory=list)
    # Where it was loaded from (not saved): how recommend and report name it.
    path: str = field(default="", compare=False, repr=False)

    @property
    def is_replay(self) -> bool:
        return self.schema == REPLAY_SCHEMA

    @property
    def is_profile(self) -> bool:
        return self.schema == PROFILE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["path"]
        if d["ranks"] is None:
            del d["ranks"]
        return d

    def save(self, path: str) -> None:
        """Write atomically: a reader never sees half a Run."""
        try:
            write_json_atomic(path, self.to_dict())
        except OSError as e:
            raise RunFileError(f"cannot write the Run ({e.strerror})", where=path) from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<run>") -> "Run":
        try:
            if d.get("schema") not in KNOWN_SCHEMAS:
                raise RunFileError(
                    f"unknown schema {d.get('schema')!r}",
                    where=source,
                    fix=f"expected one of {', '.join(KNOWN_SCHEMAS)}",
                )
            strategies = {
                name: _strategy_from_dict(s) for name, s in d.get("strategies", {}).items()
            }
            ranks = [_rank_from_dict(r) for r in d["ranks"]] if d.get("ranks") is not None else None
            return cls(
                schema=d["schema"],
                tp=int(d["tp"]),
                strategies=strategies,
                created=d.get("created", ""),
                host=d.get("host", {}),
                trace=d.get("trace", {}),
                config=d.get("config", {}),
                ranks=ranks,
                findings=list(d.get("findings", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunFileError(f"not a valid Run ({type(e).__name__}: {e})", where=source) from None

    @classmethod
    def load(cls, path: str) -> "Run":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise RunFileError("no such file", where=path) from None
        except json.JSONDecodeError as e:
            raise RunFileError(
                f"not JSON or truncated (line {e.lineno}, column {e.colno}: {e.msg})", where=path
            ) from None
        except OSError as e:
            raise RunFileError(f"cannot read ({e.strerror})", where=path) from None
        if not isinstance(d, dict):
            raise RunFileError("not a Run object", where=path)
        run = cls.from_dict(d, source=path)
        run.path = path
        return run


def _rank_from_dict(d: dict[str, Any]) -> RankResult:
    known = RankResult.__dataclass_fields__
    return RankResult(**{k: v for k, v in d.items() if k in known})


def _strategy_from_dict(d: dict[str, Any]) -> StrategyResult:
    known = StrategyResult.__dataclass_fields__
    kw = {k: v for k, v in d.items() if k in known and k != "ranks"}
    return StrategyResult(ranks=[_rank_from_dict(r) for r in d["ranks"]], **kw)
