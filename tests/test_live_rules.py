"""Stack -> phase rules and the raw parser (fast, no processes)."""
from __future__ import annotations

import math

import pytest

from mmdiag.live.errors import RawParseError
from mmdiag.live.pyspy import explain_ptrace, main_thread, parse_raw
from mmdiag.live.rules import Frame, load_rules, parse_rules
from mmdiag.live.stats import sampling_hw
from mmdiag.live.errors import LiveError


def S(*names):
    return tuple(Frame(n, "x.py", 1) for n in names)


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def test_receive_broadcast_is_not_the_strategy_broadcast(rules):
    recv = S("event_loop", "ReplayScheduler.recv_requests", "broadcast_pyobj", "wrapper", "broadcast")
    strat = S("event_loop", "handle_generate_request", "_process_and_broadcast_mm_inputs", "wrapper",
              "broadcast_object_list", "wrapper", "broadcast")
    assert rules.phase_of(recv) == "recv"
    assert rules.phase_of(strat) == "broadcast"


def test_pickle_unpickle_and_tensor_frames_by_context(rules):
    assert rules.phase_of(S("_process_and_broadcast_mm_inputs", "broadcast_object_list", "_object_to_tensor_timed",
                            "_object_to_tensor", "Tensor.__reduce_ex__")) == "pickle"
    assert rules.phase_of(S("broadcast_object_list", "_tensor_to_object")) == "unpickle"
    assert rules.phase_of(S("broadcast_object_list", "_rebuild_tensor_v2")) == "unpickle"
    # The same rebuild frame under the receive broadcast is `recv` (pickle.loads of the request list).
    assert rules.phase_of(S("recv_requests", "broadcast_pyobj", "_rebuild_tensor_v2")) == "recv"


def test_materialization_idle_forward_other(rules):
    assert rules.phase_of(S("handle_generate_request", "MultimodalInputs.from_dict",
                            "MultimodalDataItem.set_pad_value", "hash_feature", "tensor_hash", "data_hash")) == "from_dict"
    assert rules.phase_of(S("_process_and_broadcast_mm_inputs", "MultimodalInputs.from_dict")) == "from_dict"
    assert rules.phase_of(S("MultimodalInputs.from_processor_output")) == "from_dict"
    assert rules.phase_of(S("event_loop", "recv_requests", "_wait_for_arrivals")) == "idle"
    assert rules.phase_of(S("event_loop", "run_forward_step", "all_reduce")) == "forward"
    assert rules.phase_of(S("event_loop", "hold")) == "other"
    assert rules.phase_of(()) == "other"


def F(name, file):
    return Frame(name, file, 1)


def test_materialization_only_sglang_and_replay_functions(rules):
    sb = "sglang/srt/managers/schedule_batch.py"
    mu = "/usr/lib/python3.11/site-packages/sglang/srt/managers/mm_utils.py"
    assert rules.phase_of((F("handle_generate_request", "scheduler.py"), F("from_dict", sb))) == "from_dict"
    assert rules.phase_of((F("from_dict", sb), F("set_pad_value", sb), F("hash_feature", mu),
                           F("data_hash", mu))) == "from_dict"
    assert rules.phase_of((F("run", "w.py"), F("from_dict", "/work/main/mmdiag/mmpath/items.py"))) == "from_dict"
    assert rules.phase_of((F("run", "w.py"), F("MultimodalInputs.from_dict", "elsewhere.py"))) == "from_dict"
    # Someone else's from_dict / data_hash (a config loader, a cache key) is not materialization.
    assert rules.phase_of((F("load", "app.py"), F("from_dict", "transformers/configuration_utils.py"))) == "other"
    assert rules.phase_of((F("load", "app.py"), F("Config.from_dict", "app/config.py"))) == "other"
    assert rules.phase_of((F("key", "app.py"), F("data_hash", "app/cache.py"))) == "other"


