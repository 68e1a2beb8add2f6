"""A whole server to profile: a real release's code on both sides, in real processes titled
like SGLang's, each with its own phase timers (issue 22's proof target).

    python tests/whole_server_target.py --sglang PKG --tp 2 --rate 12 --stats DIR [--rows 1000]

The main process plays the server's TokenizerManager with the release's own tokenizer-side
code (PKG: an unpacked 0.5.21+ wheel; 0.5.23 is the one tested): each Poisson arrival is
preprocessed (an image normalized to a float32 feature: the processor's part), hashed by
the release's SGLANG_MM_PRECOMPUTE_HASH statement in its MultimodalHashExecutor pool
(threads sglang-mm-hash_N), wrapped by its wrap_shm_features (ShmPointerMMData writes a
/dev/shm segment named by make_shm_name) and sent over zmq, as the release does. Its
children, titled sglang::scheduler_TP{r}, run the release's receive path: the entry rank
polls and unpickles, broadcast_pyobj hands the requests to every rank of a gloo group,
SchedulerRequestReceiver._finalize_shm_features (barrier, unwrap_shm_features ->
materialize, all_reduce) and process_input_requests (from_processor_output), then a
forward stand-in (run_forward_step: a sleep). Release code is taken out of the wheel's
files by mmdiag.sglang.runtime (never imported as sglang); the stand-ins are only for what
needs a GPU server (its parallel state, the model step).

Timers (DIR): rank{r}.json as mmdiag.live.truth reads them (a non-entry rank's wait in the
broadcast while the entry rank idled is idle, per iteration, as the replay counts it), and
tokenizer.json: per server (main thread, hash pool) seconds per phase, its threads, and the
requests sent. Each file is rewritten a few times a second.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time

import torch

STOP = "__stop__"
WRITE_EVERY_S = 0.25


def _write(path: str, d: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, path)


def load_release(pkg: str, tp_group=None):
    """The release's mm path (mmdiag.sglang.runtime) plus its shared-memory transport (the real
    ShmPointerMMData, its wrap / unwrap functions and _finalize_shm_features), segments named
    as the release names them (what the whole-server profile counts)."""
    from mmdiag.sglang import runtime as rt

    path = rt.load_sglang_mm_path(pkg)
    path.shm_transport(tp_group)
    return path


class Timers:
    def __init__(self):
        self.s: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, k: str, dt: float) -> None:
        with self.lock:
            self.s[k] = self.s.get(k, 0.0) + dt


def _timed(fn, timers: Timers, key: str):
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers.add(key, time.perf_counter() - t0)
    return timed


# ---------------------------------------------------------------- scheduler ranks
def run_forward_step(ms: float) -> None:
    """The model step's stand-in (mmdiag's replay name): no GPU here."""
    time.sleep(ms / 1000.0)


def rank_main(r: int, tp: int, port: int, zmq_addr: str, pkg: str, stats: str, forward_ms: float) -> None:
    import setproctitle
    import zmq
    setproctitle.setproctitle(f"sglang::scheduler_TP{r}")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=tp)
    group = torch.distributed.new_group(backend="gloo")
    path = load_release(pkg, group)
    ns, T = path.ns, Timers()
    shm = ns["ShmPointerMMData"]
    shm.__setstate__ = _timed(shm.__setstate__, T, "shm_open")
    ns["unwrap_shm_features"] = _timed(ns["unwrap_shm_features"], T, "shm_map")
    sched = path.make_scheduler(group)
    receive = path.shm_transport().receive  # its _finalize_shm_features
    sock = poller = None
    if r == 0:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.connect(zmq_addr)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
    ph = {k: 0.0 for k in ("idle", "recv", "shm_open", "shm_sync", "shm_map", "from_dict", "forward")}
    next_write = 0.0
    while True:
        opened0, mapped0 = T.s.get("shm_open", 0.0), T.s.get("shm_map", 0.0)
        t0 = time.perf_counter()
        obj = None
        if r == 0:
            poller.poll(50)
            t1 = time.perf_counter()
            reqs = []
            while True:
                try:
                    reqs.append(sock.recv_pyobj(zmq.NOBLOCK))
                except zmq.ZMQError:
                    break
            obj = [t1 - t0, reqs]
        tb = time.perf_counter()
        obj = path.broadcast_pyobj(obj, group)
        tb1 = time.perf_counter()
        e_idle, reqs = obj
        if r == 0:
            ph["idle"] += e_idle
            recv = tb1 - (t0 + e_idle)
        else:  # waiting in the broadcast while the entry rank idled is idle (the replay's per-iteration min)
            moved = min(tb1 - tb, e_idle)
            ph["idle"] += moved
            recv = tb1 - tb - moved
        opened = T.s.get("shm_open", 0.0) - opened0
        ph["recv"] += recv - opened
        ph["shm_open"] += opened
        if STOP in reqs:
            break
        if reqs:
            t2 = time.perf_counter()
            receive(reqs)
            mapped = T.s.get("shm_map", 0.0) - mapped0
            ph["shm_map"] += mapped
            ph["shm_sync"] += time.perf_counter() - t2 - mapped
            f0 = path.stats.from_dict_s
            path.process_input_requests(sched, reqs)
            ph["from_dict"] += path.stats.from_dict_s - f0
            t3 = time.perf_counter()
            run_forward_step(forward_ms)
            ph["forward"] += time.perf_counter() - t3
        now = time.time()
        if now >= next_write:
            _write(os.path.join(stats, f"rank{r}.json"), {"rank": r, "time": now, "strategy": "shm",
                                                           "phases_ms": {k: v * 1000.0 for k, v in ph.items()}})
            next_write = now + WRITE_EVERY_S


# ---------------------------------------------------------------- the tokenizer side
async def tokenizer_main(path, sock, rate: float, rows: int, stats: str, seed: int) -> None:
    ns, T = path.ns, Timers()
    started: dict[int, float] = {}   # pool thread -> when it first ran (the pool starts threads on demand)
    hash_items = _timed(ns["_set_pad_values"], T, "pool_hash")

    def _set_pad_values(items):
        started.setdefault(threading.get_ident(), time.time())
        return hash_items(items)
    ns["_set_pad_values"] = _set_pad_values
    loop = asyncio.get_running_loop()
    loop._selector.select = _timed(loop._selector.select, T, "idle")
    rng = random.Random(seed)
    image = torch.randint(0, 256, (rows, 1176), dtype=torch.uint8)
    sent = 0

    async def one(i: int) -> None:
        nonlocal sent
        t0 = time.perf_counter()
        img = image.clone()
        img[0, 0] = i % 256
        img[0, 1] = (i // 256) % 256
        feature = (img.to(torch.float32) / 255.0 - 0.5) / 0.5  # the processor's normalization
        mm = path.make_mm_inputs([path.make_item(feature)])
        T.add("other", time.perf_counter() - t0)
        await path._release_step(path._tm_self, mm)  # SGLANG_MM_PRECOMPUTE_HASH: the release's pool
        t1 = time.perf_counter()
        req = ns["wrap_shm_features"](path.generate_req(f"r{i:06d}", mm))
        t2 = time.perf_counter()
        sock.send_pyobj(req)
        T.add("tokenizer_shm", t2 - t1)
        T.add("other", time.perf_counter() - t2)
        sent += 1

    async def writer() -> None:
        pool = path._tm_self.mm_processor.hash_executor._executor
        while True:
            s = dict(T.s)
            _write(os.path.join(stats, "tokenizer.json"), {
                "time": time.time(), "requests": sent, "pid": os.getpid(),
                "servers": {"main thread": {"threads": 1, "phases_s": {
                    "tokenizer_shm": s.get("tokenizer_shm", 0.0), "idle": s.get("idle", 0.0)}},
                    "hash pool": {"threads": max(1, len(pool._threads)), "started": sorted(started.values()),
                                  "phases_s": {"tokenizer_hash": s.get("pool_hash", 0.0)}}}})
            await asyncio.sleep(WRITE_EVERY_S)

    asyncio.ensure_future(writer())
    tasks, i = set(), 0
    while True:
        await asyncio.sleep(rng.expovariate(rate))
        t = asyncio.ensure_future(one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglang", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--rows", type=int, default=1000, help="feature rows of 1176 float32 (1000: 4.7 MB)")
    ap.add_argument("--forward-ms", type=float, default=2.0)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import zmq
    os.environ["SGLANG_MM_PRECOMPUTE_HASH"] = "1"  # the tokenizer hashes (0.5.21+: in its pool)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    zport = sock.bind_to_random_port("tcp://127.0.0.1")
    import socket as _s
    with _s.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn = mp.get_context("spawn")
    ranks = [spawn.Process(target=rank_main, daemon=True, args=(r, a.tp, port, f"tcp://127.0.0.1:{zport}", a.sglang,
                                                                  a.stats, a.forward_ms)) for r in range(a.tp)]
    for p in ranks:
        p.start()
    path = load_release(a.sglang)

    def stop(*_):
        try:
            sock.send_pyobj(STOP, zmq.NOBLOCK)  # the ranks may be gone already (a group's SIGTERM)
        except zmq.ZMQError:
            pass
        for p in ranks:
            p.join(5)
        # Segments written but never received (in flight at the stop): their names carry this pid.
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"sgl_shm_mm_{os.getpid()}_"):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(tokenizer_main(path, sock, a.rate, a.rows, a.stats, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
