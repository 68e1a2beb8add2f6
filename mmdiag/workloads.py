"""Workload profiles (data in profiles/) and trace synthesis from them.

Feature shapes come from model geometry (mmdiag.geometry, profiles/models/*.toml).
Arrivals follow `sglang.bench_serving`: Poisson at `--request-rate`, at most
`--max-concurrency` in flight; `synthesize_images` is its `--dataset-name image`.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ProfileError
from .ingest.bench_serving import defaults as bench_defaults
from .ingest.bench_serving import parse_image_resolution, parse_request_rate
# Model geometry (profiles/models) lives below, shared with ingest's dump conversion.
from .geometry import feature_shape, header_model, load_model, model_names, sampled_frames, smart_resize  # noqa: F401
from .tables import PROFILES_DIR, load_table
from .trace import MMItem, TraceHeader, TraceRequest, write_trace



def _names(sub: str) -> list[str]:
    d = PROFILES_DIR / sub
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def workload_names() -> list[str]:
    return _names("workloads")


def defaults() -> dict[str, Any]:
    return load_table(PROFILES_DIR / "defaults.toml")


@dataclass
class Workload:
    name: str
    data: dict[str, Any]
    model: dict[str, Any]

    @property
    def description(self) -> str:
        return " ".join(self.data.get("description", "").split())


def load_workload(name_or_path: str) -> Workload:
    """A profile by name (profiles/workloads/NAME.toml) or by path to a .toml file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        data, name = load_table(p), p.stem
    elif name_or_path in workload_names():
        data, name = load_table(PROFILES_DIR / "workloads" / f"{name_or_path}.toml"), name_or_path
    else:
        raise ProfileError(f"unknown workload profile {name_or_path!r}",
                           fix=f"choose one of: {', '.join(workload_names())} (or a path to a .toml profile)")
    _check_profile(data, name)
    return Workload(name, data, load_model(data["model"]))


def _check_profile(d: dict[str, Any], name: str) -> None:
    where = f"profile {name}"
    for key in ("model", "arrival", "mix"):
        if key not in d:
            raise ProfileError(f"missing key {key!r}", where=where)
    if not isinstance(d["arrival"], dict):
        raise ProfileError("[arrival] must be a table with mode = 'poisson' or 'closed'", where=where)
    mode = d["arrival"].get("mode")
    need = {"poisson": "request_rate", "closed": "max_concurrency"}.get(mode)
    if need is None:
        raise ProfileError(f"arrival.mode must be 'poisson' or 'closed', got {mode!r}", where=where)
    v = d["arrival"].get(need)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ProfileError(f"arrival.{need} must be a positive number", where=where)
    if not isinstance(d["mix"], list) or not d["mix"]:
        raise ProfileError("mix must be a non-empty list of [[mix]] tables", where=where)
    for k, m in enumerate(d["mix"]):
        w = m.get("weight", 1.0) if isinstance(m, dict) else None
        if not isinstance(w, (int, float)) or w < 0:
            raise ProfileError(f"mix[{k}].weight must be a non-negative number", where=where)
        for j, it in enumerate(m.get("items", [])):
            if not isinstance(it, dict):
                raise ProfileError(f"mix[{k}].items[{j}] must be a table", where=where)
            need_keys = ITEM_KEYS.get(it.get("modality"))
            if need_keys is None:
                raise ProfileError(f"mix[{k}].items[{j}].modality must be one of {', '.join(ITEM_KEYS)}", where=where)
            for key in need_keys:
                val = it.get(key)
                if not isinstance(val, (int, float)) or isinstance(val, bool) or val <= 0:
                    raise ProfileError(f"mix[{k}].items[{j}].{key} must be a positive number", where=where)


# What each item kind needs in a profile's mix.
ITEM_KEYS = {"image": ("width", "height"), "video": ("width", "height", "frames"), "audio": ("seconds",)}


# --- synthesis -----------------------------------------------------------------

