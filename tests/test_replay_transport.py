"""The shared-memory transport and the `shm` strategy in real gloo groups."""
from __future__ import annotations

import glob
import json
import os
import time
import subprocess
import tempfile

import pytest

from mmdiag.mmpath import shm
from mmdiag.replay import ReplayOptions, replay
from mmdiag.vocab import SHM_PHASES, TRANSPORTS
from conftest import make_trace, mmdiag_cli


def _segments():
    return glob.glob(os.path.join(shm.shm_dir(), "mmdiag-*"))


@pytest.mark.slow
def test_every_strategy_under_shm_at_tp2_agrees_and_leaves_no_segment(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=12, rows=32)
    before = set(_segments())
    runs = {}
    for tr in TRANSPORTS:
        out = tmp_path / f"{tr}.json"
        r = mmdiag_cli("replay", trace, "--tp", "2", "--transport", tr, "-q", "-o", str(out))
        assert r.returncode == 0, r.stderr
        runs[tr] = json.loads(out.read_text())
    assert set(_segments()) <= before
    p, s = runs["pickle"], runs["shm"]
    assert s["config"]["transport"] == "shm" and p["config"]["transport"] == "pickle"
    for name, st in s["strategies"].items():
        assert st["ranks_agree"] is True, name
        assert s["config"]["strategies"][name]["transport"]["name"] == "shm"
        assert st["ranks"][1]["phases_ms"]["shm_map"] > 0, name
        # handles, not bytes, ride the recv broadcast (shm brings its own transport either way)
        ref = p["strategies"]["revert"]["ranks"][0]["replay"]["recv_bytes"]
        assert st["ranks"][0]["replay"]["recv_bytes"] < ref / 4, name
        # the segment write is tokenizer-side time, never hidden
        assert st["tokenizer_ms"]["tokenizer_shm"] > 0 and st["throughput_rps"] <= st["tokenizer_ms"]["capacity_rps"]
    # shm brings its own transport: under pickle too its features travel as handles
    assert p["config"]["strategies"]["shm"]["transport"]["name"] == "shm"
    assert p["strategies"]["shm"]["ranks"][1]["phases_ms"]["from_dict"] < p["strategies"]["revert"]["ranks"][1]["phases_ms"]["from_dict"]


@pytest.mark.slow
def test_shm_strategy_at_tp4(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=16, concurrency=4)
    before = set(_segments())
    run = replay(trace, ReplayOptions(tp=4, strategies=["commit", "shm"], transport="shm", timeout=120))
    for st in run.strategies.values():
        assert st.ranks_agree is True and all(r.phases_ms["shm_sync"] > 0 for r in st.ranks)
    assert set(_segments()) <= before


@pytest.mark.slow
def test_a_full_shared_memory_filesystem_falls_back_to_inline_bytes(tmp_path):
    small = tmp_path / "shm"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        trace = make_trace(tmp_path / "t.jsonl", n=8, rows=64)  # 300 KB features: none fits
        out = tmp_path / "run.json"
        r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "shm", "-q", "-o", str(out),
                       env={shm.SHM_DIR_ENV: str(small)})
        assert r.returncode == 0, r.stderr
        d = json.loads(out.read_text())
        st = d["strategies"]["shm"]
        assert st["ranks_agree"] is True and d["config"]["strategies"]["shm"]["transport"]["fallbacks"] > 0
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)])


def test_segments_are_written_once_mapped_copy_on_write_and_swept():
    import torch
    prefix = f"mmdiag-test-{os.getpid()}-"
    f = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    h = shm.write_segment(prefix + "0", f)
    assert h is not None and h.shape == (10, 100) and h.nbytes == 4000
    fd = shm.open_segment(h)
    shm.unlink_segment(h)  # every rank holds an fd: the name can go
    m = shm.map_segment(fd, h)
    assert torch.equal(m, f)
    m[0, 0] = -1.0  # copy-on-write: the writer's bytes are untouched
    assert shm.write_segment(prefix + "1", f) is not None
    assert shm.sweep(prefix) == 1 and not glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill a rank", "ctrl-c", "sigterm", "kill -9 the launcher", "kill -9, pooled segments"])
