"""Every output of mmdiag goes through one interface: a Renderer, chosen by name or by the
output file's extension, turns a result object (a Run, a Recommendation, a Report, a
Detection, a trace summary, ...) into text.

Each renderer names the result types it handles and where the function that renders each
lives ("module:function", imported only when used, so `--help` stays light). Adding a
format is one entry in RENDERERS (and its module); adding a result type is one handler line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

from .. import fileio
from ..errors import MmdiagError

ANY = "*"  # a handler for every type (the JSON renderer)


@dataclass(frozen=True)
class Renderer:
    name: str
    extensions: tuple[str, ...]
    # result type name (the class name, or a base class's) -> "module:function"
    handlers: dict[str, str] = field(default_factory=dict)

    def _handler(self, obj: Any) -> str | None:
        for cls in type(obj).__mro__:
            if cls.__name__ in self.handlers:
                return self.handlers[cls.__name__]
        return self.handlers.get(ANY)

    def supports(self, obj_or_type: Any) -> bool:
        names = {obj_or_type} if isinstance(obj_or_type, str) else {c.__name__ for c in type(obj_or_type).__mro__}
        return ANY in self.handlers or bool(names & set(self.handlers))

    def render(self, obj: Any) -> str:
        target = self._handler(obj)
        if target is None:
            raise MmdiagError(f"the {self.name} format cannot show a {type(obj).__name__}",
                              fix=f"use one of: {', '.join(formats_for(obj))}")
        module, func = target.split(":")
        fn: Callable[[Any], str] = getattr(import_module(module, __name__), func)
        text = fn(obj)
        return text if text.endswith("\n") else text + "\n"


RENDERERS: dict[str, Renderer] = {r.name: r for r in (
    Renderer("text", (".txt",), {
        "Run": ".text:render_run", "Recommendation": ".recommend_text:render_recommendation",
        "Report": ".report_md:render_text", "Detection": ".text:render_doctor", "dict": ".text:render_mapping",
        "Catalog": ".text:render_catalog"}),
    Renderer("json", (".json",), {ANY: ".json_:render_json"}),
    Renderer("markdown", (".md", ".markdown"), {"Report": ".report_md:render_markdown", "Run": ".text:render_run_md",
                                                "Catalog": ".text:render_catalog_md"}),
    Renderer("html", (".html", ".htm"), {"Report": ".report_html:render_html", "Run": ".stages:render_run_html"}),
    Renderer("speedscope", (".speedscope.json",), {"SampledStacks": ".json_:render_speedscope"}),
    Renderer("chrome", (".trace.json",), {"RankTimelines": ".timeline:render_chrome"}),
)}


def get(name: str) -> Renderer:
    try:
        return RENDERERS[name]
    except KeyError:
        raise MmdiagError(f"unknown output format {name!r}", fix=f"choose from: {', '.join(RENDERERS)}") from None


def describe_formats(kinds: list[str], code: str = "") -> str:
    """'.txt, .json, .md for runs and reports, .html for reports': the first extension of every
    renderer that shows one of `kinds` (type names), with the kinds it shows where not all of
    them; each extension wrapped in `code` (the README's backquote)."""
    def plural(ks: list[str]) -> str:
        words = [f"{k.lower()}s" for k in ks]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    out = []
    for r in RENDERERS.values():
        shows = [k for k in kinds if r.supports(k)]
        if shows:
            out.append(f"{code}{r.extensions[0]}{code}" + ("" if len(shows) == len(kinds) else f" for {plural(shows)}"))
    return ", ".join(out)


def formats_for(obj_or_type: Any) -> list[str]:
    return [r.name for r in RENDERERS.values() if r.supports(obj_or_type)]


def for_path(path: str, obj_or_type: Any = None) -> Renderer:
    """The renderer a file name asks for (longest matching extension), refusing one that
    cannot show `obj_or_type` (an object or a type name)."""
    lower = os.path.basename(path).lower()
    matches = sorted(((ext, r) for r in RENDERERS.values() for ext in r.extensions if lower.endswith(ext)),
                     key=lambda m: -len(m[0]))
    usable = [r for _, r in matches if obj_or_type is None or r.supports(obj_or_type)]
    if not usable:
        kind = obj_or_type if isinstance(obj_or_type, str) else type(obj_or_type).__name__ if obj_or_type else "output"
        names = [f"{kind.lower()}{r.extensions[0]}" for r in RENDERERS.values()
                 if obj_or_type is None or r.supports(obj_or_type)]
        ext = os.path.splitext(lower)[1] or "(no extension)"
        raise MmdiagError(f"unknown output format {ext!r}", where=path, fix=f"name the file like {', '.join(names)}")
    return usable[0]


def check_output(path: str, kind: Any = None, what: str | None = None) -> Renderer:
    """Before the work: the file's extension names a format that can show `kind`, and the
    file can be created."""
    r = for_path(path, kind)
    fileio.check_writable(path, what)
    return r


def render(obj: Any, fmt: str = "text") -> str:
    return get(fmt).render(obj)


def write(obj: Any, path: str, fmt: str | None = None, what: str | None = None,
          fix: str = "free space or choose another path") -> None:
    """Render `obj` by name or by `path`'s extension and write it atomically."""
    r = get(fmt) if fmt else for_path(path, obj)
    text = r.render(obj)
    try:
        fileio.write_text_atomic(path, text)
    except OSError as e:
        noun = getattr(obj, "noun", type(obj).__name__)
        raise MmdiagError(f"cannot write the {noun} ({e.strerror or e})",
                          where=f"{what} {path}" if what else path,
                          fix=fix) from None
