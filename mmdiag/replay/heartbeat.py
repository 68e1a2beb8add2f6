"""Per-rank heartbeats, so the launcher blames the rank whose progress stopped.

When one rank freezes (SIGSTOP, a hang holding the GIL, a stuck syscall), its
peers wait in a collective until their gloo timeout fires, and they are the ones
that exit with an error. The launcher creates one small file with a slot per
rank; a thread in every rank stamps its slot with CLOCK_MONOTONIC (one clock for
every process of the host) a few times a second. A rank blocked in a collective
keeps beating (gloo releases the GIL); a frozen one does not.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time

INTERVAL_S = 0.25
# A slot older than this while its rank is alive: that rank stopped making progress.
STALE_S = 3.0
_SLOT = struct.Struct("d")
ENV = "MMDIAG_HEARTBEAT"


def create(path: str, world: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * _SLOT.size * world)


def read(path: str, world: int) -> list[float]:
    """Monotonic time of each rank's last beat (0.0: none yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_SLOT.size * world)
    except OSError:
        return [0.0] * world
    if len(data) < _SLOT.size * world:
        return [0.0] * world
    return [_SLOT.unpack_from(data, r * _SLOT.size)[0] for r in range(world)]


def stale_ranks(path: str, world: int, alive: list[bool]) -> list[tuple[int, float]]:
    """(rank, seconds since its last beat) for live ranks that stopped beating, stalest first."""
    now = time.monotonic()
    out = [(r, now - t) for r, t in enumerate(read(path, world)) if alive[r] and t and now - t > STALE_S]
    return sorted(out, key=lambda rt: -rt[1])


def start(rank: int) -> None:
    """In a rank: beat from a daemon thread until the process exits (no-op without the launcher's file)."""
    path = os.environ.get(ENV)
    if not path:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 0)
    finally:
        os.close(fd)

    def beat() -> None:
        while True:
            _SLOT.pack_into(mm, rank * _SLOT.size, time.monotonic())
            time.sleep(INTERVAL_S)

    threading.Thread(target=beat, name="mmdiag-heartbeat", daemon=True).start()
