from __future__ import annotations

from .revert import Revert


class Precompute(Revert):
    """Scheduler side as revert (every rank materializes); the difference is upstream of
    it: the entry rank's requests arrive with item hashes set, so from_dict skips hashing."""

    name = "precompute"
    summary = ("hashes computed once before the scheduler (SGLANG_MM_PRECOMPUTE_HASH), so every rank's "
               "from_dict skips hashing; the hashing is reported as tokenizer-side time")
    collectives = "none"
    cost_class = "tokenizer"   # mmdiag.analysis.costmodel.COST_CLASSES
    patch = "precompute"
    hashes_in_tokenizer = True
