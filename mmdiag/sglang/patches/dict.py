"""`dict`: broadcast the raw mm_inputs dict from the entry rank; every rank materializes."""
from __future__ import annotations

from .common import GROUP_WORLD, MARK, Plan, patch_broadcast_path

STRATEGY = "dict"
DESCRIPTION = "entry rank broadcasts the raw dict per request; every rank runs from_dict"

METHOD = f'''
def _process_and_broadcast_mm_inputs(
    self,
    raw_mm_inputs: Optional[dict],
):
    {MARK} dict -- broadcast the raw inputs, every rank materializes.
    # One broadcast_object_list per multimodal request, entered by every rank of
    # cpu_group: the call depends only on recv_req.mm_inputs, which every rank got
    # identically from recv_requests' broadcast_pyobj. The source is the group's
    # first rank in global numbering (correct with PP > 1, cf. PR #12762).
    if raw_mm_inputs is None:
        return None
{GROUP_WORLD}    if world > 1:
        is_src = torch.distributed.get_rank(group=group) == 0
        obj_list = [raw_mm_inputs if is_src else None]
        torch.distributed.broadcast_object_list(
            obj_list, src=torch.distributed.get_global_rank(group, 0), group=group
        )
        raw_mm_inputs = obj_list[0]
    return MultimodalInputs.from_dict(raw_mm_inputs)
'''




def build(det, texts: dict[str, str]) -> Plan:
    return patch_broadcast_path(det, texts, STRATEGY, METHOD)
