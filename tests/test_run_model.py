"""The Run model: typed replay and profile parts, /1 files read and converted, strict JSON,
one meaning of a phase share, findings computed rather than stored."""
from __future__ import annotations

import json

from runs_synth import profile_run, video_run

from mmdiag.analysis import breakdown as B
from mmdiag.analysis.findings import findings
from mmdiag.analysis.recommend import recommend
from mmdiag.run import ProfileConfig, Run
from mmdiag.vocab import PHASES, PROFILE_SCHEMA, REPLAY_SCHEMA

PH = {p: 0.0 for p in PHASES}


def _v1_rank(r, **kw):
    return dict({"rank": r, "cpu_s": 5.0, "wall_s": 10.0, "phases_ms": dict(PH, recv=2000.0, from_dict=3000.0,
                                                                            forward=5000.0)}, **kw)


def test_a_v1_replay_is_read_into_the_typed_replay_part(tmp_path):
    d = {"schema": "mmdiag.replay/1", "tp": 2, "trace": {}, "config": {"repeat": 1},
         "strategies": {"commit": {"name": "commit", "requests": 10, "duration_s": 5.0, "throughput_rps": 2.0,
                                   "latency_ms": {"p50": 1.0, "p99": 2.0},
                                   "ranks": [_v1_rank(0, collectives=10, bytes_sent=100, iterations=4, pid=None),
                                             _v1_rank(1, collectives=10, bytes_sent=0, iterations=4)]}}}
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    run = Run.load(str(p))
    assert run.schema == REPLAY_SCHEMA and run.is_replay and run.live is None
    r0 = run.strategies["commit"].rank(0)
    assert r0.replay.collectives == 10 and r0.replay.bytes_sent == 100 and r0.profile is None
    out = run.to_dict()
    assert out["schema"] == REPLAY_SCHEMA and out["strategies"]["commit"]["ranks"][0]["replay"]["iterations"] == 4
    assert "collectives" not in out["strategies"]["commit"]["ranks"][0]


def test_a_v1_profile_keeps_its_ranks_once_and_live_typed(tmp_path):
    rank = _v1_rank(0, pid=42, samples=1000, phases_pct=dict(PH, recv=20.0, from_dict=30.0, forward=50.0),
                    gil_held_pct=40.0, gil_wait_pct=3.0, cpu_pct=50.0)
    d = {"schema": "mmdiag.profile/1", "tp": 1, "ranks": [rank], "findings": ["stored prose"],
         "config": {"live": {"source": "live", "target_pid": 42, "rate_hz": 100, "duration_s": 10.0,
                             "pyspy": {"version": "0.4"}, "exited": [], "strategy_detected": "revert",
                             "phase_gil_pct": {"0": {"from_dict": 90.0}}, "threads": {"0": []},
                             "unmatched_top": {"0": []}, "gil_held_ci": {"0": 1.5}}},
         "strategies": {"revert": {"name": "revert", "requests": 0, "duration_s": 10.0, "throughput_rps": float("nan"),
                                   "latency_ms": {}, "ranks": [rank]}}}
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))     # a /1 profile holds a bare NaN
    run = Run.load(str(p))
    assert run.is_profile and run.schema == PROFILE_SCHEMA and run.config == ProfileConfig()
    assert run.live.target_pid == 42 and run.live.strategy_detected == "revert"
    (r,) = run.ranks
    assert r.profile.pid == 42 and r.profile.phase_gil_pct == {"from_dict": 90.0} and r.profile.gil_held_ci == 1.5
    assert "stored prose" not in findings(run) and findings(run)[0].startswith("multimodal path: revert")
    text = json.dumps(run.to_dict(), allow_nan=False)          # strict JSON: NaN is written as null
    out = json.loads(text)
    assert "ranks" not in out and "findings" not in out and out["strategies"]["revert"]["throughput_rps"] is None
    assert Run.from_dict(out).ranks[0].profile == r.profile


def test_a_phase_share_is_a_share_of_wall_time_from_both_collectors():
    replay_rank = video_run().strategies["commit"].rank(0)
    share = B.phase_pct(replay_rank)
    assert abs(share["from_dict"] - 100 * replay_rank.phases_ms["from_dict"] / (1000 * replay_rank.wall_s)) < 1e-9
    live = profile_run([{"recv": 20, "from_dict": 50, "forward": 30}])
    assert B.phase_pct(live.ranks[0])["from_dict"] == 50.0
    # A recommendation reads a profile and a replay through the same shares.
    assert recommend([live]).mm_share_pct == 50.0


def test_one_engine_reads_a_replay_and_a_profile_of_the_same_shares_alike():
    from mmdiag.analysis.recommend import diagnose, load_rules

    replay = video_run()
    commit = replay.strategies["commit"].ranks
    live = profile_run([B.phase_pct(r) for r in commit])      # a profile that sampled those very shares
    rules = load_rules()
    a, b = diagnose(commit, rules), diagnose(live.ranks, rules)
    assert a.points_to == b.points_to and abs(a.mm_share_pct - b.mm_share_pct) < 1e-6
    assert recommend([live]).recommended == a.points_to
    assert any(f"point to `{a.points_to}`" in n for n in recommend([replay]).notes)


def test_the_typed_config_reads_and_writes_the_same_keys():
    """Run.config is typed (ReplayConfig / ProfileConfig); the JSON keys are the /2 files' own:
    a replay of installed code, a replay of the models (no `sglang` key) and a profile with and
    without its bench_serving runs come back key for key."""
    replay = {"forward_ms": 0.0, "max_concurrency": None, "max_recv_mb": 256.0, "repeat": 2, "timeout_s": 60.0,
              "impl": "sglang", "launcher": "env", "strategies": {"commit": {"name": "commit", "transport": {}}},
              "transport": "pickle", "tokenizer_workers": 1,
              "sglang": {"path": "/x", "version": "0.5.5", "variant": "broadcast-always", "patched": None,
                         "enable_broadcast_flag": False}}
    models = {k: v for k, v in replay.items() if k != "sglang"}
    for schema, config in ((REPLAY_SCHEMA, replay), (REPLAY_SCHEMA, dict(models, impl="mmdiag")),
                           (PROFILE_SCHEMA, {"bench_serving": {"runs": [{"_where": "b.jsonl"}]}}), (PROFILE_SCHEMA, {})):
        run = Run.from_dict({"schema": schema, "tp": 2, "strategies": {}, "config": config})
        assert json.dumps(run.to_dict()["config"]) == json.dumps(config)
    assert run.config.bench_serving is None and Run.from_dict(
        {"schema": REPLAY_SCHEMA, "tp": 2, "strategies": {}, "config": replay}).config.sglang.variant == "broadcast-always"
