"""`shm`: hash once before the scheduler and move features through POSIX shared memory.

For releases whose recv broadcast still pickles feature bytes (0.5.4.post1 .. 0.5.9).
Tokenizer manager (after its multimodal processor, in a worker thread): each valid
item is hashed once (SGLang's own `set_pad_value`), then each CPU feature is copied
once into a segment under /dev/shm whose pages are reserved first (posix_fallocate:
a full /dev/shm is ENOSPC here and the feature stays inline, never a SIGBUS later);
the item's feature becomes a plain tuple handle (tag, path, shape, dtype, nbytes),
so the recv broadcast pickles a few dozen bytes and no class must be importable.
Scheduler: `recv_requests` is wrapped; after the release's own receive every rank
opens the call's segments, a barrier waits until all hold an fd, the entry rank
unlinks them, each rank maps its fd copy-on-write (no copy), and an all_reduce(MAX)
of per-item failures makes every rank see the same failures; the entry rank then
resends those features inline (one broadcast_object_list) and a request whose
feature no rank has is dropped on every rank. No other collective is added.

Why every rank takes the same collectives: they are entered only when the received
requests hold handles, and every rank of the group got the same requests from
recv_requests' broadcast_pyobj (the TP CPU group; with DP attention the attention-TP
group, within which the work requests are broadcast). Segments are written only on a
single node without attention context parallelism (where that group is every rank
that receives them). Lifetime: a collective that fails (a rank died) makes every
surviving rank unlink the call's segments; a tokenizer await that is cancelled
discards what its thread wrote; what a request rejected after the write leaves
(too long an input) is reclaimed by the tokenizer after a while, and at its exit.
On broadcast-always releases the 17a57fd broadcast is reverted to per-rank too
(it would pickle the features again); on broadcast-flag releases the flag stays off.

Reused segments (mmdiag.sglang.patches.segment_pool, shared with `apply pool`; bounded by
$MMDIAG_SHM_POOL_MB of the server, default a quarter
of /dev/shm up to 4 GiB; 0 turns it off): writing into a new segment costs its page
faults (27-34 ms for 18.8 MB), into a reused, still-mapped one a copy (2-2.6 ms). The
tokenizer keeps each pooled segment mapped and grows the pool only when no free one is
large enough (whole MB, so it is sized to the features in flight); beyond the bound it
writes new segments as above. A pooled handle carries a sixth field, True. A private
map shows the file's later bytes on every page the rank never wrote, so a segment is
rewritten only once no rank maps it: each rank takes a shared flock on the fd it opens,
and its map keeps a duplicate of that fd, so the lock lives exactly as long as the map
(the feature and every view of it; a dead rank's goes with it). After the barrier (every
rank holds its lock) the entry rank renames the segment `<name>.held` instead of
unlinking it; the tokenizer takes it back when its exclusive test finds no shared lock
left, by renaming it to its own name, atomically. A pooled segment no scheduler took is
dropped from the pool (never rewritten: a late reader may still open it). Exit removes the pool; a tokenizer that
died (kill -9) leaves segments named by its pid, which the next one removes at its
first write.
"""
from __future__ import annotations

from ...mmpath.shm import SHM_DIR_ENV
from ...vocab import STRATEGY_SHM, TRANSPORT_SHM
from ..errors import UnknownLayout
from ..facts import layouts
from .. import astutil
from .segment_pool import POOL_ENV, POOL_HELPERS, POOL_MAX_MB, PREFIX, RECLAIM_AFTER_S  # noqa: F401
from .common import (MARK, Plan, append_module_code, flag_off, insert_after_method, insert_after_statement,
                     per_rank_method, rename_method, replace_method, require_layout)

STRATEGY = STRATEGY_SHM
DESCRIPTION = "tokenizer hashes once and writes features to shared memory; ranks map them, no pickle"
TAG = "mmdiag-shm/1"      # first field of a handle tuple
ANCHOR = "TokenizerManager._tokenize_one_request:mm_inputs*"  # variants.toml [layouts]

CALL = f'''
{MARK} shm -- hash items once here and write their features to shared memory;
# the scheduler ranks then map the segments (see _mmdiag_shm_export). A cancelled
# await discards what the thread wrote once it is done.
if mm_inputs:
    _mmdiag_fut = asyncio.get_running_loop().run_in_executor(
        None, _mmdiag_shm_export, mm_inputs, self.server_args)
    try:
        await asyncio.shield(_mmdiag_fut)
    except BaseException:
        _mmdiag_fut.add_done_callback(lambda _f, _mm=mm_inputs: _mmdiag_shm_discard(_mm))
        raise
'''

