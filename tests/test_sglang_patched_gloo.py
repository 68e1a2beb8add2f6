"""Proof that each patched (and unpatched) path works: the install's own methods,
taken out of its files by AST (mmdiag.sglang.runtime), run on 2 and 3 real processes
in a gloo group. Every rank must end with the same hashes and pad values (equal to
SGLang's sha256 of the feature bytes), batches mixing multimodal and text-only
requests and calls without multimodal requests must not hang (gloo timeout 30 s,
join timeout), an aborted request leaves nothing cached, and the collectives per
rank are what the strategy promises.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import multiprocessing as mp
import socket
import traceback
from pathlib import Path

import pytest

from sglang_wheels import RELEASES, site_packages  # noqa: F401

import mmdiag.sglang.apply as A
from mmdiag.mmpath.shm import SHM_DIR_ENV
from mmdiag.sglang.patches.shm import POOL_ENV
from mmdiag.sglang.locate import locate

JOIN_TIMEOUT_S = 240
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _feature(seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16 + seed % 7, 24, generator=g)  # small (patches, dim) stand-in for pixel_values


def expected_hash_of(t) -> int:
    # SGLang: hash_feature(t) -> tensor_hash([t]) -> sha256(bytes)[:8], big endian
    return int.from_bytes(hashlib.sha256(t.contiguous().numpy().tobytes()).digest()[:8], "big")


def expected_hash(seed: int) -> int:
    return expected_hash_of(_feature(seed))


# The calls each rank's scheduler gets: (rid, kind, [feature seeds]).
CALLS = [
    [("r1", "gen", [1, 2]), ("t1", "gen", []), ("r2", "gen", [3]),
     ("batch", [("r3", "gen", [4]), ("t2", "gen", [])]), ("e1", "emb", [5])],
    [("t3", "gen", []), ("t4", "gen", [])],  # text only
    [],  # nothing received this iteration
    [("abort", "r5"), ("r5", "gen", [6]), ("r6", "gen", [7]), ("HEALTH_CHECK_1", "gen", [])],
]
MM_RIDS = {"r1": [1, 2], "r2": [3], "r3": [4], "e1": [5], "r5": [6], "r6": [7]}


def _shm_handles(reqs):
    """Items whose feature is an applied `shm` patch's handle (a tuple), in received requests."""
    subs = [s for r in reqs for s in (r.batch if hasattr(r, "batch") else [r])]
    raws = [getattr(s, "mm_inputs", None) or getattr(s, "image_inputs", None) for s in subs]
    items = [it for raw in raws if raw for it in (raw["mm_items"] if isinstance(raw, dict) else raw.mm_items)]
    return [it for it in items if isinstance(it.feature, tuple)]


def _build(path, call):
    reqs = []
    for spec in call:
        if spec[0] == "batch":
            reqs.append(path.batch_req(_build(path, spec[1])))
        elif spec[0] == "abort":
            reqs.append(path.abort_req(spec[1]))
        elif spec[0] == "bad":  # a feature SGLang cannot hash: materializing it raises
            reqs.append(path.generate_req(spec[1], path.make_mm_inputs([path.make_item("not a tensor")])))
        else:
            rid, kind, seeds = spec
            raw = path.make_mm_inputs([path.make_item(_feature(s)) for s in seeds]) if seeds else None
            path.tokenizer_side(raw)  # the tokenizer manager, before the scheduler (precompute)
            reqs.append(path.generate_req(rid, raw) if kind == "gen" else path.embedding_req(rid, raw))
    return reqs


def _worker(rank, world, port, configs, out_dir, q, calls):
    try:
        import torch.distributed as dist
        from mmdiag.sglang.runtime import load_sglang_mm_path
        timeout = datetime.timedelta(seconds=30)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timeout)
        group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
        results = {}
        for name, sglang_dir, flag in configs:
            path = load_sglang_mm_path(sglang_dir)
            sched = path.make_scheduler(group, enable_broadcast_mm_inputs_process=flag)
            path.stats.reset()
            out, caches, handles = {}, [], 0
            for call in calls:
                reqs = _build(path, call) if rank == 0 else None
                reqs = path.broadcast_pyobj(reqs, group)  # SGLang's recv_requests transport
                handles += len(_shm_handles(reqs))
                reqs = path.finish_recv(sched, reqs)  # the rest of recv_requests (shm maps its segments)
                got = path.process_input_requests(sched, reqs)
                for rid, mm in got.items():
                    out[rid] = None if mm is None else [[it.hash, it.pad_value] for it in mm.mm_items]
                caches.append(len(getattr(sched, "_mmdiag_mm_cache", {}) or {}))
            results[name] = {"out": out, "caches": caches, "aborted": sched.aborted, "rejected": sched.rejected,
                             "abort_snapshot": getattr(sched, "abort_snapshot", None),
                             "collectives": path.stats.collectives, "hash_calls": path.stats.hash_calls,
                             "tokenizer_hash_calls": path.stats.tokenizer_hash_calls,
                             "variant": path.variant, "patched": path.patched, "handles": handles}
            dist.barrier(group)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
        q.put((rank, None))
    except BaseException:
        q.put((rank, traceback.format_exc()))


