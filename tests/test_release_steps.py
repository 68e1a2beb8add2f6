"""recommend's transport dimension: per-MB receive costs under each transport, and which
release step (upgrade, SGLANG_MM_PRECOMPUTE_HASH=1, `mmdiag apply shm`) pays on a release."""
from __future__ import annotations

import pytest

from runs_synth import rank, replay_run, strategy

from mmdiag.analysis import release_steps as RS
from mmdiag.analysis.costmodel import SHM_RECV_PHASES, fit
from mmdiag.analysis.recommend import recommend
from mmdiag.render.recommend_text import render_recommendation
from mmdiag.units import MB

N, MBS, TP = 100, 18.8, 4
TOTAL = N * MBS


def _run(transport, strategies):
    run = replay_run(strategies, tp=TP, mean_mb=MBS, requests=N)
    run.config.transport = transport
    run.trace["source"]["sglang_version"] = "0.5.9"
    return run


def _pickle_run():
    ranks = lambda: [rank(r, recv=8 * TOTAL, from_dict=20 * TOTAL, forward=500) for r in range(TP)]  # noqa: E731
    return _run("pickle", [strategy("revert", [10.0, 10.2, 9.8], ranks()),
                           strategy("precompute", [14.0, 14.2, 13.8], [rank(r, recv=8 * TOTAL) for r in range(TP)])])


def _shm_run(with_revert=True):
    shm_ranks = lambda: [rank(r, recv=0.1 * TOTAL, shm_open=0.2 * TOTAL, shm_sync=0.5 * TOTAL,  # noqa: E731
                              shm_map=0.2 * TOTAL) for r in range(TP)]
    out = [strategy("shm", [30.0, 30.5, 29.5], shm_ranks(),
                    tokenizer={"tokenizer_hash": 21.7 * N, "tokenizer_shm": 10.1 * N, "capacity_rps": 31.0})]
    if with_revert:
        out.insert(0, strategy("revert", [12.0, 12.1, 11.9], shm_ranks()))
    return _run("shm", out)


def _entry_ms_per_mb(run):
    vals = [sum(s.rank(0).phases_ms.get(p, 0.0) for p in SHM_RECV_PHASES) / (run.trace["mm_bytes"] / MB)
            for s in run.strategies.values()]
    return sum(vals) / len(vals)


def _step(steps, strategy, transport, skip_hash=False):
    return next(s for s in steps if (s.strategy, s.transport, s.skip_hash) == (strategy, transport, skip_hash))


def test_per_mb_receive_cost_of_each_transport_is_measured():
    p, s = _pickle_run(), _shm_run()
    tc = fit([p, s]).transport
    assert tc.source == {"pickle": "measured", "shm": "measured"}
    assert tc.recv_ms_per_mb["pickle"] == pytest.approx(_entry_ms_per_mb(p))
    assert tc.recv_ms_per_mb["shm"] == pytest.approx(_entry_ms_per_mb(s))
    assert tc.shm_saving_ms_per_mb > 0 and tc.tokenizer_shm_ms_per_mb == pytest.approx(10.1 / MBS)
    alone = fit([p]).transport  # no shm Run: unknown, not zero
    assert alone.recv_ms_per_mb["shm"] is None and alone.shm_saving_ms_per_mb is None


def test_the_step_that_pays_on_a_pickling_release():
    p, s = _pickle_run(), _shm_run()
    rec = recommend([p, s])  # the release comes from the trace (0.5.9)
    assert rec.release == "0.5.9"
    # every step of the plan, but those with SGLANG_MM_SKIP_COMPUTE_HASH: no Run replayed --skip-hash,
    # and recommend says how to measure them
    assert [x.step for x in rec.release_steps] == [x.step for x in RS.plan("0.5.9")
                                                   if not x.skip_hash and x.hash == "sha256"]
    assert any("--skip-hash" in m for m in rec.measure_next)
    assert any("--hash xxh3" in m and "mmdiag apply xxh3" in m for m in rec.measure_next)
    shm = _step(rec.release_steps, "shm", "shm")
    assert shm.expected_rps == s.strategies["shm"].throughput_rps and shm.source == "measured"
    assert _step(rec.release_steps, "precompute", "pickle").expected_rps == p.strategies["precompute"].throughput_rps
    assert rec.release_steps[0].vs_current == 1.0
    top = RS.best(rec.release_steps)
    assert top.expected_rps == max(x.expected_rps for x in rec.release_steps)
    assert any(f"`{top.step}`" in r for r in rec.reasons)
    assert "on SGLang 0.5.9:" in render_recommendation(rec)


