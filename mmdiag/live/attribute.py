"""Samples -> per-rank phase shares, GIL figures and the detected multimodal path.

Definitions (what the numbers in a profile mean):
- phases_pct: share of the main thread's samples (= of its wall time over the
  window, py-spy samples every thread at a fixed rate with --idle) whose stack
  the rules put in each phase. Sums to 100. phases_ci: its 95% sampling
  half-width in points (this window's share); phases_spread: the 95% half-width of
  its variation between the recording's blocks (the load's), stats.py. `forward` is kept as its own phase
  (the replay times it apart too); `idle` is waiting for work.
- gil_held_pct: main-thread samples holding the GIL (the `--gil` recorder) over
  all main-thread samples (the `--idle` recorder), same rate, same window.
- gil_wait_pct: an estimate (py-spy cannot see a thread blocked on the GIL as
  such): the main thread can be waiting for the GIL only while another thread of
  the process holds it and the main thread neither holds it nor is idle, so
  min(other threads' GIL share, 100 - gil_held_pct - idle_pct). An upper bound;
  0 for a single-threaded rank.
- a non-entry rank's wait in the receive broadcast while its entry rank is idle
  is `idle` (move_entry_idle), as the replay's timers count it.
- phase_gil_pct: per phase, the share of its samples that held the GIL (e.g.
  sha256 hashing in from_dict releases it, pickling holds it).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..vocab import PHASES
from .discover import parse_title
from .pyspy import ThreadSamples, main_thread
from .rules import RuleSet
from .stats import block_share, sampling_hw, shares_pct


@dataclass
class RankSamples:
    rank: int
    pid: int | None
    title: str | None
    threads: dict[int, ThreadSamples]
    gil_threads: dict[int, ThreadSamples] | None = None
    # Consecutive blocks of the recording, (threads, gil_threads) each; the
    # merged `threads` / `gil_threads` are their sum. Empty: one block.
    blocks: list[tuple[dict[int, ThreadSamples], dict[int, ThreadSamples] | None]] = field(default_factory=list)
    gil_planned: int | None = None  # blocks recorded with --gil (None: every block)
    expected: float | None = None   # samples the blocks' span would hold at the rate (None: unknown)

    @classmethod
    def from_blocks(cls, rank: int, pid: int | None, title: str | None, blocks: list,
                    gil_planned: int | None = None, expected: float | None = None) -> "RankSamples":
        """Merge (threads, gil_threads) blocks; gil_threads over the blocks that have them
        (None if none has: see attribute for how much of the planned blocks they must cover)."""
        gils = [g for _, g in blocks if g is not None]
        return cls(rank, pid, title, merge_threads([t for t, _ in blocks]),
                   merge_threads(gils) if gils else None, list(blocks), gil_planned, expected)

    def block_list(self):
        return self.blocks or [(self.threads, self.gil_threads)]


def merge_threads(parts: list[dict[int, ThreadSamples]]) -> dict[int, ThreadSamples]:
    out: dict[int, ThreadSamples] = {}
    for part in parts:
        for tid, t in part.items():
            m = out.setdefault(tid, ThreadSamples(tid, t.name))
            m.name = m.name or t.name
            m.stacks.update(t.stacks)
    return out


@dataclass
class RankProfile:
    rank: int
    pid: int | None
    title: str | None
    samples: int
    phase_counts: Counter
    phases_pct: dict[str, float]
    phases_ci: dict[str, float | None]
    gil_held_pct: float | None
    gil_wait_pct: float | None
    phase_gil_pct: dict[str, float | None]
    other_threads: list[dict] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    top_other: list[tuple[str, int]] = field(default_factory=list)
    gil_held_ci: float | None = None
    # Per phase, the share of wall time spent waiting in it (rules.toml [[wait]]) and its half-width.
    wait_pct: dict[str, float] = field(default_factory=dict)
    wait_ci: dict[str, float | None] = field(default_factory=dict)
    gil_note: str | None = None  # why GIL figures cover part of the window, or are None
    phases_spread: dict[str, float | None] = field(default_factory=dict)
    gil_wait_ci: float | None = None


def _pct(n: float, d: float) -> float:
    return 100.0 * n / d if d else 0.0


ALL = "all"  # the key of a rank's total wait share in wait_pct / wait_ci


def _phase_counts(t: ThreadSamples | None, rules: RuleSet, waits: Counter | None = None) -> Counter:
    """Samples per phase; with `waits`, also count there the samples that were
    waiting (rules.toml [[wait]]), per phase."""
    c: Counter = Counter({p: 0 for p in PHASES})
    if t is not None:
        for stack, n in t.stacks.items():
            phase, waiting = rules.classify(stack)
            c[phase] += n
            if waiting and waits is not None:
                waits[phase] += n
                waits[ALL] += n
    return c


def _is_entry_rank(rs: RankSamples) -> bool:
    """TP0 of its group (from the title, e.g. sglang::scheduler_DP1_TP0), else rank 0."""
    parts = parse_title(rs.title) if rs.title else None
    if parts is not None:
        return parts.get("TP", 0) == 0
    return rs.rank == 0


def _strategy_tokens(rs: RankSamples, rules: RuleSet) -> set[str]:
    """What RuleSet.strategy_of reads (see [strategy] in rules.toml): the short names
    seen on any thread, `phase:NAME` for each phase seen, and `outer>inner` for the
    stack markers seen on a rank that is not its group's entry rank."""
    tokens: set[str] = set()
    pairs = rules.stack_markers
    entry = _is_entry_rank(rs)
    for t in rs.threads.values():
        for stack in t.stacks:
            names = [f.short for f in stack]
            tokens.update(names)
            tokens.update(f.name for f in stack)  # qualified (Cond.process) as py-spy shows it
            tokens.add("phase:" + rules.classify(stack)[0])
            if not entry:
                for outer, inner in pairs:
                    if outer in names and inner in names[names.index(outer) + 1:]:
                        tokens.add(f"{outer}>{inner}")
    return tokens