def test_no_segment_left_after_a_dead_rank_or_ctrl_c(tmp_path, how):
    """Every way a `--transport shm` replay ends leaves no segment: the launcher sweeps its own
    on a dead rank, Ctrl-C and SIGTERM; after a kill -9 of the launcher (nobody left to sweep)
    the next replay's sweep reclaims them at once, as their owner is gone; the segment pool's
    reused segments (--segments pool) alike."""
    import signal
    from test_replay_faults import _long_replay
    from test_replay import _assert_gone
    pool = how == "kill -9, pooled segments"
    how = "kill -9 the launcher" if pool else how
    proc, ranks = _long_replay(tmp_path, "--timeout", "20", "--transport", "shm", *(["--segments", "pool"] if pool else []))
    mine = os.path.join(shm.shm_dir(), f"mmdiag-{proc.pid}-*")
    if how == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    elif how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "kill -9 the launcher":
        proc.kill()
    else:
        next(p for p in ranks if "TP1" in " ".join(p.cmdline())).kill()
    proc.communicate(timeout=60)
    assert proc.returncode == {"ctrl-c": 130, "sigterm": 143, "kill -9 the launcher": -9}.get(how, 3)
    _assert_gone(ranks)
    if how == "kill -9 the launcher":
        from mmdiag.replay import launcher
        if pool:  # the pool's segments outlive each request: there are some when the launcher dies
            assert any("pool" in os.path.basename(n) for n in glob.glob(mine))
        ns = os.stat("/proc/self/ns/pid").st_ino
        open(os.path.join(shm.shm_dir(), f"mmdiag-{proc.pid}-1-{ns}-1-0"), "wb").close()  # one in flight, for sure
        live = os.path.join(shm.shm_dir(), shm.owner_prefix("test") + "0")   # a running replay's (this process)
        open(live, "wb").close()
        try:
            assert glob.glob(mine)                        # nobody was left to sweep them
            assert shm.sweep_dead_owners() >= 1 and os.path.exists(live)
        finally:
            os.unlink(live)
        assert launcher.sweep_orphans() >= 1             # and its job folder in /tmp
    assert not glob.glob(mine)


def test_a_segment_is_reclaimed_only_when_its_owner_is_certainly_gone(tmp_path, monkeypatch):
    """owner_gone: a running owner's segments stay, an exited one's go (reaped or a zombie), a
    reused PID (another start time) counts as gone, and a name it cannot judge (another PID
    namespace, no owner in the name) is never touched."""
    import subprocess
    import sys
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(tmp_path))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    while shm._proc_stat(zombie.pid)[0] != "Z":   # exited, not yet reaped
        time.sleep(0.05)
    ns = os.stat("/proc/self/ns/pid").st_ino
    names = {
        "live": shm.owner_prefix(1) + "0",
        "zombie": shm.owner_prefix(1, pid=zombie.pid) + "0",
        "reaped": f"mmdiag-{reaped.pid}-5-{ns}-1-0",
        "reused": f"mmdiag-{os.getpid()}-{shm._proc_stat(os.getpid())[1] + 1}-{ns}-1-0",
        "other namespace": f"mmdiag-{reaped.pid}-5-{ns + 1}-1-0",
        "no owner": f"mmdiag-test-{reaped.pid}-0",
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"x")
    assert {k: shm.owner_gone(n) for k, n in names.items()} == {
        "live": False, "zombie": True, "reaped": True, "reused": True, "other namespace": None, "no owner": None}
    assert shm.sweep_dead_owners() == 3
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("live", "other namespace", "no owner"))
    zombie.wait()


def test_release_defaults_follow_what_each_release_does():
    """The replay's default transport and tokenizer workers (variants.toml [defaults]) agree
    with what detect reads from each family's real wheel."""
    import re
    from sglang_wheels import FAMILY_WHEELS, pristine
    from mmdiag.sglang.facts import default_tokenizer_workers, default_transport
    from mmdiag.sglang.detect import detect
    from mmdiag.sglang.locate import locate
    for v in FAMILY_WHEELS:
        f = detect(locate(str(pristine(v)))).facts
        assert default_transport(v) == f.transport, v
        pool = re.search(r"thread pool \((\d+) workers", f.precompute_hashing or "")
        assert default_tokenizer_workers(v) == (int(pool.group(1)) if pool else 1), (v, f.precompute_hashing)


def test_skip_hash_draws_instead_of_hashing_and_refuses_per_rank_strategies(tmp_path):
    """replay --skip-hash (SGLANG_MM_SKIP_COMPUTE_HASH=1): precompute and shm draw a random
    hash in the tokenizer stage, so it costs next to nothing and the ranks still agree; a
    strategy that hashes on the ranks is refused (there every rank would draw its own)."""
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=256, concurrency=1)
    runs = {}
    for skip in (False, True):
        out = tmp_path / f"{skip}.json"
        r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "precompute", "--strategy", "shm", "-q",
                       "-o", str(out), *(["--skip-hash"] if skip else []))
        assert r.returncode == 0, r.stderr
        runs[skip] = json.loads(out.read_text())
    assert runs[True]["config"]["skip_hash"] is True and "skip_hash" not in runs[False]["config"]
    for name in ("precompute", "shm"):
        a, b = runs[True]["strategies"][name], runs[False]["strategies"][name]
        assert a["ranks_agree"] is True
        assert a["tokenizer_ms"].get("tokenizer_hash", 0) < b["tokenizer_ms"]["tokenizer_hash"] / 10
    r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "revert", "--skip-hash", "-q", timeout=60)
    assert r.returncode == 2 and "every rank draw its own hash" in r.stderr


