"""`mmdiag replay --impl sglang --sglang PATH`: the same loop, but each rank runs the
installed SGLang's own multimodal path (patched by `mmdiag apply` or not), extracted
by mmdiag.sglang.runtime. The Run names the result by the strategy that install
implements (its mmdiag patch, or the variant's own path), so a before/after pair
compares under the one vocabulary.
"""
from __future__ import annotations

import functools
import pickle
import time
from typing import Any

import torch

from .. import strategies as strategy_registry
from ..mmpath.collectives import broadcast_object_list_timed
from ..mmpath.items import mm_items
from ..mmpath import shm as shm_segments
from ..mmpath.timers import PhaseTimers
from ..mmpath.transport import Transport
from ..sglang.facts import variant
from ..strategies.base import Ready, Strategy
from ..vocab import STRATEGY_PRECOMPUTE, TRANSPORT_PICKLE, TRANSPORT_SHM


def strategy_name(path: Any, enable_broadcast_flag: bool) -> str:
    """The strategy the install implements: its mmdiag patch, else its variant's own path
    (variants.toml: strategy, strategy_flag_on)."""
    if path.patched:
        return path.patched
    if path.variant == "broadcast-flag" and not enable_broadcast_flag and path.release_precompute_on():
        return STRATEGY_PRECOMPUTE  # 0.5.7+: SGLANG_MM_PRECOMPUTE_HASH=1 in the ranks' environment, the release's own
    v = variant(path.variant)
    name = v.get("strategy_flag_on", v["strategy"]) if enable_broadcast_flag else v["strategy"]
    return strategy_registry.get(name).name


