"""`dict`: broadcast the raw mm_inputs dict from the entry rank; every rank materializes."""
from __future__ import annotations

from .common import MARK, Plan, not_applicable, replace_method, require_layout

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
    group = self.cpu_group
    world = 1
    if (
        group is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        world = torch.distributed.get_world_size(group=group)
    if world > 1:
        is_src = torch.distributed.get_rank(group=group) == 0
        obj_list = [raw_mm_inputs if is_src else None]
        torch.distributed.broadcast_object_list(
            obj_list, src=torch.distributed.get_global_rank(group, 0), group=group
        )
        raw_mm_inputs = obj_list[0]
    return MultimodalInputs.from_dict(raw_mm_inputs)
'''

DISPATCH = f'''
def _get_multimodal_inputs(self, mm_inputs_dict: dict):
    {MARK} {{strategy}} -- the strategy replaces the choice that
    # server_args.enable_broadcast_mm_inputs_process made here; the flag is not read.
    return self._process_and_broadcast_mm_inputs(mm_inputs_dict)
'''


def build(det, texts: dict[str, str]) -> Plan:
    plan = Plan(STRATEGY, det.variant)
    if det.variant == "per-rank":
        raise not_applicable(STRATEGY, det.variant, "it predates 17a57fd: no entry-rank path to patch")
    where = str(det.install.path("scheduler"))
    s = texts["scheduler"]
    require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", where)
    s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs", METHOD)
    if det.variant == "broadcast-flag":
        require_layout(s, "Scheduler", "_get_multimodal_inputs", where)
        s = replace_method(s, "Scheduler", "_get_multimodal_inputs", DISPATCH.format(strategy=STRATEGY))
        plan.notes.append("active whatever --enable-broadcast-mm-inputs-process says")
    plan.new_texts["scheduler"] = s
    return plan
