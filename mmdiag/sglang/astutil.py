"""Small AST helpers shared by detection, patching and the runtime loader.

Standard library only, and valid on Python 3.10 .. 3.13: the fingerprint test loads this
file alone under each interpreter."""
from __future__ import annotations

import ast
import copy
import functools
import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpan:
    """Where a function or method sits in a source file (1-based, inclusive lines)."""

    name: str
    start: int  # first line, decorators included
    def_line: int  # the `def` line
    end: int
    indent: str
    node: ast.FunctionDef | ast.AsyncFunctionDef


@functools.lru_cache(maxsize=24)
def _parse(text: str) -> ast.Module:
    return ast.parse(text)


def parse(text: str, filename: str) -> ast.Module:
    """Parsed once per text (scheduler.py is 6,000+ lines from 0.5.20; detection, planning
    and the probes all read it). Callers must not mutate the tree (copy.deepcopy first)."""
    try:
        return _parse(text)
    except SyntaxError as e:
        e.filename = filename
        raise


def find_class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def _span(node, lines: list[str]) -> MethodSpan:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    line = lines[node.lineno - 1]
    indent = line[: len(line) - len(line.lstrip())]
    return MethodSpan(node.name, start, node.lineno, node.end_lineno, indent, node)


def _defs(body: list[ast.stmt], lines: list[str]) -> dict[str, MethodSpan]:
    return {n.name: _span(n, lines) for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def methods(cls: ast.ClassDef, lines: list[str]) -> dict[str, MethodSpan]:
    return _defs(cls.body, lines)


def functions(tree: ast.Module, lines: list[str]) -> dict[str, MethodSpan]:
    return _defs(tree.body, lines)


def _assigned_awaits(func: ast.AST, var: str) -> list[ast.stmt]:
    out = []
    for node in ast.walk(func):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Await):
            tgt = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(tgt, ast.Name) and tgt.id == var:
                out.append(node)
    return out


def assigned_await(func: ast.AST, var: str) -> ast.stmt | None:
    """The first `var = await ...` (or `var: T = await ...`) statement inside func."""
    found = _assigned_awaits(func, var)
    return found[0] if found else None


def enclosing_awaits(func: ast.AST, var: str) -> ast.stmt | None:
    """The smallest statement inside func holding every `var = await ...` (the statement
    itself when there is one): after it, `var` has its final value (0.5.7 grew a second,
    alternative await of mm_inputs)."""
    found = {id(n) for n in _assigned_awaits(func, var)}
    if not found:
        return None
    best = None
    for node in ast.walk(func):
        if node is func or not isinstance(node, ast.stmt):
            continue
        if found <= {id(n) for n in ast.walk(node)}:
            if best is None or node.end_lineno - node.lineno < best.end_lineno - best.lineno:
                best = node
    return best


def target_node(text: str, target: str, filename: str = "<sglang>") -> ast.AST | None:
    """The node a variants.toml [layouts] target names in a source text: "Class.method",
    "Class.method:var" for the `var = await ...` statement in that method,
    "Class.method:var*" for the statement holding all of them, or "function" for a
    module-level function; None if absent."""
    qual, _, var = target.partition(":")
    cls_name, _, meth = qual.partition(".")
    if not meth and not var:
        return next((n for n in parse(text, filename).body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == qual), None)
    cls = find_class(parse(text, filename), cls_name)
    span = methods(cls, text.splitlines(keepends=True)).get(meth) if cls is not None else None
    if span is None:
        return None
    if var.endswith("*"):
        return enclosing_awaits(span.node, var[:-1])
    return assigned_await(span.node, var) if var else span.node


# Fields that say nothing about what the code does, or exist only on some Pythons
# (type_params from 3.12; ctx is implied by where a name stands; kind is the u"" prefix).
_NOISE_FIELDS = frozenset({"ctx", "kind", "type_comment", "type_params"})


def _canon(v, out: list[str]) -> None:
    """A version-stable text of an AST: node names and the fields that carry meaning.
    ast.dump is not stable across Pythons (3.12 adds type_params=[], 3.13 drops empty
    fields, 3.12 splits f-string constants differently), so the fingerprint is built here."""
    if isinstance(v, ast.JoinedStr):
        v = ast.JoinedStr(values=_fstring_parts(v.values))
    if isinstance(v, ast.AST):
        out.append(type(v).__name__ + "(")
        for f in v._fields:
            x = getattr(v, f, None)
            if f in _NOISE_FIELDS or x is None or (isinstance(x, list) and not x):
                continue
            out.append(f + "=")
            _canon(x, out)
            out.append(",")
        out.append(")")
    elif isinstance(v, list):
        out.append("[")
        for x in v:
            _canon(x, out)
            out.append(",")
        out.append("]")
    else:
        out.append(repr(v))


def _fstring_parts(values: list[ast.expr]) -> list[ast.expr]:
    """f-string pieces with adjacent literal parts merged and empty ones dropped."""
    parts: list[ast.expr] = []
    for p in values:
        if isinstance(p, ast.Constant) and isinstance(p.value, str):
            if parts and isinstance(parts[-1], ast.Constant):
                parts[-1] = ast.Constant(parts[-1].value + p.value)
            elif p.value:
                parts.append(ast.Constant(p.value))
        else:
            parts.append(p)
    return parts


def fingerprint(node: ast.AST) -> str:
    """Hash of a function's structure: comments, formatting and docstring ignored, and the
    same on every Python that parses the source (3.10 .. 3.13)."""
    body = getattr(node, "body", None)
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        node = copy.copy(node)
        node.body = body[1:] or [ast.Pass()]
    out: list[str] = []
    _canon(node, out)
    return hashlib.sha256("".join(out).encode()).hexdigest()[:16]


def source_of(lines: list[str], span: MethodSpan) -> str:
    return "".join(lines[span.start - 1 : span.end])
