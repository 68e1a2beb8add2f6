"""One replay rank's scheduler loop, shaped like SGLang's event loop.

Each iteration, on every rank:
  recv_requests            the entry rank admits the requests that have arrived and
                           hands them to all ranks with broadcast_pyobj   -> `recv`
  process_input_requests   the strategy materializes / broadcasts mm inputs
                           (from_dict, pickle, broadcast, unpickle)
  run_forward_step         the model step stand-in: optional sleep (GPU time,
                           GIL released) plus a tiny all_reduce that keeps the TP
                           ranks in lock-step as the real forward does  -> `forward`
The all_reduce also carries how many requests every rank holds (MIN over ranks),
which is how the entry rank runs a closed loop and knows when to stop.
"""
from __future__ import annotations

import hashlib
import heapq
import time
import uuid
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..mmpath.collectives import broadcast_pyobj
from ..mmpath.items import PAD_MODULUS, hash_feature, mm_items
from ..mmpath.memory import RANK_BASE_BYTES, HeapTrimmer, MiB
from ..mmpath.timers import PhaseTimers
from ..mmpath.transport import PickleTransport, Transport
from ..run import summarize_ms
from ..strategies.base import Strategy
from ..trace import DTYPES, TraceReader, TraceRequest
from ..vocab import TOKENIZER_PHASES

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
assert set(TORCH_DTYPES) == set(DTYPES)
# Distinct fill values per request keep hashes distinct without paying for random data.
FILL_VALUES = 64
IDLE_TICK_S = 0.05
# Most multimodal requests a strategy may have in flight before the entry rank stops admitting.
MAX_PENDING = 64


@dataclass
class ReplayRequest:
    """What the entry rank receives from the tokenizer (TokenizedGenerateReqInput's role)."""
    rid: str
    idx: int
    input_ids: list[int]
    mm_inputs: dict[str, Any] | None
    arrival: float


def make_feature(shape: tuple[int, ...], dtype: str, idx: int) -> torch.Tensor:
    return torch.full(shape, (idx % FILL_VALUES) + 1, dtype=TORCH_DTYPES[dtype])


