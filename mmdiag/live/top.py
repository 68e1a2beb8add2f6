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

import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ..proc import on_sigterm
from ..run import Run
from .attribute import ALL, RankProfile, attribute, detect_strategy, move_entry_idle
from .discover import Discovery, discover
from .profile import ATTACH_TIMEOUT_S, TERMINATED, _config, _probe, build_run
from .pyspy import check_version, find_pyspy
from .rules import load_rules
from .sampler import CpuMeter, Sampler, rank_samples
from .stats import pm
from ..render.stages import stage_lines
from ..render.text import shown_phases
from .requests import SegmentCounter
from .stages import bottleneck, build_stages
from ..vocab import PHASES

BLOCK_S = 1.0
DEFAULT_WINDOW_S = 10.0
DEFAULT_RATE_HZ = 100
REFRESH_S = 1.0
VIEWS = ("rank", "ranks", "phase")   # one rank's phases; every rank's largest phases; one phase on every rank
KEYS = "p pause  tab/arrows/0-9 rank  v view  f phase  q quit"


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


@dataclass
class ViewState:
    selected: int = 0        # index into the ranks
    view: int = 0            # index into VIEWS
    phase: int = 0           # the phase view's phase: an index into the phases shown
    paused: bool = False


def _bar(pct: float, width: int) -> str:
    n = max(0, min(width, int(round(pct / 100.0 * width))))
    return "#" * n + "." * (width - n)


def _rank_view(p: RankProfile | None, cpu: float | None, width: int) -> list[str]:
    if p is None:
        return ["  (no samples yet)"]
    lines = [f"  CPU {cpu:.0f}%" if cpu is not None else "  CPU -",
             f"  samples {p.samples}   GIL held {pm(p.gil_held_pct, p.gil_held_ci)}%   "
             f"waiting {pm(p.wait_pct.get(ALL), p.wait_ci.get(ALL))}%", "",
             f"  {'phase':<10} {'share % (95%)':<15} {'waiting %':<13}"]
    bar_w = max(4, width - 46)
    for k in shown_phases([p]):
        lines.append(f"  {k:<10} {pm(p.phases_pct.get(k), p.phases_ci.get(k)):<15} "
                     f"{pm(p.wait_pct.get(k, 0.0), p.wait_ci.get(k)):<13} {_bar(p.phases_pct.get(k, 0.0), bar_w)}")
    return lines


def _ranks_view(profiles: dict[int, RankProfile], cpu: dict[int, float | None], ranks: list[int]) -> list[str]:
    # 80 columns hold six phases: the six largest on any rank, in vocabulary order.
    seen = [p for p in profiles.values() if p is not None]
    big = sorted(shown_phases(seen), key=lambda k: -max((p.phases_pct.get(k) or 0.0 for p in seen), default=0.0))[:6]
    cols = [k for k in PHASES if k in big]
    short = {"broadcast": "bcast"}
    lines = ["  rank  CPU%  GIL%  " + "".join(f"{short.get(c, c):<10}" for c in cols)]
    for r in ranks:
        p = profiles.get(r)
        if p is None:
            lines.append(f"  {r:<4}  (no samples yet)")
            continue
        c = cpu.get(r)
        cells = "".join(f"{pm(p.phases_pct.get(k), p.phases_ci.get(k), 0):<10}" for k in cols)
        lines.append(f"  {r:<4}  {('-' if c is None else f'{c:.0f}'):>4}  "
                     f"{('-' if p.gil_held_pct is None else f'{p.gil_held_pct:.0f}'):>4}  {cells}")
    return lines


def _phase_view(phase: str, profiles: dict[int, RankProfile], cpu: dict[int, float | None], ranks: list[int],
                width: int) -> list[str]:
    lines = [f"  rank  {'share % (95%)':<15} {'waiting %':<13} GIL held % in it"]
    bar_w = max(4, width - 56)
    for r in ranks:
        p = profiles.get(r)
        if p is None:
            lines.append(f"  {r:<4}  (no samples yet)")
            continue
        gil = p.phase_gil_pct.get(phase)
        lines.append(f"  {r:<4}  {pm(p.phases_pct.get(phase), p.phases_ci.get(phase)):<15} "
                     f"{pm(p.wait_pct.get(phase, 0.0), p.wait_ci.get(phase)):<13} {('-' if gil is None else f'{gil:.0f}'):>4}  "
                     f"{_bar(p.phases_pct.get(phase, 0.0), bar_w)}")
    return lines