TOKENIZER_HELPERS = f'''
{MARK} shm -- tokenizer side. See mmdiag.sglang.patches.shm.
_MMDIAG_SHM_TAG = "{TAG}"


def _mmdiag_shm_items(mm_inputs):
    if isinstance(mm_inputs, dict):
        return mm_inputs.get("mm_items") or ()
    return getattr(mm_inputs, "mm_items", None) or ()


def _mmdiag_shm_export(mm_inputs, server_args=None):
    """Hash every valid item once (SGLang's own set_pad_value: the scheduler ranks'
    from_dict then skips hashing), then move each CPU feature into a segment."""
    # One node and no attention context parallelism: the ranks that receive a
    # request are one group that can open the node's /dev/shm.
    import torch
    shared = server_args is None or (
        getattr(server_args, "nnodes", 1) == 1 and getattr(server_args, "attn_cp_size", 1) in (None, 1))
    for item in _mmdiag_shm_items(mm_inputs):
        if not hasattr(item, "set_pad_value") or (hasattr(item, "is_valid") and not item.is_valid()):
            continue
        feature = item.feature if item.feature is not None else item.precomputed_embeddings
        if getattr(item, "hash", None) is None and type(feature).__name__ != "CudaIpcTensorTransportProxy":
            item.set_pad_value()
        if shared and isinstance(item.feature, torch.Tensor) and item.feature.is_cpu:
            handle = _mmdiag_shm_write(item.feature)
            if handle is not None:
                item.feature = handle


def _mmdiag_shm_write(feature):
    """A handle to a segment holding `feature`'s bytes (a pooled one when the pool has or
    may grow one, else a new one); None keeps them inline."""
    import mmap
    import secrets
    import time

    import torch
    src = feature.detach().contiguous().reshape(-1).view(torch.uint8)
    nbytes = int(src.numel())
    if nbytes == 0:
        return None
    folder = os.environ.get("{SHM_DIR_ENV}", "/dev/shm")
    _mmdiag_shm_sweep(folder)
    _mmdiag_shm_reclaim(time.monotonic() - {RECLAIM_AFTER_S})
    if not _MMDIAG_SHM_WRITTEN:
        import atexit
        atexit.register(_mmdiag_shm_reclaim, float("inf"))
    shape, dtype = tuple(feature.shape), str(feature.dtype).replace("torch.", "")
    slot = _mmdiag_shm_acquire(folder, nbytes)
    if slot is not None:
        path, mm = slot
        try:
            dst = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
            dst.copy_(src)
            del dst  # the map cannot close while a tensor views it
        except (ValueError, RuntimeError, BufferError):
            _mmdiag_shm_drop(path)
            return None
        return (_MMDIAG_SHM_TAG, path, shape, dtype, nbytes, True)
    path = os.path.join(folder, f"{PREFIX}{{os.getpid()}}-{{secrets.token_hex(8)}}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None  # no shared memory here: the bytes ride the recv broadcast
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)  # full: ENOSPC now, never SIGBUS on a later fault
            with mmap.mmap(fd, nbytes) as mm:
                dst = torch.frombuffer(mm, dtype=torch.uint8)
                dst.copy_(src)
                del dst  # the map cannot close while a tensor views it
        finally:
            os.close(fd)
    except (OSError, ValueError, RuntimeError, BufferError):
        _mmdiag_shm_unlink(path)
        return None
    _MMDIAG_SHM_WRITTEN[path] = time.monotonic()
    return (_MMDIAG_SHM_TAG, path, shape, dtype, nbytes, False)


{POOL_HELPERS}


def _mmdiag_shm_discard(mm_inputs):
    """The request will not be sent: remove its segments (no rank locks a pooled one: free again)."""
    for item in _mmdiag_shm_items(mm_inputs):
        handle = getattr(item, "feature", None)
        if isinstance(handle, tuple) and handle and handle[0] == _MMDIAG_SHM_TAG:
            if len(handle) > 5 and handle[5]:
                try:
                    os.rename(handle[1], handle[1] + ".held")
                except OSError:
                    pass
            else:
                _mmdiag_shm_unlink(handle[1])
            _MMDIAG_SHM_WRITTEN.pop(handle[1], None)
'''

