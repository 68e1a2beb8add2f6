"""POSIX shared-memory segments for feature bytes, as SGLang 0.5.10+ moves them.

The tokenizer side writes each feature once into a segment under /dev/shm (where
shm_open puts them on Linux), reserving its pages first with posix_fallocate so a
full /dev/shm is an ENOSPC here and not a SIGBUS on first touch later; if it cannot,
the feature stays inline (pickled in the recv broadcast). The recv broadcast carries
a `ShmHandle`. Every rank opens the segment, and once all have, maps it
copy-on-write (mmap ACCESS_COPY: no copy of the bytes) and the entry rank unlinks it.
Segment names start with a per-replay prefix, so whatever a killed rank left is
swept by the launcher. mmdiag's own code, not SGLang's.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import mmap
import os
from dataclasses import dataclass

from ..lazy import lazy_module

torch = lazy_module("torch")   # the launcher imports this module; `mmdiag --help` must not load torch

SHM_DIR_ENV = "MMDIAG_SHM_DIR"  # tests point this at a small tmpfs to fill it


def shm_dir() -> str:
    return os.environ.get(SHM_DIR_ENV, "/dev/shm")


@dataclass(frozen=True)
class ShmHandle:
    """What the recv broadcast carries instead of a feature's bytes."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def write_segment(name: str, feature: torch.Tensor) -> ShmHandle | None:
    """Copy `feature` once into a new segment; None when shared memory is unavailable
    or full (the caller keeps the bytes inline)."""
    src = feature.detach().contiguous().reshape(-1).view(torch.uint8)
    nbytes = int(src.numel())
    path = os.path.join(shm_dir(), name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, never SIGBUS on a later page fault
        with mmap.mmap(fd, nbytes) as mm:
            dst = torch.frombuffer(mm, dtype=torch.uint8)
            dst.copy_(src)
            del dst  # the mmap cannot close while a tensor still views it
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    finally:
        os.close(fd)
    return ShmHandle(name, tuple(feature.shape), str(feature.dtype).removeprefix("torch."), nbytes)


def open_segment(h: ShmHandle) -> int | None:
    try:
        return os.open(os.path.join(shm_dir(), h.name), os.O_RDONLY)
    except OSError:
        return None


def map_segment(fd: int, h: ShmHandle) -> torch.Tensor | None:
    """Map copy-on-write and close the fd; the tensor keeps the mapping alive."""
    try:
        mm = mmap.mmap(fd, h.nbytes, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return torch.frombuffer(mm, dtype=getattr(torch, h.dtype)).reshape(h.shape)


def unlink_segment(h: ShmHandle) -> None:
    try:
        os.unlink(os.path.join(shm_dir(), h.name))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def sweep(prefix: str) -> int:
    """Remove every segment whose name starts with `prefix`; returns how many."""
    if not prefix:
        return 0
    n = 0
    for path in glob.glob(os.path.join(shm_dir(), glob.escape(prefix) + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            n += 1
    return n
