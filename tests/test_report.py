"""mmdiag report: before/after tables, significance, acceptance criteria, both output
formats (the HTML parsed and its charts decoded), and every kind of bad input."""
from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from runs_synth import MB, profile_run, rank, replay_run, strategy, video_run

from mmdiag.cli import main
from mmdiag.analysis.criteria import load_criteria, parse_criteria
from mmdiag.analysis.report import build_report
from mmdiag.errors import ProfileError
from mmdiag.render.report_md import render_markdown

PNG = b"\x89PNG\r\n\x1a\n"


def _pair(after_rps=(2.0, 2.05, 1.95), after_cpu=40.0, before_rps=(1.0, 1.02, 0.98), tp=2, p99=900.0, rate=None):
    """commit before, revert after; `rate`: both replayed one open-loop trace at `rate` req/s."""
    b = replay_run([strategy("commit", before_rps, [rank(0, cpu_pct=90, recv=100, from_dict=300, pickle=100,
                                                          broadcast=50), rank(1, cpu_pct=50, recv=100, broadcast=400,
                                                                              unpickle=40)][:tp],
                             coll=1.0, bytes_per_request=36 * MB, p99=1500.0)], tp=tp, mean_mb=18, rate=rate)
    a = replay_run([strategy("revert", after_rps, [rank(r, cpu_pct=after_cpu, recv=100, from_dict=150)
                                                   for r in range(tp)], bytes_per_request=18 * MB, p99=p99,
                             seed=1)], tp=tp, mean_mb=18, rate=rate)
    return b, a


def _write(tmp_path, name, run):
    p = tmp_path / name
    run.save(str(p))
    return str(p)


def _cli(*args):
    return CliRunner().invoke(main, ["report", *[str(a) for a in args]])


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag == "table":
            self.tables += 1


# --- the comparison ----------------------------------------------------------------------

def test_report_passes_and_judges_with_repeats():
    b, a = _pair()
    rep = build_report(b, a, load_criteria(), before_path="b.json", after_path="a.json")
    assert rep.before.strategy == "commit" and rep.after.strategy == "revert"
    assert rep.passed and rep.verdict == "PASS"
    thr = rep.metrics[0]
    assert thr.metric.startswith("throughput") and thr.better is True and "faster" in thr.verdict
    crit = {c.key: c for c in rep.criteria}
    assert crit["cpu_per_request_ratio"].status == "pass"
    assert crit["gil_wait_pct"].status == "n/a"          # a replay has no GIL: n/a, not pass
    assert crit["throughput_ratio"].status == "pass"
    assert [r["rank"] for r in rep.phases] == [0, 1] and rep.phase_unit == "ms per request"


def test_difference_inside_the_noise_is_not_a_win():
    b, a = _pair(before_rps=(10.0, 12.0, 8.0), after_rps=(10.4, 12.4, 8.4))
    rep = build_report(b, a, load_criteria())
    thr = rep.metrics[0]
    assert thr.better is None and thr.verdict.startswith("not significant")


def _thr(b, a, criteria=None):
    rep = build_report(b, a, criteria or load_criteria())
    return {c.key: c for c in rep.criteria}["throughput_ratio"], rep.metrics[0]


def test_throughput_shortfall_never_passes_on_less_evidence():
    c, row = _thr(*_pair(before_rps=(10.0, 12.0, 8.0), after_rps=(9.8, 11.8, 7.8)))    # -2%, inside the noise
    assert c.status == "fail" and c.note.startswith("inconclusive") and "--repeat" in c.note
    assert row.verdict.startswith("not significant")
    c, row = _thr(*_pair(before_rps=(10.0, 10.1, 9.9), after_rps=(8.0, 8.1, 7.9)))      # -20%, significant
    assert c.status == "fail" and "significantly below" in c.note and "slower" in row.verdict
    c, row = _thr(*_pair(before_rps=(10.0,), after_rps=(9.9,)))                          # one repeat: not judged
    assert c.status == "fail" and "inconclusive" in c.note and "--repeat" in c.note
    assert "not judged" in row.verdict
    # Noisier repeats of the same means never turn a fail into a pass.
    quiet, _ = _thr(*_pair(before_rps=(10.0, 10.1, 9.9), after_rps=(9.5, 9.6, 9.4)))
    noisy, _ = _thr(*_pair(before_rps=(10.0, 14.0, 6.0), after_rps=(9.5, 13.5, 5.5)))
    assert quiet.status == noisy.status == "fail"


