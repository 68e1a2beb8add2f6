"""The strategy registry: one name per way of getting mm inputs to every TP rank.

Names come from mmdiag.vocab.STRATEGIES and are the same in the replay, the live
profiler, recommend, apply and the report.
"""
from __future__ import annotations

from ..errors import MmdiagError
from ..vocab import STRATEGIES
from .async_ import Async
from .base import Strategy
from .batch import Batch
from .commit import Commit
from .cond import Cond
from .dict_ import Dict
from .dict_async import DictAsync
from .precompute import Precompute
from .revert import Revert
from .shm import Shm

REGISTRY: dict[str, type[Strategy]] = {c.name: c for c in (Revert, Commit, Dict, Batch, Precompute, Async, Cond, DictAsync, Shm)}
assert tuple(REGISTRY) == STRATEGIES, "registry and vocabulary disagree"
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