def _spawn(world, configs, out_dir, calls=CALLS):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, configs, str(out_dir), q, calls)) for r in range(world)]
    for p in procs:
        p.start()
    errors = []
    try:
        for _ in procs:
            rank, err = q.get(timeout=JOIN_TIMEOUT_S)
            if err:
                errors.append(f"rank {rank}:\n{err}")
    except Exception:
        errors.append(f"ranks did not finish within {JOIN_TIMEOUT_S}s (hang)")
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    assert not errors, "\n".join(errors)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def _expected_collectives(variant, patched, flag):
    n_mm_requests = len(MM_RIDS)  # per-request broadcast: one per multimodal request
    if patched == "batch":
        return 2  # calls 1 and 4 have multimodal requests; calls 2 and 3 none
    if patched == "dict":
        return n_mm_requests
    if variant == "broadcast-flag":  # precompute leaves the flag in force (it must stay off)
        return n_mm_requests if flag else 0
    if patched in ("revert", "precompute", "shm") or variant == "per-rank":
        return 0
    if variant == "broadcast-always":
        return n_mm_requests
    return 0


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """name -> (sglang_dir, flag): every release unpatched, and every applicable patch."""
    root = tmp_path_factory.mktemp("gloo-installs")
    configs = []
    for version, variant in RELEASES.items():
        base = site_packages(version, root / version / "unpatched")
        configs.append((f"{version}/unpatched", str(base), False))
        if variant == "broadcast-flag":
            configs.append((f"{version}/flag-on", str(base), True))
        for strategy in ("revert", "dict", "batch", "precompute", "shm"):
            pkg = site_packages(version, root / version / strategy)
            try:
                res = A.apply(locate(str(pkg)), strategy)
            except A.SGLangError:
                continue  # not applicable (dict/batch on per-rank): covered by the apply tests
            if res.status == "applied":
                configs.append((f"{version}/{strategy}", str(pkg), False))
                if variant == "broadcast-flag":  # the patch no longer reads the flag
                    configs.append((f"{version}/{strategy}+flag", str(pkg), True))
    return configs


def _check(results, configs):
    world = len(results)
    n_items = sum(len(s) for s in MM_RIDS.values())
    for name, _dir, flag in configs:
        per_rank = [r[name] for r in results]
        r0 = per_rank[0]
        for r in per_rank[1:]:
            assert r["out"] == r0["out"], f"{name}: ranks disagree"
        base = next(r[f"{name.split('/')[0]}/unpatched"] for r in results[:1])
        for rid, seeds in MM_RIDS.items():
            got = r0["out"][rid]
            assert [h for h, _ in got] == [expected_hash(s) for s in seeds], (name, rid)
            # the release's own pad values (its formula changed in 0.5.9), whatever the path
            assert got == base["out"][rid], (name, rid)
        for rid in ("t1", "t2", "t3", "t4"):
            assert r0["out"][rid] is None
        assert "HEALTH_CHECK_1" in r0["out"]  # nothing running: the health check is handled
        for r in per_rank:
            assert r["caches"] == [0, 0, 0, 0], f"{name}: results left cached {r['caches']}"
            assert r["aborted"] == ["r5"]
            exp = _expected_collectives(r["variant"], r["patched"], flag) if world > 1 else 0
            assert r["collectives"] == exp, (name, r["collectives"], exp)
        # shm: the recv broadcast carried a handle per item, not its bytes
        assert all(r["handles"] == (n_items if r0["patched"] == "shm" else 0) for r in per_rank), name
        if r0["patched"] in ("precompute", "shm"):  # hashed once, before the scheduler
            assert all(r["hash_calls"] == 0 for r in per_rank), f"{name}: scheduler ranks hashed"
            assert r0["tokenizer_hash_calls"] == n_items
        elif r0["collectives"] == 0:
            assert all(r["hash_calls"] == n_items for r in per_rank), name  # every rank hashes every item
        if r0["patched"] == "batch" and world > 1:
            # the abort came before r5's request in the same call: r5 was dropped, r6 still waits
            assert all(r["abort_snapshot"] == ["r6"] for r in per_rank), name


