"""A cost model of the multimodal path, fitted from replay measurements.

Per multimodal request of B MB of features, on the critical path of the loop:

    revert      m_all * B                      every rank materializes (hash) at once
    commit      m_one * B + c + k * B          entry rank materializes, one collective per request
    batch       m_one * B + c / r + k * B      one collective per loop iteration of r requests
    dict        m_all * B + c + k * B          raw dict per request, every rank materializes
    precompute  0 in the scheduler; m_one * B in the (single) tokenizer process

Each strategy module says which of these it is (`cost_class`, COST_CLASSES below); the
model iterates the registry, so a new strategy only names its class. Also:

    background  (async, dict_async) the collective runs off the loop: not modelled
    conditional (cond) per request the cheaper of revert and commit (its threshold is the crossover)

with, all measured for the replay's rank count:
    m_all  ms per MB of materialization while every rank materializes (revert/dict ranks;
           ranks that share cores or memory bandwidth slow each other down here),
    m_one  ms per MB on the entry rank alone (commit/batch rank 0),
    c      ms per collective (pickle + broadcast + unpickle fixed cost: lock-step with busy ranks,
           Python and gloo overhead),
    k      ms per MB sent (pickle + copy + unpickle per byte),
    r      requests per loop iteration.

c and k are a least-squares fit of (MB per collective, ms per collective) over every
strategy that issued its own collectives, across every Run given: commit and batch
of one Run already give two sizes per collective. Broadcasting pays when
(m_all - m_one - k) * B > c, so the crossover is B* = c / (m_all - m_one - k)
(infinite when materializing on every rank is no dearer than sending: never pays).
With one message size per collective, c cannot be told from k: the crossover is
then unknown (None; 0 MB is only a trivial lower bound) and broadcast_pays() is None.

The transport dimension (TransportCosts): per MB of feature, what the entry rank's
receive path costs when the recv broadcast pickles the bytes (`pickle`: its `recv`
phase) against handles in the broadcast plus open, barrier and copy-on-write map
(`shm`: `recv` + shm_open + shm_sync + shm_map), and what writing once into shared
memory costs the tokenizer (`tokenizer_shm`, off the loop, but a stage whose capacity
caps throughput). Measured from Runs replayed under each transport; a transport no Run
carried is None, except `pickle`, which the model gives as k (the same pickle + copy +
unpickle per byte that a collective pays).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..run import Run, StrategyResult
from ..units import MB
from ..vocab import TRANSPORT_PICKLE, TRANSPORT_SHM, TRANSPORTS

# cost class -> (who materializes: every rank / the entry rank / the tokenizer, and how often
# the strategy's own collective sits on the loop's critical path: per request / per iteration).
COST_CLASSES: dict[str, tuple[str | None, str | None]] = {
    "every_rank": ("every", None),
    "entry_per_request": ("entry", "request"),
    "entry_per_iteration": ("entry", "iteration"),
    "every_rank_resend": ("every", "request"),
    "tokenizer": ("tokenizer", None),
    "background": (None, None),
    "conditional": (None, None),
}


def _classes() -> dict[str, tuple[str | None, str | None]]:
    """strategy -> its cost class's (materializes, sends), from the strategy modules."""
    from ..strategies import REGISTRY
    return {n: COST_CLASSES[c.cost_class] for n, c in REGISTRY.items() if c.cost_class in COST_CLASSES}


def _names(materializes: str | None = None, sends: bool | None = None) -> tuple[str, ...]:
    return tuple(n for n, (m, c) in _classes().items()
                 if (materializes is None or m == materializes) and (sends is None or (c is not None) == sends))


SHM_RECV_PHASES = ("recv", "shm_open", "shm_sync", "shm_map")


