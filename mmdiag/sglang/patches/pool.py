"""`mmdiag apply pool`: the release's own shared-memory writer reuses its segments (0.5.10 .. 0.5.23).

From 0.5.10 the tokenizer writes every CPU feature into a NEW POSIX segment
(`ShmPointerMMData.__init__`, srt/managers/mm_utils.py): 27-34 ms of page faults for an
18.8 MB feature, where a reused, still-mapped segment takes 2-2.6 ms. Each scheduler rank
opens the segment when it unpickles the handle (`__setstate__`: SharedMemory(name=)), and
after the receiver's barrier (0.5.10 .. 0.5.12: Scheduler.recv_requests; 0.5.13+:
_finalize_shm_features) its `materialize()` clones it out (to 0.5.20) or maps it
copy-on-write (0.5.21+, mmap.ACCESS_COPY on the handle's fd: mmap dups the fd), then
closes and unlinks it (one rank's unlink succeeds, the others' FileNotFoundError is caught).

The patch edits two kinds of call in the class, nothing else of the release:
- the writer's `shared_memory.SharedMemory(create=True, size=nbytes, ...)` becomes
  `_mmdiag_pool_segment(nbytes) or <the same call>`: a pooled segment from this process's
  pool (mmdiag.sglang.patches.segment_pool, bounded by $MMDIAG_SHM_POOL_MB), or None, and
  then the release's own new segment exactly as before (pool off or full; /dev/shm short:
  0.5.16+'s posix_fallocate ENOSPC and inline fallback unchanged). The pooled object has
  what __init__ uses of a SharedMemory: `buf` (exactly the feature's bytes), `name`, `_fd`,
  close() (the pool keeps its map), unlink() (a failed write: the segment leaves the pool).
- every `shared_memory.SharedMemory(name=self.shm_name)` (the receiver's open, and
  0.5.19+'s reopen for cleanup) is wrapped by `_mmdiag_pool_attach(self, <the call>)`: for a
  pooled name it takes LOCK_SH on the fd the release opened, unregisters the name from
  multiprocessing's resource_tracker (Python 3.10-3.12 register on attach, and the tracker
  would unlink a reused segment when the rank exits) and returns the handle with `buf` sliced
  to the feature's bytes (the segment may be larger; SharedMemory maps all of it), `_fd`,
  close(), and unlink(), which renames the segment `<name>.held` instead of removing it.

Why the release's protocol stays correct for both ways a rank takes the bytes: the lock lives
on the open file description the rank opened, for as long as any fd of it is open: the
handle's own fd (closed by close()), a duplicate the wrapper keeps until unlink() (0.5.10
closes before it unlinks) or until the handle is collected, and, 0.5.21+, the duplicate that
mmap keeps for the copy-on-write map (so the lock lasts as long as the feature's map: a
private map shows the file's later bytes on every page the rank never wrote). The rename
happens where the release unlinks, after the barrier, when every rank of the group holds its
lock; a rank renames before it lets go of its own lock, so a rank's late rename can never
take a segment the writer has reused. The writer reuses a `.held` segment only when its
LOCK_EX|LOCK_NB succeeds, renaming it back atomically; readers open names, never `.held`.
Pooled names carry the writer's pid (mmdiag-shm-<pid>-p<random>): each tokenizer process
(0.5.21+ `sglang::tokenizer_worker`s included) has its own pool, removed at its exit, and a
killed writer's segments are removed by the next writer.

0.5.4.post1 .. 0.5.9 have no such writer: mmdiag's `shm` patch is their shared-memory
transport, and it pools its segments already (segment_pool, the same code).
"""
from __future__ import annotations

import ast

from ...vocab import SEGMENTS_FRESH, SEGMENTS_POOL, STRATEGY_SHM, TRANSPORT_SHM
from .. import astutil
from ..errors import NotApplicable, UnknownLayout
from ..facts import layouts
from .common import MARK, Plan, append_module_code, module_constant
from .segment_pool import POOL_ENV, POOL_HELPERS, POOL_MAX_MB, PREFIX, RECLAIM_AFTER_S

NAME = SEGMENTS_POOL
CLASS = "ShmPointerMMData"
# Methods whose layout must be known (variants.toml [layouts]): the writer, the receiver's
# open, and where a rank takes the bytes and unlinks (present from 0.5.10 / 0.5.19).
METHODS = ("__init__", "__setstate__", "materialize", "close_and_unlink")
CTOR = "shared_memory.SharedMemory"
WRITER = "_mmdiag_pool_segment"
ATTACH = "_mmdiag_pool_attach"
NAME_CONST = "_MMDIAG_SEGMENTS"  # read back by doctor
SHM_FOLDER = "/dev/shm"  # where shm_open names live on Linux (SharedMemory(name=) finds them there)

