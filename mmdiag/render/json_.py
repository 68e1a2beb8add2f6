"""Machine output: every JSON mmdiag prints or writes is made here (strict: NaN -> null)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..fileio import dumps_json


def as_data(obj: Any) -> Any:
    """A result object as plain data: its `to_dict()`, a dataclass's fields, or itself."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def render_json(obj: Any) -> str:
    return dumps_json(as_data(obj))


def render_speedscope(stacks: Any) -> str:
    return dumps_json(stacks.to_speedscope())