class InstalledPath(Strategy):
    """Runs `process_input_requests` of the install, timed by the same primitives as
    mmdiag's own model (mmdiag.mmpath): its from_dict in the `from_dict` phase, its
    broadcast_object_list through broadcast_object_list_timed (pickle / broadcast /
    unpickle, one collective counted)."""

    collectives = "as installed"

    def __init__(self, path: Any, enable_broadcast_flag: bool = False):
        self.path = path
        self.flag = enable_broadcast_flag
        self.name = strategy_name(path, enable_broadcast_flag)
        self.summary = f"installed SGLang {path.install.version or ''} ({path.variant}, patch: {path.patched or 'none'})"
        # What the install's mmdiag patch does is said by its strategy's properties.
        patched = strategy_registry.REGISTRY.get(path.patched) if path.patched else None
        self.hashes_in_tokenizer = bool(patched and patched.hashes_in_tokenizer) or path.release_precompute_on()
        # Features by shared memory: the patch writes segments in the tokenizer and maps them on every rank.
        self.moves_by_shm = bool(patched and patched.transport == TRANSPORT_SHM)
        # Hashing runs before the window (hash_request); the shm patch's segment write stays in it.
        self.tokenizer_phase = "tokenizer_shm" if self.moves_by_shm else "tokenizer_hash"

    @staticmethod
    def pad_value_ok(item_hash: int, pad_value) -> bool:
        """The release computed it (its formula changed in 0.5.9 and 0.5.19); ranks compare digests."""
        return pad_value is not None

    def setup(self, s) -> None:
        self.sched = self.path.make_scheduler(s.cpu_group, enable_broadcast_mm_inputs_process=self.flag)
        time_with(self.path, s.timers)

    def teardown(self, s) -> None:
        # The shm patch's segment pool lives in this (entry-rank) process, whose exit skips
        # atexit: remove it here (a rank's map of a segment outlives the name).
        close = self.path.ns.get("_mmdiag_shm_pool_close")
        if close is not None:
            close()

    def raw_mm_inputs(self, modalities, features, hashes) -> dict:
        """The install's own raw mm_inputs dict for one request (what its tokenizer sends).
        Where the install hashes in its tokenizer, `hashes` are what its own step computed
        before the window (hash_request), set as that step leaves them; else none is set."""
        items = [self.path.make_item(f, modality.upper()) for modality, f in zip(modalities, features)]
        if self.hashes_in_tokenizer:
            for item, h in zip(items, hashes):
                # hash_request's {attribute: value} (hash and pad value, as the step left them;
                # a pad value set makes the ranks' set_pad_value keep them), or a trace's hash
                for k, v in (h.items() if isinstance(h, dict) else [("hash", h)]):
                    if v is not None:
                        setattr(item, k, v)
        return self.path.make_mm_inputs(items)

    def hash_request(self, modalities, features, hashes) -> tuple[list, float]:
        """The install's own tokenizer-side hashing of one request (its precompute patch, the
        release's SGLANG_MM_PRECOMPUTE_HASH step, or the shm patch's hashing without its
        write), run by the replay before its window as for mmdiag's model: in SGLang it runs
        in the tokenizer process, off the scheduler loop. Returns (per item {hash, pad_value}
        as the step left them, seconds): the pad value matters where the ranks' own
        set_pad_value would otherwise compute it again (SGLANG_MM_SKIP_COMPUTE_HASH draws a
        random hash on each rank)."""
        raw = self.raw_mm_inputs(modalities, features, hashes)
        t0 = time.perf_counter()
        self.path.tokenizer_side(raw, hash_only=True)
        dt = time.perf_counter() - t0
        return [{"hash": getattr(it, "hash", None), "pad_value": getattr(it, "pad_value", None)}
                for it in mm_items(raw)], dt

    def tokenizer_step(self, raw_mm_inputs: dict) -> float:
        """What is left of the install's tokenizer step inside the window once hash_request
        ran: the shm patch's segment write (its hashing skips hashed items); seconds."""
        return tokenizer_side(self.path, raw_mm_inputs) if self.moves_by_shm else 0.0

    def release_transport(self, cpu_group, timers: PhaseTimers, prefix: str) -> "ReleaseShmTransport | None":
        """The install's own shared-memory transport, where it has one (0.5.9+, unpatched by
        mmdiag's `shm`, which brings its own); None elsewhere."""
        if self.moves_by_shm or not self.path.detection.facts.transport_at:
            return None
        return ReleaseShmTransport(self.path.shm_transport(cpu_group, prefix), timers, prefix)

    def process(self, s, reqs) -> Ready:
        mm = self.mm_reqs(reqs)
        if not mm:
            return []
        reqs = [self.path.generate_req(r.rid, r.mm_inputs) for r in mm]
        if self.moves_by_shm:  # the rest of its recv_requests: every rank maps the segments
            with s.timers.phase("shm_map"):
                reqs = self.path.finish_recv(self.sched, reqs)
        out = self.path.process_input_requests(self.sched, reqs)
        return [(r, _Fingerprinted(out[r.rid])) for r in mm]


def time_with(path: Any, timers: PhaseTimers) -> None:
    """Make the install's extracted code report to `timers` as mmdiag's model does."""
    cls, name = path.MultimodalInputs, path.materializer  # the phase is from_dict whatever its name
    untimed = getattr(cls, "_mmdiag_untimed_materializer", None)
    if untimed is None:
        untimed = cls._mmdiag_untimed_materializer = cls.__dict__[name].__func__
    setattr(cls, name, staticmethod(timers.timed("from_dict", untimed)))
    path.dist.issue = functools.partial(broadcast_object_list_timed, timers)


class _Fingerprinted:
    """SGLang's MultimodalInputs seen through the replay's agreement check."""

    def __init__(self, mm: Any):
        self.mm = mm

    def fingerprint(self) -> tuple:
        return tuple((it.hash, it.pad_value) for it in self.mm.mm_items) if self.mm is not None else ()


def tokenizer_side(path: Any, raw: dict) -> float:
    """The install's tokenizer-manager step (hashing when precompute is applied); seconds."""
    t0 = time.perf_counter()
    path.tokenizer_side(raw)
    return time.perf_counter() - t0