RECV_WRAPPER = f'''
def recv_requests(self):
    {MARK} shm -- SGLang's own receive, then every rank maps the shared segments.
    return self._mmdiag_shm_finalize(self._mmdiag_orig_recv_requests())
'''

SCHEDULER_HELPERS = f'''
{MARK} shm -- scheduler side. See mmdiag.sglang.patches.shm for why ranks stay in step.
@staticmethod
def _mmdiag_shm_found(recv_reqs):
    """[(owner list, request, item)] for every item whose feature is a shm handle."""
    out = []
    for req in recv_reqs or ():
        subs = getattr(req, "batch", None)
        owner = subs if isinstance(subs, list) else recv_reqs
        for sub in (subs if isinstance(subs, list) else [req]):
            raw = getattr(sub, "mm_inputs", None)
            if raw is None:
                raw = getattr(sub, "image_inputs", None)  # embedding requests
            items = raw.get("mm_items") if isinstance(raw, dict) else None
            for item in items or ():
                f = getattr(item, "feature", None)
                if isinstance(f, tuple) and f and f[0] == "{TAG}":
                    out.append((owner, sub, item))
    return out

@staticmethod
def _mmdiag_shm_map(fd, handle):
    """Map the segment copy-on-write (no copy of its bytes) and close the fd. The map keeps
    its own duplicate of the fd, and with it a pooled segment's shared lock: the tokenizer
    rewrites the segment only once every rank's map is gone (a private map shows the file's
    later bytes on every page the rank never wrote)."""
    import mmap
    _tag, _path, shape, dtype, nbytes = handle[:5]
    try:
        mm = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
        return torch.frombuffer(mm, dtype=getattr(torch, dtype)).reshape(shape)
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError):
        return None
    finally:
        os.close(fd)

@staticmethod
def _mmdiag_shm_open(handles):
    """An fd per handle, None where the segment cannot be opened; a pooled segment's fd
    holds a shared lock (flock), which the tokenizer's exclusive test sees."""
    import fcntl
    fds = []
    for h in handles:
        try:
            fd = os.open(h[1], os.O_RDONLY)
        except OSError:
            fds.append(None)
            continue
        if len(h) > 5 and h[5]:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                os.close(fd)
                fd = None
        fds.append(fd)
    return fds

@staticmethod
def _mmdiag_shm_unlink(handles):
    for h in handles:
        try:
            os.unlink(h[1])
        except OSError:
            pass

@staticmethod
def _mmdiag_shm_hold(handles):
    """Pooled segments: every rank holds its lock, so the tokenizer may test them now."""
    for h in handles:
        try:
            os.rename(h[1], h[1] + ".held")
        except OSError:
            pass

def _mmdiag_shm_finalize(self, recv_reqs):
    """Replace every shm handle in recv_reqs by a copy-on-write map of its segment."""
    found = self._mmdiag_shm_found(recv_reqs)
    if not found:
        return recv_reqs  # the same on every rank: collectives are entered only below
    group, world, entry = self._mmdiag_shm_group()
    handles = [item.feature for _, _, item in found]
    fds, done = [], False
    try:
        fds = self._mmdiag_shm_open(handles)
        if world > 1:
            torch.distributed.barrier(group=group)  # every rank holds its fds (and locks): unlinking is safe
        if entry:
            self._mmdiag_shm_unlink([h for h in handles if not (len(h) > 5 and h[5])])
            self._mmdiag_shm_hold([h for h in handles if len(h) > 5 and h[5]])
        failed = torch.zeros(len(found), dtype=torch.int32)
        for k, ((_, _, item), fd) in enumerate(zip(found, fds)):
            fds[k] = None  # _mmdiag_shm_map closes it
            mapped = None if fd is None else self._mmdiag_shm_map(fd, item.feature)
            if mapped is None:
                failed[k] = 1
            else:
                item.feature = mapped
        if world > 1:
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=group)
        if bool(failed.any()):
            self._mmdiag_shm_resend(found, failed, group, world)
        done = True
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        if not done:  # a collective failed (a rank died): leave no segment behind
            self._mmdiag_shm_unlink(handles)
    return recv_reqs

def _mmdiag_shm_group(self):
    """(group, its size, whether this is its first rank): the ranks that received these requests."""
    if getattr(self.server_args, "enable_dp_attention", False):
        group = self.attn_tp_cpu_group  # work requests are broadcast within the attention-TP group
    else:
        group = self.tp_cpu_group
    if group is None or not torch.distributed.is_initialized():
        return group, 1, True
    return group, torch.distributed.get_world_size(group=group), torch.distributed.get_rank(group=group) == 0

def _mmdiag_shm_resend(self, found, failed, group, world):
    """Items some rank could not map: the entry rank sends its copy inline (every rank
    enters: `failed` is the same everywhere after the all_reduce); a request whose
    feature the entry rank lacks too is dropped on every rank."""
    idx = [k for k in range(len(found)) if failed[k]]
    payload = [[found[k][2].feature if torch.is_tensor(found[k][2].feature) else None for k in idx]]
    if world > 1:
        src = torch.distributed.get_global_rank(group, 0)
        torch.distributed.broadcast_object_list(payload, src=src, group=group)
    for k, tensor in zip(idx, payload[0]):
        owner, req, item = found[k]
        item.feature = tensor
        if tensor is None and req in owner:
            owner.remove(req)
            logger.error(f"mmdiag shm: request {{getattr(req, 'rid', '?')}} dropped on every rank: "
                         "its shared-memory feature was gone before any rank mapped it")
'''


