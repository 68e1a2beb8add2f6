"""Text edits targeted by AST: replace, rename and insert whole functions.

Each strategy module exposes `build(det, texts) -> Plan`; `texts` maps file keys
(variants.toml [files]) to the current text. Edits re-parse after each step, so
line numbers never go stale; every result is compiled by apply.py before writing.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field

from .. import astutil
from ..errors import NotApplicable, UnknownLayout
from ..facts import layouts

MARK = "# mmdiag-patch:"

# Generated-code lines the broadcasting patches share: the size of the CPU group they
# broadcast over (1 when torch.distributed is not initialized).
GROUP_WORLD = '    group = self.cpu_group\n    world = 1\n    if (\n        group is not None\n        and torch.distributed.is_available()\n        and torch.distributed.is_initialized()\n    ):\n        world = torch.distributed.get_world_size(group=group)\n'


@dataclass
class Plan:
    strategy: str
    variant: str
    new_texts: dict[str, str] = field(default_factory=dict)  # file key -> patched text
    notes: list[str] = field(default_factory=list)
    # file key -> sha256 of the bytes the plan was built from (apply re-checks them under its lock)
    planned_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def nothing_to_do(self) -> bool:
        return not self.new_texts


def _class_methods(text: str, cls: str) -> dict[str, astutil.MethodSpan]:
    tree = astutil.parse(text, "<sglang>")
    c = astutil.find_class(tree, cls)
    if c is None:
        raise UnknownLayout(f"class {cls} not found")
    return astutil.methods(c, text.splitlines(keepends=True))


def require_layout(text: str, cls: str, method: str, where: str) -> astutil.MethodSpan:
    """The method, checked against the known layouts; UnknownLayout otherwise."""
    spans = _class_methods(text, cls)
    target = f"{cls}.{method}"
    if method not in spans:
        raise UnknownLayout(f"{target} not found", where=where, fix="nothing was changed")
    fp = astutil.fingerprint(spans[method].node)
    known = layouts(target)
    if known and fp not in known:
        raise UnknownLayout(
            f"{target} (line {spans[method].def_line}) matches no known layout "
            f"(fingerprint {fp}, known: {', '.join(known)})",
            where=where, fix="this code was changed from any release mmdiag knows; nothing was changed",
        )
    return spans[method]


def _splice(text: str, start: int, end: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    if not new.endswith("\n"):
        new += "\n"
    return "".join(lines[: start - 1]) + new + "".join(lines[end:])


def replace_method(text: str, cls: str, method: str, new_source: str) -> str:
    """Replace the method (decorators to last line) with `new_source` (dedented)."""
    span = _class_methods(text, cls)[method]
    body = textwrap.indent(textwrap.dedent(new_source).strip("\n") + "\n", span.indent)
    return _splice(text, span.start, span.end, body)


def insert_after_method(text: str, cls: str, method: str, new_source: str) -> str:
    span = _class_methods(text, cls)[method]
    body = "\n" + textwrap.indent(textwrap.dedent(new_source).strip("\n") + "\n", span.indent)
    lines = text.splitlines(keepends=True)
    return "".join(lines[: span.end]) + body + "".join(lines[span.end :])


def rename_method(text: str, cls: str, old: str, new: str, strategy: str) -> str:
    """Rename on the `def` line only; a wrapper with the old name is added elsewhere."""
    span = _class_methods(text, cls)[old]
    lines = text.splitlines(keepends=True)
    line = lines[span.def_line - 1]
    needle = f"def {old}("
    if needle not in line:
        raise UnknownLayout(f"{cls}.{old}: unexpected def line {line.strip()!r}")
    eol = "\n" if line.endswith("\n") else ""
    lines[span.def_line - 1] = line.rstrip("\r\n").replace(needle, f"def {new}(", 1) + (
        f"  {MARK} {strategy} (renamed; wrapped by {old})" if line.rstrip().endswith(":") else ""
    ) + eol
    return "".join(lines)


def insert_after_statement(text: str, stmt: ast.stmt, new_source: str) -> str:
    lines = text.splitlines(keepends=True)
    first = lines[stmt.lineno - 1]
    indent = first[: len(first) - len(first.lstrip())]
    body = textwrap.indent(textwrap.dedent(new_source).strip("\n") + "\n", indent)
    return "".join(lines[: stmt.end_lineno]) + body + "".join(lines[stmt.end_lineno :])


def append_module_code(text: str, new_source: str) -> str:
    sep = "" if text.endswith("\n") else "\n"
    return text + sep + "\n\n" + textwrap.dedent(new_source).strip("\n") + "\n"


DISPATCH = f'''
def _get_multimodal_inputs(self, mm_inputs_dict: dict):
    {MARK} {{strategy}} -- the strategy replaces the choice that
    # server_args.enable_broadcast_mm_inputs_process made here; the flag is not read.
    return self._process_and_broadcast_mm_inputs(mm_inputs_dict)
'''


def patch_broadcast_path(det, texts: dict[str, str], strategy: str, method: str, prepare=None) -> Plan:
    """What dict and batch share: replace 17a57fd's `_process_and_broadcast_mm_inputs`
    with `method`; on flag releases make `_get_multimodal_inputs` always take it.
    `prepare(text, where) -> text` runs first for the strategy's own edits."""
    plan = Plan(strategy, det.variant)
    if det.variant == "per-rank":
        raise not_applicable(strategy, det.variant, "it predates 17a57fd: no entry-rank path to patch")
    where = str(det.install.path("scheduler"))
    s = texts["scheduler"]
    require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", where)
    if prepare is not None:
        s = prepare(s, where)
    s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs", method)
    if det.variant == "broadcast-flag":
        require_layout(s, "Scheduler", "_get_multimodal_inputs", where)
        s = replace_method(s, "Scheduler", "_get_multimodal_inputs", DISPATCH.format(strategy=strategy))
        plan.notes.append("active whatever --enable-broadcast-mm-inputs-process says")
    plan.new_texts["scheduler"] = s
    return plan


def not_applicable(strategy: str, variant: str, why: str) -> NotApplicable:
    return NotApplicable(f"`{strategy}` does not apply to a {variant} install: {why}",
                         fix="nothing was changed")


# The per-rank body, shared by `revert` and `precompute` (which also reverts the
# entry-rank broadcast of broadcast-always releases, so no collective remains).
def per_rank_method(strategy: str, why: str) -> str:
    return f'''
def _process_and_broadcast_mm_inputs(
    self,
    raw_mm_inputs: Optional[dict],
):
    {MARK} {strategy} -- {why}
    # Every TP rank already holds recv_req.mm_inputs (recv_requests' broadcast_pyobj),
    # so each materializes it itself: no collective, no rank waits on another.
    if raw_mm_inputs is None:
        return None
    return MultimodalInputs.from_dict(raw_mm_inputs)
'''


def flag_note(det) -> str:
    f = det.flag or {}
    where = f"{f.get('file', 'srt/server_args.py')}:{f.get('field_line', '?')}"
    opt = f"{f.get('file', 'srt/server_args.py')}:{f.get('option_line', '?')}"
    return (f"keep {f.get('option', '--enable-broadcast-mm-inputs-process')} off (default "
            f"{f.get('default', 'False')}): field defined at {where}, command-line option at {opt}; "
            "with it off every rank runs MultimodalInputs.from_dict (per-rank)")