def _main_of(threads: dict[int, ThreadSamples], main: ThreadSamples | None) -> ThreadSamples | None:
    """The main thread's samples in one block (by TID, else by name)."""
    if main is None:
        return None
    t = threads.get(main.tid)
    if t is None and main.name:
        t = next((x for x in threads.values() if x.name == main.name), None)
    return t


MIN_GIL_COVER = 0.5  # GIL figures need --gil files over at least half the planned blocks' samples


def _gil_blocks(rs: RankSamples, main: ThreadSamples, per_block: list[Counter]) -> list[tuple]:
    """(main samples, main samples holding the GIL, phase counts) of each block with a --gil file."""
    out = []
    for (threads, gthreads), counts in zip(rs.block_list(), per_block):
        if gthreads is not None:
            g, m = _main_of(gthreads, main), _main_of(threads, main)
            out.append((m.samples if m else 0, g.samples if g else 0, counts))
    return out


def _gil_figures(rs: RankSamples, main: ThreadSamples, per_block: list[Counter], idle_pct: float,
                 rules: RuleSet) -> tuple:
    """GIL held % (and its half-width over the blocks), GIL wait estimate (and its sampling
    half-width), per-phase GIL %, over the blocks that have a --gil file; and a note when
    some have none (too few: None)."""
    blocks = _gil_blocks(rs, main, per_block)
    total, n_all = sum(sum(c.values()) for c in per_block), len(per_block)
    sizes, held_n = [b[0] for b in blocks], [b[1] for b in blocks]
    covered = sum(sizes)
    note = None
    planned = n_all if rs.gil_planned is None else rs.gil_planned  # --gil runs on part of the blocks by design
    if len(blocks) < planned:
        note = (f"py-spy --gil wrote {len(blocks)} of its {planned} blocks ({covered} of {total} main-thread samples)")
        if covered < MIN_GIL_COVER * total * planned / n_all or covered == 0:
            return None, None, None, None, {k: None for k in PHASES}, note + ": too few to measure its GIL figures"
        note += ": GIL figures from those blocks only"
    p, hw, _ = block_share(held_n, sizes)
    counts: Counter = Counter()
    for b in blocks:
        counts.update(b[2])
    gmain = _main_of(rs.gil_threads, main)
    gcounts = _phase_counts(gmain, rules)
    gil_held = min(100.0, _pct(sum(gcounts.values()), covered))
    phase_gil = {k: (round(min(100.0, _pct(gcounts[k], counts[k])), 1) if counts[k] else None) for k in PHASES}
    other_gil = sum(t.samples for tid, t in rs.gil_threads.items() if gmain is None or tid != gmain.tid)
    gil_wait = max(0.0, min(min(100.0, _pct(other_gil, covered)), 100.0 - gil_held - idle_pct))
    wait_hw = sampling_hw(gil_wait / 100.0, covered)  # a share of the --gil blocks' samples
    return (round(gil_held, 2), (None if hw != hw else round(100.0 * hw, 2)), round(gil_wait, 2),
            (None if wait_hw != wait_hw else round(100.0 * wait_hw, 2)), phase_gil, note)


