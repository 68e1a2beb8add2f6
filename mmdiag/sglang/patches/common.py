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
from ...vocab import TRANSPORT_SHM

MARK = "# mmdiag-patch:"

# Generated-code lines the broadcasting patches share: the size of the release's CPU
# group they broadcast over (1 when torch.distributed is not initialized).
GROUP_WORLD = ('    group = {group}\n    world = 1\n    if (\n        group is not None\n'
               '        and torch.distributed.is_available()\n        and torch.distributed.is_initialized()\n'
               '    ):\n        world = torch.distributed.get_world_size(group=group)\n')


@dataclass(frozen=True)
class Collective:
    """The release's own entry-rank broadcast, read from its code (mmdiag.sglang.probes):
    the patches broadcast over the same group, from the same source, with the same
    entry test, materialize with the same call and, from 0.5.19, send the same
    inputs-or-error object."""

    group: str
    src: str
    entry: str
    materialize: str  # the release's MultimodalInputs.from_*(raw_mm_inputs, ...) call
    error_cls: str | None  # _MultimodalInputBroadcast (0.5.19+), None before
    notes: tuple[str, ...] = ()

    @property
    def group_world(self) -> str:
        return GROUP_WORLD.format(group=self.group)


def collective_of(det, text: str) -> Collective:
    f = det.facts
    m = _class_methods(text, "Scheduler").get("_process_and_broadcast_mm_inputs")
    call = None
    for n in ast.walk(m.node) if m else ():
        if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("MultimodalInputs.from_"):
            call = ast.unparse(n)
            break
    if not (f.group and f.src and f.entry_test and call and "raw_mm_inputs" in call):
        raise UnknownLayout("the entry-rank broadcast's group, source, entry test or materializer was not found "
                            f"(group {f.group}, src {f.src}, entry {f.entry_test}, call {call})",
                            where=str(det.install.path("scheduler")), fix="nothing was changed")
    src, notes = f.src, ()
    if src == "0":  # 17a57fd's global rank 0: wrong when the group does not start at 0 (PP > 1)
        src = f"torch.distributed.get_global_rank({f.group}, 0)"
        notes = (f"the broadcast source is the group's first rank ({src}), as PR #12762 fixed upstream",)
    return Collective(f.group, src, f.entry_test, call, f.error_protocol, notes)


@dataclass
class Plan:
    strategy: str
    variant: str
    new_texts: dict[str, str] = field(default_factory=dict)  # file key -> patched text
    notes: list[str] = field(default_factory=list)
    # What the user sets instead of a code change: {"env": {VAR: value}, "flags": {option: on?}}
    settings: dict = field(default_factory=dict)
    # file key -> sha256 of the bytes the plan was built from (apply re-checks them under its lock)
    planned_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def nothing_to_do(self) -> bool:
        return not self.new_texts and not self.settings


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


def take_decorators(text: str, cls: str, method: str) -> tuple[str, str]:
    """(text without the method's decorator lines, those lines dedented): a wrapper that
    takes over the method's name takes its decorators too (0.5.19+ `process_input_requests`
    is timed as a scheduler stage; left on the renamed original, the wrapper's own work
    would be booked to another stage)."""
    span = _class_methods(text, cls)[method]
    if span.start == span.def_line:
        return text, ""
    lines = text.splitlines(keepends=True)
    decorators = textwrap.dedent("".join(lines[span.start - 1: span.def_line - 1]))
    return "".join(lines[: span.start - 1] + lines[span.def_line - 1:]), decorators


def insert_after_statement(text: str, stmt: ast.stmt, new_source: str) -> str:
    lines = text.splitlines(keepends=True)
    first = lines[stmt.lineno - 1]
    indent = first[: len(first) - len(first.lstrip())]
    body = textwrap.indent(textwrap.dedent(new_source).strip("\n") + "\n", indent)
    return "".join(lines[: stmt.end_lineno]) + body + "".join(lines[stmt.end_lineno :])


def module_constant(text: str | None, name: str) -> tuple[ast.Module | None, object]:
    """(the parsed text, the string a patch's module-level `name = "..."` holds there, or None);
    (None, None) where the text is missing or does not parse."""
    if text is None:
        return None, None
    try:
        tree = astutil.parse(text, "mm_utils.py")
    except SyntaxError:
        return None, None
    for n in tree.body:
        if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == [name] \
                and isinstance(n.value, ast.Constant):
            return tree, n.value.value
    return tree, None


