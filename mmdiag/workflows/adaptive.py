"""Replay until the answer is decided, within a time budget: what `mmdiag recommend` does
with no Runs (and what `mmdiag demo` shows).

A first round replays every strategy the recommendation weighs (the baseline and the
patches) with 2 repeats, the fewest that give a noise estimate. Then, while the
recommendation is not decided (the leading patch not shown faster than the baseline:
the confidence interval of the difference still holds 0; or patches tied inside the
noise) and another round fits in the budget, the contenders alone are replayed once
more; Runs of one trace merge (mmdiag.analysis.merge), so every round adds repeats.
It stops when decided, at `max_repeats`, or when the budget would be exceeded, and
says which.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MmdiagError
from ..progress import Lines as Progress  # noqa: F401 - the one progress line (mmdiag.progress)
from ..run import Run
from ..strategies import cond_threshold as threshold
from ..analysis.merge import merge_replays
from ..analysis.recommend import INSUFFICIENT, Recommendation, recommend
from ..fileio import check_writable

UNDECIDED = (INSUFFICIENT, "low")


@dataclass
class Rounds:
    run: Run
    rec: Recommendation
    rounds: list[dict] = field(default_factory=list)    # strategies, repeat, seconds
    stopped: str = ""

    def summary(self) -> str:
        spent = sum(r.get("seconds", 0) for r in self.rounds)
        parts = [f"{', '.join(r['strategies'])} x{r['repeat']} ({r.get('seconds', 0):.0f} s)" for r in self.rounds]
        return f"{len(self.rounds)} round(s) in {spent:.0f} s: " + "; ".join(parts) + f"; stopped: {self.stopped}"


def contenders(rec: Recommendation) -> list[str]:
    """What another round should replay: the lead, the baseline, and patches tied with the lead."""
    return [n for n in dict.fromkeys([rec.recommended or rec.leading, rec.baseline, *rec.tied]) if n]


def replay_until_decided(replay_round: Callable[[list[str], int], Run], strategies: list[str], *,
                         budget_s: float, max_repeats: int = 6, first_repeat: int = 2,
                         log: Callable[[str], None] = lambda s: None,
                         clock: Callable[[], float] = time.monotonic) -> Rounds:
    """`replay_round(strategies, repeat) -> Run` replays one round (same trace, tp, settings)."""
    start = clock()
    runs: list[Run] = []
    rounds: list[dict] = []
    todo, repeat = list(strategies), first_repeat
    while True:
        t0 = clock()
        runs.append(replay_round(todo, repeat))
        took = clock() - t0
        rounds.append({"strategies": todo, "repeat": repeat, "seconds": round(took, 1)})
        merged = merge_replays(runs).run
        res = Rounds(merged, recommend([merged]), rounds)
        if res.rec.confidence not in UNDECIDED or res.rec.recommended == "none":
            res.stopped = "decided"
            return res
        todo = contenders(res.rec)
        have = min(len(merged.strategies[n].repeats_rps) for n in todo)
        # One more repeat of each contender costs about what a strategy-repeat cost this round.
        per = took / max(len(rounds[-1]["strategies"]) * repeat, 1)
        if have >= max_repeats:
            res.stopped = f"the cap of {max_repeats} repeats"
        elif clock() - start + per * (len(todo) + 1) > budget_s:
            res.stopped = f"the {budget_s:.0f} s budget (another round needs about {per * (len(todo) + 1):.0f} s)"
        if res.stopped:
            return res
        log(f"not decided yet ({res.rec.confidence}): one more repeat of {', '.join(todo)}")
        repeat = 1


def default_path(runs_dir: str, what: str, clock: Callable[[], float] = time.time) -> str:
    return os.path.join(runs_dir, f"{what}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(clock()))}.json")


def recommend_default(*, tp: int | None = None, n: int | None = None, profile: str | None = None,
                      repeat: int | None = None, save: str | None = None,
                      log: Callable[[str], None] = lambda s: None) -> tuple[Rounds, str]:
    """Replay the bundled default workload until the recommendation is decided (or, with
    `repeat`, exactly that many repeats); keep the Run at `save` (default: a timestamped file
    under [quick] runs_dir). Returns the rounds and where the Run was written."""
    from ..replay import ReplayOptions, replay
    from ..strategies import BASELINE, resolve
    from ..workloads import defaults, synth_to_file
    from ..analysis.recommend import load_rules

    d = defaults()
    quick = d.get("quick", {})
    profile = profile or d["workload"]
    tp = int(tp if tp is not None else d["tp"])
    n = n or quick.get("requests")
    if not save:
        save = default_path(quick.get("runs_dir", "mmdiag-runs"), "recommend")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
        except OSError as e:
            raise MmdiagError(f"cannot create the folder for the replayed Run ({e.strerror})", where=save,
                              fix="run from a writable folder or give --save PATH") from None
    check_writable(save)   # before minutes of replay, not after
    weighed = resolve([BASELINE, *load_rules()["candidates"]["order"]])
    with tempfile.TemporaryDirectory(prefix="mmdiag-recommend-") as tmp:
        path = os.path.join(tmp, "trace.jsonl")
        count = synth_to_file(profile, n, path)
        rule = (f"{repeat} repeats" if repeat else
                f"2 repeats, then more of the undecided ones until decided (at most {quick.get('max_repeats', 6)} "
                f"repeats or {quick.get('budget_s', 90)} s)")
        log(f"no Runs given: replaying {count} requests of the default workload {profile!r} at tp {tp}: "
            f"{', '.join(weighed)} ({rule})")
        progress = Progress(log)

        kept: dict[str, str] = {}

        def replay_round(strategies: list[str], rep: int) -> Run:
            run = replay(path, ReplayOptions(tp=tp, strategies=strategies, repeat=rep, extra_env=dict(kept)),
                         progress=progress)
            # cond's threshold comes from the strategies replayed before it: a later round replays
            # fewer, so it keeps the first round's (repeats that pool must measure one threshold).
            th = run.described("cond").get("threshold")
            if isinstance(th, dict) and not kept:
                kept[threshold.OPTION_ENV] = json.dumps(th)
            return run

        cap = repeat or int(quick.get("max_repeats", 6))
        res = replay_until_decided(replay_round, weighed, budget_s=float(quick.get("budget_s", 90)),
                                   max_repeats=cap, first_repeat=min(repeat or 2, cap), log=log)
    res.run.save(save)
    res.run.path = save
    log(f"{res.summary()}\nthe replayed Run is kept in {save} (mmdiag recommend {save} to read it again)")
    return res, save