def test_throughput_criterion_and_table_row_agree():
    crit = parse_criteria({"throughput_ratio": {"min": 1.5}})
    for before, after in [((1.0, 1.02, 0.98), (2.0, 2.05, 1.95)),     # 2x: meets 1.5x
                          ((1.0, 1.01, 0.99), (1.3, 1.31, 1.29)),     # 1.3x: significantly faster, short of 1.5x
                          ((1.0, 1.3, 0.7), (1.45, 1.9, 1.0))]:       # 1.45x inside the noise: inconclusive
        c, row = _thr(*_pair(before_rps=before, after_rps=after), crit)
        ratio = row.after / row.before
        assert f"{ratio:.2f}x" in c.measured and row.change == f"{ratio:.2f}x"
        assert (c.status == "pass") == (ratio >= 1.5)
    assert "significantly below" in _thr(*_pair(before_rps=(1.0, 1.01, 0.99), after_rps=(1.3, 1.31, 1.29)),
                                         crit)[0].note
    assert _thr(*_pair(before_rps=(1.0, 1.3, 0.7), after_rps=(1.45, 1.9, 1.0)), crit)[0].note.startswith("inconclusive")


def test_closed_loop_judges_throughput_not_cpu_or_p99(tmp_path):
    """A closed loop runs the ranks flat out and queues requests whatever the patch: a real 2x
    win with the ranks at 100% and a long p99 passes, with CPU and p99 n/a and the command that
    would measure them at an equal offered load (an open loop at a rate before carried)."""
    b, a = _pair(after_cpu=100.0, p99=5000.0)
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    crit = {c["key"]: c for c in rep["criteria"]}
    assert rep["verdict"] == "PASS" and crit["throughput_ratio"]["status"] == "pass"
    for key in ("scheduler_cpu_pct", "p99_latency_ms"):
        assert crit[key]["status"] == "n/a" and "closed loop" in crit[key]["note"]
        cmd = crit[key]["measure_with"]
        assert "--request-rate 0.8 " in cmd and "mmdiag replay open-loop.jsonl --tp 2" in cmd   # 0.8 x before's 1.0
        assert "--before-strategy commit --after-strategy revert" in cmd
    assert any(n.startswith("to judge scheduler_cpu_pct, p99_latency_ms: ") for n in rep["notes"])
    # The same pair reversed is a real regression: it still fails.
    r = _cli(_write(tmp_path, "b.json", a), _write(tmp_path, "a.json", b), "--before-strategy", "revert",
             "--after-strategy", "commit", "--json")
    crit = {c["key"]: c for c in json.loads(r.output)["criteria"]}
    assert r.exit_code == 1 and crit["throughput_ratio"]["status"] == "fail"
    assert crit["cpu_per_request_ratio"]["status"] == "fail"


def test_open_loop_at_an_equal_load_judges_cpu_and_p99():
    kw = dict(before_rps=(0.99, 1.0, 0.98), after_rps=(0.99, 1.0, 0.99), rate=1.0)   # both keep up with 1 req/s
    crit = {c.key: c for c in build_report(*_pair(after_cpu=85.0, **kw), load_criteria()).criteria}
    assert crit["scheduler_cpu_pct"].status == "fail" and crit["p99_latency_ms"].status == "pass"
    crit = {c.key: c for c in build_report(*_pair(after_cpu=40.0, p99=2500.0, **kw), load_criteria()).criteria}
    assert crit["scheduler_cpu_pct"].status == "pass" and crit["p99_latency_ms"].status == "fail"
    # Both carried the offered rate: throughput is that rate, not capacity.
    assert crit["throughput_ratio"].status == "n/a" and "--max-concurrency" in crit["throughput_ratio"].measure_with


def test_a_load_before_could_not_carry_is_not_an_equal_load():
    b, a = _pair(before_rps=(0.6, 0.61, 0.59), after_rps=(0.99, 1.0, 0.98), after_cpu=85.0, rate=1.0)
    crit = {c.key: c for c in build_report(b, a, load_criteria()).criteria}
    assert crit["scheduler_cpu_pct"].status == "n/a" and "did not keep up" in crit["scheduler_cpu_pct"].note
    assert "--request-rate 0.48 " in crit["scheduler_cpu_pct"].measure_with
    assert crit["throughput_ratio"].status == "pass"      # before saturated: after carried more