class ReleaseShmTransport(Transport):
    """The shm transport run by the install's own code (runtime.ReleaseShm), timed in the
    phases of mmdiag's own (mmdiag.mmpath.transport): the release's wrap_shm_features
    (ShmPointerMMData writes each segment) is tokenizer_shm; the open when a rank
    unpickles a handle (__setstate__) is shm_open, taken out of `recv` where it runs; its
    unwrap_shm_features (materialize: a clone per rank to 0.5.20, a copy-on-write map from
    0.5.21) is shm_map; the rest of its receive (barrier, all_reduce) is shm_sync.
    0.5.9 is `pickle`: its entry rank copies each feature out as it unpickles it
    (__setstate__ clones and unlinks: shm_map), and the recv broadcast pickles the bytes."""

    code = "sglang"

    def __init__(self, release, timers: PhaseTimers, prefix: str):
        self.release, self.timers, self.prefix = release, timers, prefix
        self.fallbacks = 0  # features the release kept inline (its /dev/shm-full fallback, 0.5.19+)
        self.rejected = 0   # requests every rank rejected (its all_reduce of failures, 0.5.13+)
        self.name = TRANSPORT_PICKLE if release.before_broadcast else TRANSPORT_SHM
        ns, cls = release.path.ns, release.ShmPointerMMData
        # Installed once per process (the class and module are), reading the current timers.
        if not getattr(cls, "_mmdiag_timed", False):
            opened = "shm_map" if release.before_broadcast else "shm_open"
            cls.__setstate__ = _moved_from_recv(cls.__setstate__, release, opened)
            ns["unwrap_shm_features"] = _timed_by(ns["unwrap_shm_features"], release, "shm_map")
            cls._mmdiag_timed = True
        release.timers = timers

    def encode(self, s, mm_inputs) -> float:
        if mm_inputs is None:
            return 0.0
        t0 = time.perf_counter()
        self.release.wrap(mm_inputs)
        dt = time.perf_counter() - t0
        self.fallbacks += sum(1 for it in mm_items(mm_inputs) if isinstance(it.feature, torch.Tensor))
        return dt

    @staticmethod
    def _from_tokenizer(s, mm: list) -> None:
        """The tokenizer's zmq message, unpickled by the entry rank (recv_pyobj), opens the
        segments there: here the tokenizer side ran in this process, so round-trip it."""
        with s.timers.phase("recv"):
            for r in mm:
                r.mm_inputs = pickle.loads(pickle.dumps(r.mm_inputs))

    def take(self, s, reqs) -> None:
        mm = [r for r in reqs if r.mm_inputs is not None]
        if self.release.before_broadcast and mm:
            self._from_tokenizer(s, mm)
            self.release.take(mm)

    def deliver(self, s, reqs) -> list:
        mm = [r for r in reqs if r.mm_inputs is not None]
        if not mm or self.release.before_broadcast:
            return reqs
        t = s.timers
        if s.is_entry_rank:
            self._from_tokenizer(s, mm)
        path = self.release.path
        rel = [path.generate_req(r.rid, r.mm_inputs) for r in mm]
        t0, mapped0 = time.perf_counter(), t.get("shm_map")
        rel = self.release.receive(rel)
        t.add("shm_sync", time.perf_counter() - t0 - (t.get("shm_map") - mapped0))
        delivered = (path.ProcessorOutput, path.MultimodalInputs)
        for r, q in zip(mm, rel):
            if isinstance(q.mm_inputs, delivered):
                r.mm_inputs = q.mm_inputs
            else:  # the release rejected it on every rank (its error object in mm_inputs' place)
                r.mm_inputs = None
                self.rejected += 1
        return reqs

    def close(self) -> None:
        # What was written but never received (a replay cut short): the release names no owner,
        # the replay named them (runtime._owned_shared_memory).
        shm_segments.sweep(self.prefix, folder="/dev/shm")


def _moved_from_recv(fn, release, phase: str):
    """`fn` timed into `phase` and out of `recv`, the phase it runs inside (an unpickle)."""
    @functools.wraps(fn)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t0
            release.timers.add(phase, dt)
            release.timers.add("recv", -dt)
    return timed


def _timed_by(fn, release, phase: str):
    @functools.wraps(fn)
    def timed(*a, **k):
        with release.timers.phase(phase):
            return fn(*a, **k)
    return timed
