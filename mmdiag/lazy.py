"""Heavy modules imported when first used, not when mmdiag is imported: `mmdiag --help`,
`doctor` or `report` never pay torch's second of start-up (issue 8).

    torch = lazy_module("torch")          # a stand-in; torch.tensor(...) imports torch then

Not importlib.util.LazyLoader: finding the spec of "torch.distributed" imports torch (the
parent package) at once, and the stand-in it puts in sys.modules makes "is torch loaded?"
(the --help test's check) answer yes before anything is loaded.
"""
from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any


class _LazyModule(types.ModuleType):
    def _real(self) -> types.ModuleType:
        name = self.__dict__["_lazy_name"]
        return sys.modules.get(name) or import_module(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        # A patch (mmpath/collectives.py times torch's pickling this way) must land on the real module.
        setattr(self._real(), attr, value)


def lazy_module(name: str) -> types.ModuleType:
    """`name` if already imported, else a stand-in that imports it on first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    mod = _LazyModule(name)
    mod.__dict__["_lazy_name"] = name
    return mod