def test_an_unmeasured_step_is_predicted_from_the_other_transport_or_asked_for():
    p, s = _pickle_run(), _shm_run(with_revert=False)
    rec = recommend([p, s], release="0.5.9")
    up = _step(rec.release_steps, "revert", "shm")  # upgrading alone: revert on shm, not replayed
    assert up.source.startswith("model") and up.expected_rps > p.strategies["revert"].throughput_rps
    # a release whose own path (17a57fd's broadcast) was not replayed: the command to measure it
    rec = recommend([p, s], release="0.5.5")
    assert rec.release_steps[0].expected_rps is None
    assert any("--strategy commit --transport pickle" in m for m in rec.measure_next)


def test_a_shared_memory_release_has_no_patch_step():
    s = _shm_run()
    rec = recommend([_pickle_run(), s], release="0.5.23")
    assert {(x.strategy, x.transport) for x in rec.release_steps} <= {("revert", "shm"), ("precompute", "shm")}
    assert _step(rec.release_steps, "precompute", "shm").expected_rps == s.strategies["shm"].throughput_rps  # as `shm`


def test_tiny_images_print_no_negative_per_mb_figure(tmp_path):
    """10 kB images: shm's per-request open and barrier outweigh pickling the bytes, so its receive
    path measures dearer per MB than pickle's. That is below the per-MB model's resolution: the
    saving is 0 and said so, never a negative ms per MB, in the text or the JSON recommend prints."""
    import json
    import re

    from click.testing import CliRunner

    from mmdiag.cli import main

    n, mb = 100, 0.01

    def tiny(transport, s):
        run = replay_run([s], tp=TP, mean_mb=mb, requests=n)
        run.config.transport = transport
        run.trace["source"]["sglang_version"] = "0.5.9"
        path = tmp_path / f"{transport}.json"
        run.save(str(path))
        return str(path)

    paths = [tiny("pickle", strategy("revert", [100.0, 101.0, 99.0],
                                     [rank(r, recv=0.02 * n, from_dict=0.05 * n, forward=500) for r in range(TP)])),
             tiny("shm", strategy("shm", [95.0, 96.0, 94.0],
                                  [rank(r, recv=0.01 * n, shm_open=0.05 * n, shm_sync=0.1 * n, shm_map=0.01 * n)
                                   for r in range(TP)],
                                  tokenizer={"tokenizer_hash": 0.05 * n, "tokenizer_shm": 0.02 * n,
                                             "capacity_rps": 1000.0}))]
    negative = re.compile(r"(?<![\w.])-\d")
    text = CliRunner().invoke(main, ["recommend", *paths, "--release", "0.5.9"], terminal_width=400)
    assert text.exit_code == 0, text.output
    assert "below resolution" in text.output  # the model predicted a step from the clamped saving
    assert not negative.search(text.output), negative.findall(text.output)
    js = CliRunner().invoke(main, ["recommend", *paths, "--release", "0.5.9", "--json"])
    assert js.exit_code == 0, js.output
    tc = json.loads(js.output)["cost_model"]["transport"]
    assert tc["recv_ms_per_mb"]["shm"] > tc["recv_ms_per_mb"]["pickle"]  # the tiny-image case it is
    assert tc["shm_saving_ms_per_mb"] == 0.0 and tc["shm_saving_below_resolution"] is True
    assert not negative.search(js.output), negative.findall(js.output)


def test_skipping_the_hash_is_a_step_only_where_it_is_drawn_once_and_measured():
    """A Run replayed with --skip-hash (precompute and shm drawing a random hash instead of
    sha256) adds the SGLANG_MM_SKIP_COMPUTE_HASH steps, measured; never the variable alone
    (every rank would draw its own), and never on a release that does not read it."""
    p, s = _pickle_run(), _shm_run()
    k = _run("shm", [strategy("shm", [45.0, 45.5, 44.5], [rank(r, recv=0.1 * TOTAL) for r in range(TP)],
                              tokenizer={"tokenizer_shm": 10.1 * N, "capacity_rps": 99.0})])
    k.config.skip_hash = True
    rec = recommend([p, s, k], release="0.5.9")
    skip = [x for x in rec.release_steps if x.skip_hash]
    assert skip and all(x.strategy in ("precompute", "shm") for x in skip)
    assert all("SGLANG_MM_PRECOMPUTE_HASH=1" in x.how or "apply shm" in x.how for x in skip)
    up = _step(rec.release_steps, "shm", "shm", skip_hash=True)
    assert up.expected_rps == k.strategies["shm"].throughput_rps and up.source == "measured"
    assert _step(rec.release_steps, "shm", "shm").expected_rps == s.strategies["shm"].throughput_rps  # kept apart
    assert RS.best(rec.release_steps).skip_hash
    assert any("prefix-cache" in r for r in rec.reasons)  # the cost of the step is said with it
    # measured on shm, predicted from it on pickle: nothing left to ask for
    assert _step(rec.release_steps, "precompute", "pickle", skip_hash=True).source.startswith("model")
    assert not any("--skip-hash" in m for m in rec.measure_next)
    # 0.5.7 does not read it: only the upgrade takes it there
    assert [x.step for x in RS.plan("0.5.7") if x.skip_hash] == [x.step for x in RS.plan("0.5.7")
                                                              if x.skip_hash and x.step.startswith("upgrade")]


