from __future__ import annotations

from ..mmpath.collectives import broadcast_object_list_timed
from ..mmpath.items import MultimodalInputs
from .base import Ready, Strategy


def _batch_process_mm_inputs(s, mm_reqs):
    """One collective for all of this iteration's multimodal requests. Whether to
    enter it is decided from `mm_reqs`, which every rank received identically
    through the recv broadcast, so all ranks take the same collective sequence."""
    if not mm_reqs:
        return []
    if s.is_entry_rank:
        with s.timers.phase("from_dict"):
            objs = [[MultimodalInputs.from_dict(r.mm_inputs) for r in mm_reqs]]
    else:
        objs = [None]
    broadcast_object_list_timed(s.timers, objs, src=0, group=s.cpu_group)
    return objs[0]


class Batch(Strategy):
    name = "batch"
    summary = "entry rank materializes all of a loop iteration's multimodal requests, one broadcast_object_list for the lot"
    collectives = "per iteration"
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "entry_per_iteration"   # mmdiag.analysis.costmodel.COST_CLASSES
    # The replay's function, then the methods mmdiag's SGLang patch adds.
    live_markers = ("_batch_process_mm_inputs", "_mmdiag_batch_prepare", "_mmdiag_orig_process_input_requests")
    patch = "batch"

    def process(self, s, reqs) -> Ready:
        mm_reqs = self.mm_reqs(reqs)
        return list(zip(mm_reqs, _batch_process_mm_inputs(s, mm_reqs)))
