"""`mmdiag apply pool` on the real SGLang wheels: the release's own shared-memory writer reuses its
segments (0.5.10 .. 0.5.23). Byte-identical undo on one wheel of each layout family, stacking with
xxh3 either way, the answers on releases without the release's transport; and the patched release
code itself (ShmPointerMMData, wrap/unwrap, _finalize_shm_features) in a writer process and two
gloo ranks: bytes round-trip, segments are reused, a rank's copy-on-write map keeps its segment
from reuse, the pool stays bounded, and a killed writer's segments are reclaimed."""
from __future__ import annotations

import datetime
import gc
import hashlib
import multiprocessing as mp
import os
import pickle
import re
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest

from axis_patches import MM_UTILS, apply_then_undo, run
from sglang_wheels import site_packages, tree_bytes, with_xxhash

import mmdiag.sglang.apply as A
from mmdiag.live.requests import SegmentCounter
from mmdiag.sglang.detect import detect
from mmdiag.sglang.errors import NotApplicable
from mmdiag.sglang.locate import locate
from mmdiag.sglang.patches.segment_pool import POOL_ENV, PREFIX

SHM = Path("/dev/shm")
# One wheel per layout family of ShmPointerMMData / its receiver (variants.toml [layouts]).
POOL_WHEELS = ["0.5.12.post1", "0.5.13", "0.5.16", "0.5.19", "0.5.21", "0.5.23"]


@pytest.mark.parametrize("version", POOL_WHEELS)
def test_apply_pool_and_undo_byte_identical(version, tmp_path):
    pkg = site_packages(version, tmp_path)

    def only_the_writer_and_the_opens(text):
        # the release's writer and every open by name go through the pool; nothing else of its code changes
        assert len(re.findall(r"_mmdiag_pool_segment\(nbytes\) or shared_memory\.SharedMemory\(", text)) == 1
        assert len(re.findall(r"_mmdiag_pool_attach\(self, shared_memory\.SharedMemory\(name=self\.shm_name\)\)",
                              text)) == text.count("shared_memory.SharedMemory(name=self.shm_name)") >= 1
        det = detect(locate(str(pkg)))
        assert det.segments == "pool" and det.patched is None

    apply_then_undo(pkg, "pool", "shm segments", "fresh ", "pool ", only_the_writer_and_the_opens)


@pytest.mark.parametrize("version", ["0.5.12.post1", "0.5.23"])
def test_pool_stacks_with_xxh3_either_order_and_one_undo_restores_all(version, tmp_path):
    pkg = site_packages(version, tmp_path)
    with_xxhash(pkg.parent)
    before = tree_bytes(pkg)
    for order in (["pool", "xxh3"], ["xxh3", "pool"]):
        for name in order:
            r = run("apply", name, "--sglang", pkg, "--yes")
            assert r.exit_code == 0 and f"applied `{name}`" in r.output, r.output
        det = detect(locate(str(pkg)))
        assert det.segments == "pool" and det.content_hash == "xxh3" and det.manifest["patches"] == order
        compile((pkg / MM_UTILS).read_text(), MM_UTILS, "exec")
        u = run("apply", "--undo", "--sglang", pkg, "--yes")
        assert u.exit_code == 0 and f"undone `{'+'.join(order)}`" in u.output, u.output
        assert tree_bytes(pkg) == before


def test_releases_without_the_releases_transport(tmp_path):
    """0.5.7 (features pickled) and 0.5.9 (its segments are unwrapped on the entry rank): one line,
    nothing written, pointing at `shm`; with mmdiag's `shm` applied, `pool` has nothing to add
    (shm pools its own segments) and the stack stays shm's, which one undo restores."""
    for version in ("0.5.7", "0.5.9"):
        pkg = site_packages(version, tmp_path / version)
        before = tree_bytes(pkg)
        r = run("apply", "pool", "--sglang", pkg, "--yes")
        assert r.exit_code != 0 and tree_bytes(pkg) == before
        line = r.output.strip().splitlines()[-1]
        assert "`pool`" in line and "apply `shm` instead" in line and POOL_ENV in line, r.output
        with pytest.raises(NotApplicable):
            A.apply(locate(str(pkg)), "pool")
    assert run("apply", "shm", "--sglang", pkg, "--yes").exit_code == 0
    shm_bytes = tree_bytes(pkg)
    r = run("apply", "pool", "--sglang", pkg, "--yes")
    assert r.exit_code == 0 and "already pools its segments" in r.output and "nothing to patch" in r.output, r.output
    assert tree_bytes(pkg) == shm_bytes and detect(locate(str(pkg))).manifest["patches"] == ["shm"]
    assert re.search(r"^shm segments\s+pool ", run("doctor", "--sglang", pkg).output, re.M)
    assert run("apply", "--undo", "--sglang", pkg, "--yes").exit_code == 0 and tree_bytes(pkg) == before


