"""The one home of mmdiag's pool of reused shared-memory segments, as source text that a
patch appends to the module of the process that writes features (the tokenizer side).

Two patches use it: `shm` (mmdiag.sglang.patches.shm, 0.5.4.post1 .. 0.5.9: mmdiag's own
transport, appended to tokenizer_manager.py) and `pool` (mmdiag.sglang.patches.pool,
0.5.10 .. 0.5.23: the release's own ShmPointerMMData, appended to mm_utils.py).

Writing a feature into a new segment costs its page faults (27-34 ms for 18.8 MB); into a
reused, still-mapped one a copy (2-2.6 ms). The writer keeps each pooled segment mapped and
grows the pool (whole MB) only when no free one is large enough, up to $MMDIAG_SHM_POOL_MB
of this process (default a quarter of /dev/shm, at most 4096; 0: no pool); beyond it the
caller writes a new segment. A private (copy-on-write) map shows the file's later bytes on
every page its process never wrote, and a clone reads the segment after the barrier, so a
segment is rewritten only once no reader has it open: each reader holds a shared flock on
the file description it opened for as long as it reads (its map keeps a duplicate of the
fd); after every reader holds its lock, the one that would unlink renames the segment
`<name>.held`; the writer takes it back when LOCK_EX|LOCK_NB succeeds (no shared lock left),
renaming it to its own name, atomically. A pooled segment that no reader freed within
RECLAIM_AFTER_S leaves the pool, unlinked (never rewritten: a late reader may still open it).
Exit removes the pool; a writer that died (kill -9) leaves segments named by its pid,
which the next writer removes at its first write. Names: PREFIX<pid>-p<random> (pooled).
"""
from __future__ import annotations

from ...mmpath.shm import SHM_DIR_ENV

PREFIX = "mmdiag-shm-"    # segment names: PREFIX<pid>-<random>, pooled ones PREFIX<pid>-p<random>
RECLAIM_AFTER_S = 300     # a segment no reader took within this is the writer's to remove
POOL_ENV = "MMDIAG_SHM_POOL_MB"  # the server's bound on reused segments, per writer process (0: none)
POOL_MAX_MB = 4096        # the default bound: a quarter of /dev/shm, at most this

