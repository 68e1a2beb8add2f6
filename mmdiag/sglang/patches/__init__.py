"""One module per patchable strategy (names: mmdiag.strategies.PATCHABLE, from each strategy's `patch`)."""
from __future__ import annotations

from importlib import import_module

from ...strategies import PATCHABLE as PATCHABLE_STRATEGIES


def strategy_module(name: str):
    if name not in PATCHABLE_STRATEGIES:
        raise KeyError(name)
    return import_module(f"{__name__}.{name}")
