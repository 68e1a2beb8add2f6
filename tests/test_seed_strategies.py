"""The seeds' remaining proposals as replay strategies: `cond` (size-conditional
broadcast) and `dict_async` (dict broadcast on a background thread), on real gloo ranks."""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing as mp
import os
import socket
import traceback

import pytest

from mmdiag.analysis import threshold as T
from mmdiag.analysis.costmodel import CostModel
from mmdiag.errors import MmdiagError
from mmdiag.strategies.cond import Cond, feature_nbytes
from conftest import make_trace, mmdiag_cli

JOIN_TIMEOUT_S = 120
ROWS = (8, 40, 12, 64, 8)        # feature rows per multimodal request (x 1176 float32)
THRESHOLD = 24 * 1176 * 4         # between 12 and 40 rows: requests 1 and 3 are above it


def test_threshold_precedence_and_parsing():
    model = CostModel(tp=4, m_all_ms_per_mb=3.0, m_one_ms_per_mb=1.0, c_ms_per_collective=2.0,
                      k_ms_per_mb=1.0, separable=True)
    assert T.resolve(env={}, model=model).bytes == pytest.approx(2.0 * 1e6)   # c / (m_all - m_one - k) MB
    assert T.resolve(env={T.ENV: "100k"}, model=model).source == "env"
    assert T.resolve("2M", env={T.ENV: "100k"}, model=model).bytes == 2e6
    never = CostModel(tp=4, m_all_ms_per_mb=1.0, m_one_ms_per_mb=1.0, c_ms_per_collective=2.0,
                      k_ms_per_mb=1.0, separable=True)
    th = T.resolve(env={}, model=never)
    assert th.never and "no threshold pays" in th.text and th.to_dict()["bytes"] == "never"
    unknown = T.resolve(env={}, model=None)
    assert unknown.source == "seed-example" and unknown.bytes == T.SEED_EXAMPLE_BYTES
    with pytest.raises(MmdiagError, match="not a byte count"):
        T.resolve(env={T.ENV: "lots"})


def _feature(rows: int, seed: int):
    import torch
    return torch.full((rows, 1176), float(seed + 1))


def _reqs(make_request_fn, rows_list, start):
    from mmdiag.trace import MMItem, TraceRequest
    out = []
    for k, rows in enumerate(rows_list):
        mm = (MMItem("image", (rows, 1176)),) if rows else ()
        out.append(make_request_fn(TraceRequest(f"q{start + k}", 0.0, 8, mm), start + k, 0.0, 7))
    return out


def _worker(rank, world, port, q):
    try:
        import torch.distributed as dist
        from mmdiag.replay.comm import broadcast_pyobj, install_torch_timers
        from mmdiag.replay.scheduler import ReplayScheduler, make_request
        from mmdiag.replay.timers import PhaseTimers
        from mmdiag.strategies.dict_async import DictAsync
        timeout = datetime.timedelta(seconds=30)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timeout)
        group = dist.group.WORLD
        timers = PhaseTimers(rank)
        install_torch_timers(timers)
        out = {}
        # cond: one call mixing requests above and below the threshold, with a text-only one.
        # Rank 1's environment disagrees; rank 0's threshold is the one every rank uses.
        os.environ[T.ENV] = str(THRESHOLD) if rank == 0 else "never"
        cond = Cond.for_replay(rank, group, None)
        s = ReplayScheduler(rank, world, cond, timers, cpu_group=group, timeout=timeout)
        reqs, _ = broadcast_pyobj(_reqs(make_request, ROWS + (0,), 0) if rank == 0 else None, rank, group)
        ready = cond.process(s, reqs)
        out["cond"] = {r.rid: mm.fingerprint() for r, mm in ready}
        out["cond_collectives"] = timers.collectives
        out["cond_counts"] = (cond.sent, cond.local)
        # dict_async: two calls; the second request of the first call is aborted while in flight.
        da = DictAsync()
        s = ReplayScheduler(rank, world, da, timers, cpu_group=group, timeout=timeout)
        da.setup(s)
        got = {}
        for start, rows in ((10, (8, 40, 12)), (20, (64, 0))):
            reqs, _ = broadcast_pyobj(_reqs(make_request, rows, start) if rank == 0 else None, rank, group)
            assert da.process(s, reqs) == []
            if start == 10:
                da.abort(["q11", "never-sent"])
        while da.pending():
            got.update({r.rid: mm.fingerprint() for r, mm in da.poll(s)})
        da.teardown(s)
        out["dict_async"] = got
        out["dict_async_held"] = da.held()
        q.put((rank, json.dumps(out)))
        dist.barrier(group)
    except BaseException:
        q.put((rank, "ERROR " + traceback.format_exc()))


