"""Multimodal inputs as the replay's scheduler ranks hold them.

The costs are SGLang's (checked against the 0.5.x wheels' schedule_batch.py and
mm_utils.py): `MultimodalInputs.from_dict` keeps the valid items and calls
`set_pad_value` on each, which hashes the feature unless a hash is already set;
hashing a tensor flattens and concatenates it (one copy), takes its bytes
(a second copy) and runs sha256 (or the replay's --hash), keeping the first 8 bytes as an int;
`pad_value = hash % 2**30`. The function names match SGLang's so that the live
profiler's stack rules read a replay rank and a real scheduler the same way.
This is mmdiag's own model of that path, not SGLang code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..lazy import lazy_module
from . import hashing

torch = lazy_module("torch")   # strategies import this module; `mmdiag --help` must not load torch

MODALITIES = ("image", "video", "audio")
PAD_MODULUS = 1 << 30


def mm_items(mm_inputs) -> list:
    """A request's raw items: a dict's "mm_items", or (an installed 0.5.10+ release's
    MultimodalProcessorOutput) its attribute."""
    if mm_inputs is None:
        return []
    return (mm_inputs.get("mm_items") if isinstance(mm_inputs, dict) else getattr(mm_inputs, "mm_items", None)) or []


def data_hash(data: bytes) -> int:
    return hashing.data_hash(data)  # sha256's first 8 bytes, as SGLang's, unless the replay chose --hash


def tensor_hash(tensors: list[torch.Tensor]) -> int:
    if hashing.zero_copy() and len(tensors) == 1 and tensors[0].is_contiguous():
        # mmdiag's xxh3 hashes the bytes where they lie (the same digest as the concatenation).
        return data_hash(memoryview(tensors[0].detach().reshape(-1).view(torch.uint8).numpy()))
    # Same copies as SGLang: flatten+concat, then .tobytes() of the numpy view.
    flat = torch.concat([t.flatten() for t in tensors]).detach().contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.float()
    return data_hash(memoryview(flat.numpy()).tobytes())


def hash_feature(feature: torch.Tensor) -> int:
    return tensor_hash([feature])


@dataclass
class MultimodalDataItem:
    modality: str
    feature: torch.Tensor | None
    hash: int | None = None
    pad_value: int | None = None

    def is_valid(self) -> bool:
        return self.modality in MODALITIES and self.feature is not None

    def set_pad_value(self) -> None:
        if self.hash is None:
            self.hash = hash_feature(self.feature)
        self.pad_value = self.hash % PAD_MODULUS


@dataclass
class MultimodalInputs:
    mm_items: list[MultimodalDataItem]
    im_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(obj: dict) -> "MultimodalInputs":
        ret = MultimodalInputs(mm_items=[it for it in obj["mm_items"] if it.is_valid()])
        for item in ret.mm_items:
            item.set_pad_value()
        ret.im_token_id = obj.get("im_token_id")
        return ret

    def fingerprint(self) -> tuple[tuple[int, int], ...]:
        """(hash, pad_value) per item: what every rank must agree on."""
        return tuple((it.hash, it.pad_value) for it in self.mm_items)


def precompute_hashes(raw_mm_inputs: dict) -> None:
    """The tokenizer-side hashing of the precompute strategy (SGLANG_MM_PRECOMPUTE_HASH):
    set each item's hash once, before the scheduler, so from_dict skips hashing."""
    for item in raw_mm_inputs["mm_items"]:
        if item.hash is None and item.feature is not None:
            item.hash = hash_feature(item.feature)