def test_strategy_detection(rules):
    bol = "broadcast_object_list"
    assert rules.strategy_of({"event_loop", "_process_and_broadcast_mm_inputs", "from_dict", bol}) == "commit"
    # The name alone (a reverted / precompute-patched server keeps it) is not the 17a57fd broadcast.
    assert rules.strategy_of({"event_loop", "_process_and_broadcast_mm_inputs", "from_dict",
                              "phase:from_dict", "hash_feature"}) == "revert"
    assert rules.strategy_of({"event_loop", "from_dict", "phase:from_dict", "data_hash"}) == "revert"
    # Materialization that never hashes (the tokenizer set every hash), or the tokenizer's hashing.
    assert rules.strategy_of({"event_loop", "from_dict", "phase:from_dict"}) == "precompute"
    assert rules.strategy_of({"event_loop", "phase:tokenizer_hash", "phase:from_dict", "hash_feature"}) == "precompute"
    assert rules.strategy_of({"event_loop", "from_dict"}) == "unknown"  # not SGLang's from_dict
    assert rules.strategy_of({"_async_broadcast_worker", "_process_and_broadcast_mm_inputs"}) == "async"
    assert rules.strategy_of({"_broadcast_raw_mm_inputs", bol}) == "dict"
    assert rules.strategy_of({"_batch_process_mm_inputs", bol}) == "batch"
    assert rules.strategy_of({"event_loop"}) == "unknown"


def _patched_rank(rank, title, *stacks):
    from mmdiag.live.attribute import RankSamples
    from mmdiag.live.pyspy import ThreadSamples
    t = ThreadSamples(100 + rank, "MainThread")
    for st in stacks:
        t.stacks[S(*st)] += 10
    return RankSamples(rank, 100 + rank, title, {t.tid: t})


def _detect(rules, *ranks):
    from mmdiag.live.attribute import attribute, detect_strategy
    return detect_strategy([attribute(r, rules) for r in ranks], rules)


def test_strategy_of_servers_patched_by_mmdiag(rules):
    """The names mmdiag's SGLang patches leave on the stacks (mmdiag/sglang/patches/)."""
    pb, bol = "_process_and_broadcast_mm_inputs", "broadcast_object_list"
    sched = ("event_loop_normal", "process_input_requests", "handle_generate_request")
    # 17a57fd as released: entry rank materializes and broadcasts, the others wait in the broadcast.
    commit = [_patched_rank(0, "sglang::scheduler_TP0", sched + (pb, "MultimodalInputs.from_dict"),
                            sched + (pb, bol)),
              _patched_rank(1, "sglang::scheduler_TP1", sched + (pb, bol, "broadcast"))]
    assert _detect(rules, *commit) == "commit"
    # dict patch: the same method name, but every rank runs from_dict under it after the broadcast.
    dict_ = [_patched_rank(0, "sglang::scheduler_TP0", sched + (pb, bol)),
             _patched_rank(1, "sglang::scheduler_TP1", sched + (pb, bol, "broadcast"),
                           sched + (pb, "MultimodalInputs.from_dict"))]
    assert _detect(rules, *dict_) == "dict"
    # batch patch: one broadcast per call in _mmdiag_batch_prepare.
    batch = [_patched_rank(r, f"sglang::scheduler_TP{r}",
                           ("event_loop_normal", "process_input_requests", "_mmdiag_batch_prepare", bol),
                           sched + (pb, "MultimodalInputs.from_dict")) for r in (0, 1)]
    assert _detect(rules, *batch) == "batch"
    # revert / precompute patches: the method keeps its name but enters no collective; with
    # precompute no rank hashes under it.
    revert = [_patched_rank(r, f"sglang::scheduler_TP{r}", sched + (pb, "MultimodalInputs.from_dict",
                                                                    "MultimodalDataItem.set_pad_value", "hash_feature"))
              for r in (0, 1)]
    assert _detect(rules, *revert) == "revert"
    precompute = [_patched_rank(r, f"sglang::scheduler_TP{r}", sched + (pb, "MultimodalInputs.from_dict",
                                                                        "MultimodalDataItem.set_pad_value"))
                  for r in (0, 1)]
    assert _detect(rules, *precompute) == "precompute"
    # shm patch: every rank maps its segments in the wrapped receive, then materializes unhashed.
    shm = [_patched_rank(r, f"sglang::scheduler_TP{r}",
                         ("event_loop_normal", "recv_requests", "_mmdiag_shm_finalize", "_mmdiag_shm_map"),
                         sched + (pb, "MultimodalInputs.from_dict")) for r in (0, 1)]
    assert _detect(rules, *shm) == "shm"
    # cond patch: below the threshold every rank materializes in the patch's own method (as dict
    # would under 17a57fd's), above it the entry rank broadcasts.
    cond = [_patched_rank(0, "sglang::scheduler_TP0", sched + (pb, bol),
                          sched + (pb, "_mmdiag_cond_below_threshold", "MultimodalInputs.from_dict")),
            _patched_rank(1, "sglang::scheduler_TP1", sched + (pb, bol, "broadcast"),
                          sched + (pb, "_mmdiag_cond_below_threshold", "MultimodalInputs.from_dict"))]
    assert _detect(rules, *cond) == "cond"
    # With DP, each DP group's TP0 is an entry rank: its from_dict does not make it `dict`.
    dp = [_patched_rank(2, "sglang::scheduler_DP1_TP0", sched + (pb, "MultimodalInputs.from_dict"),
                        sched + (pb, bol)),
          _patched_rank(3, "sglang::scheduler_DP1_TP1", sched + (pb, bol, "broadcast"))]
    assert _detect(rules, *dp) == "commit"


