"""The live rules against real code: every name they use is defined in real source
(SGLang wheels, mmdiag's replay and patches, torch, pyzmq, the standard library),
each SGLang release family's frames (built from the wheel's own definitions)
land in the right phase, and stacks recorded with py-spy from running replay
ranks of every strategy, from the installed-SGLang path, and from a real zmq poll
loop are attributed as the profile must. A renamed function breaks a test here."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from live_sources import c10d_defs, local_defs, wheel_defs
from mmdiag.live.attribute import RankSamples, attribute, detect_strategy
from mmdiag.live.discover import discover
from mmdiag.live.pyspy import parse_raw
from mmdiag.live.rules import Frame, load_rules
from mmdiag.live.truth import snapshot
from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace
from mmdiag.vocab import STRATEGIES
from sglang_wheels import FAMILY_WHEELS, site_packages, wheel
from conftest import stop_group

PY = sys.executable
PYSPY = os.path.join(os.path.dirname(PY), "py-spy")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def _names(rules) -> set[str]:
    names: set[str] = set()
    for r in rules.rules:
        names |= r.functions
    for w in rules.waits:
        names |= w.functions
    for markers in rules.strategy_markers.values():
        for m in markers:
            for part in m.split("+"):
                if not part.startswith("phase:"):
                    names |= set(part.lstrip("!").split(">"))
    return names


def test_every_rule_name_is_defined_in_real_code(rules):
    defs = dict(local_defs())
    for v in FAMILY_WHEELS:
        for k, d in wheel_defs(str(wheel(v))).items():
            defs.setdefault(k, d)
    # A dataclass's __init__ is generated: its class must be defined.
    missing = sorted(n for n in _names(rules)
                     if n not in defs and not (n.endswith(".__init__") and n[: -len(".__init__")] in defs))
    assert not missing, f"rules.toml / live_markers name functions no real code defines: {missing}"


# --- each release family's own frames, from the wheel's definitions -------------------

def _chain(version: str, *names: str) -> tuple[Frame, ...]:
    """A root-first stack of the wheel's real definitions (torch's for c10d names)."""
    defs, c10d = wheel_defs(str(wheel(version))), c10d_defs()
    out = []
    for n in names:
        if n.startswith("c10d:"):
            d = c10d[n[5:]]
        elif n.endswith(".__init__"):  # a dataclass: generated __init__, compiled from <string>
            assert n[: -len(".__init__")] in defs, f"{n} not defined in sglang {version}"
            out.append(Frame(n, "<string>", 3))
            continue
        else:
            assert n in defs, f"{n} is not defined in sglang {version}'s scheduler path"
            d = defs[n]
        out.append(d.frame())
    return tuple(out)


LOOP = ("Scheduler.event_loop_normal", "Scheduler.process_input_requests")
RECV13 = ("Scheduler.event_loop_normal", "SchedulerRequestReceiver.recv_requests")
# (release, stack, phase, waiting): what a sample in these real frames must count as.
FAMILY_FRAMES = [
    ("0.5.4.post1", LOOP + ("Scheduler.handle_generate_request", "MultimodalInputs.from_dict",
                            "MultimodalDataItem.set_pad_value", "hash_feature", "data_hash"), "from_dict", False),
    ("0.5.5.post2", LOOP + ("Scheduler.handle_generate_request", "Scheduler._process_and_broadcast_mm_inputs",
                            "c10d:broadcast_object_list", "c10d:broadcast"), "broadcast", True),
    ("0.5.5.post2", ("Scheduler.event_loop_normal", "Scheduler.recv_requests", "broadcast_pyobj", "c10d:broadcast"),
     "recv", True),
    ("0.5.6", LOOP + ("Scheduler.handle_generate_request", "Scheduler._get_multimodal_inputs",
                      "MultimodalInputs.from_dict", "MultimodalDataItem.set_pad_value", "tensor_hash"), "from_dict", False),
    ("0.5.9", ("Scheduler.event_loop_normal", "Scheduler.recv_requests", "unwrap_shm_features"), "shm_map", False),
    ("0.5.9", ("Scheduler.event_loop_normal", "Scheduler.recv_requests", "broadcast_pyobj",
               "ShmPointerMMData.__setstate__"), "shm_open", False),
    ("0.5.13", RECV13 + ("SchedulerRequestReceiver._broadcast_reqs_across_ranks", "broadcast_pyobj", "c10d:broadcast"),
     "recv", True),
    ("0.5.13", RECV13 + ("SchedulerRequestReceiver._finalize_shm_features", "c10d:barrier"), "shm_sync", True),
    ("0.5.13", RECV13 + ("SchedulerRequestReceiver._finalize_shm_features", "unwrap_shm_features",
                         "ShmPointerMMData.materialize"), "shm_map", False),
    ("0.5.13", LOOP + ("Scheduler.handle_generate_request", "Scheduler._get_multimodal_inputs",
                       "MultimodalInputs.from_processor_output"), "from_dict", False),
    ("0.5.17", LOOP + ("Scheduler.handle_generate_request", "Scheduler._get_multimodal_inputs",
                       "MultimodalInputs.from_processor_output", "MultimodalDataItem.set_pad_value",
                       "hash_feature"), "from_dict", False),
    ("0.5.19", LOOP + ("Scheduler.handle_generate_request", "Scheduler._get_multimodal_inputs",
                       "Scheduler._process_and_broadcast_mm_inputs", "_MultimodalInputBroadcast.__init__"),
     "from_dict", False),
    ("0.5.19", LOOP + ("Scheduler.handle_generate_request", "Scheduler._get_multimodal_inputs",
                       "MultimodalInputs.from_processor_output", "MultimodalDataItem.set_pad_value",
                       "resolve_multimodal_item_hash"), "from_dict", False),
    # The tokenizer's hash pool (SGLANG_MM_PRECOMPUTE_HASH) calls the same hashing: the tokenizer's time.
    ("0.5.21", ("_set_pad_values", "MultimodalDataItem.set_pad_value", "resolve_multimodal_item_hash",
                "hash_feature", "data_hash"), "tokenizer_hash", False),
    ("0.5.23", LOOP + ("Scheduler.handle_generate_request", "Scheduler._handle_generate_request",
                       "Scheduler._get_multimodal_inputs", "MultimodalInputs.from_processor_output"),
     "from_dict", False),
    ("0.5.23", RECV13 + ("SchedulerRequestReceiver._finalize_shm_features", "c10d:all_reduce"), "shm_sync", True),
    # Polling the tokenizer's socket for requests on an idle server is waiting for work.
    ("0.5.23", RECV13 + ("sock_recv",), "idle", True),
    # The shared-memory message queue's sched_yield spin is waiting, not work.
    ("0.5.23", ("Scheduler.event_loop_normal", "MessageQueue.acquire_read"), "other", True),
]


@pytest.mark.parametrize("version,names,phase,waiting", FAMILY_FRAMES,
                         ids=[f"{v}-{n[-1]}" for v, n, _, _ in FAMILY_FRAMES])
def test_release_family_frames(rules, version, names, phase, waiting):
    assert rules.classify(_chain(version, *names)) == (phase, waiting)


@pytest.mark.parametrize("version,flag,path", [("0.5.5.post2", False, "commit"), ("0.5.23", False, "revert"),
                                               ("0.5.23", True, "commit"), ("0.5.23", False, "precompute")])
def test_release_family_path(rules, version, flag, path):
    """The path told from a release's frames: 17a57fd's broadcast as released, and on
    0.5.23 per-rank materialization unless the broadcast flag is on; with the hashes set in
    the tokenizer (SGLANG_MM_PRECOMPUTE_HASH) the ranks materialize without hashing."""
    materialize = ("MultimodalInputs.from_processor_output", "MultimodalDataItem.set_pad_value")
    tail = (("Scheduler._process_and_broadcast_mm_inputs", "c10d:broadcast_object_list", "c10d:broadcast")
            if flag or version == "0.5.5.post2" else
            materialize + (("resolve_multimodal_item_hash",) if path == "revert" else ()))
    head = LOOP + ("Scheduler.handle_generate_request",) + (("Scheduler._get_multimodal_inputs",)
                                                             if version != "0.5.5.post2" else ())
    from mmdiag.live.pyspy import ThreadSamples
    ranks = []
    for r in (0, 1):
        t = ThreadSamples(100 + r, "MainThread")
        t.stacks[_chain(version, *head, *tail)] += 10
        ranks.append(RankSamples(r, 100 + r, f"sglang::scheduler_TP{r}", {t.tid: t}))
    assert detect_strategy([attribute(x, rules) for x in ranks], rules) == path


# --- stacks recorded from running code ---------------------------------------------------

def _trace(path, n, rate, rows=500, seed=0):
    """rows: an int, or a tuple the requests take in turn (mixed sizes)."""
    rng, t, reqs = random.Random(seed), 0.0, []
    sizes = rows if isinstance(rows, tuple) else (rows,)
    for i in range(n):
        t += rng.expovariate(rate)
        reqs.append(TraceRequest(f"r{i:06d}", t, 64, (MMItem("image", (sizes[i % len(sizes)], 1176)),)))
    write_trace(str(path), TraceHeader(arrival={"mode": "poisson", "request_rate": rate}), iter(reqs))


def _start(args, env=None):
    return subprocess.Popen([PY, "-m", "mmdiag", "replay", *map(str, args), "-q", "--timeout", "30"],
                            env=dict(os.environ, **(env or {})), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _ranks(launcher, tp=2, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            d = discover(launcher.pid)
            if len(d.ranks) == tp:
                return d.ranks
        except Exception:
            pass
        assert launcher.poll() is None, "replay exited before its ranks appeared"
        time.sleep(0.1)
    raise AssertionError("replay ranks did not appear")


_stop = stop_group


def _record(ranks, seconds, tmp, tag) -> list[RankSamples]:
    """py-spy on every rank at once (as the profiler runs it), parsed."""
    procs, outs = [], []
    for r in ranks:
        out = tmp / f"{tag}-rank{r.rank}.raw"
        outs.append(out)
        procs.append(subprocess.Popen([PYSPY, "record", "-p", str(r.pid), "-f", "raw", "-o", str(out), "-r", "100",
                                       "-d", str(seconds), "--threads", "--idle", "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(timeout=seconds + 30)
    return [RankSamples(r.rank, r.pid, r.title, parse_raw(o.read_text(), str(o))) for r, o in zip(ranks, outs)
            if o.exists()]


def _gloo_leaf_is_wait(rules, samples: list[RankSamples]) -> int:
    """Every recorded stack whose innermost frame is a torch.distributed collective
    (where gloo waits) is classified waiting; returns how many such samples were seen."""
    seen = 0
    for s in samples:
        for t in s.threads.values():
            for stack, n in t.stacks.items():
                leaf = stack[-1] if stack else None
                if leaf and leaf.file.endswith("distributed/distributed_c10d.py") and leaf.short in (
                        "broadcast", "all_reduce", "barrier"):
                    assert rules.classify(stack)[1], stack
                    seen += n
    return seen


def test_replay_ranks_of_every_strategy(rules, tmp_path):
    """One replay runs every strategy in turn on the same ranks; each is recorded
    while it runs (the ranks' stats files say which) and must be recognised."""
    trace = tmp_path / "t.jsonl"
    _trace(trace, 48, 12.0)
    stats = tmp_path / "stats"
    stats.mkdir()
    launcher = _start([trace, "--tp", "2", "--strategy", "all"], env={"MMDIAG_STATS_DIR": str(stats)})
    detected, waits = {}, 0
    try:
        ranks = _ranks(launcher)
        for name in STRATEGIES:
            deadline = time.time() + 120
            while time.time() < deadline:
                cur = {d.get("strategy") for d in snapshot(str(stats)).values()}
                if cur == {name} or launcher.poll() is not None:
                    break
                time.sleep(0.05)
            if launcher.poll() is not None:
                break
            samples = _record(ranks, 2, tmp_path, name)
            if {d.get("strategy") for d in snapshot(str(stats)).values()} != {name}:
                continue  # the strategy ended inside the recording: not a clean sample of it
            detected[name] = detect_strategy([attribute(s, rules) for s in samples], rules)
            waits += _gloo_leaf_is_wait(rules, samples)
            if name == "commit":
                r1 = attribute(next(s for s in samples if s.rank == 1), rules)
                assert r1.wait_pct["broadcast"] > 0, r1.wait_pct  # rank 1 waits for rank 0 in the collective
                assert r1.wait_pct["broadcast"] <= r1.phases_pct["broadcast"]
    finally:
        _stop(launcher)
    # precompute runs revert's scheduler path with the hashing done before the scheduler: its
    # materialization is too short to be sure of a sample, but a sampled one never hashes.
    assert detected.pop("precompute", "unknown") in ("precompute", "unknown")
    # the replay's shm is precompute's scheduler path on mapped features: its marker is the
    # applied patch's receive (the shm_* phases name the transport, which any strategy runs on).
    assert detected.pop("shm", "unknown") in ("precompute", "unknown")
    assert len(detected) >= len(STRATEGIES) - 3, f"recorded only {sorted(detected)}"
    assert detected == {n: n for n in detected}
    assert waits > 0


# (release, flag, mmdiag patch applied, path). Mixed sizes (three of 1.9 MB, one of 4.7 MB) around
# cond's 2 MB threshold take both of its branches; precompute's and cond's patched code must not read as revert
# (the same materialization on every rank) or as dict (every rank materializing under 17a57fd's method).
INSTALLED = [("0.5.5.post2", False, None, "commit"), ("0.5.6", False, None, "revert"),
             ("0.5.6", False, "precompute", "precompute"), ("0.5.5.post2", False, "cond", "cond")]


@pytest.mark.parametrize("version,flag,patch,path", INSTALLED, ids=[f"{v}-{p or 'as-released'}" for v, _, p, _ in INSTALLED])
def test_installed_sglang_path(rules, tmp_path, version, flag, patch, path):
    """`replay --impl sglang` runs the wheel's own scheduler code in the ranks (patched by
    `mmdiag apply` where given)."""
    pkg = site_packages(version, tmp_path)
    if patch:
        extra = ["--threshold", "2M"] if patch == "cond" else []
        r = subprocess.run([PY, "-m", "mmdiag", "apply", patch, "--sglang", str(pkg), "--yes", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    trace = tmp_path / "t.jsonl"
    _trace(trace, 60, 12.0, rows=(400, 400, 400, 1000) if patch == "cond" else 500)
    args = [trace, "--tp", "2", "--impl", "sglang", "--sglang", pkg] + (["--enable-broadcast-flag"] if flag else [])
    launcher = _start(args)
    try:
        ranks = _ranks(launcher)
        time.sleep(1.5)
        samples = _record(ranks, 3, tmp_path, "sg")
    finally:
        _stop(launcher)
    profiles = [attribute(s, rules) for s in samples]
    detected = detect_strategy(profiles, rules)
    if patch == "precompute" and detected == "unknown":
        # As in a server, the hashing runs before the scheduler (the replay hashes before its
        # window), so the ranks' only work in the wheel's code is a materialization with no
        # hashing, too short to be sure of a sample; a sampled one must read as precompute.
        return
    assert detected == path
    frames = {(f.name, f.file) for s in samples for t in s.threads.values() for st in t.stacks for f in st}
    assert any(f.startswith("sglang/") or "/sglang/" in f for _, f in frames), \
        f"no frame of the wheel's own code: {sorted(frames)[:40]}"
    _gloo_leaf_is_wait(rules, samples)


ZMQ_POLL = """
import sys, time, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.PULL)
sock.bind(sys.argv[1])

class Receiver:
    def recv_requests(self):
        reqs = []
        while True:
            try:
                reqs.append(sock.recv_pyobj(zmq.NOBLOCK))
            except zmq.ZMQError:
                return reqs

r = Receiver()
end = time.time() + 30
while time.time() < end:
    r.recv_requests()
"""


def test_zmq_poll_spin_is_waiting_for_work(rules, tmp_path):
    """A loop polling a real zmq socket with NOBLOCK (as SGLang's receiver does on an
    idle server) spins at full CPU; py-spy sees it in pyzmq's frames: idle, waiting."""
    pytest.importorskip("zmq")
    p = subprocess.Popen([PY, "-c", ZMQ_POLL, f"ipc://{tmp_path}/poll.sock"])
    try:
        time.sleep(1.5)
        out = tmp_path / "z.raw"
        subprocess.run([PYSPY, "record", "-p", str(p.pid), "-f", "raw", "-o", str(out), "-r", "100", "-d", "2",
                        "--threads", "--idle", "--nonblocking"], check=True, capture_output=True, timeout=60)
    finally:
        p.kill()
        p.wait()
    rs = RankSamples(0, p.pid, "poll", parse_raw(out.read_text(), str(out)))
    prof = attribute(rs, rules)
    in_zmq = sum(n for t in rs.threads.values() for st, n in t.stacks.items()
                 if any(f.file.endswith(("zmq/sugar/socket.py", "zmq/error.py")) for f in st))
    assert in_zmq / prof.samples > 0.3, "the poll loop was not sampled in pyzmq"
    assert prof.wait_pct["idle"] >= 100.0 * in_zmq / prof.samples - 0.5
    assert prof.phases_pct["idle"] > prof.phases_pct["recv"]
