"""mmdiag recommend: the cost model, the significance logic, and the recommendation on
both sides of the crossover (a real replay of small images; a Run whose measured
numbers show the broadcast paying for large video)."""
from __future__ import annotations

import json
import math
import random

import pytest

from mmdiag.units import MB
from click.testing import CliRunner

from runs_synth import profile_run, rank, replay_run, strategy, video_run

from mmdiag import api
from mmdiag.cli import main
from mmdiag.analysis.compare import compare_samples, t_quantile, t_two_sided_p
from mmdiag.analysis.costmodel import fit
from mmdiag.analysis.recommend import load_rules, recommend
from mmdiag.render.recommend_text import render_recommendation
from mmdiag.strategies import PATCHABLE as PATCHABLE_STRATEGIES
from mmdiag.vocab import STRATEGIES


# --- significance (pyperf compare_to style) ------------------------------------------

def test_t_distribution_matches_tables():
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert t_quantile(0.95, 4) == pytest.approx(2.776, abs=1e-3)


def test_same_noise_is_not_a_win_and_false_positives_are_rare():
    rng = random.Random(1)
    wins = sig = 0
    for _ in range(300):
        a = [rng.gauss(10.0, 0.5) for _ in range(5)]
        b = [rng.gauss(10.0, 0.5) for _ in range(5)]
        c = compare_samples(a, b)
        sig += c.significant
        wins += c.better
    assert sig / 300 < 0.10          # alpha 0.05, with some slack
    assert wins <= sig


def test_real_shift_is_significant_and_direction_is_right():
    rng = random.Random(2)
    before = [rng.gauss(10.0, 0.2) for _ in range(5)]
    after = [rng.gauss(12.0, 0.2) for _ in range(5)]
    c = compare_samples(before, after)
    assert c.significant and c.better and not c.worse
    assert c.ci95[0] > 0 and "faster" in c.verdict()
    # Lower is better for latency: a drop is a win.
    lat = compare_samples(after, before, metric="p99", higher_is_better=False)
    assert lat.better and "lower" in lat.verdict()


def test_shift_inside_the_noise_is_not_significant():
    c = compare_samples([10.0, 12.0, 8.0], [10.5, 12.5, 8.5])   # +5% against +-20% noise
    assert not c.significant and not c.better
    assert c.verdict().startswith("not significant")


def test_one_repeat_is_never_judged():
    c = compare_samples([10.0], [20.0])
    assert c.status == "not judged" and not c.better and not c.worse


# --- the cost model ----------------------------------------------------------------

def test_cost_model_recovers_the_measured_costs():
    m = fit([video_run()])
    assert m.m_all_ms_per_mb == pytest.approx(12.0)
    assert m.m_one_ms_per_mb == pytest.approx(4.0)
    assert m.k_ms_per_mb == pytest.approx(1.0, rel=1e-6)
    assert m.c_ms_per_collective == pytest.approx(20.0, rel=1e-6)
    assert m.separable
    # Broadcasting pays above c / (m_all - m_one - k) = 20/7 MB per collective.
    assert m.crossover_mb(1.0) == pytest.approx(20 / 7)
    assert m.broadcast_pays() is True
    assert m.predicted_ms("batch") < m.predicted_ms("revert")


def test_one_message_size_leaves_the_crossover_unknown():
    run = video_run()
    run.strategies.pop("batch")            # commit and dict send the same size per collective
    m = fit([run])
    assert not m.separable
    assert m.crossover_mb(1.0) is None and m.broadcast_pays() is None      # not 0 MB, not "pays for anything"
    assert m.predicted_ms("commit") is None and m.predicted_ms("revert") is not None
    assert any("lower bound" in n for n in m.notes)
    rec = recommend([run])
    assert any("unknown" in r and "lower bound" in r for r in rec.reasons)
    assert not any("above the crossover" in r for r in rec.reasons)


