"""Every file mmdiag writes goes through here: checked before the work, written atomically,
and JSON written one way (strict: NaN and infinities become null, which every parser reads).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterable

from .errors import MmdiagError


def jsonable(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """The one JSON encoder of mmdiag's output: strict, indented, paths and sets as strings."""
    return json.dumps(jsonable(obj), indent=1, allow_nan=False, default=str)


def check_writable(path: str, what: str | None = None) -> None:
    """An output file can be created at `path`; checked before minutes of work, not after."""
    where = f"{what} {path}" if what else path
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise MmdiagError("is a directory", where=where, fix="give a file name")
    if not os.path.isdir(d):
        raise MmdiagError("directory does not exist", where=where,
                          fix="create it first (mkdir -p), or choose another path")
    # Create a file as the write will (os.access says yes to root, also where the file system refuses).
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmdiag-", dir=d)
    except OSError as e:
        raise MmdiagError(f"directory is not writable ({e.strerror})", where=where,
                          fix="choose a writable path") from None
    os.close(fd)
    os.unlink(probe)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, dumps_json(obj) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    write_lines_atomic(path, [text])


def write_lines_atomic(path: str, chunks: Iterable[str]) -> None:
    """Stream chunks to a temp file beside `path`, fsync, rename: all or nothing
    (a full disk or Ctrl-C leaves the old file, or none, never half a file)."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        # A device or pipe (/dev/stdout, a FIFO): write through, never replace it.
        with open(real, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
        return
    directory = os.path.dirname(real) or "."
    fd, tmp = tempfile.mkstemp(prefix=".mmdiag-", dir=directory)
    try:
        # mkstemp makes 0600; a report or Run is meant to be shared like any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
