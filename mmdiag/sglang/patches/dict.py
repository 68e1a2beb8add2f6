"""`dict`: broadcast the raw mm_inputs dict from the entry rank; every rank materializes."""
from __future__ import annotations

from .common import MARK, Collective, Plan, patch_broadcast_path, refuse_resend_on_shm

STRATEGY = "dict"
DESCRIPTION = "entry rank broadcasts the raw dict per request; every rank materializes"


def method(c: Collective) -> str:
    return f'''
def _process_and_broadcast_mm_inputs(self, raw_mm_inputs):
    {MARK} dict -- broadcast the raw inputs, every rank materializes.
    # One broadcast_object_list per multimodal request, entered by every rank of the
    # release's group: the call depends only on recv_req.mm_inputs, which every rank
    # got identically from recv_requests' broadcast_pyobj.
    if raw_mm_inputs is None:
        return None
{c.group_world}    if world > 1:
        obj_list = [raw_mm_inputs if {c.entry} else None]
        torch.distributed.broadcast_object_list(obj_list, src={c.src}, group=group)
        raw_mm_inputs = obj_list[0]
    return {c.materialize}
'''


def build(det, texts: dict[str, str]) -> Plan:
    refuse_resend_on_shm(det, STRATEGY)
    return patch_broadcast_path(det, texts, STRATEGY, method)
