from __future__ import annotations

from ..mmpath.collectives import broadcast_object_list_timed
from ..mmpath.items import MultimodalInputs
from .base import Ready, Strategy


def _broadcast_raw_mm_inputs(s, raw_mm_inputs, group=None):
    """The seeds' 'broadcast the raw dict' fix: the entry rank sends the unmaterialized
    dict, every rank materializes. Note the dict already reached every rank through the
    recv broadcast, so this resends the same feature bytes."""
    objs = [raw_mm_inputs if s.is_entry_rank else None]
    broadcast_object_list_timed(s.timers, objs, src=0, group=group if group is not None else s.cpu_group)
    with s.timers.phase("from_dict"):
        return MultimodalInputs.from_dict(objs[0])


class Dict(Strategy):
    name = "dict"
    summary = "broadcast the raw mm_inputs dict per request, then every rank materializes"
    collectives = "per request"
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "every_rank_resend"   # mmdiag.analysis.costmodel.COST_CLASSES
    patch = "dict"
    # The replay's function; the SGLang patch keeps 17a57fd's method name but materializes
    # on the other ranks too, after the broadcast (from_dict, from_processor_output later).
    live_markers = ("_broadcast_raw_mm_inputs",
                    "_process_and_broadcast_mm_inputs>from_dict+broadcast_object_list",
                    "_process_and_broadcast_mm_inputs>from_processor_output+broadcast_object_list")

    def process(self, s, reqs) -> Ready:
        return [(r, _broadcast_raw_mm_inputs(s, r.mm_inputs)) for r in self.mm_reqs(reqs)]
