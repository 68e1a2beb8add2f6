from __future__ import annotations

from ..mmpath.items import MultimodalInputs
from .base import Ready, Strategy


class Revert(Strategy):
    name = "revert"
    summary = "every rank materializes its own copy (the pre-17a57fd path): no extra collective, hashing on all ranks in parallel"
    collectives = "none"
    cost_class = "every_rank"   # mmdiag.analysis.costmodel.COST_CLASSES
    patch = "revert"
    # Materialization seen and none of the broadcasting paths (their markers come first).
    live_markers = ("phase:from_dict",)

    def process(self, s, reqs) -> Ready:
        out = []
        for r in self.mm_reqs(reqs):
            with s.timers.phase("from_dict"):
                out.append((r, MultimodalInputs.from_dict(r.mm_inputs)))
        return out