def test_missing_gil_recording_is_not_zero(rules):
    from mmdiag.live.profile import build_run
    rs = _patched_rank(0, "rank0.raw", ("event_loop", "run_forward_step"))
    run = build_run([rs], rules, None, None, {"source": "raw", "rate_hz": 100}, [])
    assert run.ranks[0].profile.gil_held_pct is None and run.ranks[0].profile.gil_wait_pct is None
    rs.gil_threads = {}  # a --gil recording with no sample holding the GIL: measured 0
    run = build_run([rs], rules, None, None, {"source": "raw", "rate_hz": 100}, [])
    assert run.ranks[0].profile.gil_held_pct == 0.0


def _blocks(n_blocks, with_gil):
    """n_blocks of 100 main-thread samples (half forward, half idle); the first
    `with_gil` have a --gil recording in which forward held the GIL."""
    from mmdiag.live.pyspy import ThreadSamples
    out = []
    for k in range(n_blocks):
        t = ThreadSamples(7, "MainThread")
        t.stacks[S("event_loop", "run_forward_step")] += 50
        t.stacks[S("event_loop", "recv_requests", "_wait_for_arrivals")] += 50
        g = ThreadSamples(7, "MainThread")
        g.stacks[S("event_loop", "run_forward_step")] += 50
        out.append(({7: t}, {7: g} if k < with_gil else None))
    return out


