"""SGLang request dumps -> a trace (`mmdiag trace from-dump`).

SGLang's tokenizer manager dumps the requests it served (`--dump-requests-folder`, every
`--dump-requests-threshold` requests) and, on a crash, the last five minutes of them
(`--crash-dump-folder`, in a HOSTNAME subfolder): a pickle of
    {"server_args": ServerArgs | dict | None, "requests": [(GenerateReqInput, out_dict,
     created_time, finished_time), ...], ...}
(0.5.2x adds "config_updates", "resolved_config", "launch_command" and may store
server_args as a plain dict, or None when it would not pickle).

A dump is untrusted input: unpickling can run code. `SafeUnpickler` never imports a
class the file names. SGLang classes from the modules in ALLOWED_MODULES become inert
`Record`s (their fields only), a few plain builtins are rebuilt by mmdiag's own code,
and any other name stops the load with a one-line error. SGLang is never imported.
"""
from __future__ import annotations

import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from ..errors import MmdiagError
from ..trace import MMItem, TraceHeader, TraceRequest, write_trace
from .media import Media, resolve_image, resolve_video

# Modules whose classes a dump legitimately holds (never imported: names only).
ALLOWED_MODULES = (
    "sglang.srt.managers.io_struct",     # GenerateReqInput, EmbeddingReqInput and their bases
    "sglang.srt.utils",                  # ImageData, VideoData (defined in utils.common)
    "sglang.srt.server_args",            # ServerArgs; 0.5.2x pickles it via _rebuild_server_args
    "sglang.srt.arg_groups",             # 0.5.2x: config records nested in ServerArgs
    "sglang.srt.lora.lora_registry",     # LoRARef in a request's lora_path
    "sglang.srt.sampling.sampling_params",
)
REQUEST_CLASSES = ("GenerateReqInput", "EmbeddingReqInput")
# A longer silence between two recorded arrivals is refused unless --max-gap shortens it: a
# replay waits every gap out, and a stray created_time (a clock reset, a dump of another day)
# would hold it for hours while measuring nothing.
MAX_GAP_S = 600.0


class DumpError(MmdiagError):
    """A dump that is refused, truncated or not an SGLang request dump."""


class Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Record:
    """An SGLang object from a dump, as its fields only; it has no behaviour."""
    _sglang_name = "?"

    def __new__(cls, *args: Any, **kw: Any) -> "Record":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kw: Any) -> None:   # pickle REDUCE: cls(*args)
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:          # pickle BUILD
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:                           # (dict state, slot state)
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def get(self, key: str, default: Any = None) -> Any:
        """A field, from the instance state or a dict among the constructor arguments
        (0.5.2x rebuilds ServerArgs from `(cls, fields, bookkeeping)`)."""
        if key in self.__dict__:
            return self.__dict__[key]
        for a in self.__dict__.get("_args", ()):
            if isinstance(a, dict) and key in a:
                return a[key]
            if isinstance(a, Record) and a is not self and key in a.__dict__:
                return a.__dict__[key]
        return default

    @property
    def kind(self) -> str:
        return self._sglang_name.rsplit(".", 1)[-1]


def _bytearray(data: Any = b"", *rest: Any) -> bytearray:
    if not isinstance(data, (bytes, str)) or (isinstance(data, str) and rest not in ((), ("latin-1",), ("latin1",))):
        raise Refused("builtins.bytearray with a non-bytes argument")
    return bytearray(data.encode("latin-1") if isinstance(data, str) else data)


# Plain data some pickles name by global; rebuilt by mmdiag's own functions, never looked up.
PLAIN = {
    ("collections", "OrderedDict"): lambda *a: dict(*a[:1]) if not a or isinstance(a[0], (list, tuple, dict)) else {},
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "set"): lambda *a: set(*a[:1]) if not a or isinstance(a[0], (list, tuple)) else set(),
    ("builtins", "frozenset"): lambda *a: frozenset(*a[:1]) if not a or isinstance(a[0], (list, tuple)) else frozenset(),
}
# Classes outside SGLang a request may hold, kept as inert records like SGLang's own.
FOREIGN_RECORDS = {("PIL.Image", "Image")}   # the Engine API takes PIL images

