"""`mmdiag profile`: real py-spy attached to real processes (a running tp-2 replay,
stand-in rank processes), no mocks. Runs in about a minute on 2 cores."""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from mmdiag.analysis.findings import findings
from mmdiag.render.text import render_run
from mmdiag.live import from_raw, profile
from mmdiag.run import Run
from mmdiag.live.discover import discover, parse_title
from mmdiag.live.truth import compare, snapshot, window_shares
from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace
from mmdiag.vocab import CONTRACT_PHASES, PROFILE_SCHEMA
from conftest import stop_group

PY = sys.executable
PYSPY = os.path.join(os.path.dirname(PY), "py-spy")
LOOSE_POINTS = 25.0
pytestmark = pytest.mark.slow


def _cli(*args, env=None, timeout=120):
    return subprocess.run([PY, "-m", "mmdiag.live", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def _pyspy_left(target_pids) -> list[int]:
    """py-spy processes still attached to any of target_pids."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and os.path.basename(cmd[0]) == "py-spy" and any(str(t) in cmd for t in target_pids):
            left.append(p.info["pid"])
    return left


def _one_line_error(res, code=None):
    assert res.returncode != 0, res.stdout + res.stderr
    if code is not None:
        assert res.returncode == code, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in lines if ln.startswith("mmdiag: error: ")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def _fake_rank(title: str, seconds: float, gate: str | None = None) -> subprocess.Popen:
    """A Python process titled like a scheduler rank that spins for `seconds` (counted
    from when the file `gate` appears, if given), then exits."""
    code = ("import os, setproctitle, time, sys; setproctitle.setproctitle(sys.argv[1])\n"
            "gate = sys.argv[3] if len(sys.argv) > 3 else None\n"
            "def run_forward_step():\n    x, t = 0, None\n"
            "    while t is None or time.time() - t < float(sys.argv[2]):\n"
            "        x += 1\n"
            "        if t is None and (gate is None or os.path.exists(gate)): t = time.time()\n"
            "run_forward_step()\n")
    p = subprocess.Popen([PY, "-c", code, title, str(seconds)] + ([gate] if gate else []))
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if title in " ".join(psutil.Process(p.pid).cmdline()):
                return p
        except psutil.Error:
            pass
        time.sleep(0.05)
    raise AssertionError("fake rank did not set its title")


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """A tp-2 commit replay kept busy for ~90 s (Poisson 20 req/s, 4.7 MB images)."""
    d = tmp_path_factory.mktemp("live")
    trace = d / "t.jsonl"
    rng, t, reqs = random.Random(0), 0.0, []
    for i in range(1800):
        t += rng.expovariate(20.0)
        reqs.append(TraceRequest(f"r{i:06d}", t, 128, (MMItem("image", (1000, 1176)),)))
    write_trace(str(trace), TraceHeader(arrival={"mode": "poisson", "request_rate": 20.0}), iter(reqs))
    stats = d / "stats"
    stats.mkdir()
    env = dict(os.environ, MMDIAG_STATS_DIR=str(stats))
    launcher = subprocess.Popen([PY, "-m", "mmdiag", "replay", str(trace), "--tp", "2", "--strategy", "commit",
                                 "-q", "--timeout", "30"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    ranks = []
    while time.time() < deadline:
        ranks = [c for c in psutil.Process(launcher.pid).children() if "scheduler_TP" in " ".join(c.cmdline())]
        if len(ranks) == 2 and all(os.path.exists(stats / f"rank{r}.json") for r in range(2)):
            break
        time.sleep(0.2)
    else:
        launcher.kill()
        pytest.fail("replay ranks did not start")
    time.sleep(1.0)
    yield {"launcher": launcher.pid, "ranks": sorted(r.pid for r in ranks), "stats": str(stats), "dir": d}
    stop_group(launcher, timeout=15)


# --- discovery ------------------------------------------------------------------------

def test_parse_title():
    assert parse_title("sglang::scheduler") == {}
    assert parse_title("sglang::scheduler_TP3") == {"TP": 3}
    assert parse_title("sglang::scheduler_DP0_TP1") == {"DP": 0, "TP": 1}
    assert parse_title("mmdiag::scheduler_TP2") == {"TP": 2}
    assert parse_title("sglang::detokenizer") is None
    assert parse_title("sglang::scheduler_foo") is None
    assert parse_title("python -m sglang.launch_server") is None


def test_discovery_by_title(replay):
    d = discover(replay["launcher"])
    assert d.how == "parent"
    assert [(r.rank, r.pid, r.title) for r in d.ranks] == [
        (0, replay["ranks"][0], "mmdiag::scheduler_TP0"), (1, replay["ranks"][1], "mmdiag::scheduler_TP1")]
    one = discover(replay["ranks"][1])
    assert one.how == "scheduler" and [(r.rank, r.pid) for r in one.ranks] == [(1, replay["ranks"][1])]


# --- a live profile of the replay ---------------------------------------------------------

@pytest.fixture(scope="module")
def live(replay):
    snaps = {}
    raw = replay["dir"] / "raw"
    # 8 s: blocks of 1.6 s, 4-5 of them per rank even when py-spy's re-attach is slow on 2 loaded cores.
    run = profile(replay["launcher"], duration=8, rate=100, raw_dir=str(raw),
                  on_window=lambda w: snaps.__setitem__(w, snapshot(replay["stats"])))
    assert not _pyspy_left(replay["ranks"])
    return run, window_shares(snaps["start"], snaps["end"]), raw


def test_attribution_matches_replay_timers(live):
    run, truth, _ = live
    assert run.live.strategy_detected == "commit"
    assert set(truth) == {0, 1}
    rows = compare({r.rank: r.profile.phases_pct for r in run.ranks}, truth, min_pct=5.0)
    assert rows, "no phase above 5%"
    bad = [r for r in rows if r["diff"] > LOOSE_POINTS]
    assert not bad, bad
    # The broadcast the strategy adds is told apart from the receive broadcast.
    r1 = next(r for r in run.ranks if r.rank == 1)
    assert r1.profile.phases_pct["broadcast"] > 0 and r1.profile.phases_pct["recv"] > 0
    assert r1.profile.phases_pct["from_dict"] < 1.0  # commit: only the entry rank materializes


def test_run_contract(live):
    run, _, _ = live
    d = json.loads(json.dumps(run.to_dict()))
    assert d["schema"] == PROFILE_SCHEMA and "ranks" not in d and "findings" not in d   # ranks once, findings computed
    assert list(d["strategies"]) == ["commit"]
    assert [r["rank"] for r in d["strategies"]["commit"]["ranks"]] == [0, 1]
    for r in d["strategies"]["commit"]["ranks"]:
        assert set(CONTRACT_PHASES) <= set(r["phases_ms"]) and r["cpu_s"] > 0
        p = r["profile"]
        for k in ("pid", "title", "samples", "phases_pct", "gil_held_pct", "gil_wait_pct", "cpu_pct"):
            assert p[k] is not None, k
        assert set(CONTRACT_PHASES) | {"other", "idle"} <= set(p["phases_pct"])
        assert abs(sum(p["phases_pct"].values()) - 100.0) < 0.5
        assert p["samples"] > 0.5 * 100 * d["live"]["duration_s"]  # 100 Hz, less the re-attach gaps
        # The re-attach gaps (one fewer than the blocks) are said apart: unsampled, and a small part of the window.
        span, gaps = d["live"]["span_s"][str(r["rank"])], d["live"]["reattach_gaps_s"][str(r["rank"])]
        assert d["live"]["blocks"][str(r["rank"])] >= 2 and 0 < gaps < 0.5 * span
        assert p["samples"] <= 100 * (span - gaps) * 1.05 + 5
        assert 0 <= p["gil_held_pct"] <= 100 and p["cpu_pct"] > 0
        # One meaning of a share from both collectors: wall time per phase over the window.
        assert abs(r["phases_ms"]["recv"] / (10.0 * r["wall_s"]) - p["phases_pct"]["recv"]) < 0.5
    assert any("broadcast_object_list" in f for f in findings(Run.from_dict(d)))
    # The load's block-to-block variation is printed apart from the sampling interval.
    spread = max(r["profile"]["phases_spread"]["idle"] for r in d["strategies"]["commit"]["ranks"])
    assert f"idle +/-{spread:.1f} (rank " in render_run(Run.from_dict(d)).split("load variation")[1]


def test_profile_table_shows_every_phase_a_rank_spent_time_in():
    """A shared-memory release (0.5.10+) waits in shm_sync: a fixed column list hid it, and
    the row added up to 60%. Columns no rank spent time in are left out."""
    from runs_synth import profile_run
    text = render_run(profile_run([{"recv": 20, "shm_sync": 40, "forward": 10, "idle": 30}] * 2))
    labels = [ln.split()[0] for ln in text.split("\n\n")[2].splitlines() if ln.strip()]
    assert "shm_sync" in labels and "recv" in labels and "pickle" not in labels, labels
    # and the findings name it (a Run without intervals prints shares without a +/-, never +/-0.0)
    assert "shm_sync (waiting at the barrier" in text and "rank 1 40.0%" in text and "+/-0.0" not in text, text


def test_from_raw_same_numbers(live, tmp_path):
    run, _, raw = live
    files = sorted(str(p) for p in raw.iterdir())
    again = from_raw(files)
    for a, b in zip(run.ranks, again.ranks):
        assert (a.rank, a.profile.samples, a.profile.phases_pct, a.profile.gil_held_pct) == \
            (b.rank, b.profile.samples, b.profile.phases_pct, b.profile.gil_held_pct)
    out = tmp_path / "raw.json"
    res = _cli("--from-raw", *files, "-o", out)
    assert res.returncode == 0, res.stderr
    d = json.loads(out.read_text())
    assert d["schema"] == PROFILE_SCHEMA and len(d["strategies"]["commit"]["ranks"]) == 2


def test_from_raw_of_pyspy_record(replay, tmp_path):
    """A file recorded by py-spy itself, as on a host without mmdiag."""
    f = tmp_path / "rank1.raw"
    subprocess.run([PYSPY, "record", "-p", str(replay["ranks"][1]), "-d", "2", "-r", "100", "-f", "raw",
                    "--threads", "--idle", "--nonblocking", "-o", str(f)], check=True, capture_output=True)
    run = from_raw([str(f)])
    (r,) = run.ranks
    assert r.rank == 1 and r.profile.samples > 100 and r.profile.gil_held_pct is None
    assert r.profile.phases_pct["recv"] + r.profile.phases_pct["broadcast"] > 50


def test_cli_json_speedscope_and_nothing_left(replay, tmp_path):
    out, ss = tmp_path / "p.json", tmp_path / "p.speedscope.json"
    res = _cli("--pid", replay["launcher"], "--duration", 3, "--rate", 50, "-o", out, "--speedscope", ss)
    assert res.returncode == 0, res.stderr
    assert "findings:" in res.stdout and "mmdiag::scheduler_TP1" in res.stderr
    # The configuration measured, from the target's command line: TP size, the replay's strategy.
    assert "configuration: tp 2 | replay --impl mmdiag --strategy commit" in res.stdout, res.stdout
    d = json.loads(out.read_text())
    assert d["schema"] == PROFILE_SCHEMA and [r.rank for r in Run.from_dict(d).ranks] == [0, 1]
    s = json.loads(ss.read_text())
    assert s["profiles"] and s["shared"]["frames"]
    assert not _pyspy_left(replay["ranks"])


def test_ctrl_c_keeps_what_was_sampled(replay, tmp_path):
    """Issue 20.5: Ctrl-C while `mmdiag profile` samples does what README and --help say (py-spy
    record's convention): py-spy stopped, what was sampled shown and written, said so, exit 0."""
    out, tmpdir = tmp_path / "p.json", tmp_path / "tmp"
    tmpdir.mkdir()
    p = subprocess.Popen([PY, "-m", "mmdiag", "profile", "--pid", str(replay["ranks"][0]), "--duration", "60",
                          "--rate", "100", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, TMPDIR=str(tmpdir)))
    deadline = time.time() + 60
    while time.time() < deadline and not _sampling(tmpdir):
        time.sleep(0.1)
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "interrupted: ended the window early, keeping what was sampled" in stderr
    assert "interrupted after" in stdout and f"Run written to {out}" in stdout
    d = json.loads(out.read_text())
    run = Run.from_dict(d)
    assert run.ranks[0].profile.samples > 50 and run.live.interrupted is True
    assert not _pyspy_left(replay["ranks"])
    # and the documentation says so
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    assert "Ctrl-C while `profile` or `top` samples ends the window as `py-spy record` does" in readme
    assert "the exit code is 0" in readme
    helptext = " ".join(_cli("--help").stdout.split())
    assert "Ctrl-C ends the window early, as py-spy record does: what was sampled is shown and written, " \
           "with a note, exit 0" in helptext


def test_the_window_never_ends_waiting_for_an_import(replay, tmp_path):
    """Issue 20.5: the intervals' scipy.stats (up to 15 s to import on a loaded host) is loaded
    before the window opens, so a Ctrl-C's end waits for no import."""
    code = ("import sys, importlib\n"
            "P = importlib.import_module('mmdiag.live.profile')\n"
            "seen = {}\n"
            "P.profile(int(sys.argv[1]), duration=2, rate=50, on_window=lambda w: seen.setdefault(w, 'scipy.stats' in sys.modules))\n"
            "print(seen['start'])\n")
    r = subprocess.run([PY, "-c", code, str(replay["launcher"])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def _sampling(tmpdir) -> bool:
    """A py-spy recorder of the mmdiag run whose TMPDIR this is has begun sampling."""
    return any("Sampling process" in open(f, errors="replace").read()
               for f in glob.glob(os.path.join(tmpdir, "mmdiag-*", "*.log")))


def test_sigterm_and_ctrl_c_leave_no_folder_and_no_pyspy(replay, tmp_path):
    """`mmdiag profile` and `mmdiag top` stopped by SIGTERM (exit 143, one line) or top by
    Ctrl-C (exit 0) while py-spy samples: no mmdiag-profile-* / mmdiag-top-* folder and no
    py-spy process is left behind."""
    cases = [("profile", signal.SIGTERM, 143), ("top", signal.SIGTERM, 143), ("top", signal.SIGINT, 0)]
    procs = []
    for k, (cmd, sig, code) in enumerate(cases):
        tmpdir = tmp_path / f"tmp{k}"
        tmpdir.mkdir()
        args = [PY, "-m", "mmdiag", cmd, "--pid", str(replay["launcher"])] + (["--duration", "60"] if cmd == "profile" else [])
        procs.append((subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=dict(os.environ, TMPDIR=str(tmpdir))), str(tmpdir)))
    deadline = time.time() + 60
    while time.time() < deadline and not all(_sampling(d) for _, d in procs):
        time.sleep(0.1)
    assert all(_sampling(d) for _, d in procs), "py-spy never started sampling"
    time.sleep(1.5)
    for (p, _), (_, sig, _) in zip(procs, cases):
        p.send_signal(sig)
    for (p, d), (cmd, sig, code) in zip(procs, cases):
        _, err = p.communicate(timeout=30)
        assert p.returncode == code, f"{cmd} on {sig.name}: exit {p.returncode}\n{err}"
        assert "Traceback" not in err, err
        if code == 143:
            assert [ln for ln in err.splitlines() if ln.startswith("mmdiag: error:")] == \
                ["mmdiag: error: terminated by SIGTERM; py-spy was stopped and nothing was written"], err
        assert os.listdir(d) == [], f"{cmd} on {sig.name} left {os.listdir(d)}"
    assert not _pyspy_left(replay["ranks"])


# --- faults ---------------------------------------------------------------------------------

def test_pid_that_is_not_a_server(replay):
    """This test process is an ancestor of the replay, as init is of everything: it is
    not a server, a replay or a scheduler, so the profile names the replay's PID
    instead of sampling whatever ranks descend from it."""
    for pid in (os.getpid(), 1):
        if pid == 1 and not psutil.pid_exists(1):
            continue
        line = _one_line_error(_cli("--pid", pid, "--duration", 1))
        assert f"PID {pid} (" in line and "is not an SGLang server, an mmdiag replay or a scheduler" in line
        assert f"PID {replay['launcher']} (" in line, line  # the replay, named as what to pass
    assert not _pyspy_left(replay["ranks"])


def test_no_such_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    line = _one_line_error(_cli("--pid", p.pid, "--duration", 1))
    assert f"no process with PID {p.pid}" in line


def test_not_a_python_process():
    p = subprocess.Popen(["sleep", "60"])
    try:
        line = _one_line_error(_cli("--pid", p.pid, "--duration", 1))
        assert "not a Python process" in line and "sleep" in line
    finally:
        p.kill()
        p.wait()


def test_no_scheduler_ranks_lists_what_was_found():
    p = subprocess.Popen([PY, "-c", "import subprocess, time; c = subprocess.Popen(['sleep', '60']); time.sleep(60)"])
    try:
        time.sleep(0.5)
        line = _one_line_error(_cli("--pid", p.pid, "--duration", 1))
        assert "no scheduler ranks found" in line
        assert f"{p.pid} " in line and "sleep 60" in line  # what was found instead
    finally:
        for c in psutil.Process(p.pid).children():
            c.kill()
        p.kill()
        p.wait()


def test_pyspy_missing(replay):
    line = _one_line_error(_cli("--pid", replay["launcher"], "--duration", 1,
                                env={"MMDIAG_PYSPY": "/nonexistent/py-spy"}), code=6)
    assert "py-spy not found at /nonexistent/py-spy" in line


def test_unparseable_raw(tmp_path):
    f = tmp_path / "rank0.raw"
    f.write_text("thread (1): MainThread;main (x.py:1) 3\nthis is not py-spy output\n")
    line = _one_line_error(_cli("--from-raw", f))
    assert "line 2" in line and str(f) in line
    g = tmp_path / "nothreads.raw"
    g.write_text("<module> (x.py:1);main (x.py:2) 5\n")
    assert "--threads" in _one_line_error(_cli("--from-raw", g))


def test_target_exits_mid_profile(tmp_path):
    gate = tmp_path / "go"
    fake = _fake_rank("mmdiag::scheduler_TP0", 2.5, gate=str(gate))
    out = tmp_path / "p.json"
    p = subprocess.Popen([PY, "-m", "mmdiag.live", "--pid", str(fake.pid), "--duration", "60", "--rate", "100",
                          "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not _pyspy_left([fake.pid]):
        time.sleep(0.1)
    gate.touch()  # the window is open: the rank now runs 2.5 s more and exits
    stdout, stderr = p.communicate(timeout=120)
    fake.wait()
    res = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    line = _one_line_error(res, code=4)
    assert "exited during the profile" in line
    d = json.loads(out.read_text())
    r = Run.from_dict(d).ranks[0].profile
    assert r.samples > 50 and r.phases_pct["forward"] > 80  # what was sampled is kept
    assert "rank 0" in res.stdout and not _pyspy_left([fake.pid])


def test_missing_gil_recording_and_start_skew(monkeypatch):
    """Real py-spy on a stand-in rank whose --gil recording never reaches its file:
    GIL figures are not measured (None, with a note), not 0%; the recorders' start
    times are kept in config.live."""
    import dataclasses

    import mmdiag.live.sampler as P

    real = P.start_recorder

    def gil_elsewhere(spy, pid, out, rate, max_s, gil, log_dir=None, **kw):
        if not gil:
            return real(spy, pid, out, rate, max_s, gil, log_dir, **kw)
        rec = real(spy, pid, out + ".elsewhere", rate, max_s, gil, log_dir, **kw)
        return dataclasses.replace(rec, out=out)  # where profile() looks: never written

    run, fake = _profile_fake(monkeypatch, gil_elsewhere)
    (r,) = run.ranks
    assert r.profile.samples > 50 and r.profile.gil_held_pct is None and r.profile.gil_wait_pct is None
    assert any("no GIL recording for rank(s) 0" in f for f in findings(run)), findings(run)
    assert run.live.gil_missing == [0]
    skew = run.live.recorder_start_skew
    assert [x["rank"] for x in skew["recorders"]] == [0]
    assert all(x["sampling_s"] is not None and x["sampling_s"] >= x["spawned_s"] >= 0 for x in skew["recorders"])
    assert skew["max_s"] is not None and skew["max_s"] >= 0
    assert not _pyspy_left([fake.pid])


def _profile_fake(monkeypatch, start_recorder):
    """A 2 s profile of a stand-in rank with the sampler's start_recorder replaced."""
    import mmdiag.live.sampler as P
    monkeypatch.setattr(P, "start_recorder", start_recorder)
    fake = _fake_rank_found(20)
    try:
        return profile(fake.pid, duration=2, rate=50), fake
    finally:
        fake.kill()
        fake.wait()


def _fake_rank_found(seconds: float) -> subprocess.Popen:
    fake = _fake_rank("mmdiag::scheduler_TP0", seconds)
    deadline = time.time() + 10
    while time.time() < deadline:  # the title is in argv before setproctitle has run
        try:
            discover(fake.pid)
            break
        except Exception:
            time.sleep(0.05)
    return fake


def test_silent_pyspy_exit_is_started_again(monkeypatch):
    """On a loaded host py-spy can exit while attaching without a word: the recording is
    started again (the first attach included) and the profile has its GIL figures."""
    import mmdiag.live.sampler as P

    real, calls = P.start_recorder, []

    def first_dies(spy, pid, out, rate, max_s, gil, log_dir=None, **kw):
        rec = real(spy, pid, out, rate, max_s, gil, log_dir, **kw)
        calls.append(gil)
        if len(calls) == 2:  # the first --gil recorder: gone before it samples, no output
            rec.proc.kill()
            rec.proc.wait()
        return rec

    run, fake = _profile_fake(monkeypatch, first_dies)
    (r,) = run.ranks
    assert len(calls) >= 4 and r.profile.samples > 50
    assert r.profile.gil_held_pct is not None and run.live.gil_missing == []
    assert not _pyspy_left([fake.pid]) and not P.REGISTRY


def test_window_end_during_attach_keeps_blocks_whole():
    """A window that ends while a pair of recorders attaches (the chain starts the next
    block as one ends; slow on a loaded host) used to keep the main file of a pair whose
    --gil recorder the stop killed unwritten, and the rank lost its GIL figures. A block is
    both files or none."""
    from mmdiag.live.pyspy import find_pyspy
    from mmdiag.live.sampler import REGISTRY, Sampler

    fake = _fake_rank_found(30)
    try:
        (rank,) = discover(fake.pid).ranks
        for k in range(6):  # stop 0..0.3 s after the pair was spawned: across its attach
            d = tempfile.mkdtemp()
            s = Sampler(find_pyspy(), [rank], 100, 1.0, d, d)
            s.chains[0].start()
            time.sleep(0.06 * k)
            s.poll()
            s.stop()
            (ch,) = s.chains
            assert all(b.gil_threads is not None for b in ch.blocks if b.gil_planned)
            shutil.rmtree(d)
    finally:
        fake.kill()
        fake.wait()
    assert not REGISTRY and not _pyspy_left([fake.pid])


def test_ptrace_refused_says_why():
    """mmdiag as an unprivileged user against a root-owned rank: the kernel refuses ptrace."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("needs root (to drop to another user with setpriv)")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-c", "import mmdiag.live"],
                           capture_output=True, text=True, timeout=60, cwd="/", env=dict(os.environ, HOME="/tmp"))
    if probe.returncode != 0:
        pytest.skip("user nobody cannot run this checkout's Python (a parent folder is not world-readable)")
    fake = _fake_rank("mmdiag::scheduler_TP0", 30)
    try:
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "mmdiag.live",
                              "--pid", str(fake.pid), "--duration", "1"], capture_output=True, text=True, timeout=60,
                             cwd="/", env=dict(os.environ, HOME="/tmp"))
        line = _one_line_error(res, code=5)
        assert "ptrace refused" in line and "uid 0" in line and "uid 65534" in line
    finally:
        fake.kill()
        fake.wait()
    assert not _pyspy_left([fake.pid])


SERVER = """
import subprocess, sys, time
code = ("import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1])\\n"
        "def run_forward_step():\\n    t = time.time()\\n    while time.time() - t < 60: pass\\n"
        "run_forward_step()\\n")
kids = [subprocess.Popen([sys.executable, "-c", code, f"sglang::scheduler_TP{r}"]) for r in range(2)]
time.sleep(60)
"""


def test_profile_of_a_server_names_its_configuration(tmp_path):
    """A process with an SGLang server's command line and environment, its ranks titled
    as SGLang titles them: the profile's head is what `doctor --pid` reads of it."""
    server = subprocess.Popen([PY, "-c", SERVER, "-m", "sglang.launch_server", "--tp-size", "2",
                               "--enable-broadcast-mm-inputs-process"],
                              env=dict(os.environ, SGLANG_MM_PRECOMPUTE_HASH="1"))
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if len(discover(server.pid).ranks) == 2:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        res = _cli("--pid", server.pid, "--duration", 2)
    finally:
        for c in psutil.Process(server.pid).children():
            c.kill()
        server.kill()
        server.wait()
    assert res.returncode == 0, res.stderr
    head = [ln for ln in res.stdout.splitlines() if ln.startswith("configuration: ")]
    assert head and f"server pid {server.pid}" in head[0], res.stdout
    text = "\n".join(head)
    assert "TP 2" in text and "broadcast flag on (command line)" in text and "SGLANG_MM_PRECOMPUTE_HASH" in text
