"""Sample scheduler ranks in consecutive blocks: back-to-back py-spy recordings.

Each rank gets a chain of non-blocking `py-spy record --format raw --threads
--idle` recordings of `block_s` seconds (plus, with GIL figures, a `--gil`
recording over the same block, on every GIL_EVERY-th block: the --gil recorder
costs about a third of the main one's CPU, and the GIL share needs fewer samples
than the phase shares). A finished block's raw files are read at once,
so a caller sees each rank's samples block by block while the chain goes on:
`profile` keeps every block of its window (the blocks give the intervals, see
stats.py), `top` a sliding window of the latest. Between two blocks py-spy
re-attaches (about 50 ms of a 2 s block): samples are lost, not biased, since
the gap's timing has nothing to do with the target's phases.

py-spy never pauses the target (--nonblocking), runs in its own session (a
Ctrl-C reaches mmdiag, which stops it) and dies with mmdiag (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

import psutil

from .discover import RankProcess
from .errors import LiveError, PySpyError
from .attribute import RankSamples
from .pyspy import PySpy, Recorder, ThreadSamples, classify_failure, read_raw, start_recorder

REGISTRY: set[int] = set()  # live py-spy pids (tests check nothing is left behind)
MAX_REATTACH_FAILURES = 3
GIL_EVERY = 2  # a --gil recorder on every 2nd block: half its cost, GIL figures from half the window


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Block:
    index: int
    t0: float                      # monotonic: first seen sampling
    t1: float                      # monotonic: recording ended
    threads: dict[int, ThreadSamples]
    gil_threads: dict[int, ThreadSamples] | None
    gil_planned: bool = True       # a --gil recorder ran (gil_threads None then: it wrote nothing)


def rank_samples(rank: RankProcess, blocks: list[Block], rate: int) -> RankSamples:
    """A rank's blocks as attribute() reads them, with the samples their span would hold
    at `rate` (the re-attach gaps between them are part of the span)."""
    span = span_s(blocks)
    return RankSamples.from_blocks(rank.rank, rank.pid, rank.title, [(b.threads, b.gil_threads) for b in blocks],
                                   gil_planned=sum(b.gil_planned for b in blocks),
                                   expected=rate * span if span > 0 else None)


def span_s(blocks: list[Block]) -> float:
    """Seconds from the first block's first sample to the last block's end."""
    return blocks[-1].t1 - blocks[0].t0 if blocks else 0.0


def reattach_gaps_s(blocks: list[Block]) -> float:
    """Seconds of the span between consecutive blocks (py-spy re-attaching): unsampled.
    Each end is seen by a 50 ms poll, so one gap is coarse; their sum is not biased."""
    return sum(max(0.0, b.t0 - a.t1) for a, b in zip(blocks, blocks[1:]))


@dataclass
class _Chunk:
    index: int
    spawned: float
    main: Recorder
    gil: Recorder | None
    sampling: float | None = None

    @property
    def recorders(self) -> list[Recorder]:
        return [x for x in (self.main, self.gil) if x is not None]

    def done(self) -> bool:
        return all(x.proc.poll() is not None for x in self.recorders)


class RankChain:
    """One rank's back-to-back recordings."""

    def __init__(self, spy: PySpy, rank: RankProcess, rate: int, block_s: float, out_dir: str,
                 log_dir: str, gil: bool = True, lines: bool = False):
        self.spy, self.rank, self.rate, self.block_s = spy, rank, rate, block_s
        self.out_dir, self.log_dir, self.gil, self.lines = out_dir, log_dir, gil, lines
        self.chunk: _Chunk | None = None
        self.blocks: list[Block] = []
        self.exited = False
        self.first_sampling: float | None = None
        self.first_spawned: float | None = None
        self._n = 0
        self.stopping = False
        self.failures = 0  # consecutive recordings that never started

    def _path(self, k: int, gil: bool) -> str:
        who = f"rank{self.rank.rank}" if self.rank.rank >= 0 else f"tokenizer{-1 - self.rank.rank}"
        base = f"{who}.pid{self.rank.pid}.b{k:04d}"
        return os.path.join(self.out_dir, base + (".gil.raw" if gil else ".raw"))

    def start(self) -> None:
        k, self._n = self._n, self._n + 1
        # -d bounds a recording if mmdiag dies between blocks; SIGINT ends it on time.
        max_s = self.block_s + 30
        spawned = time.monotonic()
        a = start_recorder(self.spy, self.rank.pid, self._path(k, False), self.rate, max_s, False, self.log_dir,
                           lines=self.lines)
        REGISTRY.add(a.proc.pid)
        g = None
        if self.gil and len(self.blocks) % GIL_EVERY == 0:  # a pair started again keeps its plan
            g = start_recorder(self.spy, self.rank.pid, self._path(k, True), self.rate, max_s, True, self.log_dir,
                               lines=self.lines)
            REGISTRY.add(g.proc.pid)
        self.chunk = _Chunk(k, spawned, a, g)
        if self.first_spawned is None:
            self.first_spawned = spawned

    def sampling(self) -> bool:
        """Whether the current recording has started sampling (checks its log)."""
        c = self.chunk
        if c is None:
            return False
        if c.sampling is None and all(x.started for x in c.recorders):
            c.sampling = time.monotonic()
            if self.first_sampling is None:
                self.first_sampling = c.sampling
        return c.sampling is not None

    def poll(self) -> list[Block]:
        """Collect the current block when it is over (time up, or the target
        exited) and start the next one. Returns the new block(s)."""
        c = self.chunk
        if c is None:
            return []
        self.sampling()
        now = time.monotonic()
        if c.sampling is not None and now - c.sampling >= self.block_s:
            for x in c.recorders:
                x.stop()
        elif c.sampling is None and any(x.proc.poll() is not None for x in c.recorders):
            for x in c.recorders:  # one recorder gave up before sampling: the pair is no block
                x.kill()
        if not c.done():
            return []
        block = self._collect(c)
        self.chunk = None
        if not (self.exited or self.stopping):
            self.start()
        return [block] if block is not None else []

    def _attach_failed(self, c: _Chunk) -> None:
        """A recording pair that never sampled while the rank runs. On a loaded host
        py-spy can exit silently (no output) while attaching: start the pair again, up
        to MAX_REATTACH_FAILURES in a row. A reason py-spy states (ptrace refused, not
        Python) or a rank that exited before its first sample ends the profile at once."""
        x = next((x for x in c.recorders if x.proc.returncode not in (None, -9) and not x.started), c.main)
        err = classify_failure(x.stderr(), self.rank.pid, self.spy)
        if self.exited:
            if not self.blocks:
                raise err  # gone before its first sample
            return
        self.failures += 1
        if self.failures >= MAX_REATTACH_FAILURES or type(err) is not PySpyError:
            raise err

    def _collect(self, c: _Chunk) -> Block | None:
        for x in c.recorders:
            REGISTRY.discard(x.proc.pid)
        if any(x.target_exited for x in c.recorders) or not alive(self.rank.pid):
            self.exited = True
        missing = [x for x in c.recorders if not os.path.exists(x.out)]
        cut = any(x.proc.returncode == -signal.SIGINT for x in missing)
        if c.sampling is None or (self.stopping and cut):
            # Never sampled, or stopped right after it began: py-spy prints "Sampling" before
            # it sets its Ctrl-C handler, so the window's SIGINT can kill it unwritten. A
            # block is both recordings of the same span or nothing (a main file without its
            # GIL file would leave the rank without GIL figures).
            if not self.stopping:
                self._attach_failed(c)
            return None
        if c.main in missing:
            if not self.exited:
                self._attach_failed(c)
            return None
        self.failures = 0
        threads = read_raw(c.main.out, self.spy.version)
        gthreads = None
        if c.gil is not None:
            if c.gil not in missing:  # else py-spy --gil died mid-block: no GIL figures for it
                gthreads = read_raw(c.gil.out, self.spy.version)
        b = Block(c.index, c.sampling, time.monotonic(), threads, gthreads, c.gil is not None)
        self.blocks.append(b)
        return b

    def stop(self) -> None:
        self.stopping = True
        if self.chunk is not None:
            self.sampling()
            for x in self.chunk.recorders:
                # A pair not yet sampling is no block: end it without waiting for py-spy.
                x.stop() if self.chunk.sampling is not None else x.kill()

    def kill(self) -> None:
        if self.chunk is not None:
            for x in self.chunk.recorders:
                x.kill()
                REGISTRY.discard(x.proc.pid)
            self.chunk = None


