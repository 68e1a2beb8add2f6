"""The request trace: `trace.jsonl`, one header line then one line per request.

Header:  {"schema": "mmdiag.trace/1", "source": {...}, "model": {...geometry...},
          "arrival": {"mode": "poisson", "request_rate": R} | {"mode": "closed",
          "max_concurrency": C} | {"mode": "recorded"}}
Request: {"rid": "r000001", "t": 0.0123, "prompt_len": 256,
          "mm": [{"modality": "image", "shape": [4000, 1176], "dtype": "float32",
                  "hash": null}]}

`t` is the arrival offset in seconds from the start (non-decreasing). In a closed
loop (`max_concurrency`) a request is admitted when a slot frees and not before `t`.
The reader streams: a 100k-request trace is never held whole in memory.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import TraceError, json_error
from .run import write_lines_atomic
from .vocab import TRACE_SCHEMA

MODALITIES = ("image", "video", "audio")
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
ARRIVAL_MODES = ("poisson", "closed", "recorded")


@dataclass(frozen=True)
class MMItem:
    modality: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    hash: int | None = None
    # Items with the same content id carry identical feature bytes (a repeated image).
    content: int | None = None

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"modality": self.modality, "shape": list(self.shape), "dtype": self.dtype}
        if self.hash is not None:
            d["hash"] = self.hash
        if self.content is not None:
            d["content"] = self.content
        return d


@dataclass(frozen=True)
class TraceRequest:
    rid: str
    t: float
    prompt_len: int
    mm: tuple[MMItem, ...] = ()

    @property
    def mm_bytes(self) -> int:
        return sum(i.nbytes for i in self.mm)

    def to_json(self) -> dict[str, Any]:
        return {"rid": self.rid, "t": round(self.t, 6), "prompt_len": self.prompt_len,
                "mm": [i.to_json() for i in self.mm]}


@dataclass
class TraceHeader:
    source: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    arrival: dict[str, Any] = field(default_factory=lambda: {"mode": "recorded"})
    schema: str = TRACE_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "source": self.source, "model": self.model, "arrival": self.arrival}


def _fail(path: str, lineno: int, what: str) -> TraceError:
    return TraceError(what, where=f"{path}:{lineno}",
                      fix="fix or regenerate the trace (mmdiag trace synth), see README 'Trace format'")


def _parse_header(obj: Any, path: str) -> TraceHeader:
    if not isinstance(obj, dict):
        raise _fail(path, 1, "header must be a JSON object")
    schema = obj.get("schema")
    if schema != TRACE_SCHEMA:
        raise _fail(path, 1, f"field 'schema': expected {TRACE_SCHEMA!r}, got {schema!r}")
    arrival = obj.get("arrival", {"mode": "recorded"})
    if not isinstance(arrival, dict) or arrival.get("mode") not in ARRIVAL_MODES:
        raise _fail(path, 1, f"field 'arrival.mode': expected one of {', '.join(ARRIVAL_MODES)}")
    if arrival["mode"] == "closed":
        c = arrival.get("max_concurrency")
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise _fail(path, 1, "field 'arrival.max_concurrency': expected an integer >= 1")
    for key in ("source", "model"):
        if not isinstance(obj.get(key, {}), dict):
            raise _fail(path, 1, f"field {key!r}: expected an object")
    return TraceHeader(source=obj.get("source", {}), model=obj.get("model", {}), arrival=arrival)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_item(obj: Any, path: str, lineno: int, k: int) -> MMItem:
    where = f"mm[{k}]"
    if not isinstance(obj, dict):
        raise _fail(path, lineno, f"field '{where}': expected an object")
    modality = obj.get("modality")
    if modality not in MODALITIES:
        raise _fail(path, lineno, f"field '{where}.modality': expected one of {', '.join(MODALITIES)}, got {modality!r}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not shape or not all(_int(s) and s > 0 for s in shape):
        raise _fail(path, lineno, f"field '{where}.shape': expected a non-empty list of positive integers, got {shape!r}")
    dtype = obj.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(path, lineno, f"field '{where}.dtype': expected one of {', '.join(DTYPES)}, got {dtype!r}")
    h = obj.get("hash")
    if h is not None and not (_int(h) and h >= 0):
        raise _fail(path, lineno, f"field '{where}.hash': expected a non-negative integer or null")
    c = obj.get("content")
    if c is not None and not (_int(c) and c >= 0):
        raise _fail(path, lineno, f"field '{where}.content': expected a non-negative integer or null")
    return MMItem(modality, tuple(shape), dtype, h, c)


def _parse_request(obj: Any, path: str, lineno: int, last_t: float) -> TraceRequest:
    if not isinstance(obj, dict):
        raise _fail(path, lineno, "request must be a JSON object")
    rid = obj.get("rid")
    if not isinstance(rid, str) or not rid:
        raise _fail(path, lineno, "field 'rid': expected a non-empty string")
    t = obj.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
        raise _fail(path, lineno, f"field 't': expected a non-negative number of seconds, got {t!r}")
    if t < last_t:
        raise _fail(path, lineno, f"field 't': {t} is earlier than the previous request's {last_t}; arrivals must be sorted")
    plen = obj.get("prompt_len", 0)
    if not _int(plen) or plen < 0:
        raise _fail(path, lineno, f"field 'prompt_len': expected a non-negative integer, got {plen!r}")
    mm = obj.get("mm", [])
    if not isinstance(mm, list):
        raise _fail(path, lineno, "field 'mm': expected a list")
    items = tuple(_parse_item(it, path, lineno, k) for k, it in enumerate(mm))
    return TraceRequest(rid, float(t), plen, items)


class TraceReader:
    """Streams a trace. `header` is read on open; iterate for requests.

    Validates as it goes: a malformed line raises TraceError naming the file,
    line number and field. `validate()` reads the whole file once first so a
    replay never starts on a trace that breaks half-way.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, encoding="utf-8")
        except FileNotFoundError:
            raise TraceError("no such trace file", where=path, fix="check the path, or make one with `mmdiag trace synth`") from None
        except IsADirectoryError:
            raise TraceError("is a directory, not a trace file", where=path,
                             fix="give the trace's .jsonl file in it, or make one with `mmdiag trace synth`") from None
        except OSError as e:
            raise TraceError(f"cannot read trace ({e.strerror})", where=path) from None
        first = self._readline()
        if first is None:
            self._f.close()
            raise TraceError("empty trace file", where=path, fix="make one with `mmdiag trace synth`")
        self.header = _parse_header(self._loads(first, 1), path)
        self._lineno = 1

    def _readline(self) -> str | None:
        try:
            line = self._f.readline()
        except UnicodeDecodeError:
            raise TraceError("not UTF-8 text", where=self.path, fix="a trace is JSON lines") from None
        return line or None

    def _loads(self, line: str, lineno: int) -> Any:
        # Parse without the line terminator: json counts the "\n" as the start of a
        # second line, so a line cut mid-object would report "column 1".
        text = line.rstrip("\r\n")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            cut = " (the line ends before the JSON value does: truncated?)" if e.pos >= len(text) else ""
            raise _fail(self.path, lineno, f"invalid JSON ({json_error(e)}){cut}") from None

    def __iter__(self) -> Iterator[TraceRequest]:
        last_t = 0.0
        seen_rids: set[str] = set()
        while True:
            line = self._readline()
            if line is None:
                return
            self._lineno += 1
            if not line.strip():
                continue
            req = _parse_request(self._loads(line, self._lineno), self.path, self._lineno, last_t)
            if req.rid in seen_rids:
                raise _fail(self.path, self._lineno, f"field 'rid': duplicate request id {req.rid!r}")
            seen_rids.add(req.rid)
            last_t = req.t
            yield req

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class TraceStats:
    requests: int = 0
    mm_requests: int = 0
    items: int = 0
    mm_bytes: int = 0
    max_request_bytes: int = 0
    duration_s: float = 0.0
    modalities: dict[str, int] = field(default_factory=dict)


