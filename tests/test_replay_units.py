"""The replay's bookkeeping on hand-made inputs: admission, latency, agreement."""
import pytest

from mmdiag.replay.assemble import strategy_result
from mmdiag.replay.scheduler import Intake, RankOutcome
from mmdiag.trace import TraceStats
from conftest import make_trace


def test_closed_loop_admits_up_to_concurrency_and_starts_clocks_when_slots_free(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=6, rows=4, concurrency=2)
    it = Intake(trace, start=100.0, max_concurrency=2)
    first = it.admit(now=100.0, globally_held=0, held_at=100.0)
    assert [a for _, _, a in first] == [100.0, 100.0]
    assert it.admit(now=101.0, globally_held=0, held_at=101.0) == []  # both slots busy
    # One request done at 102.5: one slot, and the next request's clock starts then.
    third = it.admit(now=103.0, globally_held=1, held_at=102.5)
    assert [(idx, a) for idx, _, a in third] == [(2, 102.5)]
    it.close()


def test_byte_cap_holds_requests_back_without_hiding_their_wait(tmp_path):
    # 4 rows x 1176 x 4 bytes = 18,816 bytes per image request; cap at two of them.
    trace = make_trace(tmp_path / "t.jsonl", n=6, rows=4, concurrency=6, text_every=0)
    it = Intake(trace, start=0.0, max_concurrency=6, max_recv_bytes=2 * 18_816 * 2)
    a = it.admit(now=0.0, globally_held=0, held_at=0.0)
    b = it.admit(now=5.0, globally_held=0, held_at=0.0)
    assert it.cap_hits >= 1 and len(a) + len(b) <= 6
    # Held back by the cap, not by a slot: the clock started at 0, not at 5.
    assert all(arr == 0.0 for _, _, arr in b)
    it.close()


def test_open_loop_arrival_is_the_trace_offset(tmp_path):
    trace = make_trace(tmp_path / "t.jsonl", n=4, rows=2, rate=10.0)
    it = Intake(trace, start=50.0, max_concurrency=None)
    got = it.admit(now=50.25, globally_held=0, held_at=50.0)
    assert [round(a, 3) for _, _, a in got] == [50.0, 50.1, 50.2]
    it.close()


def _outcome(rank, holds, digest="d", invalid=0, arrivals=None):
    return RankOutcome(rank=rank, cpu_s=1.0, wall_s=2.0, phases_ms={}, iterations=3, loop_stall_ms={},
                       collectives=0, bytes_sent=0, recv_bytes=10, holds=holds, arrivals=arrivals or {},
                       digest=digest, held=len(holds), invalid=invalid)


def test_latency_is_until_the_last_rank_holds_and_throughput_spans_first_to_last():
    arrivals = {"a": (10.0, 0), "b": (10.5, 1)}
    outs = [_outcome(0, {"a": 10.1, "b": 10.6}, arrivals=arrivals), _outcome(1, {"a": 10.3, "b": 11.0})]
    s = strategy_result("revert", outs, {}, TraceStats(requests=2))
    assert round(s.latency_ms["max"], 3) == 500.0 and round(s.latency_ms["p50"], 3) == 400.0
    assert round(s.throughput_rps, 6) == round(2 / 1.0, 6)
    assert s.ranks_agree is True


def test_agreement_fails_on_different_digests_missing_holds_or_invalid_items():
    arrivals = {"a": (0.0, 0)}
    ok = _outcome(0, {"a": 1.0}, arrivals=arrivals)
    assert strategy_result("x", [ok, _outcome(1, {"a": 1.0}, digest="other")], {}, TraceStats()).ranks_agree is False
    assert strategy_result("x", [ok, _outcome(1, {})], {}, TraceStats()).ranks_agree is False
    assert strategy_result("x", [ok, _outcome(1, {"a": 1.0}, invalid=1)], {}, TraceStats()).ranks_agree is False