def test_gil_figures_from_the_blocks_that_have_them(rules):
    """A block whose --gil file py-spy never wrote leaves that block out of the GIL
    figures (not the whole rank); too few such blocks: not measured, and the Run says why."""
    from mmdiag.live.attribute import MIN_GIL_COVER, RankSamples
    from mmdiag.live.profile import build_run
    live = {"source": "raw", "rate_hz": 100}
    whole = build_run([RankSamples.from_blocks(0, 7, "r0", _blocks(4, 4))], rules, None, None, live, [], gil=True)
    assert whole.ranks[0].profile.gil_held_pct == 50.0 and whole.live.gil_missing == []
    assert not any("--gil" in n for n in whole.live.notes)
    part = build_run([RankSamples.from_blocks(0, 7, "r0", _blocks(4, 3))], rules, None, None, live, [], gil=True)
    p = part.ranks[0].profile
    assert p.samples == 400 and p.gil_held_pct == 50.0 and p.phase_gil_pct["forward"] == 100.0
    assert part.live.gil_missing == [] and any("wrote 3 of its 4 blocks (300 of 400" in n for n in part.live.notes)
    few = int(4 * MIN_GIL_COVER) - 1
    low = build_run([RankSamples.from_blocks(0, 7, "r0", _blocks(4, few))], rules, None, None, live, [], gil=True)
    assert low.ranks[0].profile.gil_held_pct is None and low.ranks[0].profile.gil_wait_pct is None
    assert low.live.gil_missing == [0]
    d = low.to_dict()["live"]
    assert any(f"wrote {few} of its 4 blocks" in n and "too few" in n for n in d["notes"]), d["notes"]
    # --gil on every other block by design (sampler.GIL_EVERY): measured from those, no note.
    half = build_run([RankSamples.from_blocks(0, 7, "r0", _blocks(4, 2), gil_planned=2)], rules, None, None, live, [],
                     gil=True)
    assert half.ranks[0].profile.gil_held_pct == 50.0 and not any("--gil" in n for n in half.live.notes)
    assert any("not measured (shown as -), not 0%" in n for n in d["notes"])


