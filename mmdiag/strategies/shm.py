"""`shm`: the seeds' "solution 3" (shared memory: no pickle, no per-rank copy).

Hashes are computed once before the scheduler (as `precompute`), and the features
move by shared memory whatever the replay's transport: the tokenizer side writes
each feature once into a segment, the recv broadcast carries handles, and every rank
maps the pages copy-on-write, so no rank copies, pickles or hashes feature bytes.
On SGLang 0.5.10+ this is the release's own transport plus SGLANG_MM_PRECOMPUTE_HASH=1.
"""
from __future__ import annotations

from .precompute import Precompute
from ..vocab import STRATEGY_SHM, TRANSPORT_SHM


class Shm(Precompute):
    name = "shm"  # a literal: live.rules reads names and markers from the source
    summary = ("hashes computed once before the scheduler and features moved through POSIX shared memory "
               "(handles in the recv broadcast, copy-on-write maps): no per-rank copy, pickle or hash")
    collectives = "none"
    transport = TRANSPORT_SHM
    live_markers = ("_mmdiag_shm_finalize",)  # the applied patch's receive (0.5.10+ shows no frame of its own)
    patch = STRATEGY_SHM  # 0.5.4.post1 .. 0.5.9: mmdiag/sglang/patches/shm.py; 0.5.10+: settings only