def _tag_release(trace: str, version: str) -> str:
    """The trace as if recorded from a server running SGLang `version` (header source)."""
    with open(trace) as f:
        lines = f.readlines()
    head = json.loads(lines[0])
    head["source"]["sglang_version"] = version
    out = trace.replace(".jsonl", f"-{version}.jsonl")
    with open(out, "w") as f:
        f.writelines([json.dumps(head) + "\n", *lines[1:]])
    return out


def test_the_release_decides_whether_ranks_copy_out_of_the_segment(tmp_path):
    """0.5.10 .. 0.5.20 clone every feature out of its segment on every rank; 0.5.21+ keep the
    copy-on-write map: the replay's shm transport follows the trace's release (real deliver in a
    one-rank gloo group: a clone owns resizable storage, a map of the segment does not)."""
    import socket
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from mmdiag.mmpath import transport as T
    from mmdiag.mmpath.timers import PhaseTimers
    from mmdiag.sglang.facts import shm_clones

    assert shm_clones("0.5.12.post1") and shm_clones("0.5.20") and not shm_clones("0.5.21")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        s = SimpleNamespace(timers=PhaseTimers(0), cpu_group=dist.group.WORLD, is_entry_rank=True)
        owned = {}
        for version in ("0.5.12.post1", "0.5.21"):
            tr = T.make("shm", f"mmdiag-test-{os.getpid()}-", clone=shm_clones(version))
            feature = torch.arange(4096, dtype=torch.float32).reshape(8, 512)
            req = SimpleNamespace(mm_inputs={"mm_items": [SimpleNamespace(feature=feature.clone())]})
            tr.encode(s, req.mm_inputs)
            assert isinstance(req.mm_inputs["mm_items"][0].feature, shm.ShmHandle)
            tr.deliver(s, [req])
            got = req.mm_inputs["mm_items"][0].feature
            assert torch.equal(got, feature)
            owned[version] = got.untyped_storage().resizable()
            tr.close()
        assert owned == {"0.5.12.post1": True, "0.5.21": False}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_replay_config_carries_the_clone_of_the_trace_release(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=32)
    for version, clone in (("0.5.12.post1", "clone"), ("0.5.21", None)):
        run = replay(_tag_release(trace, version), ReplayOptions(tp=2, strategies=["revert"], timeout=120))
        assert run.config.transport == "shm" and run.config.shm_map == clone, version
        assert run.strategies["revert"].ranks_agree is True
        assert all(r.phases_ms["shm_map"] > 0 for r in run.strategies["revert"].ranks)
    # asked for: the other way round
    run = replay(_tag_release(trace, "0.5.21"), ReplayOptions(tp=2, strategies=["revert"], shm_map="clone"))
    assert run.config.shm_map == "clone"


def test_a_release_that_writes_segments_but_pickles_is_replayed_so(tmp_path):
    """0.5.9's tokenizer writes each feature into a segment, and its entry rank copies it back
    out as it takes the request, before the recv broadcast pickles the bytes: the model pays
    both (tokenizer_shm; shm_map on the entry rank only), 0.5.8's pays neither."""
    trace = make_trace(tmp_path / "t.jsonl", n=6, rows=1000, concurrency=1, text_every=0)
    runs = {}
    for version in ("0.5.8.post1", "0.5.9"):
        out = tmp_path / f"{version}.json"
        r = mmdiag_cli("replay", _tag_release(str(trace), version), "--tp", "2", "--strategy", "revert",
                       "-q", "-o", str(out))
        assert r.returncode == 0, r.stderr
        runs[version] = json.loads(out.read_text())
    old, new = runs["0.5.8.post1"]["strategies"]["revert"], runs["0.5.9"]["strategies"]["revert"]
    assert runs["0.5.9"]["config"]["transport"] == "pickle" and new["ranks_agree"] is True
    assert new["tokenizer_ms"]["tokenizer_shm"] > 0 and "tokenizer_shm" not in old["tokenizer_ms"]
    assert new["ranks"][0]["phases_ms"]["shm_map"] > 0 and new["ranks"][1]["phases_ms"]["shm_map"] == 0
    assert old["ranks"][0]["phases_ms"]["shm_map"] == 0
    # the bytes still ride in the recv broadcast
    assert new["ranks"][1]["replay"]["recv_bytes"] > runs["0.5.9"]["trace"]["mm_bytes"] / 2