def append_module_code(text: str, new_source: str) -> str:
    sep = "" if text.endswith("\n") else "\n"
    return text + sep + "\n\n" + textwrap.dedent(new_source).strip("\n") + "\n"


def force_broadcast_branch(text: str, strategy: str, where: str) -> str:
    """Make `_get_multimodal_inputs` always take its broadcast branch: the flag test
    becomes True, the rest of the release's method (0.5.19's early exits for an error
    object and for already-built inputs) stays as it is."""
    span = _class_methods(text, "Scheduler")["_get_multimodal_inputs"]
    lines = text.splitlines(keepends=True)
    for n in ast.walk(span.node):
        if isinstance(n, ast.If) and "enable_broadcast_mm_inputs_process" in ast.unparse(n.test):
            line = lines[n.lineno - 1]
            head = f"if {ast.unparse(n.test)}:"
            if line.strip() != head:
                break
            indent = line[: len(line) - len(line.lstrip())]
            eol = "\r\n" if line.endswith("\r\n") else "\n"
            lines[n.lineno - 1] = (f"{indent}if True:  {MARK} {strategy} -- always the strategy's path "
                                   f"(was: {ast.unparse(n.test)}){eol}")
            return "".join(lines)
    raise UnknownLayout("Scheduler._get_multimodal_inputs: the broadcast flag test was not found on one line",
                        where=where, fix="nothing was changed")


def patch_broadcast_path(det, texts: dict[str, str], strategy: str, method, prepare=None) -> Plan:
    """What dict and batch share: replace 17a57fd's `_process_and_broadcast_mm_inputs`
    with `method(Collective) -> source`; on flag releases make `_get_multimodal_inputs`
    always take it. `prepare(text, where, Collective) -> text` runs first for the
    strategy's own edits."""
    plan = Plan(strategy, det.variant)
    if det.variant == "per-rank":
        raise not_applicable(strategy, det.variant, "it predates 17a57fd: no entry-rank path to patch")
    where = str(det.install.path("scheduler"))
    s = texts["scheduler"]
    require_layout(s, "Scheduler", "_process_and_broadcast_mm_inputs", where)
    col = collective_of(det, s)
    plan.notes += list(col.notes)
    method = method(col)
    if prepare is not None:
        s = prepare(s, where, col)
    s = replace_method(s, "Scheduler", "_process_and_broadcast_mm_inputs", method)
    if det.variant == "broadcast-flag":
        require_layout(s, "Scheduler", "_get_multimodal_inputs", where)
        s = force_broadcast_branch(s, strategy, where)
        plan.notes.append("active whatever --enable-broadcast-mm-inputs-process says")
    plan.new_texts["scheduler"] = s
    return plan


def not_applicable(strategy: str, variant: str, why: str) -> NotApplicable:
    return NotApplicable(f"`{strategy}` does not apply to a {variant} install: {why}",
                         fix="nothing was changed")


def refuse_resend_on_shm(det, strategy: str) -> None:
    """A strategy whose broadcast pickles the features again from the entry rank
    (Strategy.resends_features) is refused where they already reach every rank by shared memory."""
    from ...strategies import REGISTRY
    if det.facts.transport == TRANSPORT_SHM and REGISTRY[strategy].resends_features:
        raise not_applicable(
            strategy, f"{det.facts.family or det.variant} (shared-memory transport)",
            f"its features already reach every rank through shared memory; `{strategy}`'s broadcast would pickle "
            "them again from the entry rank (use `precompute`)")


# The per-rank body, shared by `revert` and `precompute` (which also reverts the
# entry-rank broadcast of broadcast-always releases, so no collective remains).
def per_rank_method(strategy: str, why: str) -> str:
    return f'''
def _process_and_broadcast_mm_inputs(self, raw_mm_inputs):
    {MARK} {strategy} -- {why}
    # Every TP rank already holds recv_req.mm_inputs (recv_requests' broadcast_pyobj),
    # so each materializes it itself: no collective, no rank waits on another.
    if raw_mm_inputs is None:
        return None
    return MultimodalInputs.from_dict(raw_mm_inputs)
'''


def flag_off(det, plan: Plan) -> str:
    """Settings-only advice: keep the broadcast flag off (its default); returns the note."""
    f = det.facts
    plan.settings.setdefault("flags", {})["--enable-broadcast-mm-inputs-process"] = False
    return (f"keep --enable-broadcast-mm-inputs-process off (default {f.flag_default}; declared "
            f"{f.flag_declared}, read as {f.flag_read} at {f.flag_read_at}): leave it out of the "
            "`python -m sglang.launch_server` command; with it off every rank materializes its own inputs")

