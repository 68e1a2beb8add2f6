"""`batch`: one collective per `process_input_requests` call for all its multimodal requests.

Why every rank enters the same collectives in the same order: the decision to
broadcast (and what to broadcast) is computed from `recv_reqs` alone, and every
rank of the release's group (cpu_group, later dp_tp_cpu_group) received the same `recv_reqs` from recv_requests'
broadcast_pyobj (with DP attention, cpu_group is the attention-TP group and the
work requests are broadcast within that same group). It never depends on local
state (caches, queues, health-check skips), so a call without multimodal requests
enters no collective on any rank, and a call with some enters exactly one on all.
The entry rank never raises between deciding and broadcasting: before 0.5.19 a
failed materialization is sent as None and every rank then materializes that request
itself (raising the same error everywhere, as the per-rank path would); from 0.5.19
it is sent in the release's own `_MultimodalInputBroadcast(error=...)` and every rank
raises the release's `_MultimodalInputProcessingError`, which its handler turns into
the same rejected request on every rank. A prepared result that is not
consumed (early return, abort) falls back to local from_dict, never to a
collective. Results are cached only for the duration of one call (bounded by the
requests in that call), dropped by abort_request, and cleared when the call ends.
"""
from __future__ import annotations

from .common import (MARK, Collective, Plan, insert_after_method, patch_broadcast_path, refuse_resend_on_shm,
                     rename_method, require_layout, take_decorators)

STRATEGY = "batch"
DESCRIPTION = "entry rank materializes all of a call's multimodal requests; one broadcast per call"


def _consume(c: Collective) -> str:
    if c.error_cls:  # 0.5.19+: the release's inputs-or-error object; an error fails on every rank
        return ("        result = hit[2]\n"
                "        if result.error is not None:\n"
                "            raise _MultimodalInputProcessingError(result.error)\n"
                "        return result.inputs\n")
    return "        return hit[2]\n"


def _build_one(c: Collective) -> str:
    """Entry-rank code for one payload: appends to `results`, never raises."""
    if c.error_cls:
        return (f"            try:\n"
                f"                results.append({c.error_cls}(inputs={c.materialize}))\n"
                f"            except Exception as e:  # every rank raises it, after the same collective\n"
                f"                results.append({c.error_cls}(error=(\n"
                f"                    \"mmdiag batch: the entry rank could not build the multimodal inputs: \"\n"
                f"                    f\"{{type(e).__name__}}: {{e}}\")))\n")
    return (f"            try:\n"
            f"                results.append({c.materialize})\n"
            f"            except Exception as e:  # never skip the collective the others entered\n"
            f"                logger.warning(f\"mmdiag batch: materializing failed on the entry rank ({{e}}); \"\n"
            f"                               \"every rank will materialize this request itself\")\n"
            f"                results.append(None)\n")


def method(c: Collective) -> str:
    return f'''
def _process_and_broadcast_mm_inputs(self, raw_mm_inputs):
    {MARK} batch -- take what _mmdiag_batch_prepare materialized for this call.
    if raw_mm_inputs is None:
        return None
    hit = (getattr(self, "_mmdiag_mm_cache", None) or {{}}).pop(id(raw_mm_inputs), None)
    if hit is not None and hit[0] is raw_mm_inputs:
{_consume(c)}    # Not prepared (aborted, failed on the entry rank, single rank, or called outside
    # process_input_requests): materialize here. No collective, so no rank can wait.
    return {c.materialize}
'''


def helpers(c: Collective, decorators: str = "") -> str:
    """`decorators`: the original process_input_requests' (moved to the wrapper)."""
    return f'''
{MARK} batch -- helpers. See mmdiag.sglang.patches.batch for why ranks stay in step.
@staticmethod
def _mmdiag_mm_payloads(recv_reqs):
    """(rid, raw mm inputs) of every multimodal request in recv_reqs, in order.

    A pure function of recv_reqs, which every rank of the group received
    identically (broadcast_pyobj in recv_requests): all ranks get the same list.
    """
    out = []
    for req in recv_reqs:
        if isinstance(req, (BatchTokenizedGenerateReqInput, BatchTokenizedEmbeddingReqInput)):
            subs = list(req.batch)
        else:
            subs = [req]
        for sub in subs:
            if not isinstance(sub, (TokenizedGenerateReqInput, TokenizedEmbeddingReqInput)):
                continue
            raw = getattr(sub, "mm_inputs", None)
            if raw is None:
                raw = getattr(sub, "image_inputs", None)  # embedding requests before 0.5.15
            # Error objects and already-built inputs never reach the broadcast (0.5.19+).
            if raw is not None and type(raw).__name__ not in ("MMInputsProcessError", "MultimodalInputs"):
                out.append((sub.rid, raw))
    return out

def _mmdiag_batch_prepare(self, recv_reqs):
    """One broadcast_object_list for all multimodal requests of this call, or none."""
    self._mmdiag_mm_cache = {{}}
    payloads = self._mmdiag_mm_payloads(recv_reqs)
    if not payloads:
        return  # same on every rank: the list is computed from identical recv_reqs
{c.group_world}    if world <= 1:
        return  # materialized per request, locally
    if {c.entry}:
        results = []
        for _rid, raw_mm_inputs in payloads:
{_build_one(c)}        obj_list = [results]
    else:
        obj_list = [None]
    torch.distributed.broadcast_object_list(obj_list, src={c.src}, group=group)
    for (rid, raw), mm in zip(payloads, obj_list[0]):
        if mm is not None:
            self._mmdiag_mm_cache[id(raw)] = (raw, rid, mm)

{decorators}def process_input_requests(self, recv_reqs):
    {MARK} batch -- prepare once, run SGLang's own loop, drop what is left.
    self._mmdiag_batch_prepare(recv_reqs)
    try:
        return self._mmdiag_orig_process_input_requests(recv_reqs)
    finally:
        self._mmdiag_mm_cache = {{}}

def abort_request(self, recv_req):
    {MARK} batch -- an aborted request leaves nothing cached.
    cache = getattr(self, "_mmdiag_mm_cache", None)
    if cache:
        abort_all = getattr(recv_req, "abort_all", False)
        prefix = getattr(recv_req, "rid", None)
        for key, (_raw, rid, _mm) in list(cache.items()):
            if abort_all or (isinstance(rid, str) and isinstance(prefix, str) and rid.startswith(prefix)):
                del cache[key]
    return self._mmdiag_orig_abort_request(recv_req)
'''


def build(det, texts: dict[str, str]) -> Plan:
    refuse_resend_on_shm(det, STRATEGY)

    def prepare(s: str, where: str, c: Collective) -> str:
        require_layout(s, "Scheduler", "process_input_requests", where)  # presence (no fingerprints listed)
        require_layout(s, "Scheduler", "abort_request", where)
        # Rename first: afterwards the wrappers take the original names (and decorators:
        # the stage timer of 0.5.19+ must cover the prepare step too).
        s, decorators = take_decorators(s, "Scheduler", "process_input_requests")
        s = rename_method(s, "Scheduler", "process_input_requests", "_mmdiag_orig_process_input_requests", STRATEGY)
        s = rename_method(s, "Scheduler", "abort_request", "_mmdiag_orig_abort_request", STRATEGY)
        return insert_after_method(s, "Scheduler", "_process_and_broadcast_mm_inputs", helpers(c, decorators))

    return patch_broadcast_path(det, texts, STRATEGY, method, prepare)
