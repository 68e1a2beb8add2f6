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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RunFileError
from .fileio import jsonable, write_json_atomic, write_lines_atomic, write_text_atomic  # noqa: F401 - re-exported
from .vocab import AXES, PHASES, PROFILE_SCHEMA, REPLAY_SCHEMA, TRACE_SCHEMA

# Schemas read and converted on load to the current one.
OLD_SCHEMAS = {"mmdiag.replay/1": REPLAY_SCHEMA, "mmdiag.profile/1": PROFILE_SCHEMA}
KNOWN_SCHEMAS = (REPLAY_SCHEMA, PROFILE_SCHEMA, *OLD_SCHEMAS)
# What to give where a Run is expected.
RUN_FIX = "give a Run: mmdiag replay TRACE -o run.json, or mmdiag profile --pid PID -o profile.json"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values. numpy.percentile's
    default is the same method but not bit for bit (it interpolates from the upper neighbour
    past the midpoint: 9% of values differ in the last digits), and Runs' JSON would change."""
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
class ReplayRank:
    """What only a replay measures of a rank."""
    # Main-loop iterations and how long each took beyond the forward step.
    iterations: int = 0
    loop_stall_ms: dict[str, float] = field(default_factory=dict)
    # The strategy's own collectives (the recv broadcast is counted apart).
    collectives: int = 0
    bytes_sent: int = 0
    recv_bytes: int = 0


@dataclass
class ProfileRank:
    """What only the live profiler measures of a rank (py-spy samples, the process's CPU)."""
    pid: int | None = None
    title: str | None = None
    samples: int = 0
    # Share of wall time per phase (samples); 95% half-widths in points of each share's sampling
    # error over this window (phases_ci) and of its variation between blocks (phases_spread).
    phases_pct: dict[str, float] = field(default_factory=dict)
    phases_ci: dict[str, float | None] = field(default_factory=dict)
    gil_held_pct: float | None = None
    gil_held_ci: float | None = None
    gil_wait_pct: float | None = None
    gil_wait_ci: float | None = None   # its sampling half-width (an upper-bound estimate: see live/attribute.py)
    cpu_pct: float | None = None
    # GIL held per phase (% of that phase's samples); other threads; the top unmatched frames.
    phase_gil_pct: dict[str, float | None] = field(default_factory=dict)
    # Waiting (live/rules.toml [[wait]]): per phase, share of wall time and its half-width; "all": in total.
    wait_pct: dict[str, float] = field(default_factory=dict)
    wait_ci: dict[str, float | None] = field(default_factory=dict)
    threads: list[dict[str, Any]] = field(default_factory=list)
    unmatched_top: list[Any] = field(default_factory=list)
    phases_spread: dict[str, float | None] = field(default_factory=dict)

    @property
    def phase_counts(self) -> dict[str, float]:
        return {k: v * self.samples / 100.0 for k, v in self.phases_pct.items()}


@dataclass
class RankResult:
    """One scheduler rank, as both collectors see it: CPU and wall seconds and wall time per
    phase; then the part only its collector fills."""
    rank: int
    cpu_s: float = 0.0
    wall_s: float = 0.0
    phases_ms: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    replay: ReplayRank | None = None
    profile: ProfileRank | None = None

    @property
    def busy_ms(self) -> float:
        return sum(v for k, v in self.phases_ms.items() if k != "idle")

    @property
    def cpu_pct(self) -> float:
        """Scheduler CPU of the rank as a percent of one core (nan when unknown): the
        profile's measured share, else CPU over wall seconds."""
        if self.profile is not None and self.profile.cpu_pct is not None:
            return float(self.profile.cpu_pct)
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s else math.nan


