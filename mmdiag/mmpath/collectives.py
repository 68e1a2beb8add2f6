"""The two kinds of collective traffic a replay rank sees.

`broadcast_pyobj`: how SGLang's `recv_requests` hands every request (mm_inputs
included) from the entry rank to the other TP ranks in every version: pickle.dumps,
broadcast a size tensor then a uint8 tensor over the CPU group, pickle.loads on
the receivers. mmdiag's own implementation of that protocol; its time is `recv`.

SGLang's version also copies the payload once more on each side (to and from a
numpy array); mmdiag skips those copies to keep a replay's memory in bounds, so
its `recv` is, if anything, a little cheaper than SGLang's.

`broadcast_object_list`: torch's real one, used by the strategies that add a
collective (17a57fd's path and its variants). Its pickling and unpickling run in
torch's `_object_to_tensor` / `_tensor_to_object`, which `install_torch_timers`
wraps so the replay can split the call into pickle / broadcast / unpickle.
"""
from __future__ import annotations

import pickle
import time
import warnings
from typing import Any

from ..lazy import lazy_module
from .timers import PhaseTimers

torch = lazy_module("torch")   # strategies import this module; `mmdiag --help` must not load torch
dist = lazy_module("torch.distributed")
c10d = lazy_module("torch.distributed.distributed_c10d")

_installed: PhaseTimers | None = None


def install_torch_timers(timers: PhaseTimers) -> None:
    """Time torch's pickling inside broadcast_object_list (module globals are looked
    up at call time, so wrapping them here is seen by torch's own function)."""
    global _installed
    if _installed is not None:
        _installed = timers
        return
    _installed = timers
    orig_to_tensor, orig_to_object = c10d._object_to_tensor, c10d._tensor_to_object

    def _object_to_tensor_timed(obj, device, group):
        t0 = time.perf_counter()
        out = orig_to_tensor(obj, device, group)
        _installed.add("pickle", time.perf_counter() - t0)
        _installed.sent_bytes += int(out[0].numel())
        return out

    def _tensor_to_object_timed(tensor, tensor_size, group):
        t0 = time.perf_counter()
        out = orig_to_object(tensor, tensor_size, group)
        _installed.add("unpickle", time.perf_counter() - t0)
        return out

    c10d._object_to_tensor = _object_to_tensor_timed
    c10d._tensor_to_object = _tensor_to_object_timed


def broadcast_object_list_timed(timers: PhaseTimers, objs: list[Any], src: int, group: Any, **kwargs: Any) -> None:
    """torch.distributed.broadcast_object_list; the time outside (un)pickling is `broadcast`.
    mmdiag's strategies call it, and an installed SGLang's code calls it in place of torch's."""
    p0, u0 = timers.get("pickle"), timers.get("unpickle")
    t0 = time.perf_counter()
    if timers.tracer is not None:
        with timers.tracer.log_event("broadcast_object_list"):
            dist.broadcast_object_list(objs, src=src, group=group, **kwargs)
    else:
        dist.broadcast_object_list(objs, src=src, group=group, **kwargs)
    total = time.perf_counter() - t0
    timers.add("broadcast", total - (timers.get("pickle") - p0) - (timers.get("unpickle") - u0))
    timers.collectives += 1


def broadcast_pyobj(data: Any, rank: int, group: Any, src: int = 0) -> tuple[Any, int]:
    """Send `data` from `src` to every rank of `group`; returns (data, payload bytes)."""
    if rank == src:
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(payload)], dtype=torch.long)
        dist.broadcast(size, src=src, group=group)
        # A read-only view, no copy: gloo only reads the source buffer.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(payload, dtype=torch.uint8)
        dist.broadcast(view, src=src, group=group)
        return data, len(payload)
    size = torch.tensor([0], dtype=torch.long)
    dist.broadcast(size, src=src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=group)
    return pickle.loads(memoryview(buf.numpy())), int(size.item())
