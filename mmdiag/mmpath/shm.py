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
import fcntl
import glob
import mmap
import os
import weakref
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
    pooled: bool = False  # a SegmentPool's: the writer reuses it, nobody unlinks it after delivery


def _new_segment(name: str, nbytes: int, populate: bool = False) -> tuple[int, mmap.mmap] | None:
    """Create segment `name` with its pages reserved (posix_fallocate: a full /dev/shm is an
    ENOSPC now, never a SIGBUS on a later page fault) and map it shared; None when it cannot."""
    path = os.path.join(shm_dir(), name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return fd, mmap.mmap(fd, nbytes, flags=flags)
    except (OSError, ValueError):
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def write_segment(name: str, feature: torch.Tensor) -> ShmHandle | None:
    """Copy `feature` once into a new segment; None when shared memory is unavailable
    or full (the caller keeps the bytes inline)."""
    src = feature.detach().contiguous().reshape(-1).view(torch.uint8)
    nbytes = int(src.numel())
    made = _new_segment(name, nbytes)
    if made is None:
        return None
    fd, mm = made
    os.close(fd)
    with mm:
        dst = torch.frombuffer(mm, dtype=torch.uint8)
        dst.copy_(src)
        del dst  # the mmap cannot close while a tensor still views it
    return ShmHandle(name, tuple(feature.shape), str(feature.dtype).removeprefix("torch."), nbytes)


def open_segment(h: ShmHandle) -> int | None:
    try:
        fd = os.open(os.path.join(shm_dir(), h.name), os.O_RDONLY)
    except OSError:
        return None
    if h.pooled:
        # A reader's shared lock tells the pool's writer the segment is still read (SegmentPool);
        # the kernel drops it with the fd, so a reader that dies frees its segments too.
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def map_segment(fd: int, h: ShmHandle) -> torch.Tensor | None:
    """Map copy-on-write; the tensor keeps the mapping alive. A fresh segment's fd closes at
    once; a pooled one's stays open (its shared lock held) until the mapping is freed, since
    on Linux a private mapping still shows what a writer later puts in the pages it never copied."""
    try:
        mm = mmap.mmap(fd, h.nbytes, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        os.close(fd)
        return None
    if h.pooled:
        weakref.finalize(mm, os.close, fd)
    else:
        os.close(fd)
    return torch.frombuffer(mm, dtype=getattr(torch, h.dtype)).reshape(h.shape)


def unlink_segment(h: ShmHandle) -> None:
    try:
        os.unlink(os.path.join(shm_dir(), h.name))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def sweep(prefix: str, folder: str | None = None) -> int:
    """Remove every segment whose name starts with `prefix` (in `folder`, default shm_dir());
    returns how many."""
    if not prefix:
        return 0
    n = 0
    for path in glob.glob(os.path.join(folder or shm_dir(), glob.escape(prefix) + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            n += 1
    return n


# --- reused segments ---------------------------------------------------------------

@dataclass(eq=False)
class _Segment:
    name: str
    capacity: int
    fd: int
    mm: mmap.mmap
    state: str = "free"  # free -> out (handed over) -> settled (every reader holds it) -> free


class SegmentPool:
    """Pre-faulted segments the tokenizer side writes into again and again.

    A fresh segment costs its page faults on every write (27-34 ms for 18.8 MB on the 2-core
    box, against 2-2.6 ms into a reused one): the pool keeps each segment created, allocated
    and mapped (MAP_POPULATE) in the writer, so a write is a memcpy. A segment goes back to
    the pool only when no reader maps it any more: each reader holds a shared flock while its
    mapping lives, and once the barrier after opening says every reader holds one (`settle`),
    the writer reuses the segment as soon as an exclusive flock succeeds. The pool is bounded
    (`max_bytes`): past it, a write takes a fresh one-off segment, unlinked after delivery as
    before. Names carry the transport's prefix, so the launcher's sweep removes a crashed
    replay's segments; `close` removes the pool's own.
    """

    def __init__(self, prefix: str, max_bytes: int):
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.segments: list[_Segment] = []
        self._seq = 0
        self.reused = self.created = self.overflow = self.peak = 0

    @property
    def nbytes(self) -> int:
        return sum(g.capacity for g in self.segments)

    def _reclaim(self) -> None:
        for g in self.segments:
            if g.state != "settled":
                continue
            try:
                fcntl.flock(g.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a reader still maps it
            fcntl.flock(g.fd, fcntl.LOCK_UN)
            g.state = "free"

    def _create(self, capacity: int) -> _Segment | None:
        name = f"{self.prefix}pool{self._seq}"
        self._seq += 1
        made = _new_segment(name, capacity, populate=True)  # pre-faulted: the writer's page tables stay filled
        if made is None:
            return None
        fd, mm = made
        g = _Segment(name, capacity, fd, mm)
        self.segments.append(g)
        self.created += 1
        self.peak = max(self.peak, self.nbytes)
        return g

    def _take(self, nbytes: int) -> _Segment | None:
        fits = lambda: sorted((g for g in self.segments if g.state == "free" and g.capacity >= nbytes),  # noqa: E731
                              key=lambda g: g.capacity)
        found = fits()
        if not found:
            self._reclaim()
            found = fits()
        if found:
            self.reused += 1
            return found[0]
        # Make room by dropping free segments too small for this feature, then grow if the bound allows.
        for g in [g for g in self.segments if g.state == "free"]:
            if self.nbytes + nbytes <= self.max_bytes:
                break
            self._drop(g)
        if self.nbytes + nbytes > self.max_bytes:
            self.overflow += 1
            return None
        return self._create(nbytes)

    def reserve(self, sizes: list[int]) -> None:
        """Create and pre-fault segments before the timed window (the server's warm-up)."""
        for n in sizes:
            if self.nbytes + n <= self.max_bytes:
                self._create(n)

    def write(self, feature: torch.Tensor) -> ShmHandle | None:
        """Copy `feature` into a pooled segment; a fresh one-off segment when the pool is
        full; None when shared memory is unavailable (the caller keeps the bytes inline)."""
        src = feature.detach().contiguous().reshape(-1).view(torch.uint8)
        nbytes = int(src.numel())
        g = self._take(nbytes) if nbytes else None
        if g is None:
            self._seq += 1
            return write_segment(f"{self.prefix}{self._seq}", feature)
        dst = torch.frombuffer(g.mm, dtype=torch.uint8, count=nbytes)
        dst.copy_(src)
        del dst
        g.state = "out"
        return ShmHandle(g.name, tuple(feature.shape), str(feature.dtype).removeprefix("torch."), nbytes, pooled=True)

    def settle(self, h: ShmHandle) -> None:
        """Every reader has opened `h` (and holds its lock): reusable once they all let go."""
        for g in self.segments:
            if g.name == h.name and g.state == "out":
                g.state = "settled"

    def _drop(self, g: _Segment) -> None:
        self.segments.remove(g)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(shm_dir(), g.name))
        os.close(g.fd)
        with contextlib.suppress(BufferError):  # a view still alive: the pages go with the last one
            g.mm.close()

    def close(self) -> None:
        for g in list(self.segments):
            self._drop(g)

    def stats(self) -> dict[str, int]:
        return {"pool_created": self.created, "pool_reused": self.reused, "pool_overflow": self.overflow,
                "pool_peak_bytes": self.peak}


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