@dataclass
class StrategyResult:
    name: str
    requests: int
    duration_s: float
    throughput_rps: float | None          # None: not measured (a live profile alone)
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
class LiveInfo:
    """How a live profile was taken (the typed profile part of a Run)."""
    source: str = "live"                # live: attached to PIDs; top: a watch; raw: py-spy files recorded elsewhere
    rate_hz: float = 0.0
    target_pid: int | None = None
    target_title: str | None = None
    found: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float | None = None
    requested_duration_s: float | None = None
    pyspy: dict[str, Any] = field(default_factory=dict)
    exited: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    recorder_start_skew: dict[str, Any] = field(default_factory=dict)
    gil_missing: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    block_s: float = 0.0                # samples come in consecutive blocks of this length
    blocks: dict[str, int] = field(default_factory=dict)
    span_s: dict[str, float] = field(default_factory=dict)           # per rank: first sample to last block's end
    reattach_gaps_s: dict[str, float] = field(default_factory=dict)  # per rank: unsampled time between blocks
    config: dict[str, Any] = field(default_factory=dict)   # `mmdiag top`: the server configuration seen
    strategy_detected: str = ""
    rules: str = ""
    # What the collection itself noticed (a rank without GIL file, an interrupted window, ...).
    notes: list[str] = field(default_factory=list)


@dataclass
class StageServer:
    """Threads of one stage that take its requests in turn (a server of the queue): the
    tokenizer's main thread, its hash pool (`threads` workers), one scheduler rank. Shares
    are of the group's thread time (a pool's, averaged over its threads), 95% half-widths."""
    name: str
    pid: int | None = None
    tids: list[int] = field(default_factory=list)
    threads: int = 1
    samples: int = 0
    phases_pct: dict[str, float] = field(default_factory=dict)
    phases_ci: dict[str, float | None] = field(default_factory=dict)
    busy_pct: float = 0.0                 # 100 - idle: the utilization of each of its threads
    busy_ci: float | None = None


@dataclass
class Stage:
    """One stage of the server's pipeline (vocab.STAGES), over the profile's window. Its
    phase shares are those of the server that bounds it (`bound_by`); service time and
    capacity come from that server's busy share and the requests counted (None: no count,
    mmdiag.live.stages says how they are counted)."""
    role: str
    pids: list[int] = field(default_factory=list)
    servers: list[StageServer] = field(default_factory=list)
    bound_by: str = ""
    phases_pct: dict[str, float] = field(default_factory=dict)
    phases_ci: dict[str, float | None] = field(default_factory=dict)
    busy_pct: float = 0.0
    busy_ci: float | None = None
    service_ms: float | None = None       # per multimodal request, of the bounding server's thread time
    service_ci: float | None = None
    capacity_rps: float | None = None     # the request rate that would keep it busy all the time
    capacity_ci: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stage":
        st = _known(cls, d)
        st.servers = [_known(StageServer, x) for x in d.get("servers", [])]
        return st


_OMIT_NONE = {"omit_none": True}   # a key written only when set (older files lack it)


@dataclass
class SGLangConfig:
    """The install a replay of installed code ran (--impl sglang): `config.sglang`."""
    path: str = ""
    version: str | None = None
    variant: str | None = None
    patched: str | None = None
    enable_broadcast_flag: bool = False


