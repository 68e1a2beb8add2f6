"""POSIX shared-memory segments for feature bytes, as SGLang 0.5.10+ moves them.

The tokenizer side writes each feature once into a segment under /dev/shm (where
shm_open puts them on Linux), reserving its pages first with posix_fallocate so a
full /dev/shm is an ENOSPC here and not a SIGBUS on first touch later; if it cannot,
the feature stays inline (pickled in the recv broadcast). The recv broadcast carries
a `ShmHandle`. Every rank opens the segment, and once all have, maps it
copy-on-write (mmap ACCESS_COPY: no copy of the bytes) and the entry rank unlinks it.
Segment names start with a per-replay prefix that names the owning process (its PID,
start time and PID namespace: owner_prefix), so whatever a killed replay left is
reclaimed as soon as its owner is gone (sweep_dead_owners), never while it runs.
mmdiag's own code, not SGLang's.
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


# --- owners: who made a segment, and whether it is gone -------------------------------

PREFIX = "mmdiag-"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of `pid` from /proc, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[19])


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_prefix(tag: str | int, pid: int | None = None) -> str:
    """`mmdiag-PID-START-PIDNS-TAG-`: the PID alone could be reused, and a /dev/shm shared with
    another PID namespace holds PIDs this one cannot judge; with all three, `owner_gone` knows."""
    pid = pid or os.getpid()
    st = _proc_stat(pid)
    return f"{PREFIX}{pid}-{st[1] if st else 0}-{_pid_namespace()}-{tag}-"


def owner_of(name: str) -> tuple[int, int, int] | None:
    """(pid, start ticks, PID namespace) of a name `owner_prefix` made; None for any other name."""
    parts = name.split("-")
    if len(parts) < 5 or parts[0] + "-" != PREFIX or not all(p.isdigit() for p in parts[1:4]):
        return None
    return int(parts[1]), int(parts[2]), int(parts[3])


def owner_gone(name: str) -> bool | None:
    """True when the process that made `name` has certainly exited (no such PID, a zombie, or the
    PID reused by a later process); False while it runs; None when this process cannot tell
    (another PID namespace, an older name without an owner, no /proc)."""
    owner = owner_of(name)
    ns = _pid_namespace()
    if owner is None or not ns or owner[2] != ns:
        return None
    pid, start, _ = owner
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return True
    return (st[1] != start) if start else None


def sweep_dead_owners() -> int:
    """Remove every mmdiag segment whose owner is certainly gone (a SIGKILLed replay's), at once;
    a running replay's, and any whose owner cannot be judged, stay. Returns how many."""
    n = 0
    judged: dict[str, bool | None] = {}
    for path in glob.glob(os.path.join(shm_dir(), PREFIX + "*")):
        name = os.path.basename(path)
        key = "-".join(name.split("-")[:4])
        if judged.setdefault(key, owner_gone(name)) is True:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                n += 1
    return n