def test_verify_measures_the_release_writer_before_and_after(tmp_path):
    """`apply pool --verify` replays the install's own code before and after (its own
    ShmPointerMMData writes the segments): the report shows the write per request fall, each
    side's segments, and a command to remeasure that names `pool`, not the install's strategy."""
    import json
    from conftest import make_trace
    pkg = site_packages("0.5.23", tmp_path)
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=4000, concurrency=1, text_every=0)
    out = tmp_path / "report.json"
    r = run("apply", "pool", "--verify", "--yes", "--sglang", pkg, "--trace", trace, "--tp", "2", "--repeat", "1",
            "-o", out)
    assert r.exit_code in (0, 1), r.output  # judged or not: one repeat may not decide the throughput
    rep = json.loads(out.read_text())
    rows = {m["metric"]: m for m in rep["metrics"]}
    write = rows["tokenizer shared-memory write per mm request"]
    assert write["after"] < write["before"], write  # a reused segment takes no page faults
    assert detect(locate(str(pkg))).segments == "pool"  # it stays applied
    # closed loop: CPU and p99 are judged elsewhere, and the way to measure them names what was verified
    assert any("mmdiag apply pool --verify" in n for n in rep["notes"]), rep["notes"]


# ------------------------------------------------------------ the patched release, in processes

ROWS = 300  # a (300, 1176) float32 feature: 1.4 MB, a 2 MB pooled segment
POOL_MB = "4"  # two such segments
TIMEOUT_S = 120


def _feature(i: int):
    import torch
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(ROWS, 1176, generator=g)


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).numpy().tobytes()).hexdigest()


