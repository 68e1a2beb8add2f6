"""Acceptance criteria: data in profiles/criteria/*.toml, checked key by key.

A criteria file is a set of tables, one per criterion, each with one threshold
field and an optional `description`:

    [scheduler_cpu_pct]   max = 60.0    every rank's scheduler CPU (% of one core)       equal load
    [cpu_per_request_ratio] max = 1.0   busiest rank's CPU-ms per request, after / before  per request
    [throughput_ratio]    min = 1.0     after / before request throughput                 saturation
    [p99_latency_ms]      max = 2000.0  p99 request latency of the after Run              equal load
    [gil_wait_pct]        max = 20.0    every rank's GIL wait share (live profiles)       any
    [ranks_agree]         require = true  every rank ends with the same hashes            any

The last column is where a criterion means something (mmdiag.analysis.conditions):
a criterion the Runs did not measure under its condition is n/a, never a fail.

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
from ..tables import PROFILES_DIR
from .conditions import ANY, EQUAL_LOAD, PER_REQUEST, SATURATION

DEFAULT_FILE = PROFILES_DIR / "criteria" / "default.toml"

# criterion -> (threshold field, kind, condition): "max"/"min" are numbers >= 0 ("ratio" > 0),
# "require" a bool; the condition is the load under which the criterion means something.
SCHEMA: dict[str, tuple[str, str, str]] = {
    "scheduler_cpu_pct": ("max", "number", EQUAL_LOAD),
    "cpu_per_request_ratio": ("max", "ratio", PER_REQUEST),
    "throughput_ratio": ("min", "ratio", SATURATION),
    "p99_latency_ms": ("max", "number", EQUAL_LOAD),
    "gil_wait_pct": ("max", "number", ANY),
    "ranks_agree": ("require", "bool", ANY),
}


@dataclass
class Criterion:
    key: str
    field: str          # max | min | require
    value: Any
    description: str = ""

    @property
    def condition(self) -> str:
        return SCHEMA[self.key][2]

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
        raise ProfileError("no such criteria file", where=where,
                           fix="check the path (the bundled file: profiles/criteria/default.toml)") from None
    except IsADirectoryError:
        raise ProfileError("is a directory, not a criteria file", where=where,
                           fix="give a .toml criteria file (the bundled one: profiles/criteria/default.toml)") from None
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
        fld, kind, _ = SCHEMA[key]
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
