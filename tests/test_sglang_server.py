"""doctor --pid on real running processes: a server process with a server's command line
and environment, whose children carry the scheduler titles (setproctitle), importing a
real SGLang wheel through its own PYTHONPATH."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner

from sglang_wheels import site_packages  # noqa: F401

import mmdiag.sglang.apply as A
from mmdiag.cli import main
from mmdiag.sglang.locate import locate
from mmdiag.sglang.server import header_lines, read_server

pytestmark = pytest.mark.slow  # real processes: a server and its scheduler ranks

SERVER = r"""
import subprocess, sys, time
rank = "import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1]); time.sleep(120)"
kids = [subprocess.Popen([sys.executable, "-c", rank, t]) for t in sys.argv[1].split(",")]
print("up", flush=True)
time.sleep(120)
"""


def _titles_ready(proc, n):
    deadline = time.time() + 20
    while time.time() < deadline:
        kids = psutil.Process(proc.pid).children()
        if len(kids) == n and all(k.cmdline()[:1] and k.cmdline()[0].startswith("sglang::") for k in kids):
            return kids
        time.sleep(0.1)
    raise AssertionError("scheduler titles did not appear")


@pytest.fixture
def server(tmp_path):
    started = []

    def start(version, titles, args, env, pkg=None):
        if pkg is None:  # one unpacked copy per server, unless given one
            pkg = site_packages(version, tmp_path / f"{version}-{len(started)}")
        e = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
        e.update(PYTHONPATH=str(pkg.parent), **env)
        p = subprocess.Popen([sys.executable, "-c", SERVER, ",".join(titles), "-m", "sglang.launch_server",
                              "--model-path", "Qwen/Qwen2.5-VL-7B-Instruct", *args],
                             env=e, cwd=tmp_path, stdout=subprocess.PIPE, start_new_session=True)
        started.append(p)
        assert p.stdout.readline().strip() == b"up"
        return p, _titles_ready(p, len(titles)), pkg

    yield start
    for p in started:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_current_release_settings_from_the_live_processes(server):
    p, kids, pkg = server("0.5.23", ["sglang::scheduler_TP0", "sglang::scheduler_TP1"],
                          ["--tp-size", "2", "--enable-broadcast-mm-inputs-process"],
                          {"SGLANG_MM_PRECOMPUTE_HASH": "1"})
    s = read_server(p.pid)
    assert s.version == "0.5.23" and s.sglang_dir == str(pkg.resolve()) and s.family == "private-handler"
    assert (s.tp_size, s.dp_size, len(s.ranks)) == (2, 1, 2)
    assert s.broadcast_flag and s.broadcast_flag_source == "command line"
    assert s.precompute_env == "1" and s.precompute_effective
    assert s.feature_transport == "shm" and s.patch is None
    # a scheduler's PID leads to the same server
    assert read_server(kids[1].pid).pid == p.pid
    r = CliRunner().invoke(main, ["doctor", "--pid", str(kids[0].pid), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tp_size"] == 2


def test_old_release_defaults_dp_titles_and_ignored_variable(server):
    titles = ["sglang::scheduler_DP0_TP0", "sglang::scheduler_DP0_TP1", "sglang::scheduler_DP1_TP0",
              "sglang::scheduler_DP1_TP1"]
    p, _, _ = server("0.5.6.post2", titles, [], {"SGLANG_MM_PRECOMPUTE_HASH": "1"})
    s = read_server(p.pid)
    assert (s.tp_size, s.dp_size) == (2, 2)  # from the titles: the command line left the defaults
    assert not s.broadcast_flag and s.broadcast_flag_source == "default of the release"
    assert s.precompute_env == "1" and not s.precompute_effective
    assert s.feature_transport == "pickle"
    assert any("does not read it" in n for n in s.notes)


def test_patch_written_after_start_is_pending(server):
    p, _, pkg = server("0.5.9", ["sglang::scheduler_TP0", "sglang::scheduler_TP1"], ["--tp", "2"], {})
    time.sleep(0.05)
    A.apply(locate(str(pkg)), "batch")
    s = read_server(p.pid)
    assert s.patch == "batch" and s.patch_pending
    lines = header_lines(p.pid)
    assert any("written after the server started" in line for line in lines)
    assert "SGLANG_MM_PRECOMPUTE_HASH unset" in lines[1]


def test_not_a_server(tmp_path):
    r = CliRunner().invoke(main, ["doctor", "--pid", str(os.getpid())])
    assert r.exit_code != 0 and "Traceback" not in r.output and "scheduler" in r.output


def test_skip_hash_without_hashing_once_is_called_a_divergence(server):
    """SGLANG_MM_SKIP_COMPUTE_HASH=1 on 0.5.9 with the flag off: every rank materializes and
    draws its own random hash (replay --impl sglang shows the ranks disagree); with
    SGLANG_MM_PRECOMPUTE_HASH=1 it is drawn once, and only the cache cost is named."""
    titles = ["sglang::scheduler_TP0", "sglang::scheduler_TP1"]
    p, _, _ = server("0.5.9", titles, ["--tp", "2"], {"SGLANG_MM_SKIP_COMPUTE_HASH": "1"})
    s = read_server(p.pid)
    assert s.skip_hash_env == "1"
    assert any("each rank draws its own random hash" in n for n in s.notes), s.notes
    p, _, _ = server("0.5.9", titles, ["--tp", "2"], {"SGLANG_MM_SKIP_COMPUTE_HASH": "1", "SGLANG_MM_PRECOMPUTE_HASH": "1"})
    s = read_server(p.pid)
    assert not any("draws its own" in n for n in s.notes) and any("once, in the tokenizer" in n for n in s.notes)
    p, _, _ = server("0.5.7", titles, ["--tp", "2"], {"SGLANG_MM_SKIP_COMPUTE_HASH": "1"})
    assert any("does not read it (from 0.5.8)" in n for n in read_server(p.pid).notes)


def test_content_hash_the_server_runs(server):
    """xxh3 applied after the server started is not running yet (sha256 until a restart); a
    server started after it runs it; SGLANG_MM_SKIP_COMPUTE_HASH=1 makes it random."""
    from test_sglang_content_hash import _with_xxhash
    titles = ["sglang::scheduler_TP0", "sglang::scheduler_TP1"]
    p, _, pkg = server("0.5.23", titles, ["--tp", "2"], {})
    assert read_server(p.pid).content_hash == "sha256"
    time.sleep(0.05)
    _with_xxhash(pkg.parent)
    A.apply(locate(str(pkg)), "xxh3")
    s = read_server(p.pid)
    assert s.patch == "xxh3" and s.patch_pending and s.content_hash == "sha256"
    time.sleep(1.0)  # process start times are read to about 10 ms, and boot time less exactly
    p2, _, _ = server("0.5.23", titles, ["--tp", "2"], {}, pkg=pkg)  # restarted on the patched install
    assert read_server(p2.pid).content_hash == "xxh3"
    assert "content hash xxh3 (content hash kept)" in header_lines(p2.pid)[2]
    p3, _, _ = server("0.5.23", titles, ["--tp", "2"], {"SGLANG_MM_SKIP_COMPUTE_HASH": "1"}, pkg=pkg)
    s3 = read_server(p3.pid)
    assert s3.content_hash == "random" and "random: repeated images miss" in header_lines(p3.pid)[2]