def attribute(rs: RankSamples, rules: RuleSet) -> RankProfile:
    main = main_thread(rs.threads, rs.pid)
    counts = _phase_counts(main, rules)
    total = sum(counts.values())
    per_block, wait_block = [], []
    for threads, _ in rs.block_list():
        w: Counter = Counter()
        per_block.append(_phase_counts(_main_of(threads, main), rules, w))
        wait_block.append(w)
    sizes = [sum(b.values()) for b in per_block]
    phases_pct, phases_ci, spread = shares_pct(per_block, PHASES, sizes, rs.expected)
    wait_pct, wait_ci, _ = shares_pct(wait_block, PHASES + (ALL,), sizes, rs.expected)
    functions = _strategy_tokens(rs, rules)
    # The functions most seen in `other` (leaf-most Python frame), to show what the rules miss.
    other_leaf: Counter = Counter()
    if main is not None:
        for stack, n in main.stacks.items():
            if stack and rules.classify(stack)[0] == "other":
                other_leaf[stack[-1].name] += n

    gil_held = gil_wait = gil_ci = gil_wait_ci = gil_note = None
    phase_gil: dict[str, float | None] = {p: None for p in PHASES}
    if rs.gil_threads is not None and main is not None:
        gil_held, gil_ci, gil_wait, gil_wait_ci, phase_gil, gil_note = _gil_figures(rs, main, per_block,
                                                                                   phases_pct["idle"], rules)
    others: list[dict] = []
    for tid, t in sorted(rs.threads.items()):
        if main is not None and tid == main.tid:
            continue
        g = rs.gil_threads.get(tid) if rs.gil_threads else None
        others.append({"tid": tid, "name": t.name, "samples": t.samples,
                       "gil_held_pct": round(min(100.0, _pct(g.samples if g else 0, t.samples)), 2)
                       if rs.gil_threads is not None else None,
                       "phases_pct": {p: round(_pct(n, t.samples), 2)
                                      for p, n in _phase_counts(t, rules).items() if n}})
    return RankProfile(rs.rank, rs.pid, rs.title, total, counts, phases_pct, phases_ci, gil_held, gil_wait,
                       phase_gil, others, functions, other_leaf.most_common(5), gil_ci, wait_pct, wait_ci, gil_note,
                       spread, gil_wait_ci)


def _group(title: str | None) -> tuple[int, int]:
    parts = parse_title(title) if title else None
    return (parts or {}).get("DP", 0), (parts or {}).get("PP", 0)


def move_entry_idle(profiles: list[RankProfile]) -> list[str]:
    """While a group's entry rank is idle (waiting for arrivals), the other ranks
    wait for it inside the receive broadcast (broadcast_pyobj). That wait is idle
    time, not request transport, as the replay's timers count it: move
    min(entry idle %, rank's wait in recv %) from `recv` to `idle` on each
    non-entry rank (only waiting can be idle; unpickling the requests is work).
    Samples carry no timestamps, so this is the share-level form of the replay's
    per-iteration min(). Returns a note when anything moved."""
    entries: dict[tuple[int, int], RankProfile] = {}
    for p in profiles:
        if _is_entry_rank(RankSamples(p.rank, p.pid, p.title, {})):
            entries.setdefault(_group(p.title), p)
    moved_any = []
    for p in profiles:
        e = entries.get(_group(p.title))
        if e is None or e is p:
            continue
        moved = round(min(e.phases_pct["idle"], p.wait_pct.get("recv", 0.0)), 2)
        if moved > 0:
            for d in (p.phases_pct, p.wait_pct):
                d["recv"] = round(d["recv"] - moved, 2)
                d["idle"] = round(d["idle"] + moved, 2)
            # The moved share carries the entry rank's uncertainty about its idle time, independent of
            # this rank's own (another process, sampled apart): both of its shares add it in quadrature.
            for d, e_ci in ((p.phases_ci, e.phases_ci), (p.wait_ci, e.phases_ci), (p.phases_spread, e.phases_spread)):
                if e_ci.get("idle") is None:
                    continue
                for k in ("idle", "recv"):
                    if d.get(k) is not None:
                        d[k] = round(math.hypot(d[k], e_ci["idle"]), 2)
            moved_any.append(f"rank {p.rank} {moved:.1f}")
    if not moved_any:
        return []
    return ["time the other ranks spent in the receive broadcast while their entry rank was idle is counted "
            "as idle, not recv (percentage points moved: " + ", ".join(moved_any) + ")"]


def detect_strategy(profiles: list[RankProfile], rules: RuleSet) -> str:
    seen: set[str] = set()
    for p in profiles:
        seen |= p.functions
    return rules.strategy_of(seen)
