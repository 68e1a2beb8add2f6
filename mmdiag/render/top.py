"""`mmdiag top`'s screen: the views of a live TopSession (mmdiag.live.top), the keys, and the
curses and plain loops that poll the session and redraw. The collector samples; this floor
draws (api hands `show` to live.top.top)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from ..live.attribute import ALL, RankProfile
from ..live.stats import pm
from ..live.top import REFRESH_S, VIEWS, Snapshot, TopSession, snapshot
from ..vocab import PHASES
from .stages import stage_lines
from .text import shown_phases

KEYS = "p pause  tab/arrows/0-9 rank  v view  f phase  q quit"


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


def show(sess: TopSession, duration: float | None) -> None:
    """The screen until q, Ctrl-C or `duration`: curses on a terminal, plain frames otherwise."""
    if sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb":
        import curses
        curses.wrapper(_curses_loop, sess, duration)
    else:
        _plain_loop(sess, duration)