def arrival_for(default: dict[str, Any], n: int, request_rate: float | str | None = None,
                max_concurrency: int | None = None) -> dict[str, Any]:
    """The trace's arrival, as bench_serving's pair means it: requests sent as a Poisson
    process at --request-rate (inf: all at time 0), at most --max-concurrency in flight
    (both together: a closed loop that admits no request before its Poisson time)."""

    rate = parse_request_rate(request_rate)
    if max_concurrency is not None and max_concurrency < 1:
        raise ProfileError("--max-concurrency must be at least 1")
    if rate is None and max_concurrency is None:
        return dict(default)
    finite = rate is not None and not math.isinf(rate)
    if max_concurrency is None:
        return {"mode": "poisson", "request_rate": rate} if finite else {"mode": "closed", "max_concurrency": n}
    arrival: dict[str, Any] = {"mode": "closed", "max_concurrency": int(max_concurrency)}
    if finite:
        arrival["request_rate"] = rate
    return arrival


def _arrivals(arrival: dict[str, Any], rng: random.Random) -> Iterator[float]:
    """Arrival offsets: the first request at 0, then exponential gaps at the request rate
    (as bench_serving sends them); all at 0 without a rate."""
    rate, t = arrival.get("request_rate"), 0.0
    while True:
        yield t
        if rate:
            t += rng.expovariate(rate)


def _check_n(n: int) -> None:
    if n < 1:
        raise ProfileError("-n/--num-prompts must be at least 1")


def _header(source: dict[str, Any], model: dict[str, Any], arrival: dict[str, Any]) -> TraceHeader:
    return TraceHeader(source={"tool": "mmdiag trace synth", **source},
                       model=header_model(model), arrival=arrival)


def synthesize(workload: Workload, n: int, *, request_rate: float | str | None = None,
               max_concurrency: int | None = None, seed: int = 0) -> tuple[TraceHeader, Iterator[TraceRequest]]:
    """A trace header and a lazy request stream, deterministic in `seed`."""
    _check_n(n)
    arrival = arrival_for(workload.data["arrival"], n, request_rate, max_concurrency)
    model = workload.model
    mix = workload.data["mix"]
    weights = [m.get("weight", 1.0) for m in mix]
    shapes = [[(it["modality"], feature_shape(model, it)) for it in m.get("items", [])] for m in mix]
    prompt = workload.data.get("prompt", {})
    pmin, pmax = int(prompt.get("min", 128)), int(prompt.get("max", 128))
    header = _header({"profile": workload.name, "seed": seed, "requests": n}, model, arrival)

    def requests() -> Iterator[TraceRequest]:
        rng = random.Random(seed)
        times = _arrivals(arrival, random.Random(seed + 1))
        for i in range(n):
            k = rng.choices(range(len(mix)), weights=weights)[0]
            items = tuple(MMItem(mod, shape, model.get("dtype", "float32")) for mod, shape in shapes[k])
            yield TraceRequest(f"r{i:06d}", next(times), rng.randint(pmin, pmax), items)

    return header, requests()


@dataclass(frozen=True)
class ImageDataset:
    """bench_serving's `--dataset-name image` options (defaults: profiles/bench_serving.toml)."""
    image_count: int
    image_resolution: str
    random_image_count: bool = False
    random_input_len: int = 1024
    random_range_ratio: float = 0.0

    @classmethod
    def from_options(cls, **given: Any) -> "ImageDataset":
        d = bench_defaults()
        d.pop("num_prompts", None)
        d.update({k: v for k, v in given.items() if v is not None})
        return cls(**d)


