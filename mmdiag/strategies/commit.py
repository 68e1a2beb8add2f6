from __future__ import annotations

from ..mmpath.collectives import broadcast_object_list_timed
from ..mmpath.items import MultimodalInputs
from .base import Ready, Strategy


def _process_and_broadcast_mm_inputs(s, raw_mm_inputs, group=None):
    """17a57fd: the entry rank materializes, then one blocking broadcast_object_list
    of the materialized object per request; other ranks wait for it."""
    if s.is_entry_rank:
        with s.timers.phase("from_dict"):
            mm = MultimodalInputs.from_dict(raw_mm_inputs)
        objs = [mm]
    else:
        objs = [None]
    broadcast_object_list_timed(s.timers, objs, src=0, group=group if group is not None else s.cpu_group)
    return objs[0]


class Commit(Strategy):
    name = "commit"
    summary = "17a57fd: entry rank materializes, one blocking broadcast_object_list per multimodal request"
    collectives = "per request"
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "entry_per_request"   # mmdiag.analysis.costmodel.COST_CLASSES
    baseline = True
    # 17a57fd's method (the replay's and SGLang's own name) entering the collective;
    # a reverted or precompute-patched server keeps the name but enters none.
    live_markers = ("_process_and_broadcast_mm_inputs+broadcast_object_list",)

    def process(self, s, reqs) -> Ready:
        return [(r, _process_and_broadcast_mm_inputs(s, r.mm_inputs)) for r in self.mm_reqs(reqs)]