# Module-level state and functions (named _mmdiag_shm_*), inserted once into the writer's module.
POOL_HELPERS = f'''
_MMDIAG_SHM_WRITTEN = {{}}  # segment path -> monotonic time written (the scheduler unlinks or frees it)
_MMDIAG_SHM_POOL = {{}}  # pooled segment path -> (this process's map, its size): reused once freed
_MMDIAG_SHM_STATE = {{}}  # "lock": guards the pool; "swept": crashed writers' segments removed


def _mmdiag_shm_unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _mmdiag_shm_pool_bytes():
    """What the pool may hold: ${POOL_ENV} (0: no pool), else a quarter of the folder, at most {POOL_MAX_MB} MB."""
    v = os.environ.get("{POOL_ENV}")
    if v is not None:
        try:
            return max(0, int(float(v) * (1 << 20)))
        except ValueError:
            return 0
    try:
        st = os.statvfs(os.environ.get("{SHM_DIR_ENV}", "/dev/shm"))
    except OSError:
        return 0
    return min(st.f_frsize * st.f_blocks // 4, {POOL_MAX_MB} << 20)


def _mmdiag_shm_take(path, fd):
    """Take a slot back if no rank maps it any more: its name is `<path>.held` (every rank
    of the call took its shared lock before the entry rank renamed it so) and no shared
    lock is left (a rank's lock lives as long as its map). The rename back is atomic."""
    import fcntl
    if not os.path.exists(path + ".held"):
        return False  # in flight: not every rank has locked it yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a rank still maps it
    fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        os.rename(path + ".held", path)
    except OSError:
        return False
    return True


def _mmdiag_shm_acquire(folder, nbytes):
    """(path, map) of a pooled segment of at least nbytes, now reserved for one feature;
    None: the pool has none free and may not grow."""
    import mmap
    import secrets
    import threading
    with _MMDIAG_SHM_STATE.setdefault("lock", threading.Lock()):
        by_size = sorted(_MMDIAG_SHM_POOL.items(), key=lambda kv: kv[1][1])
        for path, (mm, size, fd) in by_size:
            if size >= nbytes:
                if not _mmdiag_shm_take(path, fd):
                    continue
                import time
                _MMDIAG_SHM_WRITTEN[path] = time.monotonic()  # under the lock: reclaim sees it in flight
                return path, mm
        size = -(-nbytes // (1 << 20)) << 20  # whole MB: a slot serves features of nearby sizes
        cap = _mmdiag_shm_pool_bytes()
        held = sum(v[1] for v in _MMDIAG_SHM_POOL.values())
        for path, (mm, old, fd) in by_size:  # make room: drop free slots too small to serve
            if held + size <= cap:
                break
            if _mmdiag_shm_take(path, fd):
                _mmdiag_shm_drop(path)
                held -= old
        if size > cap - held:
            return None
        path = os.path.join(folder, f"{PREFIX}{{os.getpid()}}-p{{secrets.token_hex(8)}}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            os.posix_fallocate(fd, 0, size)  # the pages exist from here on: no fault, no SIGBUS later
            mm = mmap.mmap(fd, size)
        except (OSError, ValueError):
            os.close(fd)
            _mmdiag_shm_unlink(path)
            return None
        import time
        _MMDIAG_SHM_WRITTEN[path] = time.monotonic()  # under the lock: reclaim sees it in flight
        if hasattr(mmap, "MADV_POPULATE_WRITE"):  # fault this map's pages in now, once
            try:
                mm.madvise(mmap.MADV_POPULATE_WRITE)
            except OSError:
                pass
        if not _MMDIAG_SHM_POOL:
            import atexit
            atexit.register(_mmdiag_shm_pool_close)
        _MMDIAG_SHM_POOL[path] = (mm, size, fd)  # fd: this process's side of the ranks' locks
        return path, mm


def _mmdiag_shm_drop(path):
    """Take a slot out of the pool: unlink both its names, close this process's map and fd
    (never rewritten again: a rank that still maps it keeps its bytes)."""
    slot = _MMDIAG_SHM_POOL.pop(path, None)
    _mmdiag_shm_unlink(path)
    _mmdiag_shm_unlink(path + ".held")
    _MMDIAG_SHM_WRITTEN.pop(path, None)
    if slot is not None:
        os.close(slot[2])
        try:
            slot[0].close()
        except BufferError:
            pass  # still viewed: the map goes with its last view


def _mmdiag_shm_pool_close():
    for path in list(_MMDIAG_SHM_POOL):
        _mmdiag_shm_drop(path)


def _mmdiag_shm_sweep(folder):
    """Once per process: remove the segments of tokenizers that no longer run (a crash,
    a kill -9): their names carry the writer's pid."""
    if _MMDIAG_SHM_STATE.get("swept"):
        return
    _MMDIAG_SHM_STATE["swept"] = True
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len("{PREFIX}"):].split("-", 1)[0] if name.startswith("{PREFIX}") else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _mmdiag_shm_unlink(os.path.join(folder, name))
        except OSError:
            pass  # alive, another user's


def _mmdiag_shm_reclaim(before):
    """Forget segments a scheduler already unlinked or freed; remove those written before
    `before` that no scheduler took (a pooled one leaves the pool: it is never rewritten
    while a late reader might still open it)."""
    import threading
    with _MMDIAG_SHM_STATE.setdefault("lock", threading.Lock()):
        _mmdiag_shm_reclaim_locked(before)


def _mmdiag_shm_reclaim_locked(before):
    for path, when in list(_MMDIAG_SHM_WRITTEN.items()):
        pooled = path in _MMDIAG_SHM_POOL
        if when < before:
            if pooled and os.path.exists(path + ".held"):
                _MMDIAG_SHM_WRITTEN.pop(path, None)
            elif pooled:
                _mmdiag_shm_drop(path)
            else:
                _mmdiag_shm_unlink(path)
        elif os.path.exists(path):
            continue
        elif pooled and not os.path.exists(path + ".held"):
            _mmdiag_shm_drop(path)  # unlinked by a scheduler whose collective failed
        _MMDIAG_SHM_WRITTEN.pop(path, None)
'''