def test_acceptance_failure_exits_nonzero(tmp_path):
    b, a = _pair(after_cpu=85.0, before_rps=(0.99, 1.0, 0.98), after_rps=(0.99, 1.0, 0.99), rate=1.0)
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a))
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "scheduler_cpu_pct" in r.output
    b, a = _pair(before_rps=(0.99, 1.0, 0.98), after_rps=(0.99, 1.0, 0.99), rate=1.0)
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a))
    assert r.exit_code == 0, r.output
    assert "acceptance: PASS" in r.output


def test_live_profiles_compare_with_gil(tmp_path):
    before = profile_run([{"recv": 20, "from_dict": 30, "broadcast": 30, "forward": 20},
                          {"recv": 20, "broadcast": 60, "forward": 20}], gil_wait=[35.0, 10.0], cpu=[99, 70])
    after = profile_run([{"recv": 20, "from_dict": 20, "forward": 30, "idle": 30},
                         {"recv": 20, "from_dict": 20, "forward": 30, "idle": 30}], gil_wait=[8.0, 7.0], cpu=[45, 44])
    rep = build_report(before, after, load_criteria())
    crit = {c.key: c for c in rep.criteria}
    assert crit["gil_wait_pct"].status == "pass" and crit["scheduler_cpu_pct"].status == "pass"
    assert crit["throughput_ratio"].status == "n/a" and crit["p99_latency_ms"].status == "n/a"
    assert rep.phase_unit == "% of samples"


def test_one_run_default_is_commit_against_the_recommendation(tmp_path):
    p = _write(tmp_path, "video.json", video_run())
    r = _cli(p, p, "--json")
    d = json.loads(r.output)
    assert d["before"]["strategy"] == "commit" and d["after"]["strategy"] == "batch"
    r = _cli(p, p, "--json", "--after-strategy", "revert")
    assert json.loads(r.output)["after"]["strategy"] == "revert"


# --- output formats ----------------------------------------------------------------------

def test_markdown_report(tmp_path):
    b, a = _pair()
    out = tmp_path / "report.md"
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "-o", out)
    assert r.exit_code == 0, r.output
    md = out.read_text()
    assert md.startswith("## mmdiag acceptance report: PASS")
    assert "| criterion" in md and "| metric" in md and "| rank" in md
    assert "scheduler_cpu_pct" in md and "n/a" in md and "from_dict" in md
    assert md == render_markdown(build_report(b, a, load_criteria(), before_path=str(tmp_path / "b.json"),
                                              after_path=str(tmp_path / "a.json")))


def test_html_report_stands_alone_with_charts(tmp_path):
    b, a = _pair()
    out = tmp_path / "report.html"
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    p = _Imgs()
    p.feed(text)
    assert p.tables >= 3
    srcs = [i["src"] for i in p.imgs]
    assert len(srcs) >= 2                                      # phase bars + latency distribution
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    alts = " ".join(i.get("alt", "") for i in p.imgs)
    assert "phases" in alts and "Latency" in alts
    assert "http://" not in text and "https://" not in text    # nothing outside the file
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".mmdiag-")]  # atomic write left no temp


def test_json_report(tmp_path):
    b, a = _pair()
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "--json")
    d = json.loads(r.output)
    assert d["verdict"] == "PASS" and d["passed"] is True
    assert {c["key"] for c in d["criteria"]} >= {"scheduler_cpu_pct", "throughput_ratio", "p99_latency_ms",
                                                 "gil_wait_pct"}


# --- bad input: one line, non-zero ---------------------------------------------------------

def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mmdiag: error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_different_schemas_are_refused(tmp_path):
    b, _ = _pair()
    prof = profile_run([{"recv": 50, "from_dict": 50}, {"recv": 50, "broadcast": 50}])
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "p.json", prof))
    _one_line_error(r, "live profile", "replay", "throughput")


def test_different_rank_counts_are_refused(tmp_path):
    b, _ = _pair(tp=2)
    _, a = _pair(tp=1)
    r = _cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a))
    _one_line_error(r, "2 ranks", "1", "--tp")


@pytest.mark.parametrize("content,needle", [("", "truncated"), ('{"schema": "mmdiag.replay/1", "tp": 2, "str', "truncated"),
                                            ('{"schema": "other/9", "tp": 1}', "unknown schema")])
def test_empty_or_truncated_run(tmp_path, content, needle):
    b, _ = _pair()
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    _one_line_error(_cli(_write(tmp_path, "b.json", b), bad), "bad.json", needle)


