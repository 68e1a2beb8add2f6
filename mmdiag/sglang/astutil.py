"""Small AST helpers shared by detection, patching and the runtime loader."""
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


def fingerprint(node: ast.AST) -> str:
    """Hash of a function's structure: comments, formatting and docstring ignored."""
    node = copy.deepcopy(node)
    body = getattr(node, "body", None)
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        node.body = body[1:] or [ast.Pass()]
    dump = ast.dump(node, annotate_fields=True, include_attributes=False)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def source_of(lines: list[str], span: MethodSpan) -> str:
    return "".join(lines[span.start - 1 : span.end])