def make_request(tr: TraceRequest, idx: int, arrival: float, strategy: Strategy,
                 hashes: list[int] | None = None) -> ReplayRequest:
    """What the tokenizer hands the entry rank: the request with its features, in the
    strategy's own item classes (mmdiag's model, or an installed SGLang's)."""
    n_tokens = tr.prompt_len + sum(it.shape[0] // 4 for it in tr.mm)  # merge 2x2 -> tokens
    mm = None
    if tr.mm:
        hs = [it.hash if it.hash is not None else (hashes[k] if hashes else None) for k, it in enumerate(tr.mm)]
        mm = strategy.raw_mm_inputs([it.modality for it in tr.mm],
                                    [make_feature(it.shape, it.dtype, idx) for it in tr.mm], hs)
    return ReplayRequest(tr.rid, idx, [strategy.image_token_id] * n_tokens, mm, arrival)


def tokenizer_prepass(trace_path: str, hash_request=None,
                      skip_hash: bool = False) -> tuple[dict[int, list[int]], dict[int, float]]:
    """The tokenizer-side hashing (precompute, shm), run before the timed window: in SGLang
    it runs in the tokenizer process, off the scheduler loop. Returns per-request item
    hashes and per-request hashing seconds. Identical features (same shape, dtype, fill)
    are hashed once and their measured time reused. hash_request(modalities, features,
    trace_hashes) -> (hashes, seconds): an installed release's own step, per request.
    skip_hash: SGLANG_MM_SKIP_COMPUTE_HASH, a random 64-bit hash per item, timed, instead of sha256."""
    hashes: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    cache: dict[tuple, tuple] = {}
    with TraceReader(trace_path) as reader:
        for idx, tr in enumerate(reader):
            if hash_request is not None:
                if tr.mm:
                    key = tuple((it.shape, it.dtype, it.hash, idx % FILL_VALUES) for it in tr.mm)
                    if key not in cache:
                        cache[key] = hash_request([it.modality for it in tr.mm],
                                                  [make_feature(it.shape, it.dtype, idx) for it in tr.mm],
                                                  [it.hash for it in tr.mm])
                    hashes[idx], seconds[idx] = cache[key]
                continue
            hs, total = [], 0.0
            for it in tr.mm:
                key = (it.shape, it.dtype, idx % FILL_VALUES)
                if skip_hash and it.hash is None:
                    t0 = time.perf_counter()
                    hs.append(uuid.uuid4().int)  # as SGLang draws it: a hash per item, never reused
                    total += time.perf_counter() - t0
                    continue
                if key not in cache:
                    f = make_feature(it.shape, it.dtype, idx)
                    t0 = time.perf_counter()
                    h = hash_feature(f)
                    cache[key] = (h, time.perf_counter() - t0)
                    del f
                h, dt = cache[key]
                hs.append(it.hash if it.hash is not None else h)
                total += dt if it.hash is None else 0.0
            if tr.mm:
                hashes[idx] = hs
                seconds[idx] = total
    return hashes, seconds


class Intake:
    """The entry rank's view of the trace: who has arrived, and the closed loop.

    Closed loop: `max_concurrency` slots; a slot frees when every rank holds a
    request (seen through the per-iteration all_reduce). A request's clock starts
    when it could have been sent, max(start + t, the moment its slot freed), so
    time it waits behind the per-iteration byte cap counts in its latency.

    Tokenizer stage: a request's tokenizer-side hashing (`tokenizer_s`, seconds per
    request index, measured before the window) runs between its send and the moment the
    scheduler sees it, on `workers` servers in arrival order. It overlaps the loop's work
    on other requests, as SGLang's tokenizer process does, but not its own request's: at
    concurrency 1 it adds to every request's cycle, as it does in the server.
    """

    def __init__(self, trace_path: str, start: float, max_concurrency: int | None,
                 max_recv_bytes: int | None = None, tokenizer_s: dict[int, float] | None = None,
                 workers: int = 1):
        self.reader = TraceReader(trace_path)
        self._it: Iterator[TraceRequest] = iter(self.reader)
        self.start = start
        self.max_concurrency = max_concurrency
        self.max_recv_bytes = max_recv_bytes
        self.next: TraceRequest | None = next(self._it, None)
        self.admitted = 0  # handed to the scheduler
        self.cap_hits = 0  # iterations the byte cap held requests back
        self._slots: deque[float] = deque([start] * (max_concurrency or 0))
        self._held_seen = 0
        self._tok = tokenizer_s or {}
        self._tok_free = [start] * max(1, workers)  # heap: when each tokenizer server is free
        self._staged: deque[tuple[float, int, TraceRequest, float]] = deque()  # (ready, idx, request, sent)
        self._sent = 0

    @property
    def exhausted(self) -> bool:
        return self.next is None and not self._staged

    def next_arrival(self) -> float | None:
        """When the scheduler could next see a request: the tokenizer's next one, or the
        trace's next send (if a slot is free for it)."""
        times = [self._staged[0][0]] if self._staged else []
        if self.next is not None and (self.max_concurrency is None or self._slots):
            times.append(self.start + self.next.t)
        return min(times) if times else None

    def admit(self, now: float, globally_held: int, held_at: float) -> list[tuple[int, TraceRequest, float]]:
        """Requests the scheduler sees by `now`: (index, request, the moment its clock started)."""
        if self.max_concurrency is not None:
            self._slots.extend([held_at] * (globally_held - self._held_seen))
            self._held_seen = globally_held
        while self.next is not None and self.start + self.next.t <= now:
            if self.max_concurrency is not None and not self._slots:
                break
            sent = self.start + self.next.t
            if self.max_concurrency is not None:
                sent = max(sent, self._slots.popleft())
            ready = sent
            dt = self._tok.get(self._sent, 0.0)
            if dt:
                ready = max(sent, heapq.heappop(self._tok_free)) + dt
                heapq.heappush(self._tok_free, ready)
            self._staged.append((ready, self._sent, self.next, sent))
            self._sent += 1
            self.next = next(self._it, None)
        out, nbytes = [], 0
        while self._staged and self._staged[0][0] <= now:
            _, idx, tr, sent = self._staged[0]
            # Bound one recv's feature bytes (memory); SGLang's tokenizer paces arrivals instead.
            nbytes += tr.mm_bytes
            if out and self.max_recv_bytes is not None and nbytes > self.max_recv_bytes:
                self.cap_hits += 1
                break
            self._staged.popleft()
            out.append((idx, tr, sent))
            self.admitted += 1
        return out

    def close(self) -> None:
        self.reader.close()


@dataclass
class RankOutcome:
    rank: int
    cpu_s: float
    wall_s: float
    phases_ms: dict[str, float]
    iterations: int
    loop_stall_ms: dict[str, float]
    collectives: int
    bytes_sent: int
    recv_bytes: int
    holds: dict[str, float]
    arrivals: dict[str, tuple[float, int]] = field(default_factory=dict)  # entry rank: rid -> (time, idx)
    digest: str = ""
    held: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    invalid: int = 0  # held requests whose items lack a hash, a matching pad value or an item
    cap_hits: int = 0
    tokenizer: dict[str, dict[int, float]] = field(default_factory=dict)  # entry rank: phase -> idx -> s
    transport: dict[str, Any] = field(default_factory=dict)


class ReplayScheduler:
    def __init__(self, rank: int, world: int, strategy: Strategy, timers: PhaseTimers, *,
                 cpu_group: Any = None, timeout: timedelta = timedelta(seconds=60),
                 forward_ms: float = 0.0, progress: Any = None, heap_ceiling: int = 0,
                 transport: Transport | None = None):
        self.rank, self.world = rank, world
        self.is_entry_rank = rank == 0
        self.strategy = strategy
        self.timers = timers
        self.cpu_group = cpu_group
        self.timeout = timeout
        self.forward_s = forward_ms / 1000.0
        self.progress = progress
        self.holds: dict[str, float] = {}
        self.fingerprints: dict[str, tuple] = {}
        self.recv_bytes = 0
        self.arrivals: dict[str, tuple[float, int]] = {}
        # Tokenizer-side seconds per request index, by phase (vocab.TOKENIZER_PHASES).
        self.tokenizer: dict[str, dict[int, float]] = {p: {} for p in TOKENIZER_PHASES}
        self.transport = transport or PickleTransport()
        # Entry rank only, set by the worker: for precompute, the item hashes its
        # tokenizer pre-pass computed.
        self.precomputed: dict[int, list[int]] = {}
        self.globally_held = 0
        self.held_at = time.time()
        self.invalid = 0
        self.stop = False
        self.trim_heap = HeapTrimmer(heap_ceiling or RANK_BASE_BYTES + 256 * MiB)

    # --- the loop ---------------------------------------------------------------
    def event_loop(self, intake: Intake | None, total: int | None) -> RankOutcome:
        t = self.timers
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stalls = array("d")
        batch_sizes: list[int] = []
        iterations = 0
        self.strategy.setup(self)
        try:
            while True:
                it0 = time.perf_counter()
                idle0, fwd0 = t.get("idle"), t.get("forward")
                reqs = self.recv_requests(intake)
                if self.stop:
                    break
                reqs = self.transport.deliver(self, reqs)
                ready = self.process_input_requests(reqs)
                ready += self.strategy.poll(self)
                self.hold(ready)
                busy = bool(reqs or ready)
                if reqs:
                    batch_sizes.append(len(reqs))
                # Nothing of this iteration's features may outlive it: memory must not grow with the trace.
                del reqs, ready
                self.trim_heap()
                self.run_forward_step(busy=busy)
                iterations += 1
                stalls.append((time.perf_counter() - it0 - (t.get("idle") - idle0)
                               - (t.get("forward") - fwd0)) * 1000.0)
                t.maybe_flush()
                if self.progress is not None:
                    self.progress(self.globally_held, total)
        finally:
            self.strategy.teardown(self)
            if self.is_entry_rank:
                self.transport.close()
        t.maybe_flush(force=True)
        digest = hashlib.sha256(repr(sorted(self.fingerprints.items())).encode()).hexdigest()
        return RankOutcome(
            rank=self.rank, cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0,
            phases_ms=t.totals_ms(), iterations=iterations,
            loop_stall_ms=summarize_ms(list(stalls)), collectives=t.collectives,
            bytes_sent=t.sent_bytes, recv_bytes=self.recv_bytes, holds=self.holds, arrivals=self.arrivals,
            digest=digest, held=len(self.holds), batch_sizes=batch_sizes, invalid=self.invalid,
            cap_hits=intake.cap_hits if intake is not None else 0, tokenizer=self.tokenizer,
            transport={"name": self.transport.name, "code": self.transport.code,
                       **{k: getattr(self.transport, k, 0) for k in ("fallbacks", "rejected")},
                       **self.transport.facts()})

    def recv_requests(self, intake: Intake | None) -> list[ReplayRequest]:
        msg = None
        idle_s = 0.0
        if self.is_entry_rank:
            assert intake is not None
            idle_s = self._wait_for_arrivals(intake)
            with self.timers.phase("recv"):
                # A strategy with a backlog (async) takes no more until it drains some:
                # its queue would otherwise hold features without bound.
                backlog = self.strategy.pending() >= MAX_PENDING
                admitted = [] if backlog else intake.admit(time.time(), self.globally_held, self.held_at)
                reqs = [make_request(tr, idx, arr, self.strategy, self.precomputed.get(idx))
                        for idx, tr, arr in admitted]
                self._tokenizer_side(reqs)
                self.transport.take(self, reqs)
                for r in reqs:
                    self.arrivals[r.rid] = (r.arrival, r.idx)
                done = intake.exhausted and self.globally_held >= intake.admitted and not reqs
                msg = ("stop", [], idle_s) if done else ("reqs", reqs, idle_s)
        t0 = time.perf_counter()
        with self.timers.phase("recv"):
            msg, nbytes = broadcast_pyobj(msg, self.rank, self.cpu_group)
        self.recv_bytes += nbytes
        kind, reqs, idle_s = msg
        if not self.is_entry_rank and idle_s:
            # While the entry rank slept waiting for arrivals, this rank waited here:
            # that is idle time, not request transport.
            moved = min(idle_s, time.perf_counter() - t0)
            self.timers.add("recv", -moved)
            self.timers.add("idle", moved)
        self.stop = kind == "stop"
        return reqs

    def _tokenizer_side(self, reqs: list[ReplayRequest]) -> None:
        """What the tokenizer does to each request before the scheduler sees it (an
        installed release's own hashing step, the transport's segment write). It runs
        here, on the entry rank, so it is moved out of `recv` and booked per phase as
        tokenizer-side time: never hidden, never counted as scheduler work."""
        for r in reqs:
            if r.mm_inputs is None:
                continue
            for phase, dt in ((self.strategy.tokenizer_phase, self.strategy.tokenizer_step(r.mm_inputs)),
                              ("tokenizer_shm", self.transport.encode(self, r.mm_inputs))):
                if dt:
                    self.tokenizer[phase][r.idx] = dt
                    self.timers.add("recv", -dt)

    def _wait_for_arrivals(self, intake: Intake) -> float:
        """Nothing to do until the next arrival: sleep (the loop is idle, not stalled).
        Returns the seconds slept."""
        nxt = intake.next_arrival()
        if nxt is None or self.strategy.pending() or self.globally_held < intake.admitted:
            return 0.0
        delay = min(nxt - time.time(), IDLE_TICK_S)
        if delay <= 0:
            return 0.0
        with self.timers.phase("idle"):
            time.sleep(delay)
        return delay

    def process_input_requests(self, reqs: list[ReplayRequest]):
        ready = [(r, None) for r in reqs if r.mm_inputs is None]
        return ready + self.handle_generate_request(reqs)

    def handle_generate_request(self, reqs: list[ReplayRequest]):
        return self.strategy.process(self, reqs)

    def hold(self, ready) -> None:
        now = time.time()
        for r, mm in ready:
            self.holds[r.rid] = now
            fp = mm.fingerprint() if mm is not None else ()
            expected = len(mm_items(r.mm_inputs))  # a dict, or an installed 0.5.10+ release's MultimodalProcessorOutput
            # an installed release's pad values are its own (MM_PAD_SHIFT from 0.5.9, identity from 0.5.19)
            pad_ok = getattr(self.strategy, "pad_value_ok", None) or (lambda h, p: p == h % PAD_MODULUS)
            if len(fp) != expected or any(h is None or not pad_ok(h, p) for h, p in fp):
                self.invalid += 1
            self.fingerprints[r.rid] = fp
            r.mm_inputs = None  # free the features as soon as the rank holds its own copy

    def run_forward_step(self, busy: bool) -> None:
        with self.timers.phase("forward"):
            if busy and self.forward_s > 0:
                time.sleep(self.forward_s)
            held = torch.tensor([len(self.holds)], dtype=torch.long)
            dist.all_reduce(held, op=dist.ReduceOp.MIN, group=self.cpu_group)
            self.globally_held = int(held.item())
            self.held_at = time.time()
