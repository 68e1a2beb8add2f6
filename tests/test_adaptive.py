"""The no-argument recommend's stopping rule: replay more repeats of the undecided
strategies only, until decided, the repeat cap or the time budget (synthetic rounds:
the rule is arithmetic on Runs; the replay itself is tested in test_replay.py)."""
from __future__ import annotations

import json
import os

import pytest

from runs_synth import rank, replay_run, strategy

from mmdiag.workflows.adaptive import Progress, contenders, replay_until_decided

RANKS = [rank(r, recv=100, from_dict=400, forward=100) for r in range(2)]
# Per strategy, the throughput each successive repeat measures: precompute leads commit by
# ~12%, inside the noise of two repeats, outside it after a few more.
SERIES = {"commit": [1.0, 1.2, 0.95, 1.05, 1.0, 1.0], "revert": [0.8, 0.82, 0.79, 0.81, 0.8, 0.8],
          "precompute": [1.35, 1.05, 1.2, 1.2, 1.18, 1.22], "batch": [0.9, 0.91, 0.9, 0.9, 0.9, 0.9]}


class FakeReplay:
    def __init__(self, seconds_per_repeat=1.0):
        self.calls, self.now, self.seen = [], 0.0, {k: 0 for k in SERIES}
        self.per = seconds_per_repeat

    def clock(self):
        return self.now

    def __call__(self, strategies, repeat):
        self.calls.append((list(strategies), repeat))
        out = []
        for name in strategies:
            i = self.seen[name]
            out.append(strategy(name, SERIES[name][i:i + repeat], [rank(r.rank, recv=100, from_dict=400, forward=100)
                                                                   for r in RANKS]))
            self.seen[name] += repeat
        self.now += self.per * repeat * len(strategies)
        return replay_run(out, tp=2, mean_mb=18)


def test_undecided_replays_only_the_contenders_until_decided():
    fake = FakeReplay()
    res = replay_until_decided(fake, ["commit", "revert", "precompute", "batch"], budget_s=1000, clock=fake.clock)
    assert fake.calls[0] == (["commit", "revert", "precompute", "batch"], 2)
    later = [set(c) for c, r in fake.calls[1:] if r == 1]
    assert len(later) == len(fake.calls) - 1 >= 1 and all({"precompute", "commit"} <= c for c in later)
    assert all(b <= a for a, b in zip(later, later[1:])) and later[-1] == {"precompute", "commit"}
    assert res.stopped == "decided" and res.rec.recommended == "precompute"
    assert len(res.run.strategies["precompute"].repeats_rps) == 2 + len(fake.calls) - 1
    # Once told apart from the lead, a patch is not replayed again.
    assert len(res.run.strategies["revert"].repeats_rps) < len(res.run.strategies["precompute"].repeats_rps)
    assert "stopped: decided" in res.summary()


def test_budget_and_cap_stop_an_undecided_answer_and_say_so():
    fake = FakeReplay(seconds_per_repeat=10.0)
    res = replay_until_decided(fake, ["commit", "revert", "precompute", "batch"], budget_s=90, clock=fake.clock)
    assert len(fake.calls) == 1 and res.stopped.startswith("the 90 s budget")
    assert res.rec.recommended is None and res.rec.leading      # honest: not yet shown to help
    fake = FakeReplay()
    res = replay_until_decided(fake, ["commit", "precompute"], budget_s=1000, max_repeats=2, clock=fake.clock)
    assert len(fake.calls) == 1 and res.stopped == "the cap of 2 repeats"
    assert contenders(res.rec)[:2] == [res.rec.leading, "commit"]


def test_progress_prints_a_line_every_few_seconds_and_on_each_new_strategy():
    lines, now = [], [0.0]
    p = Progress(lines.append, every_s=3.0, clock=lambda: now[0])
    for t, label in [(0, "commit 1/2"), (1, "commit 1/2"), (3.5, "commit 1/2"), (4, "revert 1/2")]:
        now[0] = t
        p({"label": label, "done": 3, "total": 32})
    assert len(lines) == 3 and "replaying commit 1/2: 3/32 requests" in lines[0] and "revert" in lines[2]


@pytest.mark.slow
def test_no_argument_recommend_keeps_its_run_and_says_where(tmp_path):
    from conftest import mmdiag_cli

    r = mmdiag_cli("recommend", "--tp", "2", "-n", "6", "--repeat", "2", "--json", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    kept = [n for n in out["notes"] if n.startswith("the replayed Run is kept in ")]
    assert kept and os.path.isfile(os.path.join(tmp_path, kept[0].rsplit(" ", 1)[1]))
    assert kept[0].rsplit(" ", 1)[1].startswith("mmdiag-runs/recommend-")