def render(sess: TopSession, st: ViewState, snap: Snapshot, width: int = 80, height: int = 24) -> list[str]:
    """The screen as lines (at most `height`, each at most `width - 1` characters)."""
    ranks = [r.rank for r in sess.disc.ranks]
    sel = ranks[st.selected % len(ranks)]
    state = f"[paused {snap.taken}]" if st.paused else snap.taken
    title = f"mmdiag top - PID {sess.disc.target_pid} {sess.disc.target_title}"
    lines = [title[: width - len(state) - 3].ljust(width - len(state) - 2) + state,
             f"path {snap.path}" + (f" | {sess.config['lines'][0]}" if len(sess.config["lines"]) == 1 else ""),
             *([f"  {ln}" for ln in sess.config["lines"][:3]] if len(sess.config["lines"]) > 1 else []),
             f"window {snap.span_s:.0f} s of {sess.window_s:g} s, {sess.rate} Hz, py-spy {sess.spy.version}; "
             "+/- is the 95% interval", *stage_lines(snap.stages, snap.bottleneck), ""]
    if VIEWS[st.view] == "rank":
        tabs = " ".join(f"[{r}]" if r == sel else f" {r} " for r in ranks[:16])
        rp = next(r for r in sess.disc.ranks if r.rank == sel)
        lines += [f"rank {tabs}", f"  {rp.title} (pid {rp.pid})"]
        lines += _rank_view(snap.profiles.get(sel), snap.cpu.get(sel), width)
    elif VIEWS[st.view] == "ranks":
        lines += ["every rank, share % of wall time (95% interval)"]
        lines += _ranks_view(snap.profiles, snap.cpu, ranks)
    else:
        phases = shown_phases(list(snap.profiles.values()))
        phase = phases[st.phase % len(phases)]
        lines += ["phase " + " ".join(f"[{k}]" if k == phase else k for k in phases), ""]
        lines += _phase_view(phase, snap.profiles, snap.cpu, ranks, width)
    body = [ln[: width - 1] for ln in lines]
    body = body[: max(1, height - 1)]
    return body + [""] * (height - 1 - len(body)) + [KEYS[: width - 1]]


def handle_key(st: ViewState, key: int | str, n_ranks: int) -> bool:
    """Apply one key; False when it is time to quit."""
    import curses
    k = key if isinstance(key, int) else ord(key)
    if k in (ord("q"), ord("Q")):
        return False
    if k in (ord("p"), ord("P"), ord(" ")):
        st.paused = not st.paused
    elif k in (ord("v"), ord("V")):
        st.view = (st.view + 1) % len(VIEWS)
    elif k in (ord("f"), ord("F")):   # the next phase, shown on every rank
        if VIEWS[st.view] == "phase":
            st.phase += 1
        st.view = VIEWS.index("phase")
    elif k in (9, curses.KEY_RIGHT, curses.KEY_DOWN, ord("l"), ord("j")):
        st.selected = (st.selected + 1) % n_ranks
    elif k in (curses.KEY_BTAB, curses.KEY_LEFT, curses.KEY_UP, ord("h"), ord("k")):
        st.selected = (st.selected - 1) % n_ranks
    elif ord("0") <= k <= ord("9") and k - ord("0") < n_ranks:
        st.selected = k - ord("0")
    return True


def _curses_loop(stdscr, sess: TopSession, duration: float | None) -> None:
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    stdscr.timeout(100)
    st, last, shown = ViewState(), 0.0, None
    end = None if duration is None else time.monotonic() + duration
    while end is None or time.monotonic() < end:
        key = stdscr.getch()
        if key != -1 and key != curses.KEY_RESIZE and not handle_key(st, key, len(sess.disc.ranks)):
            return
        sess.poll()
        now = time.monotonic()
        if now - last >= REFRESH_S:
            sess.refresh_cpu()
            last = now
            if not st.paused or shown is None:
                shown = snapshot(sess)
        elif key == -1:
            continue
        h, w = stdscr.getmaxyx()
        stdscr.erase()
        if shown is None:
            continue
        for i, line in enumerate(render(sess, st, shown, w, h)):
            try:
                stdscr.addnstr(i, 0, line, max(1, w - 1))
            except curses.error:
                pass
        stdscr.refresh()


def _plain_loop(sess: TopSession, duration: float | None, out=sys.stdout) -> None:
    """No terminal: a plain frame per refresh (as `top -b`)."""
    end = None if duration is None else time.monotonic() + duration
    st, last = ViewState(), time.monotonic()
    while end is None or time.monotonic() < end:
        time.sleep(0.1)
        sess.poll()
        if time.monotonic() - last >= REFRESH_S:
            last = time.monotonic()
            sess.refresh_cpu()
            st.view = 1 if len(sess.disc.ranks) > 1 else 0
            out.write("\n".join(render(sess, st, snapshot(sess), 100, 60)[:-1]).rstrip() + "\n\n")
            out.flush()


def top(pid: int, *, rate: int = DEFAULT_RATE_HZ, window_s: float = DEFAULT_WINDOW_S, output: str | None = None,
        pyspy: str | None = None, rules: str | None = None, gil: bool = True, duration: float | None = None,
        log: Callable[[str], None] = lambda s: None) -> Run | None:
    """Run the live view until q / Ctrl-C (or `duration` seconds); the Run of the
    whole watch when `output` is given (written by the caller)."""
    with on_sigterm(TERMINATED):
        return _top(TopSession(pid, rate, window_s, pyspy, rules, gil, keep_all=output is not None), duration,
                    output, log)


def _top(sess: TopSession, duration: float | None, output: str | None, log: Callable[[str], None]) -> Run | None:
    try:
        sess.start(log)
        if sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb":
            import curses
            try:
                curses.wrapper(_curses_loop, sess, duration)
            except KeyboardInterrupt:
                pass
        else:
            try:
                _plain_loop(sess, duration)
            except KeyboardInterrupt:
                pass
        sess.sampler.stop(grace=5.0)  # the last blocks are written and collected
        return sess.whole_run() if output is not None else None
    finally:
        sess.close()


__all__ = ["top", "TopSession", "render", "handle_key", "ViewState"]