def _tokenizer(det, text: str) -> str:
    """Insert CALL after the statement where mm_inputs gets its final value."""
    where = str(det.install.path("tokenizer_manager"))
    stmt = astutil.target_node(text, ANCHOR, "tokenizer_manager.py")
    if stmt is None:
        raise UnknownLayout("TokenizerManager._tokenize_one_request has no `mm_inputs = await ...`",
                            where=where, fix="nothing was changed")
    fp = astutil.fingerprint(stmt)
    if fp not in layouts(ANCHOR):
        raise UnknownLayout(f"line {stmt.lineno}: the statement that builds mm_inputs matches no known layout "
                            f"(fingerprint {fp})", where=where, fix="nothing was changed")
    return append_module_code(insert_after_statement(text, stmt, CALL), TOKENIZER_HELPERS)


def _scheduler(det, text: str) -> str:
    where = str(det.install.path("scheduler"))
    require_layout(text, "Scheduler", "recv_requests", where)
    s = rename_method(text, "Scheduler", "recv_requests", "_mmdiag_orig_recv_requests", STRATEGY)
    s = insert_after_method(s, "Scheduler", "_mmdiag_orig_recv_requests", RECV_WRAPPER + SCHEDULER_HELPERS)
    if det.variant == "broadcast-always":  # 17a57fd would pickle the mapped features again
        require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", where)
        s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs",
                           per_rank_method(STRATEGY, "per-rank materialization of the mapped features"))
    return s


def release_settings(det, plan: Plan) -> Plan:
    """0.5.10+: the release's own transport plus SGLANG_MM_PRECOMPUTE_HASH=1; no code."""
    from .precompute import env_settings
    f = det.facts
    plan = env_settings(det, plan)
    if f.feature_transport_option:
        plan.settings.setdefault("flags", {})["--mm-feature-transport"] = "cpu"
        keep = f"; keep --mm-feature-transport at cpu, its default ({f.feature_transport_at})"
    elif f.cuda_ipc_env:
        keep = f"; leave SGLANG_USE_CUDA_IPC_TRANSPORT unset ({f.cuda_ipc_env})"
    else:
        keep = ""
    plan.notes.insert(0, f"no code change: this release moves features by shared memory itself ({f.transport_detail}, "
                      f"{f.transport_at}); `shm` is that transport plus SGLANG_MM_PRECOMPUTE_HASH=1{keep}")
    return plan


def build(det, texts: dict[str, str]) -> Plan:
    plan = Plan(STRATEGY, det.variant)
    if det.facts.transport == TRANSPORT_SHM:
        return release_settings(det, plan)
    plan.new_texts["tokenizer_manager"] = _tokenizer(det, texts["tokenizer_manager"])
    plan.new_texts["scheduler"] = _scheduler(det, texts["scheduler"])
    if det.variant == "broadcast-always":
        plan.notes.append("the entry-rank broadcast is reverted to per-rank as well")
    elif det.variant == "broadcast-flag":
        plan.notes.append(flag_off(det, plan))
    plan.notes.append(f"segments are named {PREFIX}<pid>-<random> under /dev/shm (or ${SHM_DIR_ENV} of the server); "
                      f"reused ones are pooled up to ${POOL_ENV} MB (default a quarter of /dev/shm, at most "
                      f"{POOL_MAX_MB}; 0: a new segment per feature)")
    return plan
