from __future__ import annotations

from .revert import Revert
from ..vocab import STRATEGY_PRECOMPUTE


class Precompute(Revert):
    """Scheduler side as revert (every rank materializes); the difference is upstream of
    it: the entry rank's requests arrive with item hashes set, so from_dict skips hashing."""

    name = "precompute"  # a literal: live.rules reads names and markers from the source
    summary = ("hashes computed once before the scheduler (SGLANG_MM_PRECOMPUTE_HASH), so every rank's "
               "from_dict skips hashing; the hashing is reported as tokenizer-side time")
    collectives = "none"
    cost_class = "tokenizer"   # mmdiag.analysis.costmodel.COST_CLASSES
    patch = STRATEGY_PRECOMPUTE
    hashes_in_tokenizer = True
    # The tokenizer's hashing when it is sampled (a replay runs it on the entry rank); on the
    # scheduler ranks alone, materialization with no hashing frame under it on any rank.
    live_markers = ("phase:tokenizer_hash",
                    "phase:from_dict+!hash_feature+!tensor_hash+!data_hash+!resolve_multimodal_item_hash")
