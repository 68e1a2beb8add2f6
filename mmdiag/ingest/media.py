"""Width and height of an image or video from its encoded header, without decoding pixels.

A request dump holds media as SGLang received them: data URIs, bare base64, raw bytes,
local paths or URLs. Image sizes are read from the container header (PNG, JPEG, GIF,
WebP, BMP); a video's size, frame count and duration from its MP4/MOV boxes (tkhd, mdhd,
stsz). URLs are never fetched. No imaging or video library is needed or used.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

# Bytes read from a local file: enough for any header below (a JPEG's SOF can sit after
# a large EXIF block, so read generously).
HEAD_BYTES = 1 << 20
# base64 characters decoded first (a multiple of 4): 96 KiB of image, past a typical EXIF block.
HEAD_B64 = 4 * (96 * 1024 // 3)


@dataclass(frozen=True)
class Media:
    """What an image reference resolved to: a size, or why there is none."""
    size: tuple[int, int] | None = None   # (width, height)
    skip: str | None = None                # url | unreadable | precomputed | unsupported
    frames: int | None = None              # video: frames in the file
    seconds: float | None = None           # video: its duration


def _png(b: bytes) -> tuple[int, int] | None:
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR" and len(b) >= 24:
        return struct.unpack(">II", b[16:24])
    return None


def _gif(b: bytes) -> tuple[int, int] | None:
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        return struct.unpack("<HH", b[6:10])
    return None


def _bmp(b: bytes) -> tuple[int, int] | None:
    if b[:2] == b"BM" and len(b) >= 26:
        w, h = struct.unpack("<ii", b[18:26])
        return w, abs(h)
    return None


def _webp(b: bytes) -> tuple[int, int] | None:
    if b[:4] != b"RIFF" or b[8:12] != b"WEBP" or len(b) < 30:
        return None
    kind = b[12:16]
    if kind == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", b[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and b[20] == 0x2F:
        v = int.from_bytes(b[21:25], "little")
        return (v & 0x3FFF) + 1, ((v >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


# JPEG start-of-frame markers (baseline, progressive, ...); C4, C8 and CC are not frames.
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(b: bytes) -> tuple[int, int] | None:
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):   # markers without a length
            i += 2
            continue
        (seg,) = struct.unpack(">H", b[i + 2:i + 4])
        if marker in _SOF and i + 9 <= len(b):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        i += 2 + seg
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header; None when unrecognised or empty."""
    for sniff in (_png, _jpeg, _gif, _webp, _bmp):
        size = sniff(data)
        if size is not None:
            return size if size[0] > 0 and size[1] > 0 else None
    return None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=False)
    except (binascii.Error, ValueError):
        return None


