"""`cond`: the seeds' size-conditional broadcast (000_3099abf5086ce8a8.txt, 方案2: 条件优化).

A multimodal request whose feature bytes exceed the threshold takes 17a57fd's path
(the entry rank materializes and broadcasts), a smaller one is materialized by
every rank. Why every rank enters the same collectives in the same order: the
per-request decision reads only the request's feature sizes, which every rank of
cpu_group received identically (recv_requests' broadcast_pyobj), and a threshold
all ranks agreed on once (all_reduce MIN over the group on the first multimodal
request, a point every rank reaches in the same call), so nodes whose environments
differ cannot diverge. The entry rank never raises between deciding and
broadcasting: a failed from_dict is sent as None and every rank then materializes
the request itself (raising the same error everywhere, as the per-rank path would).
No cache: nothing outlives the call, so an aborted request leaves nothing behind.

The threshold: SGLANG_MM_BROADCAST_THRESHOLD (bytes) read at server start, else the
value baked in at apply time (mmdiag.analysis.threshold.for_patch: `--threshold`, the
environment of `mmdiag apply`, the crossover in the Run `mmdiag recommend` kept last,
else the seed's 100 KB example; `mmdiag recommend` prints the measured crossover and the
command, or says that no threshold pays).
"""
from __future__ import annotations

from ...analysis import threshold as T
from .common import MARK, Collective, Plan, patch_broadcast_path, refuse_resend_on_shm

STRATEGY = "cond"
DESCRIPTION = "broadcast the materialized inputs only for requests above a feature-size threshold"


def method(c: Collective) -> str:
    return f'''
def _process_and_broadcast_mm_inputs(self, raw_mm_inputs):
    {MARK} cond -- broadcast only requests whose features exceed the threshold.
    # See mmdiag.sglang.patches.cond for why every rank takes the same collectives.
    if raw_mm_inputs is None:
        return None
{c.group_world}    if world <= 1:
        return {c.materialize}
    limit = getattr(self, "_mmdiag_cond_limit", None)
    if limit is None:
        limit = self._mmdiag_cond_limit = self._mmdiag_cond_agree_limit(group)
    nbytes = 0
    for item in raw_mm_inputs.get("mm_items") or ():
        for data in (getattr(item, "feature", None), getattr(item, "precomputed_embeddings", None)):
            nbytes += int(getattr(data, "nbytes", 0) or 0)
    if nbytes <= limit:
        return self._mmdiag_cond_below_threshold(raw_mm_inputs)
    obj_list = [None]
    if {c.entry}:
        try:
            obj_list = [{c.materialize}]
        except Exception as e:  # never skip the collective the others entered
            logger.warning(f"mmdiag cond: materializing failed on the entry rank ({{e}}); "
                           "every rank will materialize this request itself")
    torch.distributed.broadcast_object_list(obj_list, src={c.src}, group=group)
    if obj_list[0] is None:
        return {c.materialize}
    return obj_list[0]

def _mmdiag_cond_below_threshold(self, raw_mm_inputs):
    {MARK} cond -- below the threshold: this rank materializes the request itself.
    # Its own frame, so a profile of the server can tell cond from dict on the stacks.
    return {c.materialize}

def _mmdiag_cond_agree_limit(self, group):
    {MARK} cond -- one threshold for every rank: the smallest any rank was given.
    import os as _os
    text = _os.environ.get("{T.ENV}", "").strip()
    try:
        value = float(text) if text else {{default}}
        if not value >= 0:  # nan or negative
            raise ValueError(text)
    except ValueError:
        logger.warning(f"mmdiag cond: {T.ENV}={{text!r}} is not a byte count; "
                       "using the threshold mmdiag apply baked in")
        value = {{default}}
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    return float(t.item())
'''


def build(det, texts: dict[str, str]) -> Plan:
    refuse_resend_on_shm(det, STRATEGY)
    th = T.for_patch()
    default = 'float("inf")' if th.never else repr(float(th.bytes))
    plan = patch_broadcast_path(det, texts, STRATEGY, lambda c: method(c).replace("{default}", default))
    plan.notes.append(f"threshold baked in: {th.text}; {T.ENV} set for the server overrides it")
    return plan
