"""`mmdiag top --pid PID`: a live per-rank view, refreshed about once a second.

Each rank is sampled in 1 s blocks (sampler.py: non-blocking py-spy, the target
is never paused); the view shows the last `window` seconds of blocks: phase
shares with their 95% intervals (stats.py: batch means over the blocks), the
share spent waiting, GIL held, CPU%, the multimodal path seen on the stacks and
the server's configuration. Keys: p pause (the view; sampling goes on), tab /
arrows / 0-9 switch rank, v switch view (one rank's phases, or every rank side
by side), q quit. Quitting stops py-spy and leaves the target as it was; with
`output`, a Run covering the whole watch is written.

Without a terminal (a pipe, a log) it prints a plain frame per refresh.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ..proc import on_sigterm
from ..run import Run
from .attribute import RankProfile, attribute, detect_strategy, move_entry_idle
from .discover import Discovery, discover
from .profile import ATTACH_TIMEOUT_S, TERMINATED, _config, _probe, build_run
from .pyspy import check_version, find_pyspy
from .rules import load_rules
from .sampler import CpuMeter, Sampler, rank_samples
from .requests import SegmentCounter
from .stages import bottleneck, build_stages

BLOCK_S = 1.0
DEFAULT_WINDOW_S = 10.0
DEFAULT_RATE_HZ = 100
REFRESH_S = 1.0
VIEWS = ("rank", "ranks", "phase")   # one rank's phases; every rank's largest phases; one phase on every rank


@dataclass
class TopSession:
    """Sampling and the sliding windows behind the view (no terminal here)."""
    pid: int
    rate: int = DEFAULT_RATE_HZ
    window_s: float = DEFAULT_WINDOW_S
    pyspy: str | None = None
    rules: str | None = None
    gil: bool = True
    keep_all: bool = False          # keep every block, for a Run of the whole watch
    disc: Discovery | None = None
    windows: dict[int, deque] = field(default_factory=dict)
    cpus: dict[int, CpuMeter] = field(default_factory=dict)
    cpu_now: dict[int, float | None] = field(default_factory=dict)
    started: float = 0.0

    def start(self, log: Callable[[str], None] = lambda s: None) -> None:
        self.spy = find_pyspy(self.pyspy)
        w = check_version(self.spy)
        if w:
            log(f"warning: {w}")
        self.ruleset = load_rules(self.rules)
        self.disc = discover(self.pid)
        _probe(self.spy, self.disc.processes)   # the ranks and the tokenizer side, in the same window
        self.tmp = tempfile.mkdtemp(prefix="mmdiag-top-")
        self.sampler = Sampler(self.spy, self.disc.processes, self.rate, BLOCK_S, self.tmp, self.tmp, self.gil)
        self.windows = {r.rank: deque() for r in self.disc.processes}
        self.cpus = {r.rank: CpuMeter(r.pid) for r in self.disc.processes}
        self.whole = {r.rank: CpuMeter(r.pid) for r in self.disc.processes}
        for c in list(self.cpus.values()) + list(self.whole.values()):
            c.poll(first=True)
        self.config = _config(self.disc)
        try:
            self.sampler.start(ATTACH_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        # Multimodal requests, counted as the profile counts them (requests.py), with when.
        self.counter = SegmentCounter([t.pid for t in self.disc.tokenizers])
        self.counts: deque = deque()
        if self.disc.tokenizers and self.counter.start():
            self.counts.append((time.monotonic(), 0))
        self.started = time.monotonic()

    def poll(self) -> None:
        """Take the blocks that ended; forget those older than the window."""
        now = time.monotonic()
        if self.counts:
            self.counts.append((now, self.counter.read()))
            while len(self.counts) > 2 and now - self.counts[1][0] > self.window_s + 2 * BLOCK_S:
                self.counts.popleft()
        for rank, blocks in self.sampler.poll().items():
            slide(self.windows[rank], blocks, now, self.window_s)
        if not self.keep_all:
            for ch in self.sampler.chains:
                ch.blocks = ch.blocks[-1:]  # the chain's history is only needed for a Run

    def refresh_cpu(self) -> None:
        for rank, c in self.cpus.items():
            c.poll()
            self.cpu_now[rank] = c.cpu_pct()
            c.poll(first=True)

    def profiles(self) -> dict[int, RankProfile]:
        out = {}
        for r in self.disc.ranks:
            if self.windows[r.rank]:
                out[r.rank] = attribute(rank_samples(r, list(self.windows[r.rank]), self.rate), self.ruleset)
        move_entry_idle(list(out.values()))  # as the profile does: waiting behind an idle entry rank is idle
        return out

    def stages(self, profiles: dict[int, RankProfile]) -> tuple[list, dict | None]:
        """The stages over the window and which bounds throughput (with req/s where requests were counted)."""
        toks = [rank_samples(t, list(self.windows[t.rank]), self.rate) for t in self.disc.tokenizers
                if self.windows[t.rank]]
        blocks = [b for t in self.disc.tokenizers for b in self.windows[t.rank]]
        n = span = None
        if blocks and self.counts:  # the requests counted over the blocks' span
            t0, t1 = min(b.t0 for b in blocks), max(b.t1 for b in blocks)
            at = lambda t: next((c for w, c in reversed(self.counts) if w <= t), self.counts[0][1])  # noqa: E731
            n, span = (at(t1) - at(t0)) or None, t1 - t0
        st = build_stages(toks, list(profiles.values()), self.ruleset, n, span) if toks else []
        return st, bottleneck(st, n, span)

    def path(self, profiles: dict[int, RankProfile]) -> str:
        # The tokenizer side's frames count too, as in a profile (where it hashes, the path is precompute).
        toks = [attribute(rank_samples(t, list(self.windows[t.rank]), self.rate), self.ruleset)
                for t in self.disc.tokenizers if self.windows[t.rank]]
        return detect_strategy(list(profiles.values()) + toks, self.ruleset) if profiles else "unknown"

    def whole_run(self) -> Run:
        """A Run (schema mmdiag.profile/2) over every block of the watch."""
        watched = time.monotonic() - self.started
        for c in self.whole.values():
            c.poll()
        samples = [rank_samples(ch.rank, ch.blocks, self.rate) for ch in self.sampler.chains]
        live = {"source": "top", "target_pid": self.disc.target_pid, "target_title": self.disc.target_title,
                "found": [{"pid": p, "title": t} for p, t in self.disc.seen], "duration_s": round(watched, 3),
                "rate_hz": self.rate, "block_s": BLOCK_S,
                "blocks": {str(ch.rank.rank): len(ch.blocks) for ch in self.sampler.chains},
                "pyspy": {"path": self.spy.path, "version": self.spy.version}, "config": self.config,
                "exited": [], "interrupted": False}
        counted = self.counter.read() if self.counts else None  # since the watch began
        return build_run(samples, self.ruleset, watched, self.whole, live, [], gil=self.gil, requests=counted or None)

    def close(self) -> None:
        if getattr(self, "counter", None) is not None:
            self.counter.close()
        if getattr(self, "sampler", None) is not None:
            try:
                self.sampler.stop(grace=5.0)
            finally:
                self.sampler.kill()
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- the screen -----------------------------------------------------------------------

@dataclass
class Snapshot:
    """The figures on screen (kept while paused)."""
    profiles: dict[int, RankProfile]
    cpu: dict[int, float | None]
    span_s: float
    path: str
    taken: str
    stages: list = field(default_factory=list)
    bottleneck: dict | None = None


def slide(win: deque, blocks: list, now: float, window_s: float) -> None:
    """Add the blocks that ended; drop those that began more than `window_s` ago (the latest
    stays), so the figures cover at most the window the header names, never a block more."""
    win.extend(blocks)
    while len(win) > 1 and now - win[0].t0 > window_s:
        win.popleft()


def snapshot(sess: TopSession) -> Snapshot:
    profiles = sess.profiles()
    blocks = [b for w in sess.windows.values() for b in w]
    span = max((b.t1 for b in blocks), default=0.0) - min((b.t0 for b in blocks), default=0.0)
    return Snapshot(profiles, dict(sess.cpu_now), max(span, 0.0), sess.path(profiles),
                    datetime.now().strftime("%H:%M:%S"), *sess.stages(profiles))


def top(pid: int, show: Callable[["TopSession", float | None], None], *, rate: int = DEFAULT_RATE_HZ,
        window_s: float = DEFAULT_WINDOW_S, output: str | None = None, pyspy: str | None = None,
        rules: str | None = None, gil: bool = True, duration: float | None = None,
        log: Callable[[str], None] = lambda s: None) -> Run | None:
    """Sample while `show(session, duration)` (the caller's screen: mmdiag.render.top.show)
    runs, until it returns (q, Ctrl-C or `duration` seconds); the Run of the whole watch
    when `output` is given (written by the caller)."""
    with on_sigterm(TERMINATED):
        return _top(TopSession(pid, rate, window_s, pyspy, rules, gil, keep_all=output is not None), show, duration,
                    output, log)


def _top(sess: TopSession, show, duration: float | None, output: str | None, log: Callable[[str], None]) -> Run | None:
    try:
        sess.start(log)
        try:
            show(sess, duration)
        except KeyboardInterrupt:
            pass
        sess.sampler.stop(grace=5.0)  # the last blocks are written and collected
        return sess.whole_run() if output is not None else None
    finally:
        sess.close()


__all__ = ["top", "TopSession", "Snapshot", "snapshot", "slide"]