@dataclass
class ReplayConfig:
    """How a replay ran (the typed replay part of a Run: `config` of mmdiag.replay/2). A key an
    older file lacks reads as None."""
    forward_ms: float | None = None
    max_concurrency: int | None = None
    max_recv_mb: float | None = None
    repeat: int | None = None
    timeout_s: float | None = None
    impl: str | None = None                  # "mmdiag": the strategies' models; "sglang": installed code
    launcher: str | None = None              # env (mmdiag's launcher) or torchrun
    # What each strategy replayed says of itself (Strategy.describe(), its transport's facts, cond's threshold).
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    transport: str | None = None
    tokenizer_workers: int | None = None
    skip_hash: bool | None = field(default=None, metadata=_OMIT_NONE)  # SGLANG_MM_SKIP_COMPUTE_HASH replayed
    # The replay's axes (vocab.AXES: the content hash, the shm writer's segments), each written as
    # a key of its own; a file from before an axis lacks its key and ran its default (`setting`).
    axes: dict[str, Any] = field(default_factory=dict, metadata={"flat": True})
    # "clone": the release's shm transport copied each feature out per rank (0.5.10 .. 0.5.20); None: mapped
    shm_map: str | None = field(default=None, metadata=_OMIT_NONE)
    sglang: SGLangConfig | None = field(default=None, metadata=_OMIT_NONE)

    def setting(self, name: str) -> Any:
        """A setting as it was replayed; an axis an older file lacks reads as what it ran."""
        return self.axes.get(name, AXES[name]) if name in AXES else getattr(self, name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplayConfig":
        c = _known(cls, d)
        c.axes = {k: d[k] for k in AXES if d.get(k) is not None}
        c.sglang = _known(SGLangConfig, c.sglang) if isinstance(c.sglang, dict) else c.sglang
        return c


@dataclass
class ProfileConfig:
    """What a live profile was measured with beyond its collection (`Run.live`): `config` of
    mmdiag.profile/2."""
    # The bench_serving runs it was taken during ({"runs": [...]}: mmdiag.ingest.bench_serving).
    bench_serving: dict[str, Any] | None = field(default=None, metadata=_OMIT_NONE)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProfileConfig":
        return _known(cls, d)


def _config_dict(config: ReplayConfig | ProfileConfig) -> dict[str, Any]:
    d, out = asdict(config), {}
    for f in fields(config):
        if f.metadata.get("flat"):  # the replay's axes: a key each, as the options are named
            out.update({k: v for k, v in d[f.name].items() if v is not None})
        elif not (f.metadata.get("omit_none") and d[f.name] is None):
            out[f.name] = d[f.name]
    return out


@dataclass
class Run:
    schema: str
    tp: int
    strategies: dict[str, StrategyResult]
    created: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)
    # How it was measured: a ReplayConfig or a ProfileConfig, by schema (a dict is read as one).
    config: ReplayConfig | ProfileConfig | dict[str, Any] | None = None
    # A live profile's collection (None in a replay).
    live: LiveInfo | None = None
    # A live profile of the whole server: its pipeline's stages, and which bounds throughput
    # (mmdiag.live.stages: stage, capacity_rps, capacity_ci, ratio, requests, text, ...).
    # Additive to mmdiag.profile/2: written only when set, a file without them reads as none.
    stages: list[Stage] = field(default_factory=list)
    bottleneck: dict[str, Any] | None = None
    # Where it was loaded from (not saved): how recommend and report name it.
    path: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, (ReplayConfig, ProfileConfig)):
            kind = ProfileConfig if self.schema == PROFILE_SCHEMA else ReplayConfig
            self.config = kind.from_dict(self.config or {})

    @property
    def is_replay(self) -> bool:
        return self.schema == REPLAY_SCHEMA

    @property
    def is_profile(self) -> bool:
        return self.schema == PROFILE_SCHEMA

    def described(self, strategy: str) -> dict[str, Any]:
        """What a replayed strategy said of itself (config.strategies: its transport, cond's
        threshold); {} for a live profile or a strategy not replayed."""
        return (self.config.strategies.get(strategy) or {}) if isinstance(self.config, ReplayConfig) else {}

    @property
    def ranks(self) -> list[RankResult] | None:
        """A Run of one strategy (a live profile, a replay of installed code): its ranks."""
        if len(self.strategies) == 1:
            return next(iter(self.strategies.values())).ranks
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["path"]
        d["config"] = _config_dict(self.config)
        if d["live"] is None:
            del d["live"]
        for k in ("stages", "bottleneck"):
            if not d[k]:
                del d[k]
        for s in d["strategies"].values():
            for r in s["ranks"]:
                for part in ("replay", "profile"):
                    if r[part] is None:
                        del r[part]
        return jsonable(d)

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
            d = _upgrade(d)
            live = d.get("live")
            return cls(
                schema=d["schema"],
                tp=int(d["tp"]),
                strategies={name: _strategy_from_dict(s) for name, s in d.get("strategies", {}).items()},
                created=d.get("created", ""),
                host=d.get("host", {}),
                trace=d.get("trace", {}),
                config=d.get("config", {}),
                live=_known(LiveInfo, live) if live is not None else None,
                stages=[Stage.from_dict(x) for x in d.get("stages") or []],
                bottleneck=d.get("bottleneck"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunFileError(f"not a valid Run ({type(e).__name__}: {e})", where=source) from None

    @classmethod
    def load(cls, path: str) -> "Run":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise RunFileError("no such file", where=path, fix=RUN_FIX) from None
        except json.JSONDecodeError as e:
            _not_a_trace(path)
            raise RunFileError(
                f"not JSON or truncated (line {e.lineno}, column {e.colno}: {e.msg})", where=path, fix=RUN_FIX
            ) from None
        except OSError as e:
            raise RunFileError(f"cannot read ({e.strerror})", where=path) from None
        if not isinstance(d, dict):
            raise RunFileError("not a Run object", where=path, fix=RUN_FIX)
        _not_a_trace(path, d)
        run = cls.from_dict(d, source=path)
        run.path = path
        return run


def _not_a_trace(path: str, head: Any = None) -> None:
    """A trace given where a Run belongs (its header is one JSON line) is named as such."""
    if head is None:
        try:
            with open(path, encoding="utf-8") as f:
                head = json.loads(f.readline())
        except (OSError, ValueError):
            return
    if isinstance(head, dict) and head.get("schema") == TRACE_SCHEMA:
        raise RunFileError("is a trace, not a Run", where=path,
                           fix=f"replay it first (mmdiag replay {path} -o run.json) and give the Run")


def _known(cls, d: dict[str, Any]):
    """`cls` from the keys of `d` it knows (a newer writer's extra keys are ignored)."""
    return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _rank_from_dict(d: dict[str, Any]) -> RankResult:
    r = _known(RankResult, {k: v for k, v in d.items() if k not in ("replay", "profile")})
    r.replay = _known(ReplayRank, d["replay"]) if d.get("replay") is not None else None
    r.profile = _known(ProfileRank, d["profile"]) if d.get("profile") is not None else None
    return r


def _strategy_from_dict(d: dict[str, Any]) -> StrategyResult:
    kw = {k: v for k, v in d.items() if k in StrategyResult.__dataclass_fields__ and k != "ranks"}
    return StrategyResult(ranks=[_rank_from_dict(r) for r in d["ranks"]], **kw)


_REPLAY_RANK = tuple(ReplayRank.__dataclass_fields__)
_PROFILE_RANK = tuple(ProfileRank.__dataclass_fields__)
# Per-rank live facts that /1 kept in config.live, keyed by str(rank).
_LIVE_PER_RANK = ("phase_gil_pct", "gil_held_ci", "wait_pct", "wait_ci", "threads", "unmatched_top")


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A /1 Run as /2: each rank's collector fields in its typed part, config.live as `live`
    (its per-rank facts moved into the ranks), the profile's second copy of its ranks and the
    stored findings dropped (findings are computed: mmdiag.analysis.findings)."""
    if d["schema"] not in OLD_SCHEMAS:
        return d
    d = dict(d, schema=OLD_SCHEMAS[d["schema"]])
    profile = d["schema"] == PROFILE_SCHEMA
    config = dict(d.get("config") or {})
    live = config.pop("live", None) if profile else None
    d["config"] = config
    d.pop("ranks", None)
    d.pop("findings", None)
    if live is not None:
        d["live"] = {k: v for k, v in live.items() if k not in _LIVE_PER_RANK}
    strategies = {}
    for name, st in (d.get("strategies") or {}).items():
        ranks = []
        for r in st["ranks"]:
            part_keys = _PROFILE_RANK if profile else _REPLAY_RANK
            part = {k: r[k] for k in part_keys if r.get(k) is not None}
            for k in _LIVE_PER_RANK if live is not None else ():
                v = (live.get(k) or {}).get(str(r["rank"]))
                if v is not None:
                    part[k] = v
            base = {k: v for k, v in r.items() if k not in _REPLAY_RANK + _PROFILE_RANK}
            ranks.append(dict(base, **{"profile" if profile else "replay": part}))
        strategies[name] = dict(st, ranks=ranks)
    d["strategies"] = strategies
    return d
