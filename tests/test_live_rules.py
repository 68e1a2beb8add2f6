"""Stack -> phase rules and the raw parser (fast, no processes)."""
from __future__ import annotations

import pytest

from mmdiag.live.errors import RawParseError
from mmdiag.live.pyspy import explain_ptrace, main_thread, parse_raw
from mmdiag.live.rules import Frame, load_rules, parse_rules
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
    assert rules.phase_of(S("Scheduler.from_processor_output")) == "from_dict"
    assert rules.phase_of(S("event_loop", "recv_requests", "_wait_for_arrivals")) == "idle"
    assert rules.phase_of(S("event_loop", "run_forward_step", "all_reduce")) == "forward"
    assert rules.phase_of(S("event_loop", "hold")) == "other"
    assert rules.phase_of(()) == "other"


def test_strategy_detection(rules):
    assert rules.strategy_of({"event_loop", "_process_and_broadcast_mm_inputs", "from_dict"}) == "commit"
    assert rules.strategy_of({"event_loop", "from_dict"}) == "revert"
    assert rules.strategy_of({"_async_broadcast_worker", "_process_and_broadcast_mm_inputs"}) == "async"
    assert rules.strategy_of({"event_loop"}) == "unknown"


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
