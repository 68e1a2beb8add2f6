"""The strategy registry: one name per way of getting mm inputs to every TP rank.

Names come from mmdiag.vocab.STRATEGIES and are the same in the replay, the live
profiler, recommend, apply and the report.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import MmdiagError
from ..vocab import STRATEGIES
from .base import Strategy


def _modules() -> list[str]:
    """Every module of this package but base: each defines one strategy (a new strategy is
    a new module here and its name in the vocabulary, nothing else)."""
    return [m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"]


def _defined_in(module: str) -> list[type[Strategy]]:
    mod = importlib.import_module(f"{__name__}.{module}")
    return [c for c in vars(mod).values()
            if isinstance(c, type) and issubclass(c, Strategy) and c.__module__ == mod.__name__ and "name" in c.__dict__]


_FOUND = {c.name: c for m in _modules() for c in _defined_in(m)}
assert set(_FOUND) == set(STRATEGIES), f"strategy modules and vocabulary disagree: {sorted(set(_FOUND) ^ set(STRATEGIES))}"
REGISTRY: dict[str, type[Strategy]] = {n: _FOUND[n] for n in STRATEGIES}
# The one baseline: the path a recommendation or an acceptance report measures patches against.
BASELINE: str = next(n for n, c in REGISTRY.items() if c.baseline)
# The strategies `mmdiag apply` can patch in: those whose module names a patch.
PATCHABLE: tuple[str, ...] = tuple(n for n, c in REGISTRY.items() if c.patch)


def get(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MmdiagError(f"unknown strategy {name!r}", fix=f"choose from: {', '.join(STRATEGIES)}, or 'all'") from None


def resolve(names: list[str] | tuple[str, ...]) -> list[str]:
    """Expand 'all', check names, keep the canonical order, drop repeats."""
    for n in names:
        if n != "all":
            get(n)
    if not names or "all" in names:
        return list(STRATEGIES)
    return [n for n in STRATEGIES if n in names]


class Catalog(list):
    """What every strategy says about itself, one dict per strategy in the canonical order:
    the source of `mmdiag strategies`, the replay's help and the README's table."""


def catalog() -> Catalog:
    return Catalog({"name": n, "summary": c.summary, "collectives": c.collectives,
                    "patch": f"mmdiag apply {n}" if c.patch else None, "baseline": c.baseline}
                   for n, c in REGISTRY.items())