def test_all_paths_two_ranks(installs, tmp_path, monkeypatch):
    names = {n for n, _, _ in installs}
    assert {"0.5.5/batch", "0.5.6/batch+flag", "0.5.4.post2/dict", "0.5.6/precompute",
            "0.5.4.post1/shm", "0.5.5/shm", "0.5.9/shm+flag"} <= names
    segments = tmp_path / "shm"
    segments.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(segments))  # where the `shm` patch writes (inherited by the ranks)
    _check(_spawn(2, installs, tmp_path), installs)
    assert list(segments.iterdir()) == []  # every segment unlinked once every rank had mapped it


def test_broadcasting_paths_three_ranks(installs, tmp_path):
    sub = [c for c in installs if c[0].startswith(("0.5.5/", "0.5.6/"))
           and c[0].split("/")[1] in ("unpatched", "flag-on", "dict", "batch")]
    _check(_spawn(3, sub, tmp_path), sub)


def _killed_worker(rank, world, port, sglang_dir, q):
    """Rank 1 dies (SIGKILL) holding handles it never mapped; rank 0 reports what it met."""
    try:
        import os
        import signal
        import torch.distributed as dist
        from mmdiag.sglang.runtime import load_sglang_mm_path
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        path = load_sglang_mm_path(sglang_dir)
        sched = path.make_scheduler(dist.group.WORLD)
        reqs = _build(path, CALLS[0]) if rank == 0 else None
        reqs = path.broadcast_pyobj(reqs, dist.group.WORLD)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        held = len(os.listdir(os.environ[SHM_DIR_ENV]))  # segments written for this call
        try:
            path.finish_recv(sched, reqs)
            q.put((rank, "finished although its peer died"))
        except RuntimeError as e:
            q.put((rank, f"held {held}; {e}"))
    except BaseException:
        q.put((rank, traceback.format_exc()))


