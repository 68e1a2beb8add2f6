"""Faults a user meets in a replay: too little memory, a frozen rank, SIGTERM."""
from __future__ import annotations

import ctypes
import glob
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mmdiag.mmpath import memory
from mmdiag.replay import heartbeat
from mmdiag.replay.launcher import _blame
from conftest import ROOT, make_trace, mmdiag_cli
from test_replay import _assert_gone, _ranks_of


def test_a_replay_that_cannot_fit_is_refused_before_any_rank_starts(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = mmdiag_cli("trace", "synth", "-n", "16", "-o", str(trace))
    assert r.returncode == 0, r.stderr
    if psutil.virtual_memory().available > 128 * memory.GiB:
        pytest.skip("this machine could hold a 64-rank replay of 16 requests")
    t0 = time.time()
    r = mmdiag_cli("replay", str(trace), "--tp", "64", "-q", timeout=60)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert " GB" in err and "available" in err and "lower --tp" in err
    assert time.time() - t0 < 30  # refused up front, not after 64 ranks came up


def test_a_rank_killed_while_memory_ran_low_names_the_oom_killer(tmp_path):
    logs = [str(tmp_path / f"rank{r}.log") for r in range(2)]
    for p in logs:
        open(p, "w").close()
    beats = str(tmp_path / "hb")
    heartbeat.create(beats, 2)
    err = _blame([None, None], [None, -signal.SIGKILL], logs, beats, low_memory=True)
    assert "rank 1 was killed by signal SIGKILL" in str(err) and "OOM killer" in str(err)
    assert "OOM" not in str(_blame([None, None], [None, -signal.SIGKILL], logs, beats, low_memory=False))


def test_freed_heap_is_given_back_when_rss_passes_the_ceiling():
    # Large buffers served from the heap, as once glibc's dynamic mmap threshold has risen
    # in a rank (M_MMAP_THRESHOLD = -3).
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 32 * memory.MiB) == 1
    keep, blocks = [], []
    for _ in range(64):  # 16 MiB buffers with small survivors between them: a fragmented heap
        blocks.append(bytearray(16 * memory.MiB))
        keep.append(bytearray(4096))
    ceiling = memory._rss_bytes() - 512 * memory.MiB
    del blocks
    trim = memory.HeapTrimmer(ceiling)
    kept = memory._rss_bytes() > ceiling  # glibc kept the freed pages (or gave them back itself)
    trim()
    assert trim.trims == int(kept) and memory._rss_bytes() < ceiling
    trim()
    assert trim.trims == int(kept)  # under the ceiling: nothing to do


def _long_replay(tmp_path, *extra, env=None):
    trace = make_trace(tmp_path / "t.jsonl", n=2000, rows=16, rate=40.0, text_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "mmdiag", "replay", trace, "--tp", "2",
                             "--strategy", "commit", "-q", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    ranks = _ranks_of(psutil.Process(proc.pid), 2)
    time.sleep(3)  # into the loop: past torch import and rendezvous
    return proc, ranks


@pytest.mark.slow
def test_the_frozen_rank_is_blamed_not_the_one_whose_timeout_fired(tmp_path):
    proc, ranks = _long_replay(tmp_path, "--timeout", "10")
    victim = next(p for p in ranks if "TP1" in " ".join(p.cmdline()))
    victim.suspend()  # SIGSTOP
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if victim.is_running():
            victim.resume()
    assert proc.returncode == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "rank 1 stopped making progress" in err and "rank 0 gave up waiting" in err
    _assert_gone(ranks)


@pytest.mark.slow
def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc, ranks = _long_replay(tmp_path, "--timeout", "20", env={"TMPDIR": str(tmpdir)})
    assert glob.glob(str(tmpdir / "mmdiag-replay-*"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err and "Traceback" not in err
    _assert_gone(ranks)
    assert not glob.glob(str(tmpdir / "mmdiag-replay-*"))


@pytest.mark.slow
def test_what_a_sigkilled_launcher_left_is_swept_before_the_next_replay(tmp_path, monkeypatch):
    """SIGKILL of the launcher: its ranks die with it (PDEATHSIG), so nobody removes its job folder
    or its shared-memory segments; the next replay's sweep does at once (the owner named in the
    segment prefix is gone: no waiting for its ranks' last beats to age), and leaves a live
    launcher's."""
    import json
    import tempfile

    from mmdiag.mmpath.shm import SHM_DIR_ENV
    from mmdiag.mmpath.shm import owner_prefix as shm_owner_prefix
    from mmdiag.replay import launcher

    tmpdir, shmdir = tmp_path / "tmp", tmp_path / "shm"
    tmpdir.mkdir()
    shmdir.mkdir()
    proc, ranks = _long_replay(tmp_path, "--transport", "shm", env={"TMPDIR": str(tmpdir), SHM_DIR_ENV: str(shmdir)})
    live = tmpdir / "mmdiag-replay-live"   # a running launcher's (pytest's parent: alive)
    live.mkdir()
    (live / "job.json").write_text(json.dumps({"shm_prefix": shm_owner_prefix(1, pid=os.getppid()),
                                               "options": {"tp": 1}}))
    proc.kill()
    proc.wait()
    _assert_gone(ranks)
    job = next(d for d in glob.glob(str(tmpdir / "mmdiag-replay-*")) if d != str(live))
    prefix = json.loads(open(os.path.join(job, "job.json")).read())["shm_prefix"]
    (shmdir / f"{prefix}9").write_bytes(b"\0" * 4096)   # one segment in flight at the kill, for sure
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv(SHM_DIR_ENV, str(shmdir))
    beats = heartbeat.read(os.path.join(job, "heartbeat"), 2)
    assert any(time.monotonic() - b < launcher.ORPHAN_S for b in beats if b)   # the ranks beat a moment ago
    assert launcher.sweep_orphans() == 1
    assert not os.path.exists(job) and live.is_dir()
    assert not [n for n in os.listdir(shmdir) if n.startswith(prefix)]


def test_a_refused_replay_suggests_only_what_can_help(tmp_path):
    """`--tp 1024 --strategy commit` is not told to leave out an async strategy it does not run,
    and names a --tp that fits; one request larger than the machine is told that no option helps."""
    import json

    trace = tmp_path / "t.jsonl"
    assert mmdiag_cli("trace", "synth", "-n", "16", "-o", str(trace)).returncode == 0
    r = mmdiag_cli("replay", str(trace), "--tp", "1024", "--strategy", "commit", "-q", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "async" not in r.stderr and re.search(r"lower --tp \(to \d+ or less\)", r.stderr), r.stderr
    r = mmdiag_cli("replay", str(trace), "--tp", "1024", "--strategy", "async", "-q", timeout=60)
    assert r.returncode == 2 and "leave out async" in r.stderr, r.stderr
    big = tmp_path / "big.jsonl"     # one 18.8 TB image
    big.write_text(json.dumps({"schema": "mmdiag.trace/1", "arrival": {"mode": "closed", "max_concurrency": 4}}) + "\n"
                   + json.dumps({"rid": "r0", "t": 0.0, "prompt_len": 10,
                                 "mm": [{"modality": "image", "shape": [4_000_000, 1_176_000], "dtype": "float32"}]}) + "\n")
    r = mmdiag_cli("replay", str(big), "--tp", "2", "-q", timeout=60)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "largest request alone carries 18,816,000.0 MB" in err and "smaller features" in err
    assert "--tp" not in err.split("available;")[1] and "--max-recv-mb" not in err and "async" not in err.split("available;")[1]
