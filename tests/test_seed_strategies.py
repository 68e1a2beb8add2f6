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

from mmdiag.strategies import cond_threshold as T
from mmdiag.analysis.costmodel import CostModel, fit
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


class _Tokenizer:
    """mmdiag's model of the tokenizer hand-over (the base Strategy's items), image token 7."""
    image_token_id = 7

    def raw_mm_inputs(self, modalities, features, hashes):
        from mmdiag.strategies.base import Strategy
        return Strategy.raw_mm_inputs(self, modalities, features, hashes)


_TOKENIZER = _Tokenizer()


def _reqs(make_request_fn, rows_list, start):
    from mmdiag.trace import MMItem, TraceRequest
    out = []
    for k, rows in enumerate(rows_list):
        mm = (MMItem("image", (rows, 1176)),) if rows else ()
        out.append(make_request_fn(TraceRequest(f"q{start + k}", 0.0, 8, mm), start + k, 0.0, _TOKENIZER))
    return out


def _worker(rank, world, port, q):
    try:
        import torch.distributed as dist
        from mmdiag.mmpath.collectives import broadcast_pyobj, install_torch_timers
        from mmdiag.replay.scheduler import ReplayScheduler, make_request
        from mmdiag.mmpath.timers import PhaseTimers
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
    from mmdiag.mmpath.items import MultimodalDataItem
    raw = {"mm_items": [MultimodalDataItem("image", _feature(3, 0)), MultimodalDataItem("image", None)]}
    assert feature_nbytes(raw) == 3 * 1176 * 4


@pytest.mark.slow
@pytest.mark.parametrize("given", ["env", "option"])
def test_cond_replay_follows_the_environment_threshold(tmp_path, given):
    """The threshold from SGLANG_MM_BROADCAST_THRESHOLD, or from --threshold (which beats it)."""
    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=16, video_every=3, text_every=4)
    out = tmp_path / "run.json"
    limit = 40 * 1176 * 4  # images (16 or 32 rows) below, videos (64 rows) above
    opt = ["--threshold", str(limit)] if given == "option" else []
    r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "cond", "-o", str(out), "-q", *opt,
                   env={T.ENV: str(limit) if given == "env" else "1"})
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    cfg = d["config"]["strategies"]["cond"]
    assert cfg["threshold"]["source"] == given and cfg["threshold"]["bytes"] == limit
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


def _measured_run(path):
    """A Run whose cost model places the crossover (video_run: broadcasting pays above it)."""
    from runs_synth import video_run
    run = video_run()
    run.save(str(path))
    return T.from_model(fit([run])).bytes


def test_threshold_option_forms_and_mistakes(tmp_path):
    """--threshold takes bytes, never, or a Run's measured crossover; a mistake is one line before any rank starts."""
    run_file = tmp_path / "run.json"
    crossover = _measured_run(run_file)
    assert 0 < crossover < math.inf
    assert T.from_option("2M").bytes == 2e6 and T.from_option("never").never
    th = T.from_option(str(run_file), fit)
    assert (th.bytes, th.source) == (crossover, "measured") and str(run_file) in th.text
    trace = make_trace(tmp_path / "t.jsonl", n=2, rows=8)
    notes = tmp_path / "notes.txt"
    notes.write_text("threshold: about a megabyte\n")
    for args, words in ((["--strategy", "revert", "--threshold", "1M"], "add --strategy cond"),
                        (["--strategy", "cond", "--threshold", "lots"], "not a byte count"),
                        (["--strategy", "cond", "--threshold", str(trace)], "is a trace, not a Run"),
                        (["--strategy", "cond", "--threshold", str(notes)], "not JSON")):
        r = mmdiag_cli("replay", trace, "--tp", "2", *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_apply_cond_bakes_the_option_else_the_run_recommend_kept(tmp_path):
    """`apply cond --threshold X` bakes X in; with neither option nor variable, the crossover of the
    Run `mmdiag recommend` kept last (its runs_dir under the working directory)."""
    from sglang_wheels import site_packages
    pkg = str(site_packages("0.5.5", tmp_path / "sg"))
    work = tmp_path / "work"
    (work / "mmdiag-runs").mkdir(parents=True)
    crossover = _measured_run(work / "mmdiag-runs" / "recommend-20260101-000000.json")
    env = {T.ENV: ""}
    r = mmdiag_cli("apply", "cond", "--sglang", pkg, "--dry-run", "--threshold", "2M", cwd=work, env=env)
    assert r.returncode == 0 and "else 2000000.0" in r.stdout and "from the option" in r.stdout, r.stderr
    r = mmdiag_cli("apply", "cond", "--sglang", pkg, "--dry-run", cwd=work, env=env)
    assert r.returncode == 0 and f"else {float(crossover)!r}" in r.stdout and "recommend-2026" in r.stdout, r.stderr
    r = mmdiag_cli("apply", "revert", "--sglang", pkg, "--dry-run", "--threshold", "2M", cwd=work, env=env)
    assert r.returncode == 2 and "cond" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_recommend_picks_cond_with_the_threshold_it_was_replayed_with():
    from runs_synth import rank, strategy, video_run
    from mmdiag.analysis.recommend import recommend
    run = video_run()
    run.strategies["cond"] = strategy("cond", [2.30, 2.32, 2.28], [rank(r, cpu_pct=60, recv=3000) for r in range(4)],
                                      requests=100, coll=1.0)
    th = {"bytes": 31_500_000.0, "source": "measured", "text": "the measured crossover"}
    run.config.strategies = {"cond": {"name": "cond", "threshold": th}}
    rec = recommend([run])
    assert rec.recommended == "cond" and rec.command == "mmdiag apply cond --threshold 31500000"
    assert rec.to_dict()["command"] == rec.command


@pytest.mark.slow
def test_cond_and_dict_async_under_every_transport(tmp_path):
    """Both seed strategies at tp 2 under each feature transport: a threshold between the trace's
    image and video sizes splits cond's requests both ways, and every rank ends with the same
    hashes; no shared-memory segment outlives the replay."""
    from mmdiag.mmpath import shm
    from mmdiag.vocab import TRANSPORTS

    trace = make_trace(tmp_path / "t.jsonl", n=8, rows=16, video_every=3, text_every=4)
    limit = 40 * 1176 * 4   # images (16 or 32 rows) below, videos (64 rows) above
    segments = set(os.listdir(shm.shm_dir()))
    for tr in TRANSPORTS:
        out = tmp_path / f"{tr}.json"
        r = mmdiag_cli("replay", trace, "--tp", "2", "--strategy", "cond", "--strategy", "dict_async",
                       "--threshold", str(limit), "--transport", tr, "-q", "-o", str(out))
        assert r.returncode == 0, (tr, r.stderr)
        d = json.loads(out.read_text())
        assert d["config"]["transport"] == tr
        cond = d["config"]["strategies"]["cond"]
        assert cond["broadcast_requests"] > 0 and cond["local_requests"] > 0, (tr, cond)
        for name in ("cond", "dict_async"):
            assert d["strategies"][name]["ranks_agree"] is True, (tr, name)
    assert {s for s in os.listdir(shm.shm_dir()) if s.startswith("mmdiag-")} <= segments