@pytest.mark.slow
def test_cond_and_dict_async_on_two_gloo_ranks():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, payload = q.get(timeout=JOIN_TIMEOUT_S)  # a hang fails here
            assert not payload.startswith("ERROR"), payload
            results[rank] = json.loads(payload)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    r0, r1 = results[0], results[1]
    assert r0["cond"] == r1["cond"] and len(r0["cond"]) == len(ROWS)   # ranks agree
    above = sum(rows * 1176 * 4 > THRESHOLD for rows in ROWS)
    assert r0["cond_counts"] == r1["cond_counts"] == [above, len(ROWS) - above]
    assert r0["cond_collectives"] == r1["cond_collectives"] == above
    assert r0["dict_async"] == r1["dict_async"]
    assert set(r0["dict_async"]) == {"q10", "q12", "q20"}               # q11 aborted, q21 text-only
    assert r0["dict_async_held"] == r1["dict_async_held"] == 0           # nothing left behind


def test_feature_nbytes_reads_items():
    from mmdiag.replay.mm import MultimodalDataItem
    raw = {"mm_items": [MultimodalDataItem("image", _feature(3, 0)), MultimodalDataItem("image", None)]}
    assert feature_nbytes(raw) == 3 * 1176 * 4


@pytest.mark.slow
def test_cond_replay_follows_the_environment_threshold(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=16, video_every=3, text_every=4)
    out = tmp_path / "run.json"
    limit = 40 * 1176 * 4  # images (16 or 32 rows) below, videos (64 rows) above
    r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "cond", "-o", str(out), "-q",
                   env={T.ENV: str(limit)})
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    cfg = d["config"]["strategies"]["cond"]
    assert cfg["threshold"]["source"] == "env" and cfg["threshold"]["bytes"] == limit
    with open(trace) as f:
        sizes = [sum(math.prod(it["shape"]) * 4 for it in json.loads(line)["mm"]) for line in list(f)[1:]]
    big = sum(b > limit for b in sizes if b)
    assert 0 < big < sum(1 for b in sizes if b)
    assert (cfg["broadcast_requests"], cfg["local_requests"]) == (big, sum(1 for b in sizes if b) - big)
    assert d["strategies"]["cond"]["ranks"][0]["replay"]["collectives"] == big
    assert d["strategies"]["cond"]["ranks_agree"] is True


@pytest.mark.slow
def test_cond_patch_on_real_wheels_two_gloo_ranks(tmp_path, monkeypatch):
    """`mmdiag apply cond` on a broadcast-always and a broadcast-flag release, run on 2 gloo
    ranks through the install's own code (the calls of test_sglang_patched_gloo: mixed
    multimodal/text batches, an empty call, an abort). Requests above the threshold are
    broadcast, the others materialized per rank; nothing hangs, nothing stays cached."""
    import mmdiag.sglang.apply as A
    from mmdiag.sglang.locate import locate
    from sglang_wheels import site_packages
    from test_sglang_patched_gloo import MM_RIDS, _feature, _spawn, expected_hash

    limit = 1900  # between the features' sizes (1,536 .. 3,360 bytes per request)
    monkeypatch.setenv(T.ENV, str(limit))  # the servers' environment (spawned ranks inherit it)
    configs = []
    for version, flag in (("0.5.5", False), ("0.5.6", True)):
        pkg = site_packages(version, tmp_path / version)
        assert A.apply(locate(str(pkg)), "cond").status == "applied"
        configs.append((f"{version}/cond", str(pkg), flag))
    results = _spawn(2, configs, tmp_path)
    above = sum(sum(_feature(s).numpy().nbytes for s in seeds) > limit for seeds in MM_RIDS.values())
    assert 0 < above < len(MM_RIDS)
    for name, _dir, _flag in configs:
        per_rank = [r[name] for r in results]
        assert per_rank[0]["out"] == per_rank[1]["out"], f"{name}: ranks disagree"
        for rid, seeds in MM_RIDS.items():
            assert per_rank[0]["out"][rid] == [[expected_hash(s), expected_hash(s) % (1 << 30)] for s in seeds]
        for r in per_rank:
            assert r["collectives"] == above, (name, r["collectives"])
            assert r["caches"] == [0, 0, 0, 0] and r["aborted"] == ["r5"]