def test_cost_model_never_pays_when_sending_costs_more_than_hashing():
    run = video_run()
    for name in ("revert", "dict"):                   # hashing on every rank is now cheap
        for r in run.strategies[name].ranks:
            r.phases_ms["from_dict"] = 0.5 * 9000
    m = fit([run])
    assert math.isinf(m.crossover_mb(1.0)) and m.broadcast_pays() is False


# --- the recommendation: large video (broadcast paying) -----------------------------

def test_large_video_with_broadcast_paying_does_not_get_revert():
    rec = recommend([video_run()])
    assert rec.recommended != "revert"
    assert rec.recommended == "batch"
    assert rec.confidence == "high"
    assert rec.cost_model.broadcast_pays() is True
    names = [o.name for o in rec.runners_up]
    assert "commit" in names and "revert" in names
    pre = next(o for o in rec.runners_up if o.name == "precompute")
    assert pre.expected_rps == pytest.approx(1.5) and "tokenizer" in pre.note


def test_batch_replayed_on_shared_memory_is_not_recommended():
    """The same measurements on the shm transport: batch (fastest patch) would pickle the features
    again from the entry rank, which apply refuses on shared-memory releases: never the pick."""
    run = video_run()
    run.config.transport = "shm"
    rec = recommend([run])
    assert rec.recommended != "batch"
    batch = next(o for o in rec.runners_up if o.name == "batch")
    assert not batch.patchable and "pickles the features again from the entry rank" in batch.note


def test_commit_and_async_are_never_recommended_even_when_fastest():
    run = video_run()
    run.strategies["async"] = strategy("async", [6.0, 6.1, 5.9], run.strategies["commit"].ranks)
    rec = recommend([run])
    assert rec.recommended == "batch"                  # async is fastest, but no patch ships it
    notes = {o.name: o.note for o in rec.runners_up}
    assert "regression" in notes["commit"] and "no patch ships it" in notes["async"]
    # commit itself fastest: still never the answer, and no patch slower than it is either.
    run.strategies["commit"].repeats_rps = [5.0, 5.1, 4.9]
    run.strategies["commit"].throughput_rps = 5.0
    rec = recommend([run])
    assert rec.recommended is None and rec.confidence == "undecided"
    assert any("keep the current path" in r for r in rec.reasons)


def test_a_patch_slower_than_commit_is_not_a_confident_pick():
    """Only revert and commit replayed, and revert measurably slower (1.0 against 1.6 req/s):
    revert is the only candidate, but recommending it would make things worse."""
    run = video_run()
    for name in ("batch", "dict", "precompute"):
        run.strategies.pop(name)
    rec = recommend([run])
    assert not (rec.recommended == "revert" and rec.confidence in ("high", "medium"))
    assert rec.recommended is None and rec.confidence == "undecided" and rec.chosen is None
    assert "slower than `commit`" in rec.reasons[0] and "keep the current path" in rec.reasons[0]
    assert any("batch" in m for m in rec.measure_next)
    assert {o.name for o in rec.runners_up} == {"commit", "revert"}
    assert json.loads(json.dumps(rec.to_dict()))["recommended"] is None


def _consistent(rec):
    """Verdict and confidence never contradict: a recommendation the data does not back is none."""
    words = " ".join(rec.reasons).lower()
    if rec.recommended not in (None, "none"):
        assert rec.confidence in ("high", "medium", "low") and "insufficient evidence" not in words
        assert "does not show" not in words and "not measurably faster" not in words
    if rec.confidence == "insufficient evidence":
        assert rec.recommended is None and rec.leading and words.startswith("insufficient evidence")