def synthesize_images(model_name: str, n: int, ds: ImageDataset, *, request_rate: float | str | None = None,
                      max_concurrency: int | None = None,
                      seed: int = 0) -> tuple[TraceHeader, Iterator[TraceRequest]]:
    """bench_serving's image dataset as a trace: `image_count` images per request (1 to
    image_count with random_image_count) of `image_resolution`, text lengths drawn as its
    random dataset draws them, arrivals as its --request-rate / --max-concurrency."""

    _check_n(n)
    if ds.image_count < 1:
        raise ProfileError("--image-count must be at least 1")
    if ds.random_input_len < 0 or not 0.0 <= ds.random_range_ratio <= 1.0:
        raise ProfileError("--random-input-len must be >= 0 and --random-range-ratio in [0, 1]")
    res = parse_image_resolution(ds.image_resolution)
    model = load_model(model_name)
    arrival = arrival_for({"mode": "closed", "max_concurrency": n}, n, request_rate, max_concurrency)
    rate = parse_request_rate(request_rate)
    bench = {"dataset_name": "image", "num_prompts": n, **ds.__dict__, "model": model_name,
             "request_rate": "inf" if rate is None or math.isinf(rate) else rate, "max_concurrency": max_concurrency}
    header = _header({"bench_serving": bench, "seed": seed, "requests": n}, model, arrival)
    lo_len = max(int(ds.random_input_len * ds.random_range_ratio), 1)
    shapes: dict[tuple[int, int], tuple[int, ...]] = {}

    def shape(w: int, h: int) -> tuple[int, ...]:
        if (w, h) not in shapes:
            shapes[(w, h)] = feature_shape(model, {"modality": "image", "width": w, "height": h})
        return shapes[(w, h)]

    def requests() -> Iterator[TraceRequest]:
        rng = random.Random(seed)
        times = _arrivals(arrival, random.Random(seed + 1))
        for i in range(n):
            count = rng.randint(1, ds.image_count) if ds.random_image_count else ds.image_count
            sizes = [(rng.randint(res.min_wh[0], res.max_wh[0]), rng.randint(res.min_wh[1], res.max_wh[1]))
                     for _ in range(count)]
            items = tuple(MMItem("image", shape(w, h), model.get("dtype", "float32")) for w, h in sizes)
            plen = rng.randint(lo_len, ds.random_input_len) if ds.random_input_len > 0 else 0
            yield TraceRequest(f"r{i:06d}", next(times), plen, items)

    return header, requests()


# A repeat copies one of the last REPEAT_POOL multimodal requests (a client re-sending a recent image).
REPEAT_POOL = 64


def with_repeats(reqs: Iterator[TraceRequest], share: float, seed: int = 0) -> Iterator[TraceRequest]:
    """Give every item a content id; with probability `share` a multimodal request instead
    repeats a recent one's items (same shapes, same content ids: identical feature bytes)."""
    rng = random.Random(seed + 2)  # its own stream: the rest of the trace is unchanged
    pool: list[tuple[MMItem, ...]] = []
    fresh = 0
    for r in reqs:
        if r.mm and pool and rng.random() < share:
            r = dataclasses.replace(r, mm=rng.choice(pool))
        elif r.mm:
            items = tuple(dataclasses.replace(it, content=fresh + k) for k, it in enumerate(r.mm))
            fresh += len(items)
            pool = (pool + [items])[-REPEAT_POOL:]
            r = dataclasses.replace(r, mm=items)
        yield r


def synth_to_file(profile: str, n: int | None, out: str, repeat_share: float | None = None, **kw: Any) -> int:
    wl = load_workload(profile)
    header, reqs = synthesize(wl, n if n is not None else int(wl.data.get("requests", 200)), **kw)
    return _write(out, header, reqs, repeat_share, kw.get("seed", 0))


def synth_images_to_file(model_name: str, n: int | None, out: str, ds: ImageDataset,
                         repeat_share: float | None = None, **kw: Any) -> int:
    header, reqs = synthesize_images(model_name, n if n is not None else int(bench_defaults()["num_prompts"]),
                                     ds, **kw)
    return _write(out, header, reqs, repeat_share, kw.get("seed", 0))


def _write(out: str, header: TraceHeader, reqs: Iterator[TraceRequest], repeat_share: float | None, seed: int) -> int:
    if repeat_share is not None:
        if not 0.0 <= repeat_share <= 1.0:
            raise ProfileError(f"repeat share {repeat_share} is not between 0 and 1", where="--repeat-share",
                               fix="give a share such as 0.3")
        header.source["repeat_share"] = repeat_share
        reqs = with_repeats(reqs, repeat_share, seed)
    return write_trace(out, header, reqs)
