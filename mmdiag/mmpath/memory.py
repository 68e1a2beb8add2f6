"""How much memory a replay needs, and keeping a rank's heap from growing with the trace.

A rank holds one loop iteration's features a few times over (the entry rank: the
tensors and the recv broadcast's pickle; a receiver: the received bytes and what
they unpickle to; plus a strategy's own copy), then frees them. glibc serves
those large, equal-sized buffers from its heap once its dynamic mmap threshold has
risen, and a fragmented heap is not given back: RSS then grows with the number of
requests replayed. `HeapTrimmer` hands free pages back (malloc_trim) whenever RSS
passes the rank's share of the estimate, so memory stays flat however long the trace.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..units import fmt_gb, fmt_mb

GiB, MiB = 2**30, 2**20
# A rank with torch imported and a gloo group up (measured: about 250 MiB).
RANK_BASE_BYTES = 300 * MiB
# Copies of one iteration's features a rank holds at its peak: three live (see the
# module doc) and one the heap may keep between iterations before it is trimmed.
COPIES_PER_RANK = 4
# Free memory under this fraction of the total during a run: a SIGKILL was likely the OOM killer.
LOW_MEMORY_FRACTION = 0.10


@dataclass(frozen=True)
class MemoryEstimate:
    ranks: int
    in_flight: int   # feature bytes one rank holds in one iteration
    backlog: int     # feature bytes a background strategy may queue (async)
    shared: int      # shared-memory segments, once for the host (shm transport)

    @property
    def per_rank(self) -> int:
        return RANK_BASE_BYTES + COPIES_PER_RANK * self.in_flight + self.backlog

    @property
    def heap_ceiling(self) -> int:
        """RSS a rank may keep between iterations (one iteration's worth of free heap)."""
        return RANK_BASE_BYTES + self.in_flight + self.backlog

    @property
    def total(self) -> int:
        return self.ranks * self.per_rank + self.shared

    def explain(self) -> str:
        extra = f" + {fmt_mb(self.backlog, 0)} queued" if self.backlog else ""
        shm = f" + {fmt_mb(self.shared, 0)} in /dev/shm" if self.shared else ""
        return (f"about {fmt_gb(self.total)} ({self.ranks} ranks x ({fmt_gb(RANK_BASE_BYTES, 2)} + "
                f"{COPIES_PER_RANK} copies of {fmt_mb(self.in_flight, 0)} of features in flight{extra}){shm})")


def estimate(tp: int, mm_bytes: int, max_request_bytes: int, max_recv_bytes: int,
             max_concurrency: int | None, backlog_requests: int = 0, shared_copy: bool = False) -> MemoryEstimate:
    """Peak memory of a replay: features in flight x copies x ranks, plus a rank's base."""
    in_flight = min(max_recv_bytes, mm_bytes)
    if max_concurrency is not None:
        in_flight = min(in_flight, max_concurrency * max_request_bytes)
    in_flight = max(in_flight, max_request_bytes)  # one request is always admitted
    backlog = min(backlog_requests * max_request_bytes, mm_bytes)
    return MemoryEstimate(tp, in_flight, backlog, in_flight if shared_copy else 0)


def available_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def memory_low() -> bool:
    import psutil
    vm = psutil.virtual_memory()
    return vm.available < LOW_MEMORY_FRACTION * vm.total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """Call once per loop iteration, once its features are freed: when RSS passes
    `ceiling` (MemoryEstimate.heap_ceiling), give the heap's free pages back. Below
    it nothing is trimmed, so freed buffers are reused without new page faults."""

    def __init__(self, ceiling: int) -> None:
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            self._trim = None
        self.ceiling = ceiling
        self.trims = 0

    def __call__(self) -> None:
        if self._trim is not None and _rss_bytes() > self.ceiling:
            self._trim(0)
            self.trims += 1