RELEASE_HELPERS = f'''
{MARK} pool -- the writer's segments come from a pool (see mmdiag.sglang.patches.pool).
{NAME_CONST} = "{NAME}"


def _mmdiag_pool_named(name):
    """A pooled segment's name: {PREFIX}<pid>-p<random>."""
    rest = name[len("{PREFIX}"):] if isinstance(name, str) and name.startswith("{PREFIX}") else ""
    pid, _, tail = rest.partition("-")
    return pid.isdigit() and tail.startswith("p")


def _mmdiag_pool_segment(nbytes):
    """A pooled segment for ShmPointerMMData.__init__ to write nbytes into; None: the release
    writes its own new segment (pool off or full, or no room in /dev/shm)."""
    import time
    nbytes = int(nbytes)
    if nbytes <= 0 or not os.path.isdir("{SHM_FOLDER}"):
        return None
    _mmdiag_shm_sweep("{SHM_FOLDER}")
    _mmdiag_shm_reclaim(time.monotonic() - {RECLAIM_AFTER_S})
    slot = _mmdiag_shm_acquire("{SHM_FOLDER}", nbytes)
    return None if slot is None else _MmdiagPoolWrite(slot[0], slot[1], nbytes)


class _MmdiagPoolWrite:
    """What __init__ uses of a new SharedMemory, on a pooled segment: buf (the feature's
    bytes of this process's map), name, _fd (already reserved), close() (the map stays with
    the pool), unlink() (the write failed: the segment leaves the pool)."""

    def __init__(self, path, mm, nbytes):
        self._path = path
        self.name = os.path.basename(path)
        self.size = nbytes
        self._fd = _MMDIAG_SHM_POOL[path][2]
        self.buf = memoryview(mm)[:nbytes]

    def close(self):
        if self.buf is not None:
            self.buf.release()
            self.buf = None

    def unlink(self):
        self.close()
        _mmdiag_shm_drop(self._path)


def _mmdiag_pool_attach(ptr, handle):
    """The release's handle of a segment it opened by name; a pooled one's is wrapped so that
    this process holds a shared lock on it until it lets go (_MmdiagPoolRead)."""
    if not _mmdiag_pool_named(getattr(ptr, "shm_name", None)):
        return handle
    try:
        nbytes = int(torch.Size(ptr.shape).numel()) * torch.empty((), dtype=ptr.dtype).element_size()
        return _MmdiagPoolRead(handle, nbytes)
    except BaseException:
        handle.close()
        raise


class _MmdiagPoolRead:
    """A receiver's handle of a pooled segment. Holds LOCK_SH on the open file description the
    release opened (the writer rewrites the segment only once no such lock is left); the lock
    lasts while the handle's fd, the duplicate kept here until unlink() or collection, or an
    mmap of the fd (0.5.21+'s copy-on-write map dups it) is open. buf: the feature's bytes only.
    unlink(): the rename to `.held` (this rank still holds its lock), then the duplicate goes."""

    def __init__(self, handle, nbytes):
        import fcntl
        self._handle = handle
        self._held = None
        fcntl.flock(handle._fd, fcntl.LOCK_SH)
        self._held = os.dup(handle._fd)
        if getattr(handle, "_track", True):  # registered on attach: its exit must not unlink a reused segment
            try:
                from multiprocessing import resource_tracker
                resource_tracker.unregister(handle._name, "shared_memory")
            except Exception:
                pass
        self.name = handle.name
        self.size = nbytes
        self.buf = handle.buf[:nbytes]

    @property
    def _fd(self):
        return self._handle._fd

    @property
    def _name(self):
        return self._handle._name

    def close(self):
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        self._handle.close()

    def unlink(self):
        path = os.path.join("{SHM_FOLDER}", self.name)
        try:
            os.rename(path, path + ".held")  # FileNotFoundError: another rank renamed it
        finally:
            self._let_go()

    def _let_go(self):
        fd, self._held = self._held, None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self._let_go()
        except Exception:
            pass
'''


def _ctor_calls(fn: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == CTOR]


def _is_create(call: ast.Call) -> bool:
    return any(k.arg == "create" and ast.unparse(k.value) == "True" for k in call.keywords)


def _edit(lines: list[str], line: int, col: int, text: str) -> None:
    raw = lines[line - 1].encode("utf-8")  # ast offsets count UTF-8 bytes
    lines[line - 1] = (raw[:col] + text.encode() + raw[col:]).decode("utf-8")


def _mark(lines: list[str], line: int) -> None:
    body = lines[line - 1].rstrip("\r\n")
    if "#" not in body and not body.endswith("\\"):
        lines[line - 1] = f"{body}  {MARK} {NAME}" + lines[line - 1][len(body):]


def segments_of(text: str | None, manifest: dict | None = None) -> str | None:
    """How the install's writer gets a segment per feature (vocab.SEGMENTS): `pool` where mmdiag
    put the pool (this patch, or the `shm` patch's own), `fresh` where the release writes a new
    segment, None where no shared-memory writer exists."""
    if manifest and manifest.get("strategy") == STRATEGY_SHM:
        return SEGMENTS_POOL
    tree, applied = module_constant(text, NAME_CONST)
    if applied is not None or tree is None:
        return applied
    return SEGMENTS_FRESH if astutil.find_class(tree, CLASS) is not None else None


