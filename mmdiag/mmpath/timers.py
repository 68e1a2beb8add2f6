"""Per-rank phase timers.

Each thread of a rank accumulates into its own dict (the async strategy's
broadcaster thread times its own pickle/broadcast/unpickle), summed at the end.
When a timeline is asked for, each phase interval is also logged to viztracer;
when MMDIAG_STATS_DIR is set, cumulative totals are flushed there a few times a
second so an attached profiler can compare against the same window.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from typing import Any, Callable, Iterator

from ..vocab import PHASES

STATS_FLUSH_S = 0.25


class PhaseTimers:
    def __init__(self, rank: int, tracer: Any = None, stats_dir: str | None = None):
        self.rank = rank
        self._local = threading.local()
        self._all: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self.tracer = tracer
        self.stats_dir = stats_dir
        self._last_flush = 0.0
        self.strategy = ""
        # Counters for the strategy's own collectives (not the recv broadcast).
        self.collectives = 0
        self.sent_bytes = 0

    def _mine(self) -> dict[str, float]:
        d = getattr(self._local, "acc", None)
        if d is None:
            d = {p: 0.0 for p in PHASES}
            with self._lock:
                self._all.append(d)
            self._local.acc = d
        return d

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        acc = self._mine()
        with self.tracer.log_event(name) if self.tracer is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                acc[name] += time.perf_counter() - t0

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, every call timed in phase `name`: for code the rank runs but mmdiag does
        not own (an installed SGLang's from_dict), timed as mmdiag's own model is."""
        @functools.wraps(fn)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed_call

    def add(self, name: str, seconds: float) -> None:
        self._mine()[name] += seconds

    def get(self, name: str) -> float:
        """This thread's running total for `name` (seconds)."""
        return self._mine()[name]

    def totals_ms(self) -> dict[str, float]:
        out = {p: 0.0 for p in PHASES}
        with self._lock:
            for d in self._all:
                for k, v in d.items():
                    out[k] += v * 1000.0
        return out

    def reset(self, strategy: str) -> None:
        with self._lock:
            for d in self._all:
                for k in d:
                    d[k] = 0.0
        self.strategy = strategy
        self.collectives = 0
        self.sent_bytes = 0

    def maybe_flush(self, force: bool = False) -> None:
        """Write cumulative totals for an attached profiler (see mmdiag.live)."""
        if not self.stats_dir:
            return
        now = time.time()
        if not force and now - self._last_flush < STATS_FLUSH_S:
            return
        self._last_flush = now
        path = os.path.join(self.stats_dir, f"rank{self.rank}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rank": self.rank, "pid": os.getpid(), "strategy": self.strategy, "time": now,
                       "cpu_s": time.process_time(), "phases_ms": self.totals_ms()}, f)
        os.replace(tmp, path)