def _writer(pkg: str, conn) -> None:
    """The tokenizer side: the release's wrap_shm_features, one request per command."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from whole_server_target import load_release
        path = load_release(pkg)
        ns = path.ns
        conn.send(("ready", os.getpid()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            i = cmd[1]
            f = _feature(i)
            req = ns["wrap_shm_features"](path.generate_req(f"r{i}", path.make_mm_inputs([path.make_item(f)])))
            ptr = req.mm_inputs.mm_items[0].feature
            conn.send((ptr.shm_name, _digest(f), pickle.dumps(req)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    conn.close()


def _rank(r: int, port: int, pkg: str, cmds, results) -> None:
    """A scheduler rank: broadcast_pyobj from rank 0, the release's _finalize_shm_features
    (barrier, unwrap -> materialize, all_reduce); keeps a feature when told to."""
    try:
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2,
                                             timeout=datetime.timedelta(seconds=60))
        group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))
        from whole_server_target import load_release
        path = load_release(pkg, group)
        receive = path.shm_transport().receive  # its _finalize_shm_features, on the parallel state above
        kept = []
        while True:
            cmd = cmds.get(timeout=TIMEOUT_S)
            if cmd[0] == "stop":
                break
            if cmd[0] == "drop":  # what the kept features read now; then let them go, then answer
                seen = [(rid, _digest(t)) for rid, t in kept]
                kept.clear()
                gc.collect()
                results.put((r, seen))
                continue
            _, payload, keep = cmd
            reqs = path.broadcast_pyobj([pickle.loads(payload)] if r == 0 else None, group)
            receive(reqs)
            feat = reqs[0].mm_inputs.mm_items[0].feature
            assert isinstance(feat, torch.Tensor) and tuple(feat.shape) == (ROWS, 1176), type(feat)
            if keep:
                kept.append((reqs[0].rid, feat))
            msg = (r, reqs[0].rid, _digest(feat))
            del reqs, feat
            gc.collect()  # let go of what is not kept before answering: the next write may reuse it
            results.put(msg)
        torch.distributed.destroy_process_group()
        results.put((r, "stopped"))
    except BaseException:
        results.put((r, "error", traceback.format_exc()))


def _mine(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"{PREFIX}{pid}-") or f"_{pid}_" in n)


def _pooled(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):].split("-", 1)[1].startswith("p")


@pytest.fixture
def patched(tmp_path, request):
    pkg = site_packages(request.param, tmp_path)
    assert A.apply(locate(str(pkg)), "pool").status == "applied"
    return request.param, str(pkg)


@pytest.mark.slow
# clone (receive in recv_requests; in _finalize_shm_features), then copy-on-write map
@pytest.mark.parametrize("patched", ["0.5.12.post1", "0.5.19", "0.5.23"], indirect=True)
def test_patched_release_reuses_segments_safely_in_real_processes(patched, monkeypatch):
    version, pkg = patched
    cow = version == "0.5.23"
    monkeypatch.setenv(POOL_ENV, POOL_MB)
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmds, results = [ctx.Queue(), ctx.Queue()], ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(r, port, pkg, cmds[r], results)) for r in range(2)]
    writers = []

    def start_writer():
        here, there = ctx.Pipe()
        p = ctx.Process(target=_writer, args=(pkg, there))
        p.start()
        writers.append(p)
        msg = here.recv() if here.poll(TIMEOUT_S) else ("error", "writer did not start")
        assert msg[0] == "ready", msg[1]
        return here, msg[1]

    def get():
        msg = results.get(timeout=TIMEOUT_S)
        assert msg[1:2] != ("error",), msg[-1]
        return msg

    def one(w, i, keep=False):
        """Write feature i, deliver it to both ranks; the segment's name."""
        w.send(("write", i))
        msg = w.recv() if w.poll(TIMEOUT_S) else ("error", "writer did not answer")
        assert msg[0] != "error", msg[1]
        name, digest, payload = msg
        cmds[0].put(("req", payload, False))
        cmds[1].put(("req", None, keep))
        got = sorted(get() for _ in range(2))
        assert got == [(0, f"r{i}", digest), (1, f"r{i}", digest)]  # byte-exact on both ranks
        return name, digest

    try:
        for p in ranks:
            p.start()
        w, wpid = start_writer()
        counter = SegmentCounter([wpid])  # what `mmdiag profile` counts requests by (an inotify watch)
        assert counter.start(), counter.error
        try:
            names = [one(w, i)[0] for i in range(4)]
            assert counter.read() == 4  # one feature each, though one segment carried them all
        finally:
            counter.close()
        assert all(map(_pooled, names)) and len(set(names)) == 1, names  # one segment, reused
        a, da = one(w, 4, keep=True)  # rank 1 keeps feature 4
        b = one(w, 5)[0]
        if cow:  # its map holds the segment's lock: the writer takes another one
            assert a == names[0] and b != a and _pooled(b), (a, b)
            c, dc = one(w, 6, keep=True)
            assert c == b
            d = one(w, 7)[0]  # both pooled segments mapped, the bound reached: a new segment, as the release writes
            assert not _pooled(d) and d.startswith("sgl_shm_mm_"), d
            assert len([n for n in _mine(wpid) if _pooled(n)]) == 2  # bounded
        else:  # a clone lets go of the segment as soon as it is copied
            assert b == a == names[0]
            c, dc = one(w, 6, keep=True)
            assert one(w, 7)[0] == c == a
        cmds[1].put(("drop",))
        assert get() == (1, [("r4", da), ("r6", dc)])  # what rank 1 kept never changed
        assert one(w, 8)[0] in {a, c}  # let go: reused again
        os.kill(wpid, signal.SIGKILL)
        writers[0].join(TIMEOUT_S)
        left = _mine(wpid)
        assert left and all(n.startswith(PREFIX) for n in left), left  # a killed writer leaves its pool
        w2, w2pid = start_writer()
        e = one(w2, 9)[0]
        assert _pooled(e) and _mine(wpid) == [], _mine(wpid)  # the next writer removed them at its first write
        for q in cmds:
            q.put(("stop",))
        assert sorted(get() for _ in range(2)) == [(0, "stopped"), (1, "stopped")]
        for p in ranks:
            p.join(TIMEOUT_S)
        # the ranks' exit left the pooled segment alone (no resource_tracker unlink)
        assert _mine(w2pid) == [e + ".held"], _mine(w2pid)
        w2.send(("stop",))
        writers[1].join(TIMEOUT_S)
        assert writers[1].exitcode == 0
        time.sleep(0.5)  # the writer's resource tracker finishes after it
        assert _mine(w2pid) == [] and _mine(wpid) == []  # the pool is removed at exit
    finally:
        for p in ranks + writers:
            if p.is_alive():
                p.kill()
                p.join(10)
        for pid in [p.pid for p in writers if p.pid]:
            for n in _mine(pid):
                (SHM / n).unlink(missing_ok=True)