@dataclass
class TransportCosts:
    recv_ms_per_mb: dict[str, float | None]      # transport -> entry rank's receive path, ms per MB
    source: dict[str, str]                        # transport -> "measured" | "model (k)" | "not measured"
    tokenizer_shm_ms_per_mb: float | None = None  # the tokenizer's write into shared memory

    @property
    def shm_saving_ms_per_mb(self) -> float | None:
        """What moving features by shared memory saves the scheduler loop per MB, never below 0.
        Below 0 (shm's receive path dearer per MB than pickling) is below the model's resolution:
        on tiny images shm's per-request open and barrier, spread over a few kB, read as a large
        per-MB cost (or it is noise); used per MB it would predict losses that grow with image
        size, so the saving is 0 and `saving_below_resolution` says so."""
        d = self._raw_saving()
        return None if d is None else (d if d > 0 else 0.0)

    @property
    def saving_below_resolution(self) -> bool:
        d = self._raw_saving()
        return d is not None and d <= 0

    def _raw_saving(self) -> float | None:
        p, m = self.recv_ms_per_mb.get(TRANSPORT_PICKLE), self.recv_ms_per_mb.get(TRANSPORT_SHM)
        return None if p is None or m is None else p - m


def _transport_of(run: Run, name: str) -> str | None:
    """The transport a strategy ran on in a Run (its own, else the Run's)."""
    cfg = ((getattr(run.config, "strategies", None) or {}).get(name) or {}).get("transport")
    return cfg.get("name") if isinstance(cfg, dict) else getattr(run.config, "transport", None)


def fit_transport(replays: list[Run], k_ms_per_mb: float | None) -> TransportCosts:
    """TransportCosts from the replays (one rank count), `k` as `pickle`'s model."""
    recv: dict[str, list[float]] = {}
    tok: list[float] = []
    for run in replays:
        mb = _mm_mb(run)
        for name, s in run.strategies.items():
            tr = _transport_of(run, name)
            entry = next((r for r in s.ranks if r.rank == 0), None)
            if mb <= 0 or entry is None or tr not in TRANSPORTS:
                continue
            recv.setdefault(tr, []).append(sum(entry.phases_ms.get(p, 0.0) for p in SHM_RECV_PHASES) / mb)
            if (s.tokenizer_ms or {}).get("tokenizer_shm"):
                tok.append(s.tokenizer_ms["tokenizer_shm"] / mb)
    costs: dict[str, float | None] = {}
    source: dict[str, str] = {}
    for tr in TRANSPORTS:
        if recv.get(tr):
            costs[tr], source[tr] = sum(recv[tr]) / len(recv[tr]), "measured"
        elif tr == TRANSPORT_PICKLE and k_ms_per_mb is not None:
            costs[tr], source[tr] = k_ms_per_mb, "model (k)"
        else:
            costs[tr], source[tr] = None, "not measured"
    return TransportCosts(costs, source, sum(tok) / len(tok) if tok else None)