def test_a_patch_inside_the_noise_of_commit_is_insufficient_evidence():
    run = video_run()
    run.strategies["batch"].repeats_rps = [1.55, 1.75, 1.45]       # batch no longer clearly beats commit
    run.strategies["batch"].throughput_rps = 1.55
    run.strategies["precompute"].tokenizer_ms["capacity_rps"] = 1.0
    rec = recommend([run])
    _consistent(rec)
    assert rec.recommended is None and rec.confidence == "insufficient evidence" and rec.leading == "batch"
    assert "does not show it is faster than `commit`" in rec.reasons[0]
    assert json.loads(json.dumps(rec.to_dict()))["leading"] == "batch"


def test_mm_path_under_a_few_percent_gets_none():
    tiny = [rank(r, recv=9000, from_dict=50, forward=9000) for r in range(2)]
    run = replay_run([strategy("commit", [10, 10.1], tiny), strategy("revert", [10, 10.2], tiny)], tp=2, mean_mb=0.1)
    rec = recommend([run])
    assert rec.recommended == "none" and rec.mm_share_pct < 5


def test_a_small_image_size_is_said_in_digits_that_show_it():
    # A 12 kB image at one decimal would read "0.0 MB each": as if the requests carried nothing.
    tiny = [rank(r, recv=9000, from_dict=50, forward=9000) for r in range(2)]
    run = replay_run([strategy("commit", [10, 10.1], tiny), strategy("revert", [10, 10.2], tiny)], tp=2, mean_mb=0.012)
    assert "multimodal at 0.012 MB each" in recommend([run]).target


def test_no_patchable_strategy_measured_cannot_decide():
    run = video_run()
    run.strategies = {k: v for k, v in run.strategies.items() if k == "commit"}
    rec = recommend([run])
    assert rec.recommended is None and rec.confidence == "undecided"
    assert any("--strategy all" in m for m in rec.measure_next)


def test_tie_inside_the_noise_is_low_confidence_and_says_what_to_measure():
    run = video_run()
    run.strategies["revert"].repeats_rps = [1.5, 2.3, 1.9]      # noisy, overlaps batch
    rec = recommend([run])
    assert rec.confidence == "low"
    assert any("cannot decide" in r for r in rec.reasons)
    assert any("--repeat" in m for m in rec.measure_next)
    assert rec.recommended == "batch"                            # the cost model's side breaks the tie


def test_one_repeat_never_recommends_what_it_cannot_show():
    run = video_run()
    for s in run.strategies.values():
        s.repeats_rps = s.repeats_rps[:1]
    rec = recommend([run])
    _consistent(rec)
    assert rec.recommended is None and rec.confidence == "insufficient evidence" and rec.leading == "batch"
    assert any("--repeat 3" in m for m in rec.measure_next)
    text = render_recommendation(rec)
    assert text.startswith("recommended: nothing yet, insufficient evidence (`batch` leads")


def _split(run, keep):
    from dataclasses import replace
    return replace(run, strategies={k: v for k, v in run.strategies.items() if k in keep})