def scan(path: str) -> tuple[TraceHeader, TraceStats]:
    """Read the whole trace once, validating every line; return header and totals."""
    st = TraceStats()
    with TraceReader(path) as r:
        for req in r:
            st.requests += 1
            st.mm_requests += bool(req.mm)
            st.items += len(req.mm)
            b = req.mm_bytes
            st.mm_bytes += b
            st.max_request_bytes = max(st.max_request_bytes, b)
            st.duration_s = req.t
            for it in req.mm:
                st.modalities[it.modality] = st.modalities.get(it.modality, 0) + 1
        header = r.header
    if st.requests == 0:
        raise TraceError("trace has a header but no requests", where=path)
    return header, st


def write_trace(path: str, header: TraceHeader, requests: Iterator[TraceRequest]) -> int:
    """Write a trace atomically (temp file + rename); returns the request count."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise TraceError("output directory does not exist", where=path,
                         fix="create it first (mkdir -p), or write the trace elsewhere")
    n = 0

    def lines() -> Iterator[str]:
        nonlocal n
        yield json.dumps(header.to_json()) + "\n"
        for req in requests:
            yield json.dumps(req.to_json(), separators=(",", ":")) + "\n"
            n += 1

    try:
        write_lines_atomic(path, lines())
    except OSError as e:
        raise TraceError(f"cannot write trace ({e.strerror}); nothing was written", where=path) from None
    return n
