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
from mmdiag.live.server import header_lines, read_server

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
    from sglang_wheels import with_xxhash
    titles = ["sglang::scheduler_TP0", "sglang::scheduler_TP1"]
    p, _, pkg = server("0.5.23", titles, ["--tp", "2"], {})
    assert read_server(p.pid).content_hash == "sha256"
    time.sleep(0.05)
    with_xxhash(pkg.parent)
    A.apply(locate(str(pkg)), "xxh3")
    s = read_server(p.pid)
    assert s.patch == "xxh3" and s.patch_pending and s.content_hash == "sha256"
    time.sleep(1.0)  # process start times are read to about 10 ms, and boot time less exactly
    p2, _, _ = server("0.5.23", titles, ["--tp", "2"], {}, pkg=pkg)  # restarted on the patched install
    assert read_server(p2.pid).content_hash == "xxh3"
    assert any("content hash xxh3 (content hash kept)" in line for line in header_lines(p2.pid))
    p3, _, _ = server("0.5.23", titles, ["--tp", "2"], {"SGLANG_MM_SKIP_COMPUTE_HASH": "1"}, pkg=pkg)
    s3 = read_server(p3.pid)
    assert s3.content_hash == "random" and any("random: repeated images miss" in line for line in header_lines(p3.pid))


def test_segment_pool_the_server_runs(server):
    """`apply pool` after the server started is not running yet (fresh segments until a restart);
    a server started after it runs it, and doctor --pid says so."""
    titles = ["sglang::scheduler_TP0", "sglang::scheduler_TP1"]
    p, _, pkg = server("0.5.23", titles, ["--tp", "2"], {})
    assert read_server(p.pid).segments == "fresh"
    time.sleep(0.05)
    A.apply(locate(str(pkg)), "pool")
    s = read_server(p.pid)
    assert s.patch == "pool" and s.patch_pending and s.segments == "fresh"
    time.sleep(1.0)  # process start times are read to about 10 ms
    p2, _, _ = server("0.5.23", titles, ["--tp", "2"], {}, pkg=pkg)
    assert read_server(p2.pid).segments == "pool"
    assert any("mmdiag patch: pool; content hash sha256" in line and "shm segments pool" in line
               for line in header_lines(p2.pid))


def test_server_in_a_venv_reads_the_venvs_release(tmp_path):
    """A server started from a venv's python: /proc/PID/exe resolves to the base interpreter,
    which has no sglang; doctor --pid must still read the venv's (sys.prefix as the process sees it)."""
    import shutil
    import sysconfig
    from sglang_wheels import pristine
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert site.startswith(str(venv)) and sysconfig.get_paths()["purelib"] != site
    shutil.copytree(pristine("0.5.23"), os.path.join(site, "sglang"))
    # ranks run the test's own interpreter (it has setproctitle); the server is the venv's python
    server = SERVER.replace("[sys.executable, ", f"[{sys.executable!r}, ")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_", "PYTHON", "VIRTUAL_ENV"))}
    p = subprocess.Popen([str(py), "-c", server, "sglang::scheduler_TP0,sglang::scheduler_TP1", "-m",
                          "sglang.launch_server", "--tp-size", "2"], env=e, cwd=tmp_path, stdout=subprocess.PIPE,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"up"
        kids = _titles_ready(p, 2)
        assert not psutil.Process(p.pid).exe().startswith(str(venv))  # the resolved binary is the base's
        s = read_server(kids[0].pid)
        assert s.version == "0.5.23" and s.sglang_dir.startswith(str(venv.resolve())), (s.sglang_dir, s.notes)
        assert s.feature_transport == "shm" and s.family == "private-handler"
        r = CliRunner().invoke(main, ["doctor", "--pid", str(p.pid)])
        assert r.exit_code == 0 and "SGLang 0.5.23 (private-handler)" in r.output, r.output
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.parametrize("version, args, env, transport, why", [
    # 0.5.10 .. 0.5.18 take any --dist-init-addr for a multi-node launch, and pickle
    ("0.5.12.post1", ["--dist-init-addr", "127.0.0.1:5757"], {}, "pickle", "--dist-init-addr 127.0.0.1:5757"),
    ("0.5.12.post1", ["--skip-tokenizer-init"], {}, "pickle", "--skip-tokenizer-init"),
    ("0.5.12.post1", ["--nnodes", "1"], {}, "shm", "the release's CPU transport"),
    # 0.5.19+ ask the node count, not the address
    ("0.5.23", ["--dist-init-addr", "127.0.0.1:5757"], {}, "shm", "the release's CPU transport"),
    ("0.5.23", ["--dist-init-addr", "10.0.0.1:5757", "--nnodes", "2", "--node-rank", "0"], {}, "pickle",
     "--nnodes 2"),
    ("0.5.23", ["--skip-tokenizer-init"], {}, "pickle", "--skip-tokenizer-init"),
    ("0.5.23", ["--mm-feature-transport", "cpu", "--nnodes=2"], {}, "pickle", "--nnodes 2"),
])
def test_launch_flags_decide_the_effective_transport(server, version, args, env, transport, why):
    p, _, _ = server(version, ["sglang::scheduler_TP0", "sglang::scheduler_TP1"], ["--tp-size", "2", *args], env)
    s = read_server(p.pid)
    assert (s.feature_transport, why in s.feature_transport_source) == (transport, True), s.feature_transport_source
    assert f"feature transport {transport} (" in header_lines(p.pid)[1]


@pytest.mark.parametrize("version, rust", [("0.5.23", True), ("0.5.12.post1", False)])
def test_rust_server_hands_items_over_hashed(server, version, rust):
    """SGLANG_RUST_SERVER=1: from 0.5.18 the Rust front end's workers hash; before, the variable
    does not touch images and every rank still hashes."""
    p, _, _ = server(version, ["sglang::scheduler_TP0", "sglang::scheduler_TP1"], ["--tp-size", "2"],
                     {"SGLANG_RUST_SERVER": "1"})
    s = read_server(p.pid)
    assert s.launch["rust_server"]
    lines = header_lines(p.pid)
    if rust:
        assert "Rust front end" in s.hashing and "every" not in " ".join(lines)
    else:
        assert s.hashing.startswith("every TP rank") and "hashing: every TP rank" in lines[2]
        assert any("takes no images (from 0.5.18)" in n for n in s.notes)


def test_doctor_options_where_no_server_runs():
    """doctor without --pid takes the launch settings as options; with --pid it reads them."""
    from sglang_wheels import pristine
    pkg = str(pristine("0.5.23"))
    r = CliRunner().invoke(main, ["doctor", "--sglang", pkg, "--nnodes", "2", "--dist-init-addr", "10.0.0.1:5000"])
    assert r.exit_code == 0 and "with this launch" in r.output
    row = next(line for line in r.output.splitlines() if line.startswith("with this launch"))
    assert "feature transport pickle" in row and "--nnodes 2" in row and "--dist-init-addr" not in row
    d = json.loads(CliRunner().invoke(main, ["doctor", "--sglang", pkg, "--rust-server", "--json"]).output)
    assert d["launch"]["transport"] == "shm" and "Rust front end" in d["launch"]["hashing"]
    plain = CliRunner().invoke(main, ["doctor", "--sglang", pkg])
    assert plain.exit_code == 0 and "with this launch" not in plain.output
    r = CliRunner().invoke(main, ["doctor", "--pid", str(os.getpid()), "--nnodes", "2"])
    assert r.exit_code == 2 and r.output.startswith("mmdiag: error: --pid reads the launch settings")