def test_runs_of_one_trace_are_merged_and_others_left_out_with_the_reason(tmp_path):
    """before.json holds commit, after.json revert, batch and precompute (one trace, one tp):
    recommend reads both; a Run of another rank count or another trace is named and left out."""
    video = video_run()
    paths = {}
    for name, run in [("before", _split(video, {"commit"})), ("after", _split(video, {"revert", "batch", "precompute"})),
                      ("tp2", video_run(tp=2)), ("other", replay_run([strategy("commit", [9, 9.1], [rank(0)])],
                                                                     tp=4, mean_mb=1.0))]:
        paths[name] = str(tmp_path / f"{name}.json")
        run.save(paths[name])
    r = CliRunner().invoke(main, ["recommend", *[paths[k] for k in ("before", "after", "tp2", "other")]] +
                           ["--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["recommended"] == "batch" and d["baseline"] == "commit"
    assert d["runs"]["used"] == [paths["before"], paths["after"]]
    why = {x["run"]: x["why"] for x in d["runs"]["left_out"]}
    assert "tp 2, not 4" in why[paths["tp2"]] and "another trace" in why[paths["other"]]


def test_repeats_of_one_strategy_in_two_runs_pool():
    a, b = video_run(), video_run()
    for run, reps in ((a, [1.58]), (b, [1.60, 1.62])):
        run.strategies["commit"].repeats_rps = reps
    rec = recommend([a, b])
    assert next(o for o in rec.runners_up if o.name == "commit").repeats == 3


def test_two_runs_show_the_pooled_figure_the_verdict_uses(tmp_path):
    """Issue 20.1: `recommend r1.json r2.json` with one repeat each (revert 3.86 and 2.53 req/s)
    shows revert's pooled figure (the median of its pooled repeats, as one Run shows its own
    repeats') with both repeats, never the first Run's figure alone."""
    from dataclasses import replace
    paths = []
    for i, reps in enumerate(([3.86], [2.53])):
        run = video_run()
        for s in run.strategies.values():
            s.repeats_rps = s.repeats_rps[i:i + 1]
            s.throughput_rps = s.repeats_rps[0]
        run.strategies["revert"] = replace(run.strategies["revert"], repeats_rps=reps, throughput_rps=reps[0])
        paths.append(str(tmp_path / f"r{i + 1}.json"))
        run.save(paths[-1])
    r = CliRunner().invoke(main, ["recommend", *paths, "--json"])
    assert r.exit_code == 0, r.output
    revert = next(o for o in json.loads(r.output)["runners_up"] if o["name"] == "revert")
    pooled = (3.86 + 2.53) / 2                    # the median of two: what the first Run alone is not
    assert revert["repeats"] == 2 and revert["expected_rps"] == pytest.approx(pooled)
    # one Run holding both repeats shows the same figure: pooling and repeating agree
    one = video_run()
    one.strategies["revert"].repeats_rps = [3.86, 2.53]
    from mmdiag.replay.assemble import merge_repeats
    rs = [replace(one.strategies["revert"], throughput_rps=x, repeats_rps=[x], latency_ms={"p99": 1.0}) for x in (3.86, 2.53)]
    assert merge_repeats(rs).throughput_rps == pytest.approx(pooled)
    # with three repeats over two Runs the figure is their median, which no single Run measured
    a, b = video_run(), video_run()
    a.strategies["commit"].repeats_rps, a.strategies["commit"].throughput_rps = [1.50], 1.50
    b.strategies["commit"].repeats_rps, b.strategies["commit"].throughput_rps = [1.70, 1.60], 1.70
    commit = next(o for o in recommend([a, b]).runners_up if o.name == "commit")
    assert commit.repeats == 3 and commit.expected_rps == pytest.approx(1.60)


def test_no_baseline_measured_names_no_patch_and_says_what_to_replay(tmp_path):
    """Issue 20.2: a Run without `commit` (revert and precompute, one repeat) never gets a patch,
    not even at low confidence: insufficient evidence, and the replay of `commit` that merges
    with it (same trace, tp and settings) is named."""
    run = video_run()
    for name in ("commit", "batch", "dict"):
        run.strategies.pop(name)
    for s in run.strategies.values():
        s.repeats_rps = s.repeats_rps[:1]
    run.config.transport = "shm"
    p = str(tmp_path / "nocommit.json")
    run.save(p)
    rec = recommend([run.load(p)])
    _consistent(rec)
    assert rec.recommended is None and rec.chosen is None and rec.confidence == "insufficient evidence"
    assert rec.leading == "precompute"        # 1.5 req/s (its tokenizer cap) against revert's 1.0
    assert "`commit` (the current path) was not replayed" in rec.reasons[0]
    cmd = rec.measure_next[0]
    assert "mmdiag replay /synthetic/trace.jsonl --tp 4 --strategy commit --transport shm" in cmd
    assert f"mmdiag recommend {p} commit.json" in cmd
    # with three repeats each it is still no answer: the baseline is what a patch must beat
    run = video_run()
    run.strategies.pop("commit")
    rec = recommend([run])
    assert rec.recommended is None and rec.leading == "batch" and "--strategy commit" in rec.measure_next[0]
    text = render_recommendation(rec)
    assert text.startswith("recommended: nothing yet, insufficient evidence (`batch` leads")
    assert "confidence:  insufficient evidence" in text


def test_cond_replayed_with_another_threshold_is_not_pooled():
    """Two Runs of one workload whose `cond` ran with different thresholds: the second's cond is
    left out with both thresholds named, the merged Run keeps the first's threshold and repeats,
    and the rest of the second Run still pools."""
    from dataclasses import replace
    from mmdiag.analysis.merge import merge_replays
    runs = []
    for th, reps in ((100_000, [1.2, 1.21]), (2_000_000, [1.7, 1.71, 1.72])):
        run = video_run()
        cond = replace(run.strategies["revert"], name="cond", repeats_rps=reps, throughput_rps=reps[0])
        run.strategies["cond"] = cond
        run.config.strategies = {"cond": {"name": "cond", "threshold": {"bytes": th, "source": "option", "text": ""}}}
        runs.append(replace(run, path=f"th{th}.json"))
    m = merge_replays(runs)
    assert m.used == ["th100000.json", "th2000000.json"]
    assert m.left_out == [("th2000000.json `cond`", "replayed with another threshold (2000000, not 100000 as in th100000.json)")]
    assert m.run.strategies["cond"].repeats_rps == [1.2, 1.21] and len(m.run.strategies["commit"].repeats_rps) == 6
    assert m.run.config.strategies["cond"]["threshold"]["bytes"] == 100_000
    # the same threshold pools
    runs[1].config.strategies["cond"]["threshold"]["bytes"] = 100_000
    assert len(merge_replays(runs).run.strategies["cond"].repeats_rps) == 5


def test_a_null_throughput_is_left_out_not_a_traceback(tmp_path):
    d = video_run().to_dict()
    d["strategies"]["precompute"]["throughput_rps"] = None
    p = tmp_path / "null.json"
    p.write_text(json.dumps(d))
    r = CliRunner().invoke(main, ["recommend", str(p), "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    out = json.loads(r.output)
    assert out["recommended"] == "batch"
    assert any("precompute" in x["run"] and "no throughput" in x["why"] for x in out["runs"]["left_out"])


def test_live_profile_recommends_from_phase_shares_and_asks_for_a_replay():
    waiting = profile_run([{"recv": 20, "from_dict": 10, "pickle": 5, "broadcast": 5, "forward": 30, "idle": 30},
                           {"recv": 20, "broadcast": 40, "unpickle": 5, "forward": 30, "idle": 5}])
    rec = recommend([waiting])
    assert rec.source == "profile" and rec.recommended == "revert"
    assert any("replay" in m for m in rec.measure_next)
    hashing = profile_run([{"recv": 20, "from_dict": 50, "forward": 30}, {"recv": 20, "from_dict": 50, "forward": 30}])
    assert recommend([hashing]).recommended == "precompute"
    idle = profile_run([{"recv": 30, "from_dict": 1, "forward": 30, "idle": 39}, {"recv": 30, "from_dict": 1, "forward": 30, "idle": 39}])
    assert recommend([idle]).recommended == "none"


def test_rules_are_data():
    rules = load_rules()
    assert rules["thresholds"]["min_mm_share_pct"] > 0
    assert set(rules["candidates"]["order"]) <= set(PATCHABLE_STRATEGIES)
    # Shown but never recommended: strategies no patch ships.
    assert set(rules["not_a_fix"]) <= set(STRATEGIES) - set(PATCHABLE_STRATEGIES)
    assert {"commit", "async"} <= set(rules["not_a_fix"])


def test_readme_names_the_strategies_never_recommended():
    """The README's "`commit`, `async` and `dict_async` are shown, never recommended: no patch
    ships them" is what the code does: recommend picks only among [candidates] order, so the
    never-recommended are the strategies outside it, and they are the ones no patch ships."""
    import os
    import re

    never = [n for n in STRATEGIES if n not in load_rules()["candidates"]["order"]]
    assert never == [n for n in STRATEGIES if n not in PATCHABLE_STRATEGIES]  # the README's reason holds
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read().split())
    said = re.search(r"((?:`\w+`(?:, | and ))*`\w+`) are shown, never recommended: no patch ships them", readme)
    assert said and re.findall(r"`(\w+)`", said.group(1)) == never, \
        f"README's never-recommended strategies are stale: {never}"


def test_cli_json_and_no_runs_replays_the_default(monkeypatch, tmp_path):
    calls = {}

    def fake_replay_default(**kw):
        calls.update(kw)
        return video_run()

    monkeypatch.setattr(api, "replay_default", fake_replay_default)
    r = CliRunner().invoke(main, ["recommend", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["recommended"] == "batch" and d["cost_model"]["broadcast_pays"] is True
    assert "tp" in calls
    p = tmp_path / "run.json"
    video_run().save(str(p))
    r = CliRunner().invoke(main, ["recommend", str(p)])
    assert r.exit_code == 0 and "recommended: batch" in r.output


def test_cli_bad_run_file_is_one_line(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('{"schema": "mmdiag.replay/1", "tp": 2, "strat')
    r = CliRunner().invoke(main, ["recommend", str(p)])
    assert r.exit_code == 2 and "mmdiag: error:" in r.output and "Traceback" not in r.output


# --- a real replay: small images at high concurrency ---------------------------------

@pytest.mark.slow
def test_small_images_at_high_concurrency_do_not_get_commit(tmp_path):
    from mmdiag.replay import ReplayOptions, replay
    from mmdiag.workloads import synth_to_file

    trace = str(tmp_path / "small.jsonl")
    synth_to_file("small-image-c96", 24, trace)          # 24 real-size 1120x700 images, closed loop c96
    run = replay(trace, ReplayOptions(tp=2, strategies=["revert", "commit", "batch", "precompute"], repeat=2))
    rec = recommend([run])
    # Every rank hashing a small image is cheaper than broadcasting it at high concurrency:
    # the answer is per-rank (revert) or hashing once in the tokenizer (precompute), never
    # a broadcast, and the model must not say broadcasting pays.
    _consistent(rec)
    assert (rec.recommended or rec.leading) in {"revert", "precompute"}, rec.reasons
    assert rec.cost_model.broadcast_pays() is not True
    assert rec.mm_share_pct > 5
    m = rec.cost_model
    assert m.m_all_ms_per_mb > 0 and m.k_ms_per_mb is not None and m.workload_mb == pytest.approx(4000 * 1176 * 4 / MB)
    d = rec.to_dict()
    json.dumps(d)
    assert d["recommended"] == rec.recommended and len(d["runners_up"]) == (3 if rec.recommended else 4)
    # The acceptance report of that recommendation builds from the same Run.
    from mmdiag.analysis.criteria import load_criteria
    from mmdiag.analysis.report import build_report
    rep = build_report(run, run, load_criteria(), before_path="run.json", after_path="run.json")
    assert rep.before.strategy == "commit" and rep.after.strategy == (rec.recommended or rec.leading)


def test_among_tied_patches_one_shown_faster_than_the_baseline_wins():
    """revert and precompute tie inside revert's noise; only precompute is shown faster than
    commit, so it is the pick (not 'insufficient evidence' because revert came first in order)."""
    rk = [rank(r, recv=100, from_dict=400, forward=100) for r in range(2)]
    run = replay_run([strategy("commit", [1.0, 1.02, 0.98], rk), strategy("revert", [1.05, 1.45, 0.75], rk),
                      strategy("precompute", [1.2, 1.22, 1.18], rk)], tp=2, mean_mb=18)
    rec = recommend([run])
    _consistent(rec)
    assert rec.recommended == "precompute" and rec.confidence == "low"


def test_cost_model_reads_each_strategy_module_and_a_new_one_plugs_in(monkeypatch):
    from mmdiag import strategies
    from mmdiag.analysis.costmodel import COST_CLASSES

    assert all(c.cost_class in COST_CLASSES for c in strategies.REGISTRY.values())
    m = fit([video_run()])
    pred = m.to_dict()["predicted_ms_per_mm_request"]
    assert set(pred) == set(strategies.REGISTRY)
    assert pred["batch"] < pred["commit"] and pred["precompute"] == 0.0 and pred["async"] is None
    assert pred["cond"] == min(pred["revert"], pred["commit"])

    class Twice(strategies.REGISTRY["batch"]):     # a new strategy: its module names its class
        name, cost_class = "twice", "entry_per_request"
    monkeypatch.setitem(strategies.REGISTRY, "twice", Twice)
    assert m.predicted_ms("twice") == pytest.approx(pred["commit"])


def test_where_the_tokenizer_bounds_no_scheduler_patch_is_recommended():
    """The phase shares point to revert, but the stage verdict (mmdiag.live.stages) says the
    tokenizer stage saturates first: revert would speed up a stage that does not bound the
    server, so the remedy for the tokenizer's dominant phase is named instead; where the
    scheduler loop bounds, the phase shares' pick stands."""
    from mmdiag.live.stages import bottleneck
    from mmdiag.run import Stage, StageServer

    def with_tokenizer(busy_shm: float, phase: str = "tokenizer_shm") -> "Run":
        run = profile_run([{"recv": 20, "from_dict": 10, "pickle": 5, "broadcast": 5, "forward": 30, "idle": 30},
                           {"recv": 20, "broadcast": 40, "unpickle": 5, "forward": 30, "idle": 5}])
        idle = 100.0 - busy_shm - 5.0
        tok = StageServer("main thread", 1, phases_pct={"tokenizer_hash": 0.0, "tokenizer_shm": 0.0, phase: busy_shm,
                                                       "other": 5.0, "idle": idle},
                          busy_pct=100.0 - idle, busy_ci=1.0)
        sched = [StageServer(f"rank {r.rank}", r.rank + 2, phases_pct=dict(r.profile.phases_pct),
                             busy_pct=100.0 - r.profile.phases_pct["idle"], busy_ci=1.0) for r in run.ranks]
        run.stages = [Stage("tokenizer", [1], [tok], tok.name, dict(tok.phases_pct), busy_pct=tok.busy_pct, busy_ci=1.0),
                      Stage("scheduler", [2, 3], sched, "rank 1", dict(sched[1].phases_pct),
                            busy_pct=sched[1].busy_pct, busy_ci=1.0)]
        run.bottleneck = bottleneck(run.stages, None, None)
        return run

    rec = recommend([with_tokenizer(94.5)])  # the segment write bounds: the segment pool
    assert rec.recommended == "pool" and rec.command == "mmdiag apply pool" and "segment" in rec.remedy
    # where the release predates its own segments' handles (0.5.9), mmdiag's shm patch is the pool
    assert recommend([with_tokenizer(94.5)], release="0.5.9").command == "mmdiag apply shm"
    assert rec.reasons[0].startswith("the tokenizer stage bounds throughput")
    assert any("'revert'" in n and "not recommended" in n for n in rec.notes)
    assert recommend([with_tokenizer(50.0)]).recommended == "revert"   # the scheduler loop bounds
    hashing = recommend([with_tokenizer(94.5, "tokenizer_hash")])  # hashing bounds: the content-hash patch
    assert hashing.recommended == "xxh3" and hashing.command == "mmdiag apply xxh3"
