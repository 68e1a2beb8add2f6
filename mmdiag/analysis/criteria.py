"""Acceptance criteria: data in profiles/criteria/*.toml, checked key by key.

A criteria file is a set of tables, one per criterion, each with one threshold
field and an optional `description`:

    [scheduler_cpu_pct]   max = 60.0    every rank's scheduler CPU (% of one core)
    [throughput_ratio]    min = 1.0     after / before request throughput
    [p99_latency_ms]      max = 2000.0  p99 request latency of the after Run
    [gil_wait_pct]        max = 20.0    every rank's GIL wait share (live profiles)
    [ranks_agree]         require = true  every rank ends with the same hashes

Unknown tables or fields, a missing threshold, or a value of the wrong type or
sign are errors naming the file and the key.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProfileError
from ..workloads import PROFILES_DIR

DEFAULT_FILE = PROFILES_DIR / "criteria" / "default.toml"

# criterion -> (threshold field, kind): "max"/"min" are numbers >= 0 ("ratio" > 0), "require" a bool.
SCHEMA: dict[str, tuple[str, str]] = {
    "scheduler_cpu_pct": ("max", "number"),
    "throughput_ratio": ("min", "ratio"),
    "p99_latency_ms": ("max", "number"),
    "gil_wait_pct": ("max", "number"),
    "ranks_agree": ("require", "bool"),
}


@dataclass
class Criterion:
    key: str
    field: str          # max | min | require
    value: Any
    description: str = ""

    def threshold(self) -> str:
        if self.field == "require":
            return "required" if self.value else "not required"
        op = "<=" if self.field == "max" else ">="
        return f"{op} {self.value:g}"


def load_criteria(path: str | os.PathLike | None = None) -> list[Criterion]:
    p = Path(path) if path else DEFAULT_FILE
    where = str(p)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ProfileError("no such criteria file", where=where) from None
    except IsADirectoryError:
        raise ProfileError("is a directory, not a criteria file", where=where) from None
    except OSError as e:
        raise ProfileError(f"cannot read ({e.strerror})", where=where) from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"invalid TOML ({e})", where=where) from None
    return parse_criteria(data, where=where)


def parse_criteria(data: dict[str, Any], *, where: str = "<criteria>") -> list[Criterion]:
    if not data:
        raise ProfileError("no criteria in the file", where=where, fix=f"known criteria: {', '.join(SCHEMA)}")
    out = []
    for key, table in data.items():
        if key not in SCHEMA:
            raise ProfileError(f"unknown criterion {key!r}", where=where, fix=f"known criteria: {', '.join(SCHEMA)}")
        if not isinstance(table, dict):
            raise ProfileError(f"{key} must be a table ([{key}] with {SCHEMA[key][0]} = ...)", where=where)
        fld, kind = SCHEMA[key]
        unknown = sorted(set(table) - {fld, "description"})
        if unknown:
            raise ProfileError(f"unknown field {key}.{unknown[0]}", where=where,
                               fix=f"{key} takes `{fld}` and an optional `description`")
        if fld not in table:
            raise ProfileError(f"{key} has no `{fld}` threshold", where=where)
        v = table[fld]
        if kind == "bool":
            if not isinstance(v, bool):
                raise ProfileError(f"{key}.{fld} must be true or false, got {v!r}", where=where)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ProfileError(f"{key}.{fld} must be a number, got {v!r}", where=where)
            if v != v or v < 0 or (kind == "ratio" and v == 0):
                raise ProfileError(f"{key}.{fld} must be {'> 0' if kind == 'ratio' else '>= 0'}, got {v!r}",
                                   where=where)
            v = float(v)
        desc = table.get("description", "")
        if not isinstance(desc, str):
            raise ProfileError(f"{key}.description must be a string", where=where)
        out.append(Criterion(key, fld, v, " ".join(desc.split())))
    return out
