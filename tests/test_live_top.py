"""`mmdiag top` on a real running replay, in a real pseudo-terminal (tmux, 80x24):
keys sent as a person types them, the screen read back as a person reads it."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from mmdiag.live.discover import discover
from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace
from mmdiag.vocab import PROFILE_SCHEMA
from conftest import stop_group

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")]


def _tmux(sock, *args, check=True):
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30, check=check)


def _screen(sock) -> list[str]:
    return _tmux(sock, "capture-pane", "-p", "-t", "top").stdout.rstrip("\n").split("\n")


def _wait_for(sock, pred, timeout=90.0) -> list[str]:
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        lines = _screen(sock)
        if pred("\n".join(lines)):
            return lines
        time.sleep(0.3)
    raise AssertionError("screen never showed what was expected:\n" + "\n".join(lines))


@pytest.fixture
def replay(tmp_path):
    trace = tmp_path / "t.jsonl"
    rng, t, reqs = random.Random(0), 0.0, []
    for i in range(1500):
        t += rng.expovariate(15.0)
        reqs.append(TraceRequest(f"r{i:06d}", t, 64, (MMItem("image", (500, 1176)),)))
    write_trace(str(trace), TraceHeader(arrival={"mode": "poisson", "request_rate": 15.0}), iter(reqs))
    p = subprocess.Popen([PY, "-m", "mmdiag", "replay", str(trace), "--tp", "2", "--strategy", "commit", "-q",
                          "--timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 90
    ranks = []
    while time.time() < deadline and len(ranks) < 2:
        try:
            ranks = discover(p.pid).ranks
        except Exception:
            time.sleep(0.2)
    assert len(ranks) == 2, "replay ranks did not start"
    yield p, [r.pid for r in ranks]
    stop_group(p)


def test_top_in_a_terminal(replay, tmp_path):
    launcher, rank_pids = replay
    sock, out = f"mmdiag-top-{os.getpid()}", tmp_path / "watch.json"
    cmd = (f"cd {REPO} && PYTHONPATH={os.environ.get('PYTHONPATH', REPO)} {PY} -m mmdiag top --pid {launcher.pid} "
           f"-o {out}; echo EXITED $?; sleep 120")
    _tmux(sock, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", cmd)
    try:
        lines = _wait_for(sock, lambda s: "rank [0]" in s and "+/-" in s and "recv" in s)
        text = "\n".join(lines)
        assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines), text
        assert f"PID {launcher.pid}" in lines[0] and "path commit" in lines[1] and "tp 2" in lines[1], text
        assert "GIL held" in text and "CPU" in text and "waiting" in text
        assert lines[-1].startswith("p pause") and "q quit" in lines[-1]
        recv = next(ln for ln in lines if ln.strip().startswith("recv"))
        assert "+/-" in recv  # a share with its interval

        _tmux(sock, "send-keys", "-t", "top", "1")
        text = "\n".join(_wait_for(sock, lambda s: "rank  0  [1]" in s))
        assert "mmdiag::scheduler_TP1" in text

        _tmux(sock, "send-keys", "-t", "top", "v")
        text = "\n".join(_wait_for(sock, lambda s: "every rank" in s))
        rows = [ln.split() for ln in text.split("\n") if ln.strip()[:1].isdigit()]
        assert [r[0] for r in rows] == ["0", "1"], text

        _tmux(sock, "send-keys", "-t", "top", "f")   # one phase on every rank: recv first
        text = "\n".join(_wait_for(sock, lambda s: "phase [recv]" in s))
        rows = [ln.split() for ln in text.split("\n") if ln.strip()[:1].isdigit()]
        assert [r[0] for r in rows] == ["0", "1"] and all(r[2].startswith("+/-") for r in rows), text
        _tmux(sock, "send-keys", "-t", "top", "f")   # the next phase
        _wait_for(sock, lambda s: "phase recv [" in s)

        _tmux(sock, "send-keys", "-t", "top", "p")
        frozen = _wait_for(sock, lambda s: "[paused " in s)
        time.sleep(2.5)
        assert _screen(sock) == frozen  # paused: the figures stay put

        _tmux(sock, "send-keys", "-t", "top", "q")
        _wait_for(sock, lambda s: "EXITED 0" in s, timeout=60)
    finally:
        _tmux(sock, "kill-server", check=False)
    assert launcher.poll() is None, "quitting top disturbed the replay"
    for pid in rank_pids:
        assert psutil.pid_exists(pid)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
            and os.path.basename(p.info["cmdline"][0]) == "py-spy" and any(str(r) in p.info["cmdline"] for r in rank_pids)]
    assert not left, "py-spy left attached"
    run = json.loads(out.read_text())
    (ranks,) = [s["ranks"] for s in run["strategies"].values()]
    assert run["schema"] == PROFILE_SCHEMA and [r["rank"] for r in ranks] == [0, 1]
    assert run["live"]["source"] == "top" and run["live"]["duration_s"] > 3
    assert "tp 2" in run["live"]["config"]["summary"]
    assert all(r["profile"]["samples"] > 100 and r["profile"]["phases_ci"] for r in ranks)


def test_the_window_never_covers_more_than_it_says():
    """Issue 20 (also seen): top's header said "window 11 s of 10 s": blocks of 1 s were kept
    until their end left the window, so the figures spanned a block more than the window."""
    from collections import deque

    from mmdiag.live.sampler import Block
    from mmdiag.live.top import slide

    win, window_s = deque(), 10.0
    for k in range(30):                     # 1 s blocks, each read 0.05 s after it ended
        t0 = 100.0 + 1.05 * k
        slide(win, [Block(k, t0, t0 + 1.0, {}, None)], t0 + 1.05, window_s)
        span = win[-1].t1 - win[0].t0
        assert span <= window_s and (k < 10 or span > window_s - 1.1), (k, span)
    slide(win, [], 1e6, window_s)           # long after: the latest block stays to show
    assert len(win) == 1