def describe(segments: str | None) -> str:
    """For doctor: how the writer gets its segments."""
    if segments == SEGMENTS_POOL:
        return (f"pool (reused, pre-faulted; bound ${POOL_ENV} MB per writer process, default a quarter of "
                f"/dev/shm, at most {POOL_MAX_MB})")
    if segments == SEGMENTS_FRESH:
        return f"fresh (a new segment per feature; `mmdiag apply {NAME}` reuses them)"
    return "none (no segments reach the ranks: features ride the recv broadcast)"


def build(det, texts: dict[str, str]) -> Plan:
    plan = Plan(NAME, det.variant)
    where = str(det.install.path("mm_utils"))
    text = texts.get("mm_utils")
    if (det.manifest or {}).get("strategy") == STRATEGY_SHM:
        plan.notes.append(f"nothing to patch: mmdiag's `{STRATEGY_SHM}` patch already pools its segments here "
                          f"(${POOL_ENV} MB, 0: a new segment per feature)")
        return plan
    if det.facts.transport != TRANSPORT_SHM:
        version = det.install.version or "this release"
        raise NotApplicable(f"`{NAME}` reuses the segments through which SGLang hands features to every rank; "
                            f"{version} has none ({det.facts.transport_detail or 'features are pickled'})",
                            where=where, fix=f"apply `{STRATEGY_SHM}` instead: mmdiag's shared-memory transport, "
                            f"which pools its segments (${POOL_ENV}); nothing was changed")
    if text is None:
        raise UnknownLayout("srt/managers/mm_utils.py not found", where=where, fix="nothing was changed")
    if segments_of(text) == SEGMENTS_POOL:
        plan.notes.append("this install's segments are pooled already: nothing to patch")
        return plan
    tree = astutil.parse(text, "mm_utils.py")
    if astutil.find_class(tree, CLASS) is None:
        raise UnknownLayout(f"class {CLASS} not found", where=where, fix="nothing was changed")
    nodes = {}
    for m in METHODS:
        node = astutil.target_node(text, f"{CLASS}.{m}", "mm_utils.py")
        if node is None:
            if m in ("__init__", "__setstate__", "materialize"):
                raise UnknownLayout(f"{CLASS}.{m} not found", where=where, fix="nothing was changed")
            continue
        fp = astutil.fingerprint(node)
        if fp not in layouts(f"{CLASS}.{m}"):
            raise UnknownLayout(f"{CLASS}.{m} (line {node.lineno}) matches no known layout (fingerprint {fp})",
                                where=where, fix="this code was changed from any release mmdiag knows; "
                                "nothing was changed")
        nodes[m] = node
    creates = [c for c in _ctor_calls(nodes["__init__"]) if _is_create(c)]
    size = next((k.value for c in creates for k in c.keywords if k.arg == "size"), None)
    opens = [c for m in ("__setstate__", "close_and_unlink") if m in nodes
             for c in _ctor_calls(nodes[m]) if not _is_create(c)]
    if len(creates) != 1 or size is None or not opens:
        raise UnknownLayout(f"{CLASS}: expected one {CTOR}(create=True, size=...) in __init__ and {CTOR}(name=...) "
                            f"in __setstate__ (found {len(creates)} and {len(opens)})", where=where,
                            fix="nothing was changed")
    lines = text.splitlines(keepends=True)
    edits = [(c.lineno, c.col_offset, f"{WRITER}({ast.unparse(size)}) or ") for c in creates]
    for c in opens:
        edits += [(c.lineno, c.col_offset, f"{ATTACH}(self, "), (c.end_lineno, c.end_col_offset, ")")]
    for line, col, s in sorted(edits, reverse=True):  # from the end: earlier offsets stay valid
        _edit(lines, line, col, s)
    for line in sorted({e[0] for e in edits}):
        _mark(lines, line)
    plan.new_texts["mm_utils"] = append_module_code("".join(lines), POOL_HELPERS + RELEASE_HELPERS)
    clone = "materialize maps copy-on-write" if "mmap" in ast.unparse(nodes["materialize"]) else "materialize clones"
    plan.notes.append(f"{CLASS} writes features into reused segments of a pool, per tokenizer process, up to "
                      f"${POOL_ENV} MB (default a quarter of /dev/shm, at most {POOL_MAX_MB}; 0: a new segment "
                      f"per feature, as before); beyond it, new segments as the release writes them")
    plan.notes.append(f"segments are named {PREFIX}<pid>-p<random> under {SHM_FOLDER}; ranks hold a shared lock "
                      f"while they read ({clone}); the unlink becomes a rename to <name>.held; restart the server "
                      "to use it")
    return plan