def test_cli_json_write_failure_is_one_line(tmp_path, monkeypatch):
    import errno as _errno

    from click.testing import CliRunner

    from mmdiag import fileio
    from mmdiag.cli import main

    f = tmp_path / "rank0.raw"
    f.write_text("thread (1): MainThread;main (x.py:1);run_forward_step (x.py:2) 30\n")

    def full(path, text):
        raise OSError(_errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "write_text_atomic", full)
    r = CliRunner().invoke(main, ["profile", "--from-raw", str(f), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("mmdiag: error: ")]
    assert errors == [f"mmdiag: error: --json {tmp_path / 'p.json'}: cannot write the Run (No space left on device); "
                      "the profile is shown above; free space or choose another path"], r.output


def test_bad_rules_file():
    with pytest.raises(LiveError, match="phase 'nope'"):
        parse_rules('[[rule]]\nphase = "nope"\nfunctions = ["x"]\n')


def test_parse_raw():
    text = ("thread (7447): MainThread;<module> (w.py:1);recv_requests (s.py:2) 5\n"
            "thread (7447): MainThread;<module> (w.py:1);run_forward_step (s.py:9) 3\n"
            "thread (7450): mm-broadcaster;run (t.py:3) 4\n"
            "thread (0x7f00aa);<module> (<string>:4) 2\n")
    th = parse_raw(text, "t")
    assert th[7447].samples == 8 and th[7447].name == "MainThread"
    assert th[0x7f00aa].samples == 2
    assert main_thread(th).tid == 7447
    assert list(th[7447].stacks)[0][-1] == Frame("recv_requests", "s.py", 2)
    with pytest.raises(RawParseError, match="line 1"):
        parse_raw("garbage\n", "t", "0.9.9")
    with pytest.raises(RawParseError, match="py-spy 0.9.9"):
        parse_raw("garbage\n", "t", "0.9.9")


def test_explain_ptrace():
    other = explain_ptrace(1, ptrace_scope="0", my_uid=1000, target_uid=0, cap=False, container=False)
    assert "uid 0" in other and "uid 1000" in other and "sudo" in other
    scope = explain_ptrace(1, ptrace_scope="1", my_uid=1000, target_uid=1000, cap=False, container=False)
    assert "ptrace_scope is 1" in scope and "sysctl kernel.yama.ptrace_scope=0" in scope
    box = explain_ptrace(1, ptrace_scope=None, my_uid=0, target_uid=0, cap=False, container=True)
    assert "CAP_SYS_PTRACE" in box and "--cap-add SYS_PTRACE" in box


def test_a_socket_poll_waits_but_unpickling_what_it_received_is_work(rules):
    """Up to 0.5.9 the entry rank's recv_pyobj unpickles each request, features included:
    blocked in the socket call it waits for work (idle), inside _deserialize it works (recv)."""
    sock = "/usr/lib/python3/site-packages/zmq/sugar/socket.py"
    sched = (F("event_loop_normal", "sglang/srt/managers/scheduler.py"),
             F("recv_requests", "sglang/srt/managers/scheduler.py"), F("Socket.recv_pyobj", sock))
    assert rules.classify(sched) == ("idle", True)
    assert rules.classify(sched + (F("Socket._deserialize", sock),)) == ("recv", False)
    assert rules.classify(sched + (F("Socket._deserialize", sock), F("_rebuild_tensor_v2", "torch/_utils.py"))) \
        == ("recv", False)


def test_non_entry_wait_behind_idle_entry_is_idle(rules):
    from mmdiag.live.profile import build_run
    r0 = _patched_rank(0, "mmdiag::scheduler_TP0", ("event_loop", "recv_requests", "_wait_for_arrivals"),
                       ("event_loop", "run_forward_step"))
    r1 = _patched_rank(1, "mmdiag::scheduler_TP1", ("event_loop", "recv_requests", "broadcast_pyobj"),
                       ("event_loop", "run_forward_step"))
    gloo = Frame("broadcast", "torch/distributed/distributed_c10d.py", 1)
    (t1,) = r1.threads.values()
    t1.stacks = type(t1.stacks)({(st + (gloo,) if "broadcast_pyobj" in [f.name for f in st] else st): n
                                 for st, n in t1.stacks.items()})  # the gloo wait under broadcast_pyobj
    run = build_run([r0, r1], rules, None, None, {"source": "raw", "rate_hz": 100}, [])
    a, b = run.ranks
    assert a.profile.phases_pct["idle"] == 50.0 and a.profile.phases_pct["recv"] == 0.0
    assert b.profile.phases_pct["idle"] == 50.0 and b.profile.phases_pct["recv"] == 0.0
    # The moved share brings the entry rank's uncertainty, added in quadrature to rank 1's own.
    own_recv = 100.0 * sampling_hw(0.5, b.profile.samples)   # half its samples waited in broadcast_pyobj
    assert a.profile.phases_ci["idle"] > 0
    assert b.profile.phases_ci["idle"] == pytest.approx(a.profile.phases_ci["idle"], abs=0.02)
    assert b.profile.phases_ci["recv"] == pytest.approx(math.hypot(own_recv, a.profile.phases_ci["idle"]), abs=0.02)
    from mmdiag.analysis.findings import findings
    assert any("counted as idle, not recv" in f for f in findings(run))


def test_markers_are_the_strategy_modules_own():
    """rules.py reads each strategy's live_markers from its source (no torch import):
    the same as the classes say, and every path the rules detect is a strategy."""
    from mmdiag.live.rules import strategy_markers
    from mmdiag.strategies import REGISTRY
    read = strategy_markers()
    assert set(read) == set(REGISTRY)
    for name, cls in REGISTRY.items():
        if "live_markers" in vars(cls):
            assert read[name] == tuple(cls.live_markers), name
    order = load_rules().strategy_order
    assert set(order) <= set(REGISTRY) and all(read[n] for n in order)


def test_shared_memory_frames(rules):
    """SGLang's shared-memory frames, the `shm` patch's and the replay transport's get the shm phases."""
    recv = ("event_loop_normal", "recv_requests")
    for fin in ("_finalize_shm_features", "_mmdiag_shm_finalize"):
        assert rules.classify(S(*recv, fin, "barrier")) == ("shm_sync", False)  # "x.py": not torch's wait
    assert rules.phase_of(S(*recv, "_finalize_shm_features", "unwrap_shm_features",
                            "ShmPointerMMData.materialize")) == "shm_map"
    assert rules.phase_of(S(*recv, "_mmdiag_shm_finalize", "_mmdiag_shm_open")) == "shm_open"
    assert rules.phase_of(S(*recv, "broadcast_pyobj", "ShmPointerMMData.__setstate__")) == "shm_open"
    assert rules.phase_of(S(*recv, "broadcast_pyobj")) == "recv"
    # tokenizer side: the patch hashes, then writes; 0.5.10+ writes in ShmPointerMMData.__init__
    export = ("_tokenize_one_request", "_mmdiag_shm_export")
    assert rules.phase_of(S(*export, "set_pad_value", "hash_feature", "data_hash")) == "tokenizer_hash"
    assert rules.phase_of(S(*export, "_mmdiag_shm_write", "copy_")) == "tokenizer_shm"
    assert rules.phase_of(S("wrap_shm_features", "ShmPointerMMData.__init__")) == "tokenizer_shm"
    # the replay's transport, in mmdiag's own files
    mm = lambda name, f: Frame(name, f"/x/mmdiag/mmpath/{f}", 1)  # noqa: E731
    deliver = (Frame("run", "x.py", 1), mm("ShmTransport.deliver", "transport.py"))
    assert rules.phase_of(deliver + (mm("open_segment", "shm.py"),)) == "shm_open"
    assert rules.phase_of(deliver + (mm("map_segment", "shm.py"),)) == "shm_map"
    assert rules.phase_of(deliver) == "shm_sync"
    assert rules.phase_of((mm("ShmTransport.encode", "transport.py"), mm("write_segment", "shm.py"))) == "tokenizer_shm"


def test_tokenizer_side_waits_and_work(rules):
    """The tokenizer side (mmdiag.live.stages): its event loop waiting in the selector, or under
    uvloop with nothing above asyncio's runner, waits for work; a coroutine running above the
    runner works; a hash pool thread waits in its worker and hashes in _set_pad_values; the
    segment write is tokenizer_shm."""
    aio = "/usr/lib/python3.11/asyncio/"
    loop = (F("main", "sglang/launch_server.py"), F("run", aio + "runners.py"), F("Runner.run", aio + "runners.py"))
    assert rules.classify(loop) == ("idle", True)          # uvloop: the loop itself runs in C
    sel = loop + (F("BaseEventLoop.run_until_complete", aio + "base_events.py"),
                  F("BaseEventLoop._run_once", aio + "base_events.py"),
                  F("_PollLikeSelector.select", "/usr/lib/python3.11/selectors.py"))
    assert rules.classify(sel) == ("idle", True)
    mm = "sglang/srt/managers/mm_utils.py"
    work = loop + (F("TokenizerManager._send_one_request", "sglang/srt/managers/tokenizer_manager.py"),
                   F("wrap_shm_features", mm), F("_wrap_shm_or_inline", mm), F("ShmPointerMMData.__init__", mm))
    assert rules.classify(work) == ("tokenizer_shm", False)
    assert rules.classify(loop + (F("TokenizerManager._tokenize_one_request", "x.py"),))[1] is False
    th = "/usr/lib/python3.11/threading.py"
    worker = (F("Thread._bootstrap", th), F("Thread.run", th), F("_worker", "/usr/lib/python3.11/concurrent/futures/thread.py"))
    assert rules.classify(worker) == ("idle", True)
    hashing = worker + (F("_WorkItem.run", "concurrent/futures/thread.py"),
                        F("_set_pad_values", "sglang/srt/multimodal/processors/hash_executor.py"),
                        F("MultimodalDataItem.set_pad_value", "sglang/srt/managers/schedule_batch.py"),
                        F("hash_feature", mm), F("tensor_hash", mm))
    assert rules.classify(hashing) == ("tokenizer_hash", False)