@pytest.mark.parametrize("toml,needle", [
    ("[cpu_pct]\nmax = 60\n", "unknown criterion 'cpu_pct'"),
    ("[scheduler_cpu_pct]\nmaximum = 60\n", "unknown field scheduler_cpu_pct.maximum"),
    ("[scheduler_cpu_pct]\nmax = \"sixty\"\n", "must be a number"),
    ("[scheduler_cpu_pct]\nmax = -1\n", "must be >= 0"),
    ("[throughput_ratio]\nmin = 0\n", "must be > 0"),
    ("[ranks_agree]\nrequire = 1\n", "true or false"),
    ("[p99_latency_ms]\ndescription = \"x\"\n", "no `max` threshold"),
    ("scheduler_cpu_pct = 60\n", "must be a table"),
    ("[scheduler_cpu_pct\n", "invalid TOML"),
    ("", "no criteria"),
])
def test_bad_criteria(tmp_path, toml, needle):
    b, a = _pair()
    c = tmp_path / "crit.toml"
    c.write_text(toml)
    _one_line_error(_cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "--criteria", c),
                    "crit.toml", needle)


def test_criteria_parse_directly():
    crit = parse_criteria({"scheduler_cpu_pct": {"max": 50}, "ranks_agree": {"require": True}})
    assert [c.key for c in crit] == ["scheduler_cpu_pct", "ranks_agree"] and crit[0].value == 50.0
    with pytest.raises(ProfileError):
        parse_criteria({"scheduler_cpu_pct": {"max": True}})


def test_missing_criteria_file(tmp_path):
    b, a = _pair()
    _one_line_error(_cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "--criteria",
                         tmp_path / "nope.toml"), "nope.toml", "no such")


def test_unwritable_or_unknown_output(tmp_path):
    b, a = _pair()
    bp, ap = _write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a)
    _one_line_error(_cli(bp, ap, "-o", tmp_path / "no" / "dir" / "r.html"), "directory does not exist")
    _one_line_error(_cli(bp, ap, "-o", tmp_path / "r.pdf"), "r.pdf", "report.html")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):               # root can write anyway
            _one_line_error(_cli(bp, ap, "-o", ro / "r.md"), "not writable")
    finally:
        ro.chmod(0o700)


def test_unknown_or_ambiguous_strategy(tmp_path):
    p = _write(tmp_path, "video.json", video_run())
    b, _ = _pair()
    _one_line_error(_cli(p, p, "--after-strategy", "nope"), "'nope'", "it has:")
    two = replay_run([b.strategies["commit"], strategy("revert", [1.0, 1.1], b.strategies["commit"].ranks),
                      strategy("dict", [1.0, 1.1], b.strategies["commit"].ranks)], tp=2, mean_mb=18)
    two.strategies.pop("commit")
    q = _write(tmp_path, "two.json", two)
    _one_line_error(_cli(q, p), "2 ranks", "4", "--tp")  # tp 2 vs tp 4: refused before any strategy is picked
    _one_line_error(_cli(q, q), "before", "--before-strategy")


def test_same_strategy_of_one_run_is_refused(tmp_path):
    p = _write(tmp_path, "video.json", video_run())
    _one_line_error(_cli(p, p, "--before-strategy", "batch", "--after-strategy", "batch"), "same strategy")


# --- apply --verify, end to end on an unpacked SGLang release ------------------------------

@pytest.mark.slow
def test_verify_end_to_end_on_a_real_release(tmp_path):
    from conftest import make_trace
    from sglang_wheels import site_packages

    from mmdiag.workflows.verify import verify
    from mmdiag.sglang.detect import detect
    from mmdiag.sglang.locate import locate

    pkg = site_packages("0.5.5", tmp_path / "site")      # broadcast-always: the regression itself
    trace = make_trace(tmp_path / "t.jsonl", n=12, rows=16)
    out = tmp_path / "verify.md"
    res = verify(str(pkg), "batch", trace, 2, None, str(out), repeat=2, keep_runs=str(tmp_path))
    rep = res.report
    assert rep.before.strategy == "commit" and rep.after.strategy == "batch"
    assert res.applied.status == "applied" and detect(locate(str(pkg))).patched == "batch"
    crit = {c.key: c for c in rep.criteria}
    assert crit["ranks_agree"].status == "pass" and crit["gil_wait_pct"].status == "n/a"
    coll = {m.metric: m for m in rep.metrics}["collectives per request"]
    assert coll.before == pytest.approx(1.0, abs=0.35) and coll.after < coll.before
    md = out.read_text()
    assert md.startswith("## mmdiag acceptance report:") and "after mmdiag apply batch" in md
    assert (tmp_path / "before.json").exists() and (tmp_path / "after.json").exists()


