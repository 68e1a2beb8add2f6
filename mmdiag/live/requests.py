"""Count the multimodal requests a server takes in a profile's window, without its help.

SGLang 0.5.10+ on one node hands each image feature to the scheduler ranks in a POSIX
shared-memory segment that its tokenizer side creates (`ShmPointerMMData.__init__`), in
/dev/shm; from 0.5.16 it names it `sgl_shm_mm_<creator pid>_<random>` (`make_shm_name("mm")`,
checked in the 0.5.16-0.5.23 wheels; 0.5.10-0.5.13 leave the name to Python, `psm_<random>`,
which says nothing of its creator: no count there). Where mmdiag's `pool` (or `shm`) patch
writes them, a reused segment counts each time its writer takes it back (a rename).
py-spy's samples carry no timestamps, so they cannot count requests; the kernel can:
an inotify watch on /dev/shm sees every segment created, however briefly it lives (the
ranks unlink it within milliseconds). One segment is one feature: a request of k images
counts k, so the stage verdict's service time is per image feature (per request at one
image a request). Releases and transports that create no named segment (<= 0.5.13, pickled
features, cuda_ipc) give no count: the verdict then compares the stages by their busy
shares alone (which stage bounds and by what factor, no req/s).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

from ..sglang.patches.segment_pool import PREFIX as POOL_PREFIX

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "sgl_shm_mm_"   # 0.5.23's make_shm_name("mm"): sgl_shm_mm_<pid>_<rand>
# mmdiag's own writers (`apply pool` on 0.5.10+, `apply shm` to 0.5.9) name theirs POOL_PREFIX<pid>-...;
# a pooled one is created once and then renamed back from `<name>.held` for each feature it carries.
_IN_CREATE, _IN_MOVED_TO, _IN_NONBLOCK, _IN_CLOEXEC = 0x100, 0x80, 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")


class SegmentCounter:
    """Segments created in /dev/shm by `pids` (the tokenizer side) since start(); read()
    drains the kernel's queue (call it often: the queue holds 16384 events by default)."""

    def __init__(self, pids: list[int], directory: str = SHM_DIR):
        self.prefixes = tuple(f"{SEGMENT_PREFIX}{p}_" for p in pids) + tuple(f"{POOL_PREFIX}{p}-" for p in pids)
        self.reused = tuple(f"{POOL_PREFIX}{p}-p" for p in pids)  # a pooled segment taken for the next feature
        self.directory = directory
        self.count = 0
        self.fd = -1
        self.error: str | None = None

    def start(self) -> bool:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            self.error = f"inotify_init1: {os.strerror(ctypes.get_errno())}"
            return False
        if libc.inotify_add_watch(fd, self.directory.encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            self.error = f"inotify_add_watch {self.directory}: {os.strerror(ctypes.get_errno())}"
            os.close(fd)
            return False
        self.fd = fd
        return True

    def read(self) -> int:
        """Drain the events seen so far; the running count of matching segments."""
        while self.fd >= 0:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            off = 0
            while off + _EVENT.size <= len(buf):
                _wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size: off + _EVENT.size + n].rstrip(b"\0").decode(errors="replace")
                off += _EVENT.size + n
                if mask & _IN_CREATE and name.startswith(self.prefixes):
                    self.count += 1
                elif mask & _IN_MOVED_TO and name.startswith(self.reused) and not name.endswith(".held"):
                    self.count += 1
        return self.count

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
