"""`revert`: per-rank materialization on every rank (before 17a57fd)."""
from __future__ import annotations

from .common import Plan, flag_off, per_rank_method, replace_method, require_layout

STRATEGY = "revert"
DESCRIPTION = "every rank materializes MultimodalInputs itself; no collective"


def build(det, texts: dict[str, str]) -> Plan:
    plan = Plan(STRATEGY, det.variant)
    if det.variant == "per-rank":
        plan.notes.append("this install is already per-rank (before 17a57fd): nothing to patch")
        return plan
    if det.variant == "broadcast-flag":
        plan.notes.append("no code change: " + flag_off(det, plan))
        return plan
    where = str(det.install.path("scheduler"))
    s = texts["scheduler"]
    require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", where)
    s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs",
                       per_rank_method(STRATEGY, "per-rank materialization restored"))
    plan.new_texts["scheduler"] = s
    return plan