class Sampler:
    """Chains on every rank, started together."""

    def __init__(self, spy: PySpy, ranks: list[RankProcess], rate: int, block_s: float, out_dir: str,
                 log_dir: str, gil: bool = True, lines: bool = False):
        """lines: record line numbers (only a speedscope file shows them; reading them costs py-spy CPU)."""
        self.chains = [RankChain(spy, r, rate, block_s, out_dir, log_dir, gil, lines) for r in ranks]
        self.spy = spy

    def start(self, attach_timeout: float) -> None:
        """Start every chain; return when each has begun sampling (or raise why not)."""
        for c in self.chains:
            c.start()
        deadline = time.monotonic() + attach_timeout
        while not all(c.sampling() for c in self.chains):
            for c in self.chains:
                if not c.sampling():
                    c.poll()  # a pair that gave up is started again, or raises why not
            if time.monotonic() > deadline:
                raise LiveError(f"py-spy {self.spy.version} did not start sampling within {attach_timeout:.0f} s",
                                fix="check the target is responsive; rerun")
            time.sleep(0.02)

    def poll(self) -> dict[int, list[Block]]:
        return {c.rank.rank: c.poll() for c in self.chains}

    def all_exited(self) -> bool:
        return all(c.exited for c in self.chains)

    def stop(self, grace: float = 10.0) -> None:
        """End the current blocks (py-spy writes them) and collect them."""
        for c in self.chains:
            c.stop()
        deadline = time.monotonic() + grace
        for c in self.chains:
            while c.chunk is not None and not c.chunk.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            if c.chunk is not None and c.chunk.done():
                c.poll()
            c.kill()

    def kill(self) -> None:
        for c in self.chains:
            c.kill()

    def start_skew(self) -> dict:
        """When each rank's first recording was spawned and first seen sampling, in
        seconds after the first spawn, and the largest gap between first samples."""
        spawned = [c.first_spawned for c in self.chains if c.first_spawned is not None]
        t0 = min(spawned) if spawned else 0.0
        rows = [{"rank": c.rank.rank, "spawned_s": round(c.first_spawned - t0, 3),
                 "sampling_s": round(c.first_sampling - t0, 3) if c.first_sampling is not None else None}
                for c in self.chains if c.first_spawned is not None]
        seen = [r["sampling_s"] for r in rows if r["sampling_s"] is not None]
        return {"max_s": round(max(seen) - min(seen), 3) if seen else None, "recorders": rows}