def test_shm_patch_leaves_no_segment_when_a_rank_dies(tmp_path, monkeypatch):
    pkg = site_packages("0.5.9", tmp_path / "inst")
    assert A.apply(locate(str(pkg)), "shm").status == "applied"
    segments = tmp_path / "shm"
    segments.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(segments))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_killed_worker, args=(r, 2, port, str(pkg), q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, what = q.get(timeout=JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    # the survivor held the call's 5 segments, and its barrier failed instead of hanging
    assert rank == 0 and what.startswith("held 5; "), what
    assert procs[1].exitcode == -9
    assert list(segments.iterdir()) == []  # the survivor unlinked the call's segments


def test_shm_patch_fallback_discard_and_a_lost_segment(installs, tmp_path, monkeypatch):
    """The patched tokenizer side and receive in one process (a group of one): a segment is
    mapped and unlinked, a cancelled request's segments are discarded, the exit reclaim
    removes what no scheduler took, a full /dev/shm keeps the bytes inline (hashed all the
    same), and a segment gone before any rank mapped it drops its request instead of crashing."""
    import subprocess
    import torch
    from mmdiag.sglang.runtime import load_sglang_mm_path
    seg = tmp_path / "shm"
    seg.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(seg))
    monkeypatch.setenv(POOL_ENV, "0")  # a new segment per feature (the pool: tests below)
    path = load_sglang_mm_path(next(d for n, d, _ in installs if n == "0.5.4.post1/shm"))
    sched = path.make_scheduler(None)

    def written(seed, rows=None):
        f = _feature(seed) if rows is None else torch.randn(rows, 256)
        raw = path.make_mm_inputs([path.make_item(f)])
        path.tokenizer_side(raw)
        return raw, f

    raw, f = written(1)
    assert isinstance(raw["mm_items"][0].feature, tuple) and len(list(seg.iterdir())) == 1
    reqs = path.finish_recv(sched, [path.generate_req("a", raw)])
    assert torch.equal(raw["mm_items"][0].feature, f) and list(seg.iterdir()) == []
    assert [it.hash for it in path.process_input_requests(sched, reqs)["a"].mm_items] == [expected_hash(1)]
    raw, _ = written(2)
    path.ns["_mmdiag_shm_discard"](raw)  # the tokenizer's await was cancelled
    assert list(seg.iterdir()) == []
    written(3)
    path.ns["_mmdiag_shm_reclaim"](float("inf"))  # what atexit runs
    assert list(seg.iterdir()) == []
    raw, _ = written(4)
    (seg / os.path.basename(raw["mm_items"][0].feature[1])).unlink()  # lost before the scheduler mapped it
    assert path.finish_recv(sched, [path.generate_req("b", raw)]) == []
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(seg)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        raw, f = written(5, rows=512)  # 512 KB: /dev/shm is full
        item = raw["mm_items"][0]
        assert item.feature is f and item.hash == expected_hash_of(f) and list(seg.iterdir()) == []
    finally:
        subprocess.run(["umount", str(seg)])


def _pooled(raw):
    h = raw["mm_items"][0].feature
    return isinstance(h, tuple) and len(h) > 5 and h[5]


def test_shm_patch_reuses_pooled_segments_bounded_and_safely(installs, tmp_path, monkeypatch):
    """The pool in one process (a group of one): a segment is not rewritten while a rank
    still maps it (the next feature goes to a new segment, the bound being reached), and is
    rewritten (same file, no new one) once that map is gone; a cancelled request gives its
    segment back; the exit removes the pool."""
    import gc
    import torch
    from mmdiag.sglang.runtime import load_sglang_mm_path
    seg = tmp_path / "shm"
    seg.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(seg))
    monkeypatch.setenv(POOL_ENV, "1")  # one whole-MB slot
    path = load_sglang_mm_path(next(d for n, d, _ in installs if n == "0.5.9/shm"))
    sched = path.make_scheduler(None)

    def written(seed):
        f = _feature(seed)
        raw = path.make_mm_inputs([path.make_item(f)])
        path.tokenizer_side(raw)
        return raw, f

    def received(raw, rid):
        path.finish_recv(sched, [path.generate_req(rid, raw)])
        return raw["mm_items"][0].feature

    raw1, f1 = written(1)
    assert _pooled(raw1)
    slot = raw1["mm_items"][0].feature[1]
    held = os.path.basename(slot) + ".held"
    inode = os.stat(slot).st_ino
    got1 = received(raw1, "a")
    assert torch.equal(got1, f1) and sorted(os.listdir(seg)) == [held]  # mapped, not unlinked
    raw2, f2 = written(2)  # the rank still maps the slot, and the bound is reached: a new segment
    assert not _pooled(raw2) and len(os.listdir(seg)) == 2
    assert torch.equal(received(raw2, "b"), f2) and sorted(os.listdir(seg)) == [held]
    assert torch.equal(got1, f1)  # never rewritten under a live map
    del got1, raw1
    gc.collect()  # the rank's map (and with it its lock) is gone
    raw3, f3 = written(3)
    assert _pooled(raw3) and raw3["mm_items"][0].feature[1] == slot and os.stat(slot).st_ino == inode
    assert torch.equal(received(raw3, "c"), f3)
    del raw3
    gc.collect()
    raw4, _ = written(4)
    assert _pooled(raw4)
    path.ns["_mmdiag_shm_discard"](raw4)  # a cancelled request gives its slot back
    assert sorted(os.listdir(seg)) == [held]
    raw5, _ = written(5)
    assert raw5["mm_items"][0].feature[1] == slot
    path.ns["_mmdiag_shm_pool_close"]()  # what atexit runs
    path.ns["_mmdiag_shm_reclaim"](float("inf"))
    assert os.listdir(seg) == []