@pytest.mark.slow
def test_apply_verify_prints_the_report_and_exits_1_when_acceptance_fails(tmp_path):
    from conftest import make_trace
    from sglang_wheels import site_packages

    pkg = site_packages("0.5.5", tmp_path / "site")
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=16)
    crit = tmp_path / "crit.toml"
    crit.write_text("[ranks_agree]\nrequire = true\n[cpu_per_request_ratio]\nmax = 0.001\n")   # cannot pass
    r = CliRunner().invoke(main, ["apply", "revert", "--verify", "--yes", "--sglang", str(pkg), "--trace", trace,
                                  "--tp", "2", "--criteria", str(crit), "-o", str(tmp_path / "v.html"), "--repeat", "1"])
    assert r.exit_code == 1 and "acceptance: FAIL" in r.stdout and "cpu_per_request_ratio" in r.stderr, r.output
    assert "<img" in (tmp_path / "v.html").read_text()


# --- apply --verify: refused before the first replay, and an undo that fails is told ------

def _no_replay(monkeypatch):
    import mmdiag.replay

    def replay(*a, **kw):
        raise AssertionError("verify replayed although it should have refused first")
    monkeypatch.setattr(mmdiag.replay, "replay", replay)


def test_verify_refuses_a_strategy_with_nothing_to_do_before_replaying(tmp_path, monkeypatch):
    from sglang_wheels import site_packages

    from mmdiag.workflows.verify import verify
    from mmdiag.errors import MmdiagError

    pkg = site_packages("0.5.6", tmp_path / "site")       # broadcast behind a flag, off by default
    _no_replay(monkeypatch)
    with pytest.raises(MmdiagError, match="nothing to change") as e:
        verify(str(pkg), "revert", str(tmp_path / "unused.jsonl"), 2)
    assert "revert" in str(e.value) and "nothing was replayed" in str(e.value)


def test_verify_refuses_an_install_already_patched(tmp_path, monkeypatch):
    from sglang_wheels import site_packages

    from mmdiag.workflows.verify import verify
    from mmdiag.errors import MmdiagError
    from mmdiag.sglang.apply import apply
    from mmdiag.sglang.locate import locate

    pkg = site_packages("0.5.5", tmp_path / "site")
    assert apply(locate(str(pkg)), "batch").status == "applied"
    _no_replay(monkeypatch)
    for strategy in ("batch", "revert"):                   # the same one too: before would be patched code
        with pytest.raises(MmdiagError, match="already applied") as e:
            verify(str(pkg), strategy, str(tmp_path / "unused.jsonl"), 2)
        assert "--undo" in str(e.value)