@dataclass
class CpuMeter:
    """psutil CPU times of one rank between two polls (an exited rank keeps its last)."""
    pid: int
    t0: float = math.nan
    cpu0: float = math.nan
    t1: float = math.nan
    cpu1: float = math.nan
    threads0: dict[int, float] = field(default_factory=dict)
    threads1: dict[int, float] = field(default_factory=dict)
    alive: bool = True

    def poll(self, first: bool = False) -> None:
        if not self.alive:
            return
        try:
            p = psutil.Process(self.pid)
            ct = p.cpu_times()
            th = {t.id: t.user_time + t.system_time for t in p.threads()}
            now = time.monotonic()
            if p.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(self.pid)
        except psutil.Error:
            self.alive = False
            return
        if first:
            self.t0, self.cpu0, self.threads0 = now, ct.user + ct.system, th
        self.t1, self.cpu1, self.threads1 = now, ct.user + ct.system, th

    def cpu_pct(self) -> float | None:
        dt = self.t1 - self.t0
        return round(100.0 * (self.cpu1 - self.cpu0) / dt, 1) if dt > 0 else None

    def cpu_s(self) -> float:
        return 0.0 if math.isnan(self.cpu1) else self.cpu1 - self.cpu0

    def thread_pct(self) -> dict[int, float]:
        dt = self.t1 - self.t0
        if not dt > 0:
            return {}
        return {tid: round(100.0 * (c - self.threads0.get(tid, 0.0)) / dt, 1) for tid, c in self.threads1.items()}