_RECORD_CLASSES: dict[str, type] = {}


def _record_class(full: str) -> type:
    if full not in _RECORD_CLASSES:
        _RECORD_CLASSES[full] = type(full.rsplit(".", 1)[-1], (Record,), {"_sglang_name": full})
    return _RECORD_CLASSES[full]


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PLAIN:
            return PLAIN[(module, name)]
        if (module, name) in FOREIGN_RECORDS:
            return _record_class(f"{module}.{name}")
        if any(module == m or module.startswith(m + ".") for m in ALLOWED_MODULES):
            return _record_class(f"{module}.{name}")
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("a persistent id (tensor storage)")


def load_dump(path: str) -> dict[str, Any]:
    """One dump file, loaded safely; a one-line DumpError for anything else."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f).load()
    except Refused as e:
        raise DumpError(f"refused: the pickle references {e.name}, which is not an SGLang request class; "
                        "nothing in it was run", where=path,
                        fix="convert only dumps SGLang wrote (--dump-requests-folder, --crash-dump-folder)") from None
    except OSError as e:
        raise DumpError(f"cannot read ({e.strerror})", where=path) from None
    except Exception as e:   # truncated, corrupt or hostile bytes: pickle raises many kinds
        raise DumpError(f"truncated or not a pickle ({type(e).__name__}: {str(e)[:80]})", where=path,
                        fix="a dump still being written is incomplete: wait for it, or leave the file out") from None
    reqs = obj.get("requests") if isinstance(obj, dict) else None
    if not isinstance(reqs, (list, tuple)):
        raise DumpError("not an SGLang request dump (no 'requests' list)", where=path,
                        fix="give files from --dump-requests-folder or --crash-dump-folder")
    return obj


def dump_files(paths: list[str]) -> Iterator[str]:
    """The files to read: each file given, and every *.pkl under each folder (sorted)."""
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".pkl"))
            if not found:
                raise DumpError("no *.pkl dump files in this folder", where=p)
            yield from found
        elif os.path.isfile(p):
            yield p
        else:
            raise DumpError("no such file or folder", where=p,
                            fix="give SGLang dump files (*.pkl) or the folders it dumped them to "
                                "(--dump-requests-folder, --crash-dump-folder)")


# --- conversion ---------------------------------------------------------------

@dataclass
class Conversion:
    """What `trace from-dump` read, wrote and left out (and why)."""
    files: int = 0
    requests: int = 0
    model: str | None = None
    model_path: str | None = None
    skipped: Counter = field(default_factory=Counter)       # requests left out, by reason
    defaulted: int = 0                                       # images given --default-size
    prompt_len_from: Counter = field(default_factory=Counter)
    gaps_shortened: int = 0                                  # idle gaps cut to --max-gap


def _field(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, (dict, Record)) else default


def _listify(data: Any) -> list[Any]:
    if data is None:
        return []
    return list(data) if isinstance(data, (list, tuple)) else [data]


def _batch(req: Record) -> list[dict[str, Any]]:
    """A GenerateReqInput as single requests (a batch one holds lists per field)."""
    text, ids = req.get("text"), req.get("input_ids")
    n = len(text) if isinstance(text, (list, tuple)) else \
        len(ids) if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple)) else 0
    keys = ("text", "input_ids", "image_data", "video_data", "audio_data", "rid")
    if n == 0:
        return [{k: req.get(k) for k in keys}]
    out = []
    for i in range(n):
        one = {}
        for k in keys:
            v = req.get(k)
            one[k] = v[i] if isinstance(v, (list, tuple)) and len(v) == n else (v if k != "rid" else None)
        out.append(one)
    return out


class Converter:
    """Turns dump entries into compact trace requests, counting what it leaves out."""

    def __init__(self, model: dict[str, Any], default_size: tuple[int, int] | None, conv: Conversion):
        from ..workloads import feature_shape, sampled_frames
        self.model, self.default_size, self.conv = model, default_size, conv
        self._shape = lambda w, h: feature_shape(model, {"modality": "image", "width": w, "height": h})
        self._frames = lambda m: sampled_frames(model, m.frames, m.seconds) if "video" in model else None
        self._vshape = lambda w, h, n: feature_shape(model, {"modality": "video", "width": w, "height": h,
                                                             "frames": n})
        self.tokens_per_row = 1.0 / (model.get("merge_size", 1) ** 2)

    def _image(self, ref: Any) -> Media:
        if isinstance(ref, Record):   # ImageData(url=...), or a PIL image's pickled state
            if ref.kind == "Image" and isinstance(ref.get("_state"), (list, tuple)) and len(ref.get("_state")) > 2:
                size = ref.get("_state")[2]
                return Media(size=tuple(size)) if isinstance(size, (list, tuple)) and len(size) == 2 else Media(skip="unreadable")
            ref = ref.get("url")
        m = resolve_image(ref)
        if m.skip == "url" and self.default_size:
            self.conv.defaulted += 1
            return Media(size=self.default_size)
        return m

    def request(self, one: dict[str, Any], out: Any, created: float, index: int,
                seen: set[str]) -> tuple[float, TraceRequest] | None:
        meta = _field(out, "meta_info", {})
        rid = one.get("rid") if isinstance(one.get("rid"), str) else _field(meta, "id")
        rid = rid if isinstance(rid, str) and rid else f"dump{index:06d}"
        if rid in seen:
            self.conv.skipped["duplicate request id (in more than one dump)"] += 1
            return None
        if one.get("audio_data"):
            self.conv.skipped["audio input (mmdiag reads image and video sizes only)"] += 1
            return None
        items = []
        dtype = self.model.get("dtype", "float32")
        for ref in _listify(one.get("image_data")):
            m = self._image(ref)
            if m.size is None:
                self.conv.skipped[SKIP_WORDS[m.skip or "unsupported"]] += 1
                return None
            items.append(MMItem("image", self._shape(*m.size), dtype))
        for ref in _listify(one.get("video_data")):
            m = resolve_video(ref.get("url") if isinstance(ref, Record) else ref)
            n = self._frames(m) if m.size is not None else None
            if n is None:
                self.conv.skipped[VIDEO_SKIP_WORDS.get(m.skip, VIDEO_SKIP_WORDS["unreadable"])] += 1
                return None
            items.append(MMItem("video", self._vshape(*m.size, n), dtype))
        seen.add(rid)
        return created, TraceRequest(rid, 0.0, self._prompt_len(one, meta, items), tuple(items))

    def _prompt_len(self, one: dict[str, Any], meta: Any, items: list[MMItem]) -> int:
        tokens = _field(meta, "prompt_tokens")
        mm_tokens = int(sum(it.shape[0] for it in items) * self.tokens_per_row)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            self.conv.prompt_len_from["meta_info.prompt_tokens"] += 1
            return max(tokens - mm_tokens, 0)     # SGLang counts the expanded image tokens
        ids, text = one.get("input_ids"), one.get("text")
        if isinstance(ids, (list, tuple)):
            self.conv.prompt_len_from["input_ids"] += 1
            return len(ids)
        self.conv.prompt_len_from["text, ~4 bytes per token"] += 1
        return len(text.encode("utf-8", "replace")) // 4 if isinstance(text, str) else 0


VIDEO_SKIP_WORDS = {
    "url": "video given as a URL (never fetched)",
    "unreadable": "video whose size and frames could not be read (MP4/MOV only), or too short",
    "precomputed": "precomputed video features",
}
SKIP_WORDS = {
    "url": "image given as a URL (never fetched; give --default-size WxH)",
    "unreadable": "image whose size could not be read",
    "precomputed": "precomputed image features",
    "unsupported": "image of an unsupported kind",
}


def geometry_for(model_path: str | None, where: str) -> str:
    """The profiles/models geometry whose `model_paths` patterns match server_args.model_path."""
    from ..workloads import load_model, model_names
    if not isinstance(model_path, str) or not model_path:
        raise DumpError("the dump has no server_args.model_path (SGLang stores None when they would not pickle)",
                        where=where, fix=f"name the geometry with --model ({', '.join(model_names())})")
    low = model_path.lower()
    for name in model_names():
        if any(p.lower() in low for p in load_model(name).get("model_paths", [])):
            return name
    raise DumpError(f"no model geometry matches {model_path!r}", where=where,
                    fix=f"name one with --model ({', '.join(model_names())}), or add profiles/models/NAME.toml")


def _entries(d: dict[str, Any], conv: Conversion) -> Iterator[tuple[Record, Any, float]]:
    for entry in d["requests"]:
        ok = isinstance(entry, (list, tuple)) and len(entry) >= 3 and isinstance(entry[0], Record)
        if not ok or entry[0].kind not in REQUEST_CLASSES:
            conv.skipped["entry that is not (GenerateReqInput, output, created, finished)"] += 1
        elif (created := _seconds(entry[2])) is None:
            conv.skipped["request without a created_time"] += 1
        else:
            yield entry[0], entry[1], created


def _seconds(x: Any) -> float | None:
    """A finite time stamp, or None (NaN, inf or a huge int would break the trace's order)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _arrivals(records: list, max_gap: float | None, conv: Conversion) -> Iterator[TraceRequest]:
    """Sorted (created, request, file) records as trace requests timed from the first; a gap
    over max_gap is cut to it; with none given, a gap over MAX_GAP_S is refused."""
    t, prev, prev_rid = 0.0, records[0][0], records[0][1].rid
    for created, tr, path in records:
        gap = created - prev
        if max_gap is not None and gap > max_gap:
            gap, conv.gaps_shortened = max_gap, conv.gaps_shortened + 1
        elif max_gap is None and gap > MAX_GAP_S:
            span = records[-1][0] - records[0][0]
            raise DumpError(f"request {tr.rid!r} was created {gap:.0f} s after {prev_rid!r} (the dumps span "
                            f"{span / 3600:.1f} h of created_time): a replay would wait that long", where=path,
                            fix="pass --max-gap S to shorten every idle gap to S seconds, or convert the dumps "
                                "of one busy period")
        t, prev, prev_rid = t + gap, created, tr.rid
        yield replace(tr, t=t)


def convert(paths: list[str], out: str, *, model: str | None = None,
            default_size: tuple[int, int] | None = None, max_gap: float | None = None) -> Conversion:
    """Read dump files one at a time (a folder is never held whole), keep a compact
    record per request, then write the trace sorted by created_time."""
    from ..fileio import check_writable
    from ..workloads import header_model, load_model

    check_writable(out, "-o")   # before reading a folder of dumps, not after
    conv, records, seen = Conversion(), [], set()
    converter: Converter | None = None
    for path in dump_files(paths):
        d = load_dump(path)
        conv.files += 1
        mp = _field(d.get("server_args"), "model_path")
        if isinstance(mp, str) and conv.model_path and mp != conv.model_path:
            raise DumpError(f"served {mp!r}, the earlier dumps {conv.model_path!r}", where=path,
                            fix="convert each model's dumps into its own trace")
        conv.model_path = mp if isinstance(mp, str) else conv.model_path
        if converter is None:
            conv.model = model or geometry_for(mp, path)
            converter = Converter(load_model(conv.model), default_size, conv)
        for req, output, created in _entries(d, conv):
            for one in _batch(req):
                r = converter.request(one, output, created, len(records), seen)
                if r is not None:
                    records.append((*r, path))
        del d
    if not records:
        raise DumpError("no request could be converted" + (f" (left out: {skipped_text(conv)})" if conv.skipped else ""),
                        where=", ".join(paths))
    records.sort(key=lambda r: r[0])
    arrivals = list(_arrivals(records, max_gap, conv))   # refuses before a byte is written
    header = TraceHeader(
        source={"tool": "mmdiag trace from-dump", "files": conv.files, "model_path": conv.model_path,
                "skipped": dict(conv.skipped), "default_size": list(default_size) if default_size else None,
                "defaulted_images": conv.defaulted, "prompt_len_from": dict(conv.prompt_len_from),
                **({"max_gap_s": max_gap, "gaps_shortened": conv.gaps_shortened} if max_gap is not None else {})},
        model=header_model(converter.model), arrival={"mode": "recorded"})
    conv.requests = write_trace(out, header, iter(arrivals))
    return conv


def skipped_text(conv: Conversion) -> str:
    # "reason: count", as each reason is worded for one request
    return "; ".join(f"{why}: {n}" for why, n in conv.skipped.most_common())
