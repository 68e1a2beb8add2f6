"""Real multi-process replays: separate rank processes in a gloo group."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from mmdiag.replay import ReplayOptions, replay
from mmdiag.run import Run
from mmdiag.vocab import CONTRACT_PHASES, REPLAY_RANK_TITLE, REPLAY_SCHEMA, STRATEGIES
from conftest import ROOT, make_trace, mmdiag_cli


def _check_contract(d, tp, names):
    assert d["schema"] == REPLAY_SCHEMA and d["tp"] == tp
    assert list(d["strategies"]) == list(names)
    for name, s in d["strategies"].items():
        assert s["throughput_rps"] > 0
        assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
        assert [r["rank"] for r in s["ranks"]] == list(range(tp))
        for r in s["ranks"]:
            assert r["cpu_s"] > 0 and r["replay"]["iterations"] > 0 and "profile" not in r
            assert set(CONTRACT_PHASES) <= set(r["phases_ms"])
        assert s["ranks_agree"] is True, name


def test_every_strategy_at_tp2_cli_json_and_timeline(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=24, rows=64)
    out, tl = tmp_path / "run.json", tmp_path / "timeline.json"
    r = mmdiag_cli("replay", trace, "--tp", "2", "-o", str(out), "--timeline", str(tl), "-q")
    assert r.returncode == 0, r.stderr
    for name in STRATEGIES:
        assert name in r.stdout
    assert f"next: mmdiag recommend {out}" in r.stdout   # the table says what to do with the Run
    d = json.loads(out.read_text())
    _check_contract(d, 2, STRATEGIES)
    s = d["strategies"]
    mm = d["trace"]["mm_requests"]
    # What each strategy adds, counted on the entry rank: the vocabulary's promises.
    assert s["revert"]["ranks"][0]["replay"]["collectives"] == 0 and s["precompute"]["ranks"][0]["replay"]["collectives"] == 0
    assert s["commit"]["ranks"][0]["replay"]["collectives"] == mm
    assert s["dict"]["ranks"][0]["replay"]["collectives"] == mm
    assert s["async"]["ranks"][0]["replay"]["collectives"] == mm
    assert 1 <= s["batch"]["ranks"][0]["replay"]["collectives"] < mm
    # Non-entry ranks of commit never hash; every rank of revert does.
    assert s["commit"]["ranks"][1]["phases_ms"]["from_dict"] == 0
    assert s["revert"]["ranks"][1]["phases_ms"]["from_dict"] > 0
    assert s["commit"]["ranks"][1]["phases_ms"]["unpickle"] > 0
    # precompute shows its hashing on the tokenizer side, not hidden.
    assert s["precompute"]["tokenizer_ms"]["tokenizer_hash"] > 0
    assert s["commit"]["bytes_per_request"] > s["revert"]["bytes_per_request"]
    events = json.loads(tl.read_text())["traceEvents"]
    pids = {e["pid"] for e in events if e.get("ph") == "X"}
    names = {e["name"].split(" ")[0] for e in events if e.get("ph") == "X"}
    assert len(pids) == 2 and {"recv", "from_dict", "broadcast_object_list", "forward"} <= names
    assert Run.load(str(out)).strategies["batch"].ranks[1].rank == 1


def test_every_strategy_at_tp4(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=16, rows=32, concurrency=4)
    run = replay(trace, ReplayOptions(tp=4, strategies=list(STRATEGIES), timeout=120))
    _check_contract(run.to_dict(), 4, STRATEGIES)


def _ranks_of(launcher: psutil.Process, tp: int, deadline_s: float = 90.0):
    end = time.time() + deadline_s
    while time.time() < end:
        kids = [p for p in launcher.children(recursive=True)
                if REPLAY_RANK_TITLE in " ".join(_safe_cmdline(p))]
        if len(kids) == tp:
            return kids
        time.sleep(0.2)
    raise AssertionError("ranks did not come up")


def _safe_cmdline(p):
    try:
        return [p.name()] + p.cmdline()
    except psutil.Error:
        return []


def _start_long_replay(tmp_path, *extra, tp=2):
    trace = make_trace(tmp_path / "t.jsonl", n=2000, rows=16, rate=40.0, text_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "mmdiag", "replay", trace, "--tp", str(tp),
                             "--strategy", "commit", "--timeout", "20", "-q", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = _ranks_of(psutil.Process(proc.pid), tp)
    time.sleep(3)  # into the loop: past torch import and rendezvous
    return proc, ranks


def _assert_gone(ranks):
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"left behind: {alive}"


def test_dead_rank_stops_the_others_and_names_it(tmp_path):
    proc, ranks = _start_long_replay(tmp_path)
    victim = next(p for p in ranks if p.name().endswith("TP1") or "TP1" in " ".join(p.cmdline()))
    victim.kill()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert "rank 1" in err and "SIGKILL" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    _assert_gone(ranks)


def test_ctrl_c_leaves_no_process_behind(tmp_path):
    """Nothing left running or written; under --json the outcome is JSON on stdout too."""
    proc, ranks = _start_long_replay(tmp_path, "--json", "-o", str(tmp_path / "run.json"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert json.loads(out) == {"error": err.strip().removeprefix("mmdiag: "), "fix": None, "exit_code": 130}
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]
    _assert_gone(ranks)


def test_busy_port_is_a_one_line_error(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = mmdiag_cli("replay", trace, "--tp", "2", "--port", str(port), timeout=60)
    assert r.returncode == 3
    assert f"port {port} is already in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_trace_spanning_hours_is_announced_before_the_wait(tmp_path):
    """Arrivals 3 h apart: the replay says it will wait them out before it starts (here a busy
    port then stops it, so the test does not wait)."""
    from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace
    trace = str(tmp_path / "t.jsonl")
    write_trace(trace, TraceHeader(arrival={"mode": "recorded"}),
                iter([TraceRequest(f"r{i}", t, 8, (MMItem("image", (4, 1176)),)) for i, t in enumerate((0.0, 10800.0))]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = mmdiag_cli("replay", trace, "--tp", "2", "--port", str(s.getsockname()[1]), timeout=60)
    assert r.returncode == 3 and "arrivals span 180 min" in r.stderr and "--max-gap" in r.stderr, r.stderr


def test_torchrun_launch_over_loopback(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=12, rows=16)
    out = tmp_path / "run.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                        "--master-port", str(port), "--log-dir", str(tmp_path / "elastic"),  # else torch leaves /tmp/torchelastic_*
                        "-m", "mmdiag.replay.worker", trace, "--out", str(out),
                        "--strategy", "commit", "--strategy", "batch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    _check_contract(d, 2, ["commit", "batch"])
    assert d["config"]["launcher"] == "torchrun"


def test_cli_user_mistakes_are_one_line(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=2, rows=4)
    for args, code, text in [
        (("replay", trace, "--strategy", "nope"), 2, "unknown strategy 'nope'"),
        (("replay", trace, "--tp", "0"), 2, "'--tp': 0 is not in the range 1<=x"),
        (("replay", trace, "--max-concurrency", "0"), 2, "'--max-concurrency': 0 is not in the range 1<=x"),
        (("replay", trace, "--strategy", "all", "--strategy", "nope"), 2, "unknown strategy 'nope'"),
        (("replay", str(tmp_path)), 2, "is a directory"),
        (("replay", str(tmp_path / "missing.jsonl")), 2, "no such trace file"),
        (("trace", "synth", "--profile", "nope", "-o", str(tmp_path / "x.jsonl")), 2, "unknown workload profile"),
        (("replay", trace, "-o", str(tmp_path / "no" / "dir.json")), 2, "directory does not exist"),
        # refused before the replay, for root too (os.access says yes to root; /proc takes no file)
        (("replay", trace, "-o", "/proc/run.json"), 2, "directory is not writable"),
        (("recommend", trace), 2, "is a trace, not a Run; replay it first"),
    ]:
        as_json = args[0] != "trace"   # trace synth writes a file, it has no --json
        r = mmdiag_cli(*args, *(["--json"] if as_json else []), timeout=60)
        assert r.returncode == code, (args, r.stderr)
        if as_json:   # the same words on stdout, as JSON
            err = json.loads(r.stdout)
            assert r.stderr.strip() == f"mmdiag: error: {err['error']}" + (f"; {err['fix']}" if err["fix"] else "")
        assert text in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_demo_repeats_so_its_table_shows_the_noise(tmp_path):
    """Issue 20 (also seen): one repeat swung revert from 0.82x to 1.41x commit between demos;
    the demo now replays [demo] repeats (profiles/defaults.toml) and shows each one's spread."""
    from mmdiag.workloads import defaults

    want = defaults()["demo"]["repeat"]
    assert want >= 2
    out = tmp_path / "demo.json"
    r = mmdiag_cli("demo", "-n", "4", "--tp", "2", "--strategy", "commit", "--strategy", "revert", "-q",
                   "-o", str(out), cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    run = Run.load(str(out))
    assert {n: len(s.repeats_rps) for n, s in run.strategies.items()} == {"commit": want, "revert": want}
    import re
    for name in ("commit", "revert"):
        assert re.search(rf"^{name}\s+[\d.,]+ ±[\d.]+\s", r.stdout, re.M), r.stdout
