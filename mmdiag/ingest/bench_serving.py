"""sglang.bench_serving's vocabulary: image dataset options, and its result files.

The presets and defaults are data (profiles/bench_serving.toml), checked against the
wheels' own source by the tests. Only the words are shared; the code is mmdiag's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..errors import ProfileError


@lru_cache(maxsize=1)
def facts() -> dict[str, Any]:
    from ..workloads import PROFILES_DIR, _load_toml
    return _load_toml(PROFILES_DIR / "bench_serving.toml")


def presets() -> dict[str, tuple[int, int]]:
    """--image-resolution presets: name -> (width, height)."""
    return {k: (int(v[0]), int(v[1])) for k, v in facts()["image_resolution"].items()}


def defaults() -> dict[str, Any]:
    return dict(facts()["defaults"])


@dataclass(frozen=True)
class Resolution:
    """Image sizes bench_serving draws: fixed when min == max, else uniform per side."""
    text: str
    min_wh: tuple[int, int]
    max_wh: tuple[int, int]

    @property
    def fixed(self) -> bool:
        return self.min_wh == self.max_wh


def _one_size(text: str) -> tuple[int, int] | None:
    if text in presets():
        return presets()[text]
    parts = text.strip().lower().split("x")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[1]), int(parts[0])      # "HxW": height first
    return None


def parse_image_resolution(text: str) -> Resolution:
    """4k, 1080p, 720p, 360p, HxW (height first) or random:HxW-HxW."""
    bad = ProfileError(f"--image-resolution {text!r} is not a resolution",
                       fix=f"use {', '.join(presets())}, HxW with the height first (e.g. 700x1120), "
                           "or random:HxW-HxW")
    s = text.strip()
    if s.lower().startswith("random:"):
        bounds = s[len("random:"):].split("-", 1)
        sizes = [_one_size(b) for b in bounds] if len(bounds) == 2 else [None]
        if None in sizes:
            raise bad
        lo, hi = sizes
        if lo[0] > hi[0] or lo[1] > hi[1]:
            raise ProfileError(f"--image-resolution {text!r}: the minimum exceeds the maximum")
        return Resolution(s, lo, hi)
    size = _one_size(s)
    if size is None:
        raise bad
    return Resolution(s, size, size)


def parse_request_rate(value: float | str | None) -> float | None:
    """bench_serving's --request-rate: req/s, or inf (every request at time 0)."""
    if value is None:
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ProfileError(f"--request-rate {value!r} is not a number", fix="give req/s, or inf") from None
    if math.isnan(rate) or rate <= 0:
        raise ProfileError(f"--request-rate must be positive (or inf), got {value!r}")
    return rate
