"""Transports: how feature bytes reach every TP rank (names: vocab.TRANSPORTS).

`pickle` (SGLang <= 0.5.9): the bytes ride inside the recv broadcast; nothing to do.
`shm` (0.5.10+): the tokenizer side writes each feature into a shared segment
(`encode`, entry rank, booked as tokenizer_shm); after the recv broadcast every
rank opens the segments, waits at a barrier until all have, maps them and the entry
rank unlinks them, then an all_reduce(MAX) of per-request failures makes every rank
reject the same requests (`deliver`, phases shm_open / shm_sync / shm_map).
Whether `deliver` enters a collective is decided from the received requests, which
are identical on every rank, so all ranks take the same collective sequence.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..errors import MmdiagError
from ..units import MB
from ..vocab import DEFAULT_SEGMENTS, TRANSPORT_PICKLE, TRANSPORT_SHM, TRANSPORTS
from . import shm
from .items import mm_items


class Transport:
    name: ClassVar[str]
    code: ClassVar[str] = "mmdiag"  # whose code moves the bytes: mmdiag's model, or "sglang" (the release's own)

    def encode(self, s: Any, mm_inputs: dict | None) -> float:
        """Tokenizer side, on the entry rank: returns the seconds it took."""
        return 0.0

    def take(self, s: Any, reqs: list) -> None:
        """Entry rank, as it takes the requests from the tokenizer, before the recv broadcast."""

    def deliver(self, s: Any, reqs: list) -> list:
        """Every rank, after the recv broadcast: returns the requests, rejected ones
        with their mm_inputs dropped."""
        return reqs

    def close(self) -> None:
        pass

    def facts(self) -> dict[str, int]:
        """What the Run records of this transport beyond its name (the segment pool's counts)."""
        return {}


class PickleTransport(Transport):
    """`pickle`; with `via_segment` as 0.5.9 does it: the tokenizer side still writes each
    feature into a new segment (tokenizer_shm) and the entry rank copies it back out as it
    takes the request (shm_map), then the recv broadcast pickles the bytes."""

    name = TRANSPORT_PICKLE

    def __init__(self, prefix: str = "", via_segment: bool = False):
        self.prefix, self.via_segment = prefix, via_segment
        self._seq = itertools.count()

    def encode(self, s, mm_inputs) -> float:
        if not self.via_segment or mm_inputs is None:
            return 0.0
        t0 = time.perf_counter()
        for item in mm_items(mm_inputs):
            if isinstance(item.feature, torch.Tensor):
                item.feature = shm.write_segment(f"{self.prefix}{next(self._seq)}", item.feature) or item.feature
        return time.perf_counter() - t0

    def take(self, s, reqs) -> None:
        items = [it for r in reqs if r.mm_inputs is not None
                 for it in mm_items(r.mm_inputs) if isinstance(it.feature, shm.ShmHandle)]
        if not items:
            return
        t0 = time.perf_counter()
        with s.timers.phase("shm_map"):
            for it in items:
                h = it.feature
                fd = shm.open_segment(h)
                mapped = shm.map_segment(fd, h) if fd is not None else None
                shm.unlink_segment(h)
                if mapped is None:
                    raise MmdiagError(f"shared-memory segment {h.name} vanished before the entry rank read it",
                                      where=shm.shm_dir(), fix="rerun; another process removed mmdiag's segments")
                it.feature = mapped.clone()
        s.timers.add("recv", -(time.perf_counter() - t0))  # it runs inside `recv`: booked apart, not twice

    def close(self) -> None:
        if self.via_segment:
            shm.sweep(self.prefix)


class ShmTransport(Transport):
    name = TRANSPORT_SHM

    def __init__(self, prefix: str, segments: str = DEFAULT_SEGMENTS, pool_bytes: int = 0, clone: bool = False):
        self.prefix = prefix
        # Copy each feature out of its map on every rank (ShmPointerMMData.materialize()'s clone,
        # 0.5.10 .. 0.5.20) instead of keeping the copy-on-write map (0.5.21+): facts.shm_clones.
        self.clone = clone
        self._seq = itertools.count()
        self.fallbacks = 0  # features kept inline: shared memory unavailable or full
        self.rejected = 0   # requests every rank rejected (a segment failed on some rank)
        # vocab.SEGMENTS: "fresh" (a new segment per feature, as every release writes them) or
        # "pool" (reused, pre-faulted segments: mmdiag's remedy for the write's page faults).
        self.pool = shm.SegmentPool(prefix, pool_bytes) if segments == "pool" else None

    def _write(self, feature) -> "shm.ShmHandle | None":
        if self.pool is not None:
            return self.pool.write(feature)
        return shm.write_segment(f"{self.prefix}{next(self._seq)}", feature)

    def encode(self, s, mm_inputs) -> float:
        if mm_inputs is None:
            return 0.0
        t0 = time.perf_counter()
        for item in mm_items(mm_inputs):
            if isinstance(item.feature, torch.Tensor):
                h = self._write(item.feature)
                if h is None:
                    self.fallbacks += 1
                else:
                    item.feature = h
        return time.perf_counter() - t0

    def deliver(self, s, reqs) -> list:
        items = [(i, it) for i, r in enumerate(reqs) if r.mm_inputs is not None
                 for it in mm_items(r.mm_inputs) if isinstance(it.feature, shm.ShmHandle)]
        if not items:
            return reqs
        t = s.timers
        failed = torch.zeros(len(reqs), dtype=torch.int32)
        with t.phase("shm_open"):
            fds = [shm.open_segment(it.feature) for _, it in items]
        with t.phase("shm_sync"):
            dist.barrier(group=s.cpu_group)  # every rank holds an fd: unlinking is safe now
        with t.phase("shm_map"):
            for (i, it), fd in zip(items, fds):
                h = it.feature
                it.feature = shm.map_segment(fd, h) if fd is not None else None
                if self.clone and it.feature is not None:
                    it.feature = it.feature.clone()
                if it.feature is None:
                    failed[i] = 1
                if s.is_entry_rank:
                    if h.pooled:
                        self.pool.settle(h)  # every rank holds it: reusable once they all let go
                    else:
                        shm.unlink_segment(h)
        with t.phase("shm_sync"):
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=s.cpu_group)
        for i in failed.nonzero().flatten().tolist():
            reqs[i].mm_inputs = None
            self.rejected += 1
        return reqs

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        shm.sweep(self.prefix)

    def facts(self) -> dict[str, int]:
        return self.pool.stats() if self.pool is not None else {}


def make(name: str, prefix: str, options: Any = None, clone: bool = False, via_segment: bool = False) -> Transport:
    """The transport `name`, configured from the replay's options (its axes: the segments);
    `clone`, `via_segment`: as the release does (facts.shm_clones, facts.entry_rank_copies_out)."""
    if name == PickleTransport.name:
        return PickleTransport(prefix, via_segment)
    if name == ShmTransport.name:
        # The pool holds what one recv may carry and the next being written (mapped features outlive their recv).
        segments = getattr(options, "segments", DEFAULT_SEGMENTS)
        pool_bytes = 2 * int(getattr(options, "max_recv_mb", 0.0) * MB)
        return ShmTransport(prefix, segments, pool_bytes, clone)
    raise MmdiagError(f"unknown transport {name!r}", where="--transport", fix=f"choose from: {', '.join(TRANSPORTS)}")
