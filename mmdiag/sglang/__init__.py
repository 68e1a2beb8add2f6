"""SGLang side of mmdiag: locate an install, detect its multimodal path variant,
patch it with a strategy (revert, dict, batch, precompute) and undo, and run its
own multimodal scheduler code outside SGLang (runtime) for proofs and replays."""
from __future__ import annotations

from .apply import ApplyResult
from .apply import apply as apply_patch
from .apply import plan as plan_patch
from .apply import undo as undo_patch
from .detect import Detection, detect
from .errors import SGLangError
from .locate import SGLangInstall, locate

__all__ = ["ApplyResult", "Detection", "SGLangError", "SGLangInstall", "apply_patch", "detect", "locate",
           "plan_patch", "undo_patch", "load_sglang_mm_path"]


def load_sglang_mm_path(sglang_dir=None):
    """See mmdiag.sglang.runtime (imported lazily: it needs torch)."""
    from .runtime import load_sglang_mm_path as _load
    return _load(sglang_dir)
