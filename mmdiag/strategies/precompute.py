from __future__ import annotations

from ..replay.mm import MultimodalInputs
from .base import Ready, Strategy


class Precompute(Strategy):
    name = "precompute"
    summary = ("hashes computed once before the scheduler (SGLANG_MM_PRECOMPUTE_HASH), so every rank's "
               "from_dict skips hashing; the hashing is reported as tokenizer-side time")
    collectives = "none"
    hashes_in_tokenizer = True

    def process(self, s, reqs) -> Ready:
        out = []
        for r in self.mm_reqs(reqs):
            with s.timers.phase("from_dict"):
                out.append((r, MultimodalInputs.from_dict(r.mm_inputs)))
        return out
