"""One module per patchable strategy (names: mmdiag.strategies.PATCHABLE, from each strategy's `patch`),
and content_hash for the content-hash axis (names: mmdiag.mmpath.hashing.PATCHABLE)."""
from __future__ import annotations

from functools import partial
from importlib import import_module
from types import SimpleNamespace

from ...mmpath.hashing import PATCHABLE as PATCHABLE_HASHES
from ...strategies import PATCHABLE as PATCHABLE_STRATEGIES

# What `mmdiag apply` takes: a strategy, or a content hash (which stacks on a strategy).
PATCHES: tuple[str, ...] = PATCHABLE_STRATEGIES + PATCHABLE_HASHES


def axis_of(name: str) -> str:
    """'strategy' or 'hash': one patch of each axis can be applied at a time."""
    return "hash" if name in PATCHABLE_HASHES else "strategy"


def strategy_module(name: str):
    if name in PATCHABLE_HASHES:
        mod = import_module(f"{__name__}.content_hash")
        return SimpleNamespace(build=partial(mod.build, name=name), STRATEGY=name)
    if name not in PATCHABLE_STRATEGIES:
        raise KeyError(name)
    return import_module(f"{__name__}.{name}")