def test_the_tokenizer_stage_delays_its_own_request_but_overlaps_the_others(tmp_path):
    """Hashing before the scheduler (precompute, shm) runs between a request's send and the
    moment the scheduler sees it: its clock still starts at the send (latency includes it)."""
    trace = make_trace(tmp_path / "t.jsonl", n=3, rows=4, concurrency=1, text_every=0)
    it = Intake(trace, start=0.0, max_concurrency=1, tokenizer_s={0: 0.3, 1: 0.3, 2: 0.3})
    assert it.admit(now=0.0, globally_held=0, held_at=0.0) == []  # sent, still in the tokenizer
    assert it.next_arrival() == pytest.approx(0.3)  # the scheduler sleeps until then, no spinning
    (first,) = it.admit(now=0.3, globally_held=0, held_at=0.0)
    assert first[0] == 0 and first[2] == 0.0
    # concurrency 1: the next request is sent when the first is held (1.0), and hashed after that
    assert it.admit(now=1.2, globally_held=1, held_at=1.0) == []
    (second,) = it.admit(now=1.3, globally_held=1, held_at=1.0)
    assert second[0] == 1 and second[2] == 1.0
    it.close()
    # at concurrency 3 the tokenizer works on the next requests while the loop has the first
    it = Intake(trace, start=0.0, max_concurrency=3, tokenizer_s={0: 0.3, 1: 0.3, 2: 0.3})
    got = it.admit(now=0.6, globally_held=0, held_at=0.0)
    assert [idx for idx, _, _ in got] == [0, 1] and it.next_arrival() == pytest.approx(0.9)
    assert not it.exhausted
    it.admit(now=0.9, globally_held=0, held_at=0.0)
    assert it.exhausted
    it.close()


def test_throughput_is_the_lower_of_the_loop_and_the_tokenizer_stage():
    # one request held 0.1 s after it arrived: the loop alone would do 10 req/s
    outs = [_outcome(0, {"a": 0.1}, arrivals={"a": (0.0, 0)})]
    slow = {"tokenizer_hash": {0: 0.4}, "tokenizer_shm": {0: 0.1}}
    one = strategy_result("s", outs, slow, TraceStats(), workers=1)
    two = strategy_result("s", outs, slow, TraceStats(), workers=2)
    assert one.throughput_rps == pytest.approx(2.0) and two.throughput_rps == pytest.approx(1 / 0.3)  # hashing spreads over workers
    assert one.tokenizer_ms["loop_rps"] == 10.0
    assert strategy_result("s", outs, {}, TraceStats()).throughput_rps == 10.0


def test_a_replay_option_given_to_the_cli_or_to_torchrun_reaches_the_ranks_alike():
    """Options are declared once (ReplayOptions): `mmdiag replay`'s flags and a torchrun rank's
    command line are derived from its fields, so the same flags give the ranks the same job."""
    from dataclasses import asdict

    from mmdiag.cli.options import REPLAY_CLI
    from mmdiag.cli.replay_cmds import replay_cmd
    from mmdiag.replay.options import ReplayOptions, job_from_argv

    argv = ["--timeout", "5", "--forward-ms", "2.5", "--max-concurrency", "3", "--max-recv-mb", "8", "--repeat", "3",
            "--strategy", "batch", "--strategy", "cond", "--impl", "sglang", "--sglang", "/x/sglang",
            "--enable-broadcast-flag", "--transport", "shm"]
    params = replay_cmd.make_context("replay", ["t.jsonl", *argv]).params
    from_cli = ReplayOptions(**{n: list(params[n]) if n == "strategies" else params[n] for n in REPLAY_CLI})
    from_torchrun = job_from_argv(["t.jsonl", "--out", "run.json", *argv]).options
    given = {"timeout", "forward_ms", "max_concurrency", "max_recv_mb", "repeat", "strategies", "impl",
             "sglang_path", "enable_broadcast_flag", "transport"}
    cli, ranks = asdict(from_cli), asdict(from_torchrun)
    assert {k: cli[k] for k in given} == {k: ranks[k] for k in given}
    assert cli["max_recv_mb"] == 8.0 and cli["strategies"] == ["batch", "cond"] and cli["enable_broadcast_flag"]