def test_each_configuration_states_its_prefix_cache_and_xxh3_steps_show_once_measured():
    """A Run replayed with the xxh3 content hash adds the `apply xxh3` steps, measured; every
    step and every replayed strategy says whether it keeps a content hash or draws a random one."""
    p, s = _pickle_run(), _shm_run()
    x = _run("shm", [strategy("shm", [40.0, 40.5, 39.5], [rank(r, recv=0.1 * TOTAL) for r in range(TP)],
                              tokenizer={"tokenizer_hash": 0.6 * N, "tokenizer_shm": 10.1 * N, "capacity_rps": 90.0})])
    x.config.axes["hash"] = "xxh3"
    k = _run("shm", [strategy("shm", [45.0, 45.5, 44.5], [rank(r, recv=0.1 * TOTAL) for r in range(TP)],
                              tokenizer={"tokenizer_shm": 10.1 * N, "capacity_rps": 99.0})])
    k.config.skip_hash = True
    rec = recommend([p, s, x, k], release="0.5.9")
    fast = [st for st in rec.release_steps if st.hash == "xxh3"]
    assert fast and all("mmdiag apply xxh3" in st.how for st in fast)
    up = next(st for st in fast if (st.strategy, st.transport) == ("shm", "shm") and st.source == "measured")
    assert up.expected_rps == x.strategies["shm"].throughput_rps
    assert up.prefix_cache == "content hash kept (xxh3)"
    assert _step(rec.release_steps, "shm", "shm").prefix_cache == "content hash kept (sha256)"
    assert _step(rec.release_steps, "shm", "shm", skip_hash=True).prefix_cache.startswith("random")
    assert not any("--hash xxh3" in m for m in rec.measure_next)  # measured: nothing to ask for
    text = render_recommendation(rec)
    assert "prefix cache" in text and "content hash kept (xxh3)" in text and "random: repeated images miss" in text
    assert rec.to_dict()["release_steps"][0]["prefix_cache"] == "content hash kept (sha256)"
    for run, said in ((s, "content hash kept (sha256)"), (k, "random: repeated images miss")):
        opts = recommend([run]).to_dict()  # the strategies table of one Run
        assert (opts["chosen"] or opts["runners_up"][0])["prefix_cache"] == said


def test_the_launch_decides_the_transport_of_the_steps(tmp_path):
    """recommend --release with the server's launch settings: 0.5.12.post1 with --dist-init-addr
    pickles, so its steps are priced on pickle and upgrading to the first release that keeps shared
    memory with that address (0.5.19) is a step; on several nodes no release moves features by shared
    memory and mmdiag's shm patch does not write segments: neither step is offered; with
    SGLANG_RUST_SERVER=1 on 0.5.23 items arrive hashed (priced as hashing once before the scheduler)."""
    import json

    from click.testing import CliRunner

    from mmdiag.cli import main

    paths = []
    for name, run in (("p", _pickle_run()), ("s", _shm_run())):
        paths.append(str(tmp_path / f"{name}.json"))
        run.save(paths[-1])

    def steps(*args):
        r = CliRunner().invoke(main, ["recommend", *paths, "--json", *args])
        assert r.exit_code == 0, r.output
        return [(x["step"], x["strategy"], x["transport"]) for x in json.loads(r.output)["release_steps"]]

    assert steps("--release", "0.5.12.post1")[0] == ("as it is", "revert", "shm")
    addr = steps("--release", "0.5.12.post1", "--dist-init-addr", "127.0.0.1:5000")
    assert addr[0] == ("as it is", "revert", "pickle") and ("upgrade to 0.5.19+", "revert", "shm") in addr
    assert not any(s[0] == "apply shm" for s in addr)  # the release has its own transport: no code to write
    nodes = steps("--release", "0.5.9", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:5000")
    assert nodes[0][2] == "pickle" and not any(s[2] == "shm" for s in nodes)
    assert steps("--release", "0.5.23", "--rust-server") == [("as it is", "precompute", "shm")]
    bad = CliRunner().invoke(main, ["recommend", *paths, "--nnodes", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
