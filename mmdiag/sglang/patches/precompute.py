"""`precompute`: hash every multimodal item once in the tokenizer manager.

The tokenizer manager (main process, its own asyncio loop, off the scheduler
loop) calls `MultimodalDataItem.set_pad_value()` on each item right after its
multimodal processor produced `mm_inputs`, in a worker thread (sha256 releases
the GIL on large buffers). `item.hash` travels with the request, and every
scheduler rank's `MultimodalInputs.from_dict` -> `set_pad_value` finds it set
and skips hashing. No collective is added. On broadcast-always releases the
entry-rank broadcast is also reverted to per-rank (otherwise the regression's
collective would remain); on broadcast-flag releases the flag must stay off.
This is what upstream ships from 0.5.7 behind SGLANG_MM_PRECOMPUTE_HASH=1: there
no code is written, the plan says what to set (the variable, the flag off) and where.
"""
from __future__ import annotations

from ..detect import tokenizer_mm_statement
from ...vocab import STRATEGY_PRECOMPUTE
from ..errors import UnknownLayout
from ..facts import layouts
from .. import astutil
from .common import MARK, Plan, append_module_code, flag_off, insert_after_statement
from .common import per_rank_method, replace_method, require_layout

STRATEGY = STRATEGY_PRECOMPUTE
DESCRIPTION = "tokenizer manager hashes items once; ranks skip hashing; no collective"

CALL = f'''
{MARK} precompute -- hash items here, off the scheduler loop; each scheduler
# rank's MultimodalInputs.from_dict then finds item.hash set and skips hashing.
if mm_inputs:
    await asyncio.to_thread(_mmdiag_precompute_mm_hashes, mm_inputs)
'''

HELPER = f'''
{MARK} precompute
def _mmdiag_precompute_mm_hashes(mm_inputs):
    """Set hash and pad_value of every valid item (SGLang's own set_pad_value)."""
    if isinstance(mm_inputs, dict):
        items = mm_inputs.get("mm_items")
    else:
        items = getattr(mm_inputs, "mm_items", None)
    for item in items or ():
        if not hasattr(item, "set_pad_value") or getattr(item, "hash", None) is not None:
            continue
        if hasattr(item, "is_valid") and not item.is_valid():
            continue  # from_dict drops invalid items before hashing
        feature = item.feature if item.feature is not None else item.precomputed_embeddings
        if feature is None or type(feature).__name__ == "CudaIpcTensorTransportProxy":
            continue  # CUDA IPC handles are hashed by the scheduler, on its device
        item.set_pad_value()
'''

TARGET = "TokenizerManager._tokenize_one_request:mm_inputs"


def env_settings(det, plan: Plan) -> Plan:
    """The release ships it: SGLANG_MM_PRECOMPUTE_HASH=1 and the broadcast flag off."""
    f = det.facts
    plan.settings.setdefault("env", {})["SGLANG_MM_PRECOMPUTE_HASH"] = "1"
    plan.notes.append(
        f"no code change: this release ships precompute behind SGLANG_MM_PRECOMPUTE_HASH (declared {f.precompute_env}, "
        f"default {f.precompute_default}); set SGLANG_MM_PRECOMPUTE_HASH=1 in the environment of the "
        "`python -m sglang.launch_server` process (e.g. `SGLANG_MM_PRECOMPUTE_HASH=1 python -m sglang.launch_server "
        "...`, `-e SGLANG_MM_PRECOMPUTE_HASH=1` for docker run, `env:` in a pod spec) and restart it; the tokenizer "
        f"manager then hashes each item once on its {f.precompute_hashing} ({f.precompute_at})")
    if det.variant == "broadcast-flag":
        plan.notes.append(flag_off(det, plan))
    return plan


def build(det, texts: dict[str, str]) -> Plan:
    plan = Plan(STRATEGY, det.variant)
    if det.facts.precompute_env:
        return env_settings(det, plan)
    tm = texts["tokenizer_manager"]
    where = str(det.install.path("tokenizer_manager"))
    stmt = tokenizer_mm_statement(tm)
    if stmt is None:
        raise UnknownLayout("TokenizerManager._tokenize_one_request has no `mm_inputs = await ...`",
                            where=where, fix="nothing was changed")
    fp = astutil.fingerprint(stmt)
    if fp not in layouts(TARGET):
        raise UnknownLayout(f"line {stmt.lineno}: the mm_inputs statement matches no known layout "
                            f"(fingerprint {fp})", where=where, fix="nothing was changed")
    tm = insert_after_statement(tm, stmt, CALL)
    tm = append_module_code(tm, HELPER)
    plan.new_texts["tokenizer_manager"] = tm
    if det.variant == "broadcast-always":
        s = texts["scheduler"]
        require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", str(det.install.path("scheduler")))
        s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs",
                           per_rank_method(STRATEGY, "per-rank materialization, hashes precomputed"))
        plan.new_texts["scheduler"] = s
        plan.notes.append("the entry-rank broadcast is reverted to per-rank as well")
    elif det.variant == "broadcast-flag":
        plan.notes.append(flag_off(det, plan))
    return plan