@dataclass
class CostModel:
    tp: int
    m_all_ms_per_mb: float | None
    m_one_ms_per_mb: float | None
    c_ms_per_collective: float | None
    k_ms_per_mb: float | None
    separable: bool
    points: list[tuple[str, float, float]] = field(default_factory=list)  # (strategy, MB/coll, ms/coll)
    workload_mb: float | None = None           # mean features per multimodal request
    requests_per_iteration: float | None = None
    notes: list[str] = field(default_factory=list)
    transport: TransportCosts | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.m_all_ms_per_mb, self.m_one_ms_per_mb, self.c_ms_per_collective, self.k_ms_per_mb)

    @property
    def saving_ms_per_mb(self) -> float | None:
        """What broadcasting saves per MB: materializing on every rank minus on one, minus sending."""
        if not self.complete:
            return None
        return self.m_all_ms_per_mb - self.m_one_ms_per_mb - self.k_ms_per_mb

    def crossover_mb(self, collectives_per_request: float = 1.0) -> float | None:
        """Feature MB per request above which broadcasting pays (inf: never; None: unknown,
        including when the per-collective cost could not be fitted apart from the per-MB cost)."""
        s = self.saving_ms_per_mb
        if s is None or not self.separable:
            return None
        if s <= 0:
            return math.inf
        return self.c_ms_per_collective * collectives_per_request / s

    def predicted_ms(self, strategy: str, mb: float | None = None, r: float | None = None) -> float | None:
        """Critical-path mm cost per multimodal request (ms) for `strategy` at `mb` MB."""
        if not self.complete:
            return None
        mb = self.workload_mb if mb is None else mb
        r = max(self.requests_per_iteration or 1.0, 1.0) if r is None else max(r, 1.0)
        if mb is None:
            return None
        from ..strategies import REGISTRY
        cls = getattr(REGISTRY.get(strategy), "cost_class", None)
        if cls == "conditional":
            costs = [self._class_ms(COST_CLASSES[k], mb, r) for k in ("every_rank", "entry_per_request")]
            return None if None in costs else min(costs)
        return self._class_ms(COST_CLASSES[cls], mb, r) if cls in COST_CLASSES else None

    def _class_ms(self, cls: tuple[str | None, str | None], mb: float, r: float) -> float | None:
        materializes, sends = cls
        if materializes is None or (sends is not None and not self.separable):
            return None          # not modelled; or c and k not told apart (a sender's cost is unknown)
        mat = {"every": self.m_all_ms_per_mb * mb, "entry": self.m_one_ms_per_mb * mb, "tokenizer": 0.0}[materializes]
        if sends is None:
            return mat
        per = {"request": 1.0, "iteration": 1.0 / r}[sends]
        return mat + self.c_ms_per_collective * per + self.k_ms_per_mb * mb

    def broadcast_pays(self) -> bool | None:
        """Does the batched broadcast beat every rank materializing, at this workload?
        None when unknown (no crossover: a cost missing, or c not separable from k)."""
        x = self.crossover_mb(1.0 / max(self.requests_per_iteration or 1.0, 1.0))
        if x is None or self.workload_mb is None:
            return None
        return self.workload_mb > x

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crossover_mb_commit"] = _finite(self.crossover_mb(1.0))
        r = max(self.requests_per_iteration or 1.0, 1.0)
        d["crossover_mb_batch"] = _finite(self.crossover_mb(1.0 / r))
        d["broadcast_pays"] = self.broadcast_pays()
        d["predicted_ms_per_mm_request"] = {s: self.predicted_ms(s) for s in _classes()}
        if self.transport is not None:
            d["transport"]["shm_saving_ms_per_mb"] = self.transport.shm_saving_ms_per_mb
            d["transport"]["shm_saving_below_resolution"] = self.transport.saving_below_resolution
        return d


def _finite(x: float | None) -> float | str | None:
    return "never" if x is not None and math.isinf(x) else x


def _mm_mb(run: Run) -> float:
    return float(run.trace.get("mm_bytes") or 0.0) / MB


def _materialize_points(run: Run) -> tuple[list[float], list[float]]:
    """(ms per MB with every rank materializing, ms per MB on the entry rank alone)."""
    mb = _mm_mb(run)
    every, one = [], []
    if mb <= 0:
        return every, one
    every_rank, entry_only = _names("every"), _names("entry")
    for name, s in run.strategies.items():
        if name in every_rank:
            vals = [r.phases_ms.get("from_dict", 0.0) / mb for r in s.ranks]
            if vals and max(vals) > 0:
                every.append(sum(vals) / len(vals))
        elif name in entry_only and s.ranks:
            v = s.rank(0).phases_ms.get("from_dict", 0.0) / mb if any(r.rank == 0 for r in s.ranks) else 0.0
            if v > 0:
                one.append(v)
    return every, one


