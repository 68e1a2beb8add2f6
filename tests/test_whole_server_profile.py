"""`mmdiag profile --pid MAIN` of a whole server: the tokenizer side sampled with the ranks,
the stage part, the stage verdict and recommend's reading of it, against a target that runs
SGLang 0.5.23's own code on both sides with its own timers (tests/whole_server_target.py).
The tight figures (default window, 3 points) are benchmarks/bench_stages.py's; the bound
here is loose, for a loaded test host."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mmdiag import render
from mmdiag.analysis.recommend import recommend
from mmdiag.live import profile
from mmdiag.live.discover import discover
from mmdiag.live.errors import LiveError
from mmdiag.live.truth import snapshot, snapshot_tokenizer, tokenizer_window_shares, truth_bottleneck, window_shares
from mmdiag.run import Run
from mmdiag.vocab import PROFILE_SCHEMA, STAGE_PHASES
from conftest import stop_group
from sglang_wheels import pristine

TARGET = os.path.join(os.path.dirname(__file__), "whole_server_target.py")
LOOSE_POINTS = 8.0
WINDOW_S = 10.0


def _ranks_found(pid: int) -> int:
    try:
        return len(discover(pid).ranks)
    except LiveError:
        return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pkg = pristine("0.5.23")
    stats = str(tmp_path_factory.mktemp("stats"))
    log = os.path.join(stats, "target.log")  # a file, not a pipe nobody reads: the target never blocks on it
    with open(log, "w") as err:
        # 1120x700 images (4000 rows, 18.8 MB): the processor's normalization and the segment write
        # make the tokenizer stage the clear bound, loaded host or idle (at 4.7 MB an idle 2-core
        # host put the two stages within each other's intervals)
        p = subprocess.Popen([sys.executable, TARGET, "--sglang", str(pkg), "--tp", "2", "--rate", "8",
                              "--rows", "4000", "--stats", stats], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (len(snapshot(stats)) == 2 and (snapshot_tokenizer(stats) or {}).get("requests")
                   and _ranks_found(p.pid) == 2):
            assert p.poll() is None, open(log).read()[-2000:]
            assert time.time() < deadline, "the target did not start serving: " + open(log).read()[-2000:]
            time.sleep(0.2)
        time.sleep(2.0)
        yield p, stats
    finally:
        stop_group(p)


@pytest.fixture(scope="module")
def measured(server):
    p, stats = server
    snaps = {}
    run = profile(p.pid, duration=WINDOW_S, on_window=lambda w: snaps.__setitem__(w, (snapshot(stats),
                                                                                      snapshot_tokenizer(stats))))
    (r0, t0), (r1, t1) = snaps["start"], snaps["end"]
    return run, window_shares(r0, r1), tokenizer_window_shares(t0, t1), t1["requests"] - t0["requests"]


def test_tokenizer_side_is_found_and_sampled(server, measured):
    p, _ = server
    run, *_ = measured
    roles = {st.role: st for st in run.stages}
    assert set(roles) == {"tokenizer", "scheduler"}
    tok = roles["tokenizer"]
    assert tok.pids == [p.pid]                                   # the main process runs the TokenizerManager
    names = [s.name for s in tok.servers]
    assert names[0] == "main thread" and any(n.startswith("hash pool") for n in names)  # 0.5.21+'s pool threads
    assert sorted(roles["scheduler"].pids) == sorted(r.profile.pid for r in run.ranks)
    assert run.live.strategy_detected == "precompute"   # the tokenizer's hashing, seen on its stacks


def test_stage_shares_match_the_targets_timers(measured):
    run, ranks, tok, _ = measured
    gaps = []
    for st in run.stages:
        for sv in st.servers:
            truth = tok[sv.name.split(" (")[0]] if st.role == "tokenizer" else ranks[int(sv.name.split()[-1])]
            for ph in STAGE_PHASES[st.role]:
                gaps.append((abs(sv.phases_pct.get(ph, 0.0) - truth.get(ph, 0.0)), st.role, sv.name, ph))
    worst = max(gaps)
    assert worst[0] <= LOOSE_POINTS, f"worst gap {worst}"


def test_verdict_names_the_stage_the_timers_say(measured):
    run, ranks, tok, sent = measured
    b = run.bottleneck
    assert b["stage"] == truth_bottleneck(tok, ranks) == "tokenizer"
    # Requests counted by the kernel (the tokenizer's shared-memory segments), as the target sent them.
    assert b["requests"] is not None and abs(b["requests"] - sent) <= 3 + 0.1 * sent
    t = next(s for s in run.stages if s.role == "tokenizer")
    assert t.capacity_rps and t.capacity_ci and t.service_ms
    assert abs(t.capacity_rps * t.service_ms / 1000.0 - 1.0) < 0.01  # one thread serves: capacity = 1 / service
    assert "the tokenizer stage caps at" in b["text"] and "req/s" in b["text"]


def test_stages_saved_and_shown(measured, tmp_path):
    run, *_ = measured
    path = str(tmp_path / "p.json")
    run.save(path)
    back = Run.load(path)
    assert [s.role for s in back.stages] == [s.role for s in run.stages]
    assert back.bottleneck == run.bottleneck and back.stages[0].servers[0].phases_ci
    for fmt in ("text", "markdown", "html"):
        out = render.render(back, fmt)
        assert run.bottleneck["text"].split(";")[0] in out.replace("&#x27;", "'")
        assert "tokenizer_shm" in out


def test_recommend_names_the_tokenizer_remedy_not_a_scheduler_patch(measured):
    run, *_ = measured
    rec = recommend([run])
    # the tokenizer-side remedy of its dominant phase (hashing: xxh3; the segment write: pool), never a strategy
    assert rec.recommended in ("none", "xxh3", "pool") and rec.remedy
    assert rec.reasons[0].startswith("the tokenizer stage bounds throughput")


def test_old_profile_without_stages_reads_and_writes_as_before():
    d = {"schema": PROFILE_SCHEMA, "tp": 1, "strategies": {"revert": {
        "name": "revert", "requests": 0, "duration_s": 1.0, "throughput_rps": None, "latency_ms": {},
        "ranks": [{"rank": 0, "phases_ms": {}}]}}}
    run = Run.from_dict(d)
    assert run.stages == [] and run.bottleneck is None
    out = run.to_dict()
    assert "stages" not in out and "bottleneck" not in out


def test_tokenizer_workers_are_the_tokenizer_side_when_present():
    """With --tokenizer-worker-num > 1, SGLang titles its workers sglang::tokenizer_worker:{pid}:
    they are the tokenizer side, not the main process; the detokenizer is not sampled."""
    child = ("import os, sys, time, setproctitle\n"
             "setproctitle.setproctitle(sys.argv[1].replace('{pid}', str(os.getpid()))); time.sleep(60)\n")
    code = ("import subprocess, sys, time\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', {child!r}, t]) for t in\n"
            "        ('sglang::scheduler_TP0', 'sglang::scheduler_TP1', 'sglang::tokenizer_worker:{pid}',\n"
            "         'sglang::detokenizer')]\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.time() + 90  # four interpreters starting on a loaded host
        while True:
            try:
                d = discover(p.pid)
                titles = " ".join(t for _, t in d.seen)  # every child has titled itself
                if len(d.ranks) == 2 and "detokenizer" in titles and "tokenizer_worker:" in titles:
                    break
            except Exception:
                pass
            assert time.time() < deadline, "the processes did not title themselves"
            time.sleep(0.2)
        assert [t.role for t in d.tokenizers] == ["tokenizer"]
        assert d.tokenizers[0].title.startswith("sglang::tokenizer_worker:") and d.tokenizers[0].pid != p.pid
        # how messages (an exit during the window) name each: never "rank -1"
        assert [r.label for r in d.processes] == ["rank 0", "rank 1", "tokenizer worker 1"]
        assert [r.pid for r in d.processes] == [r.pid for r in d.ranks] + [d.tokenizers[0].pid]
    finally:
        stop_group(p)


def test_top_watches_the_tokenizer_side_too(server):
    """`mmdiag top` samples the tokenizer side with the ranks and shows the stage verdict live."""
    from mmdiag.live.top import TopSession, snapshot as top_snapshot
    from mmdiag.render.top import ViewState, render as render_top
    p, _ = server
    sess = TopSession(p.pid, window_s=6.0)
    try:
        sess.start()
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            sess.poll()
            time.sleep(0.1)
        snap = top_snapshot(sess)
    finally:
        sess.close()
    assert [st.role for st in snap.stages] == ["tokenizer", "scheduler"]
    assert snap.bottleneck["stage"] == "tokenizer"
    screen = "\n".join(render_top(sess, ViewState(), snap))
    assert "tokenizer busy %: main thread" in screen and "bottleneck: tokenizer stage" in screen
    assert snap.path == "precompute"   # SGLANG_MM_PRECOMPUTE_HASH: the tokenizer hashes, seen on its stacks