TOKENIZER = r"""
import os, signal, sys, torch
from mmdiag.sglang.runtime import load_sglang_mm_path
path = load_sglang_mm_path(sys.argv[1])
for seed in range(3):
    raw = path.make_mm_inputs([path.make_item(torch.randn(16, 24))])
    path.tokenizer_side(raw)
print(len(os.listdir(os.environ["MMDIAG_SHM_DIR"])), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_shm_patch_pool_is_cleaned_at_exit_and_reclaimed_after_kill_9(installs, tmp_path, monkeypatch):
    import subprocess
    import sys
    from mmdiag.sglang.runtime import load_sglang_mm_path
    seg = tmp_path / "shm"
    seg.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(seg))
    monkeypatch.delenv(POOL_ENV, raising=False)  # the default bound
    sglang_dir = next(d for n, d, _ in installs if n == "0.5.9/shm")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))

    def tokenizer(how):
        return subprocess.run([sys.executable, "-c", TOKENIZER, sglang_dir, how], env=env, capture_output=True,
                              text=True, timeout=300)

    r = tokenizer("exit")
    assert r.returncode == 0 and r.stdout.split() == ["3"], r.stderr[-2000:]  # three pooled segments in flight
    assert os.listdir(seg) == []  # removed at exit
    r = tokenizer("kill")
    assert r.returncode == -9 and r.stdout.split() == ["3"]
    left = os.listdir(seg)
    assert len(left) == 3  # a crash leaves them
    path = load_sglang_mm_path(sglang_dir)  # the next server's tokenizer, at its first write
    raw = path.make_mm_inputs([path.make_item(_feature(1))])
    path.tokenizer_side(raw)
    assert not set(left) & set(os.listdir(seg)) and len(os.listdir(seg)) == 1
    path.ns["_mmdiag_shm_pool_close"]()
    path.ns["_mmdiag_shm_reclaim"](float("inf"))
    assert os.listdir(seg) == []


# 0.5.19+: the release's error-broadcast protocol. A mixed call (multimodal, text-only, and a
# request whose features cannot be materialized), then a text-only call.
ERROR_CALLS = [
    [("r1", "gen", [1]), ("t1", "gen", []), ("bad", "x1"), ("r2", "gen", [2, 3])],
    [("t2", "gen", [])],
]


def test_error_protocol_releases_two_ranks(tmp_path_factory, tmp_path):
    """0.5.19 and 0.5.23 (the release's own broadcast, flag on; `batch` is refused on these
    shared-memory releases): every rank agrees on hashes and pad values, the mixed call does
    not hang, and the request whose materialization fails on the entry rank is rejected on
    every rank with the same error, after the same collectives."""
    root = tmp_path_factory.mktemp("gloo-error-protocol")
    configs = []
    for version in ("0.5.19", "0.5.23"):
        base = site_packages(version, root / version / "unpatched")
        configs.append((f"{version}/flag-on", str(base), True))
    results = _spawn(2, configs, tmp_path, ERROR_CALLS)
    for name, _dir, _flag in configs:
        r0, r1 = results[0][name], results[1][name]
        assert r0["out"] == r1["out"] and r0["rejected"] == r1["rejected"], f"{name}: ranks disagree"
        assert list(r0["rejected"]) == ["x1"], (name, r0["rejected"])
        # the release's message, naming the entry rank's error
        assert "TypeError" in r0["rejected"]["x1"] and "entry rank" in r0["rejected"]["x1"], r0["rejected"]
        for rid, seeds in (("r1", [1]), ("r2", [2, 3])):
            assert [h for h, _ in r0["out"][rid]] == [expected_hash(s) for s in seeds], (name, rid)
        assert r0["out"]["t1"] is None and r0["out"]["t2"] is None
        # flag on: one broadcast per multimodal request (the failed one included)
        assert r0["collectives"] == r1["collectives"] == 3, name
        assert r0["caches"] == [0, 0]


def test_release_candidate_runs_as_its_code_says(tmp_path_factory, tmp_path, monkeypatch):
    """0.5.10rc0, a release candidate outside the matrix whose code is the 0.5.9 family's (features
    pickled in the recv broadcast): unpatched, with the flag on, and with `shm` applied (its
    tokenizer statement is a known layout), every rank agrees and the patch's handles ride the
    recv broadcast."""
    root = tmp_path_factory.mktemp("gloo-rc")
    base = site_packages("0.5.10rc0", root / "unpatched")
    pkg = site_packages("0.5.10rc0", root / "shm")
    assert A.apply(locate(str(pkg)), "shm").status == "applied"
    configs = [("0.5.10rc0/unpatched", str(base), False), ("0.5.10rc0/flag-on", str(base), True),
               ("0.5.10rc0/shm", str(pkg), False)]
    segments = tmp_path / "shm"
    segments.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(segments))
    _check(_spawn(2, configs, tmp_path), configs)
    assert list(segments.iterdir()) == []
