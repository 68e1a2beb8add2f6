"""Width and height of an image from its encoded header, without decoding pixels.

A request dump holds images as SGLang received them: data URIs, bare base64, raw bytes,
local paths or URLs. The size is read from the container header (PNG, JPEG, GIF, WebP,
BMP); URLs are never fetched. No imaging library is needed or used.
"""
from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass

# Bytes read from a local file: enough for any header below (a JPEG's SOF can sit after
# a large EXIF block, so read generously).
HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class Media:
    """What an image reference resolved to: a size, or why there is none."""
    size: tuple[int, int] | None = None   # (width, height)
    skip: str | None = None                # url | unreadable | precomputed | unsupported


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


def resolve_image(ref: object) -> Media:
    """An image reference from a request (str, bytes, {"url": ...}, ImageData record)."""
    if isinstance(ref, (bytes, bytearray)):
        return _sized(bytes(ref))
    if isinstance(ref, dict):
        if "url" in ref:
            return resolve_image(ref["url"])
        # {"format": "processor_output" | "precomputed_embedding", ...}: features, not an image
        return Media(skip="precomputed" if "format" in ref else "unsupported")
    if not isinstance(ref, str):
        return Media(skip="unsupported")
    s = ref.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://")):
        return Media(skip="url")
    if low.startswith("data:"):
        head, _, payload = s.partition(",")
        return _sized(_b64(payload) if head.endswith(";base64") else None)
    if low.startswith("file://"):
        return _sized(_read_head(s[len("file://"):]))
    if os.path.isabs(s) or (len(s) < 4096 and os.path.exists(s)):
        return _sized(_read_head(s))
    return _sized(_b64(s))          # SGLang also takes bare base64


def _sized(data: bytes | None) -> Media:
    size = image_size(data) if data else None
    return Media(size=size) if size else Media(skip="unreadable")
