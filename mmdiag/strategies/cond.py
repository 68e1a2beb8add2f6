"""`cond`: the seeds' size-conditional broadcast (000_3099abf5086ce8a8.txt, 方案2: 条件优化).

A multimodal request whose feature bytes exceed the threshold takes 17a57fd's path
(the entry rank materializes, one broadcast_object_list); a smaller one is
materialized by every rank itself (`revert`). The decision reads only the request's
feature sizes, which every rank received identically through the recv broadcast,
and a threshold every rank got from rank 0: so in a batch mixing large and small
requests all ranks enter the same collectives in the same order.
"""
from __future__ import annotations

import math
import os
from typing import Any

from ..analysis import threshold as T
from ..mmpath.collectives import broadcast_pyobj
from .base import Ready, Strategy
from .commit import _process_and_broadcast_mm_inputs
from .revert import Revert


def feature_nbytes(raw_mm_inputs: dict) -> int:
    """Bytes of a request's item features (tensors or arrays): the size the decision reads."""
    total = 0
    for item in raw_mm_inputs.get("mm_items") or ():
        f = getattr(item, "feature", None)
        if f is None:
            continue
        n = getattr(f, "nbytes", None)  # numpy arrays, and torch tensors since 2.1
        total += int(n) if n is not None else int(f.numel() * f.element_size())
    return total


class Cond(Strategy):
    name = "cond"
    summary = ("size-conditional broadcast: requests whose features exceed a threshold take 17a57fd's broadcast, "
               "smaller ones materialize on every rank (threshold: option, SGLANG_MM_BROADCAST_THRESHOLD, "
               "or the measured crossover)")
    collectives = "per request"  # per request above the threshold
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "conditional"   # mmdiag.analysis.costmodel.COST_CLASSES
    patch = "cond"
    # The replay's method; the SGLang patch keeps 17a57fd's method name, and materializes a
    # request below the threshold in a method of its own (every rank, as dict does, so the
    # dict marker alone cannot tell them apart); it agrees on the threshold on the first call.
    live_markers = ("Cond.process", "_mmdiag_cond_below_threshold", "_mmdiag_cond_agree_limit")

    def __init__(self, threshold: T.Threshold | None = None):
        self.threshold = threshold or T.resolve(env=os.environ)
        self.limit = math.inf if self.threshold.bytes is None else self.threshold.bytes
        self.sent = self.local = 0

    @classmethod
    def for_replay(cls, rank: int, group: Any, measured_run: Any) -> "Cond":
        """Rank 0 resolves the threshold (environment, else the crossover fitted on the
        strategies this replay measured so far) and every rank adopts rank 0's: nodes
        whose environments differ still agree."""
        from ..analysis.costmodel import fit
        from ..errors import MmdiagError
        th = None
        if rank == 0:
            try:
                th = T.resolve(env=os.environ, model=fit([measured_run]) if measured_run is not None else None)
            except MmdiagError as e:  # a bad value: every rank fails alike, none waits
                th = e
        th, _ = broadcast_pyobj(th, rank, group)
        if isinstance(th, MmdiagError):
            raise th
        return cls(th)

    def process(self, s, reqs) -> Ready:
        out: Ready = []
        for r in self.mm_reqs(reqs):
            if feature_nbytes(r.mm_inputs) > self.limit:
                self.sent += 1
                out.append((r, _process_and_broadcast_mm_inputs(s, r.mm_inputs)))
            else:
                self.local += 1
                out += Revert.process(self, s, [r])
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold.to_dict(),
                "broadcast_requests": self.sent, "local_requests": self.local}
