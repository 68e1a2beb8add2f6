"""`dict_async`: the seeds' combined proposal (003_f7c4a69be2b46d59.txt, 方案3: 组合方案):
broadcast the raw dict (`dict`) on a background thread with its own gloo group (`async`).

The background machinery is async_.Async's; only what the thread does per request
differs. Every rank queues the same multimodal requests in the same order (they came
through the recv broadcast), so the threads enter the same collectives. An aborted
request still takes part in its collective (the other ranks' threads enter it), but
its result is dropped when it arrives: nothing stays behind.
"""
from __future__ import annotations

from .async_ import Async
from .base import Ready
from .dict_ import _broadcast_raw_mm_inputs


class DictAsync(Async):
    name = "dict_async"
    summary = ("the raw dict broadcast per request (dict) on a background thread with its own gloo group (async); "
               "every rank materializes, the loop does not block")
    collectives = "per request"
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "background"   # mmdiag.analysis.costmodel.COST_CLASSES
    live_markers = ("_async_broadcast_worker+_broadcast_raw_mm_inputs",)
    materialize = staticmethod(_broadcast_raw_mm_inputs)

    def setup(self, s) -> None:
        self.in_flight: set[str] = set()
        self.aborted: set[str] = set()
        super().setup(s)

    def process(self, s, reqs) -> Ready:
        self.in_flight.update(r.rid for r in self.mm_reqs(reqs))
        return super().process(s, reqs)

    def abort(self, rids) -> None:
        """Drop these requests' results when they arrive. Only requests in flight are
        remembered (an abort for anything else holds nothing), so the set stays bounded."""
        self.aborted.update(set(rids) & self.in_flight)

    def poll(self, s) -> Ready:
        out = []
        for r, mm in super().poll(s):
            self.in_flight.discard(r.rid)
            if r.rid in self.aborted:
                self.aborted.discard(r.rid)
                continue
            out.append((r, mm))
        return out

    def held(self) -> int:
        """Requests this strategy still remembers (in flight or aborted-in-flight)."""
        return len(self.in_flight) + len(self.aborted)
