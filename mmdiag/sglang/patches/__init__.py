"""One module per patchable strategy (names: mmdiag.strategies.PATCHABLE, from each strategy's `patch`),
content_hash for the content-hash axis (names: mmdiag.mmpath.hashing.PATCHABLE), and pool for the
segments axis (vocab.SEGMENTS_POOL: the release's own shared-memory writer reuses its segments)."""
from __future__ import annotations

from functools import partial
from importlib import import_module
from types import SimpleNamespace

from ...mmpath.hashing import PATCHABLE as PATCHABLE_HASHES
from ...strategies import PATCHABLE as PATCHABLE_STRATEGIES
from ...vocab import SEGMENTS_POOL

PATCHABLE_SEGMENTS: tuple[str, ...] = (SEGMENTS_POOL,)

# What `mmdiag apply` takes: a strategy, a content hash or the segment pool; the last two stack
# on a strategy and on each other (one patch of each axis at a time).
PATCHES: tuple[str, ...] = PATCHABLE_STRATEGIES + PATCHABLE_HASHES + PATCHABLE_SEGMENTS


def axis_of(name: str) -> str:
    """'strategy', 'hash' or 'segments': one patch of each axis can be applied at a time."""
    if name in PATCHABLE_HASHES:
        return "hash"
    return "segments" if name in PATCHABLE_SEGMENTS else "strategy"


def strategy_module(name: str):
    if name in PATCHABLE_HASHES:
        mod = import_module(f"{__name__}.content_hash")
        return SimpleNamespace(build=partial(mod.build, name=name), STRATEGY=name)
    if name in PATCHABLE_SEGMENTS:
        mod = import_module(f"{__name__}.pool")
        return SimpleNamespace(build=mod.build, STRATEGY=name)
    if name not in PATCHABLE_STRATEGIES:
        raise KeyError(name)
    return import_module(f"{__name__}.{name}")