def _comm_point(name: str, s: StrategyResult) -> tuple[str, float, float] | None:
    """(strategy, MB per collective, critical-path ms per collective) of one strategy."""
    entry = next((r.replay for r in s.ranks if r.rank == 0 and r.replay is not None), None)
    if entry is None or entry.collectives <= 0 or entry.bytes_sent <= 0:
        return None
    others = [r for r in s.ranks if r.rank != 0]
    unpickle = (sum(r.phases_ms.get("unpickle", 0.0) for r in others) / len(others)) if others else 0.0
    phases = s.rank(0).phases_ms
    ms = phases.get("pickle", 0.0) + phases.get("broadcast", 0.0) + unpickle
    return name, entry.bytes_sent / entry.collectives / MB, ms / entry.collectives


def _fit(points: list[tuple[str, float, float]]) -> tuple[float | None, float | None, bool, list[str]]:
    """Least squares ms = c + k * MB, both clamped at >= 0. Returns (c, k, separable, notes).
    The closed form of a line (numpy.linalg.lstsq solves it by SVD: the same fit up to the
    last digits, which would move the crossover cond's patch bakes in and recommend's JSON)."""
    notes: list[str] = []
    if not points:
        return None, None, False, ["no strategy with its own collectives was replayed (replay commit and batch)"]
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    spread = (max(xs) - min(xs)) / max(max(xs), 1e-12)
    if len(points) >= 2 and spread > 0.25:
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        c = my - k * mx
        if k < 0:
            notes.append("sending cost did not grow with size in these runs (noise?): per-MB cost set to 0")
            k, c = 0.0, max(my, 0.0)
        elif c < 0:
            notes.append("fitted per-collective cost was negative (noise): set to 0, per-MB cost through the origin")
            k = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
            c = 0.0
        return c, k, True, notes
    # One size only: cannot split fixed from per-byte cost; attribute all to per-byte.
    k = sum(ys) / sum(xs) if sum(xs) > 0 else 0.0
    notes.append("per-collective cost cannot be told from per-MB cost with one size per collective "
                 "(replay batch as well as commit, or a second workload): the crossover is unknown "
                 "(0 MB is only a lower bound) and is not used to decide")
    return 0.0, k, False, notes


def fit(runs: list[Run], target: Run | None = None) -> CostModel:
    """Fit the model from every replay Run given; place `target`'s workload (default: the first)."""
    replays = [r for r in runs if r.is_replay]
    target = target or (replays[0] if replays else None)
    tp = target.tp if target else (runs[0].tp if runs else 0)
    notes: list[str] = []
    if len({r.tp for r in replays}) > 1:
        notes.append(f"Runs at different rank counts ({sorted({r.tp for r in replays})}): only tp {tp} is used")
        replays = [r for r in replays if r.tp == tp]
    every, one, points = [], [], []
    for run in replays:
        e, o = _materialize_points(run)
        every += e
        one += o
        for name in _names(sends=True):
            if name in run.strategies:
                p = _comm_point(name, run.strategies[name])
                if p:
                    points.append(p)
    m_all = sum(every) / len(every) if every else None
    m_one = sum(one) / len(one) if one else None
    if m_all is None and m_one is not None:
        notes.append("no strategy with every rank materializing was replayed (revert): assumed as fast as one rank")
        m_all = m_one
    elif m_one is None and m_all is not None:
        notes.append("no entry-only materialization was replayed (commit/batch): assumed as fast as every rank")
        m_one = m_all
    c, k, separable, fit_notes = _fit(points)
    notes += fit_notes
    workload_mb = r_iter = None
    if target is not None:
        mean_b = target.trace.get("mean_mm_request_bytes")
        if mean_b:
            workload_mb = float(mean_b) / MB
        rs = [s.requests_per_iteration for s in target.strategies.values() if s.requests_per_iteration]
        r_iter = sum(rs) / len(rs) if rs else None
    return CostModel(tp=tp, m_all_ms_per_mb=m_all, m_one_ms_per_mb=m_one, c_ms_per_collective=c,
                     k_ms_per_mb=k, separable=separable, points=points, workload_mb=workload_mb,
                     requests_per_iteration=r_iter, notes=notes, transport=fit_transport(replays, k))
