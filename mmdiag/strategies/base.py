"""What a strategy is: how the scheduler ranks turn each received request's raw
mm_inputs into materialized MultimodalInputs.

The replay's scheduler (mmdiag.replay.scheduler) calls, on every rank and in
the same order: `setup` once, `process` once per loop iteration with that
iteration's requests (identical on all ranks, since they came through the recv
broadcast), `poll` once per iteration, `teardown` once. Any collective a
strategy issues must be decided from that identical data, so every rank enters
the same collectives in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..mmpath.items import MultimodalDataItem, MultimodalInputs

if TYPE_CHECKING:
    from ..replay.scheduler import ReplayRequest, ReplayScheduler

Ready = list[tuple["ReplayRequest", "MultimodalInputs"]]


class Strategy:
    """Everything mmdiag knows about a strategy lives on its class: the help text, the README
    table, `mmdiag apply`'s choices, the cost model and the live rules read these attributes."""

    name: ClassVar[str]
    # One line for help text and tables: what the TP ranks do with each request's mm inputs.
    summary: ClassVar[str]
    # How many collectives of its own it adds: "none", "per request", "per iteration".
    collectives: ClassVar[str]
    # The cost model's class for it (mmdiag.analysis.costmodel); None: not yet classified.
    cost_class: ClassVar[str | None] = None
    # Hashing happens before the scheduler (reported as tokenizer-side time).
    hashes_in_tokenizer: ClassVar[bool] = False
    # Function names that, on a sampled stack, say a live rank runs this strategy.
    live_markers: ClassVar[tuple[str, ...]] = ()
    # Module under mmdiag/sglang/patches that patches it into SGLang; None: no patch ships it.
    patch: ClassVar[str | None] = None
    # The current upstream path every patch is measured against (exactly one strategy).
    baseline: ClassVar[bool] = False
    # Its own collective pickles the features again from the entry rank: where they already reach
    # every rank by shared memory that undoes the transport, so apply and recommend refuse it there.
    resends_features: ClassVar[bool] = False
    # A feature transport it brings whatever the replay's (vocab.TRANSPORTS); None: the replay's.
    transport: ClassVar[str | None] = None
    # The model's image token (set by the replay from the trace).
    image_token_id: int = 0

    def raw_mm_inputs(self, modalities: list[str], features: list[Any], hashes: list[int | None]) -> dict:
        """One request's raw mm_inputs as the tokenizer hands them over, in this path's
        item classes (mmdiag's model here; the installed-SGLang plug-in uses the install's)."""
        return {"mm_items": [MultimodalDataItem(m, f, hash=h) for m, f, h in zip(modalities, features, hashes)],
                "im_token_id": self.image_token_id}

    # The tokenizer-side phase (vocab.TOKENIZER_PHASES) that tokenizer_step's seconds count in.
    tokenizer_phase: ClassVar[str] = "tokenizer_hash"

    def tokenizer_step(self, raw_mm_inputs: dict) -> float:
        """Tokenizer-side work this path runs inside the replay's window; seconds.
        (Hashing runs before the window instead: see replay.scheduler.tokenizer_prepass.)"""
        return 0.0

    def setup(self, s: "ReplayScheduler") -> None:
        pass

    def process(self, s: "ReplayScheduler", reqs: list["ReplayRequest"]) -> Ready:
        raise NotImplementedError

    def poll(self, s: "ReplayScheduler") -> Ready:
        return []

    def pending(self) -> int:
        return 0

    def teardown(self, s: "ReplayScheduler") -> None:
        pass

    @staticmethod
    def mm_reqs(reqs: list["ReplayRequest"]) -> list["ReplayRequest"]:
        return [r for r in reqs if r.mm_inputs is not None]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "collectives": self.collectives,
                "patch": self.patch}