def _read_head(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return None


def _source(ref: object) -> tuple[str, object]:
    """Where a media reference's bytes are: ("bytes", data) | ("file", path) | (skip reason, None)."""
    if isinstance(ref, (bytes, bytearray)):
        return "bytes", bytes(ref)
    if isinstance(ref, dict):
        if "url" in ref:
            return _source(ref["url"])
        # {"format": "processor_output" | "precomputed_embedding", ...}: features, not media
        return ("precomputed" if "format" in ref else "unsupported"), None
    if not isinstance(ref, str):
        return "unsupported", None
    s = ref.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://")):
        return "url", None
    if low.startswith("data:"):
        head, _, payload = s.partition(",")
        return ("b64", payload) if head.endswith(";base64") else ("unreadable", None)
    if low.startswith("file://"):
        return "file", s[len("file://"):]
    if len(s) < 4096 and os.path.isfile(s):   # not isabs: a JPEG's base64 starts with "/9j/"
        return "file", s
    return "b64", s                  # SGLang also takes bare base64


def resolve_image(ref: object) -> Media:
    """An image reference from a request (str, bytes, {"url": ...})."""
    kind, where = _source(ref)
    if kind == "file":
        return _sized(_read_head(where))
    if kind == "b64":   # the header is near the start: decode a prefix first, all only if needed
        head = _sized(_b64(where[:HEAD_B64]))
        return head if head.size or len(where) <= HEAD_B64 else _sized(_b64(where))
    return _sized(where) if kind == "bytes" else Media(skip=kind)


def resolve_video(ref: object) -> Media:
    """A video reference: size, frame count and duration from its MP4/MOV header."""
    kind, where = _source(ref)
    if kind == "b64":
        kind, where = "bytes", _b64(where)
    if kind not in ("file", "bytes"):
        return Media(skip=kind)
    if not where:
        return Media(skip="unreadable")
    try:
        if kind == "file":
            with open(where, "rb") as f:
                info = mp4_info(f)
        else:
            info = mp4_info(io.BytesIO(where))
    except OSError:
        info = None
    if info is None:
        return Media(skip="unreadable")
    w, h, frames, seconds = info
    return Media(size=(w, h), frames=frames, seconds=seconds)


def _sized(data: bytes | None) -> Media:
    size = image_size(data) if data else None
    return Media(size=size) if size else Media(skip="unreadable")


# --- MP4 / MOV (ISO base media file format) ---------------------------------------

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _boxes(f: BinaryIO, end: int | None) -> "list[tuple[bytes, int, int]]":
    """(type, body offset, body size) of the boxes from f's position to `end`; seeks past bodies."""
    out = []
    while end is None or f.tell() + 8 <= end:
        start = f.tell()
        head = f.read(8)
        if len(head) < 8:
            break
        size, kind = struct.unpack(">I4s", head)
        hdr = 8
        if size == 1:
            big = f.read(8)
            if len(big) < 8:
                break
            size, hdr = struct.unpack(">Q", big)[0], 16
        elif size == 0:   # to the end of the file
            size = (end if end is not None else f.seek(0, io.SEEK_END)) - start
        if size < hdr:
            break
        out.append((kind, start + hdr, size - hdr))
        f.seek(start + size)
    return out


def _track(f: BinaryIO, off: int, size: int, found: dict) -> None:
    """Collect tkhd/mdhd/hdlr/stsz/stts fields of one trak (recursing into its containers)."""
    f.seek(off)
    for kind, boff, bsize in _boxes(f, off + size):
        if kind in _CONTAINERS:
            _track(f, boff, bsize, found)
            continue
        if kind not in (b"tkhd", b"mdhd", b"hdlr", b"stsz", b"stts"):
            continue
        f.seek(boff)
        body = f.read(min(bsize, 4096))
        if kind == b"tkhd" and len(body) >= 84:
            found["wh"] = (struct.unpack(">I", body[-8:-4])[0] >> 16, struct.unpack(">I", body[-4:])[0] >> 16)
        elif kind == b"mdhd" and len(body) >= 24:
            found["ts"] = struct.unpack(">IQ", body[20:32]) if body[0] == 1 else struct.unpack(">II", body[12:20])
        elif kind == b"hdlr" and len(body) >= 12:
            found["handler"] = body[8:12]
        elif kind == b"stsz" and len(body) >= 12:
            found["frames"] = struct.unpack(">I", body[8:12])[0]
        elif kind == b"stts" and len(body) >= 8 and "frames" not in found:
            n = struct.unpack(">I", body[4:8])[0]
            found["frames"] = sum(struct.unpack(">I", body[8 + 8 * i:12 + 8 * i])[0]
                                  for i in range(min(n, (len(body) - 8) // 8)))


def mp4_info(f: BinaryIO) -> tuple[int, int, int, float] | None:
    """(width, height, frames, seconds) of the first video track; None if not MP4/MOV."""
    f.seek(0)
    top = _boxes(f, None)
    moov = next(((o, s) for k, o, s in top if k == b"moov"), None)
    if not top or top[0][0] not in (b"ftyp", b"moov", b"wide", b"free", b"mdat") or moov is None:
        return None
    f.seek(moov[0])
    for kind, off, size in _boxes(f, moov[0] + moov[1]):
        if kind != b"trak":
            continue
        found: dict = {}
        _track(f, off, size, found)
        if found.get("handler") == b"vide" and "wh" in found and found.get("frames") and found.get("ts"):
            (w, h), (scale, dur) = found["wh"], found["ts"]
            if w > 0 and h > 0 and scale > 0 and dur > 0:
                return w, h, found["frames"], dur / scale
        f.seek(off + size)
    return None
