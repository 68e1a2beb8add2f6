from __future__ import annotations

import queue
import threading

from ..lazy import lazy_module

dist = lazy_module("torch.distributed")   # the registry is read by --help, which must not load torch

from .base import Ready, Strategy
from .commit import _process_and_broadcast_mm_inputs

_STOP = object()


class Async(Strategy):
    """The seeds' background broadcaster. A thread on every rank runs the 17a57fd
    broadcast for each multimodal request, in arrival order, on a gloo group of its
    own (collectives on one group from two threads could interleave differently on
    different ranks); the main loop goes on and picks results up when ready."""

    name = "async"
    summary = "17a57fd's per-request broadcast moved to a background thread on its own gloo group; the loop does not block"
    collectives = "per request"
    resends_features = True   # its broadcast_object_list pickles the features again
    cost_class = "background"   # mmdiag.analysis.costmodel.COST_CLASSES
    live_markers = ("_async_broadcast_worker+_process_and_broadcast_mm_inputs",)
    # What the background thread does for each request, on the strategy's own group.
    materialize = staticmethod(_process_and_broadcast_mm_inputs)

    def setup(self, s) -> None:
        # new_group is itself collective: every rank calls it here, in the same order.
        self.group = dist.new_group(backend="gloo", timeout=s.timeout)
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.inflight = 0
        self.thread = threading.Thread(target=self._async_broadcast_worker, args=(s,), name="mm-broadcaster", daemon=True)
        self.thread.start()

    def _async_broadcast_worker(self, s) -> None:
        try:
            while (r := self.todo.get()) is not _STOP:
                self.done.put((r, self.materialize(s, r.mm_inputs, group=self.group)))
        except BaseException as e:  # surfaced on the main thread by poll()
            self.error = e
            self.done.put(None)

    def process(self, s, reqs) -> Ready:
        for r in self.mm_reqs(reqs):
            self.inflight += 1
            self.todo.put(r)
        return []  # results are picked up by poll(), called every iteration

    def poll(self, s) -> Ready:
        out = []
        while True:
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                break
            if item is None:
                raise RuntimeError(f"background broadcaster failed: {self.error}")
            self.inflight -= 1
            out.append(item)
        return out

    def pending(self) -> int:
        return self.inflight

    def teardown(self, s) -> None:
        self.todo.put(_STOP)
        self.thread.join(timeout=s.timeout.total_seconds())
        dist.destroy_process_group(self.group)
