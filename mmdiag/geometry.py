"""Model geometry (data in profiles/models/*.toml): what shape a feature has.

Images are resized as Qwen2-VL's smart_resize does (sides to multiples of patch*merge,
pixel budget), then one row per patch; video folds `temporal_patch_size` frames into a
row. Read by trace synthesis (mmdiag.workloads) and by the dump conversion (mmdiag.ingest.dump).
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ProfileError
from .tables import PROFILES_DIR, load_table


def _names() -> list[str]:
    d = PROFILES_DIR / "models"
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def model_names() -> list[str]:
    return _names()


def header_model(model: dict[str, Any]) -> dict[str, Any]:
    """The geometry as a trace header carries it (scalars only)."""
    return {k: v for k, v in model.items() if isinstance(v, (str, int, float, bool))}


def load_model(name: str) -> dict[str, Any]:
    if name not in _names():
        raise ProfileError(f"unknown model geometry {name!r}", fix=f"known: {', '.join(_names())}")
    return load_table(PROFILES_DIR / "models" / f"{name}.toml")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: round each side to a multiple of `factor`, then scale
    into [min_pixels, max_pixels] keeping the aspect ratio."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def feature_shape(model: dict[str, Any], spec: dict[str, Any]) -> tuple[int, ...]:
    """pixel_values shape for one item spec ({modality, width, height[, frames|seconds]})."""
    modality = spec["modality"]
    if modality == "audio":
        a = model["audio"]
        return (a["mel_bins"], int(round(spec["seconds"] * a["frames_per_second"])))
    p, m, tp = model["patch_size"], model["merge_size"], model["temporal_patch_size"]
    row = model["channels"] * tp * p * p
    factor = p * m
    if modality == "image":
        h, w = smart_resize(spec["height"], spec["width"], factor, model["min_pixels"], model["max_pixels"])
        return ((h // p) * (w // p), row)
    if modality == "video":
        frames = max(tp, int(spec["frames"]) // tp * tp)
        lo, hi = model["min_pixels"], model["video_max_pixels"]
        v = model.get("video")
        if v:   # the processor's per-frame budget: a long video gets smaller frames
            lo = v["min_pixels"]
            hi = max(min(hi, v["total_pixels"] / frames * v["frame_factor"]), int(lo * 1.05))
        h, w = smart_resize(spec["height"], spec["width"], factor, lo, hi)
        return ((frames // tp) * (h // p) * (w // p), row)
    raise ProfileError(f"unknown modality {modality!r} in mix")


def sampled_frames(model: dict[str, Any], total_frames: int, seconds: float) -> int | None:
    """Frames the model's processor takes from a video file of `total_frames` over `seconds`
    (SGLang's Qwen-VL smart_nframes); None when the file has too few frames for it."""
    v = model["video"]
    f = v["frame_factor"]
    lo = math.ceil(v["min_frames"] / f) * f
    hi = math.floor(min(v["max_frames"], total_frames) / f) * f
    n = seconds * v["fps"] if seconds > 0 else lo
    n = math.floor(min(max(n, lo), hi, total_frames) / f) * f
    return n if f <= n <= total_frames else None