def _failing_after_replay(monkeypatch):
    import mmdiag.replay
    from mmdiag.errors import ReplayError

    calls = []

    def replay(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            return video_run(tp=2)                         # the before replay
        raise ReplayError("rank 1 died")
    monkeypatch.setattr(mmdiag.replay, "replay", replay)


def test_verify_undoes_the_patch_when_the_after_replay_fails(tmp_path, monkeypatch):
    from sglang_wheels import site_packages

    from mmdiag.workflows.verify import verify
    from mmdiag.errors import ReplayError
    from mmdiag.sglang.detect import detect
    from mmdiag.sglang.locate import locate

    pkg = site_packages("0.5.5", tmp_path / "site")
    _failing_after_replay(monkeypatch)
    with pytest.raises(ReplayError, match="rank 1 died"):
        verify(str(pkg), "batch", str(tmp_path / "unused.jsonl"), 2)
    assert detect(locate(str(pkg))).patched is None


def test_verify_says_the_patch_is_still_applied_when_undo_fails(tmp_path, monkeypatch):
    from sglang_wheels import site_packages

    import mmdiag.sglang.apply
    from mmdiag.workflows.verify import verify
    from mmdiag.errors import MmdiagError
    from mmdiag.sglang.detect import detect
    from mmdiag.sglang.errors import ReadOnlyInstall
    from mmdiag.sglang.locate import locate

    pkg = site_packages("0.5.5", tmp_path / "site")
    _failing_after_replay(monkeypatch)

    def undo(*a, **kw):
        raise ReadOnlyInstall("folder is not writable", where=str(pkg))
    monkeypatch.setattr(mmdiag.sglang.apply, "undo", undo)
    with pytest.raises(MmdiagError) as e:
        verify(str(pkg), "batch", str(tmp_path / "unused.jsonl"), 2)
    msg = str(e.value)
    assert "rank 1 died" in msg and "not writable" in msg and "STILL APPLIED" in msg and "mmdiag apply --undo" in msg
    assert detect(locate(str(pkg))).patched == "batch"


# --- the default workload, replayed for real --------------------------------------------

@pytest.mark.slow
def test_default_workload_a_real_win_passes_and_a_real_regression_fails(tmp_path):
    """commit -> precompute on the default workload (small, tp 2) passes the default criteria;
    precompute -> commit fails them. CPU per rank and p99 of the closed loop are n/a, not fails."""
    from mmdiag.replay import ReplayOptions, replay
    from mmdiag.workloads import defaults, synth_to_file

    trace = str(tmp_path / "t.jsonl")
    synth_to_file(defaults()["workload"], 16, trace)
    run = _write(tmp_path, "run.json", replay(trace, ReplayOptions(tp=2, strategies=["commit", "precompute"],
                                                                   repeat=3)))
    win = _cli(run, run, "--before-strategy", "commit", "--after-strategy", "precompute", "--json")
    rep = json.loads(win.output)
    crit = {c["key"]: c["status"] for c in rep["criteria"]}
    assert win.exit_code == 0 and rep["verdict"] == "PASS", win.output
    assert crit["throughput_ratio"] == crit["cpu_per_request_ratio"] == "pass"
    assert crit["scheduler_cpu_pct"] == crit["p99_latency_ms"] == "n/a"
    loss = _cli(run, run, "--before-strategy", "precompute", "--after-strategy", "commit")
    assert loss.exit_code == 1 and "acceptance: FAIL" in loss.output and "throughput_ratio" in loss.stderr


def test_each_side_states_its_prefix_cache(tmp_path):
    """The report says, per configuration, whether repeated images keep sharing prefix-cache
    entries: a content hash kept (which one), or random hashes (replay --skip-hash)."""
    b, a = _pair()
    a.config.skip_hash = True
    md = render_markdown(build_report(b, a, load_criteria(), before_path="b.json", after_path="a.json"))
    assert "prefix cache: content hash kept (sha256)" in md and "prefix cache: random: repeated images miss" in md
    a.config.skip_hash, a.config.axes["hash"] = None, "xxh3"
    rep = build_report(b, a, load_criteria(), before_path="b.json", after_path="a.json")
    assert rep.to_dict()["after"]["prefix_cache"] == "content hash kept (xxh3)"
    a.config.axes.pop("hash", None)
    a.config.skip_hash = True
    d = json.loads(_cli(_write(tmp_path, "b.json", b), _write(tmp_path, "a.json", a), "--json").output)
    assert d["before"]["prefix_cache"] == "content hash kept (sha256)" and d["after"]["prefix_cache"].startswith("random")
    live = build_report(profile_run([{"recv": 50, "from_dict": 50}]), profile_run([{"recv": 50, "idle": 50}]),
                        load_criteria())
    assert live.before.prefix_cache is None and "prefix cache" not in render_markdown(live)  # live: not stated


def test_the_tokenizer_stage_shows_hashing_and_the_segment_write_apart():
    """What `apply xxh3` and `apply pool` change is each a phase of the tokenizer stage: the
    report shows each per multimodal request, before and after."""
    b, a = _pair()
    sb, sa = next(iter(b.strategies.values())), next(iter(a.strategies.values()))
    sb.tokenizer_ms = {"tokenizer_hash": 30.0 * sb.mm_requests, "tokenizer_shm": 12.0 * sb.mm_requests}
    sa.tokenizer_ms = {"tokenizer_hash": 2.0 * sa.mm_requests, "tokenizer_shm": 3.0 * sa.mm_requests}
    rows = {m.metric: m for m in build_report(b, a, load_criteria()).metrics}
    hashing, write = rows["tokenizer hashing per mm request"], rows["tokenizer shared-memory write per mm request"]
    assert (hashing.before, hashing.after) == pytest.approx((30.0, 2.0))
    assert (write.before, write.after) == pytest.approx((12.0, 3.0))
