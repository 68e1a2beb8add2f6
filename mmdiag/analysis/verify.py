"""`mmdiag apply STRATEGY --verify`: the whole loop in one call.

    replay the installed SGLang's own mm path  (ReplayOptions(impl="sglang"))   -> before Run
    apply STRATEGY to the install              (mmdiag.sglang.apply.apply)
    replay the patched install the same way                                      -> after Run
    compare against the acceptance criteria    (mmdiag.analysis.report)         -> report file

If the after replay fails (the patched code crashes or hangs a rank), the patch is
undone before the error is raised: a verify never leaves a broken install behind.
A patch that runs but fails acceptance stays applied; the report says so and
`mmdiag apply --undo` restores the original bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import MmdiagError
from ..run import Run, write_text_atomic
from .criteria import Criterion, load_criteria
from .report import Report, build_report


@dataclass
class VerifyResult:
    report: Report
    before: Run
    after: Run
    out: str | None
    applied: Any          # mmdiag.sglang.apply.ApplyResult
    before_json: str | None = None
    after_json: str | None = None


def render_to(report: Report, out: str) -> None:
    """Write the report by the file's extension (.html or .md), atomically."""
    ext = os.path.splitext(out)[1].lower()
    if ext in (".html", ".htm"):
        from ..render.report_html import render_html
        text = render_html(report)
    elif ext in (".md", ".markdown"):
        from ..render.report_md import render_markdown
        text = render_markdown(report)
    else:
        raise MmdiagError(f"unknown report format {ext or '(no extension)'!r}", where=out,
                          fix="name the output report.html or report.md")
    check_writable(out)
    try:
        write_text_atomic(out, text)
    except OSError as e:
        raise MmdiagError(f"cannot write ({e.strerror or e})", where=out) from None


def check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise MmdiagError("is a directory", where=path, fix="give a file name such as report.html")
    if not os.path.isdir(d):
        raise MmdiagError("directory does not exist", where=path)
    if not os.access(d, os.W_OK):
        raise MmdiagError("directory is not writable", where=path)


def verify(install_path: str | None, strategy: str, trace: str, tp: int,
           criteria: list[Criterion] | str | None = None, out: str | None = None, *,
           repeat: int = 2, timeout: float = 60.0, enable_broadcast_flag: bool = False,
           keep_runs: str | None = None, progress: Callable[[dict], None] | None = None,
           confirm: Callable[[str], bool] | None = None) -> VerifyResult:
    """Replay the install, apply `strategy`, replay again, build (and write to `out`) the report.

    `criteria`: parsed criteria, a path to a criteria file, or None for the default file.
    `keep_runs`: a directory to save before.json and after.json in.
    `confirm`: called with the patch diff before writing (default: write without asking).
    """
    from ..replay import ReplayOptions, replay
    from ..sglang.apply import apply as apply_patch
    from ..sglang.apply import undo as undo_patch
    from ..sglang.locate import locate

    crit = criteria if isinstance(criteria, list) else load_criteria(criteria)
    if out:
        check_writable(out)
        if os.path.splitext(out)[1].lower() not in (".html", ".htm", ".md", ".markdown"):
            raise MmdiagError("unknown report format", where=out, fix="name the output report.html or report.md")
    inst = locate(install_path)
    path = str(inst.package_dir)

    def run_installed() -> Run:
        opts = ReplayOptions(tp=tp, strategies=[], repeat=repeat, timeout=timeout, impl="sglang",
                             sglang_path=path, enable_broadcast_flag=enable_broadcast_flag)
        return replay(trace, opts, progress=progress)

    before = run_installed()
    applied = apply_patch(inst, strategy, confirm=confirm or (lambda diff: True))
    if applied.status not in ("applied", "already-applied"):
        raise MmdiagError(f"`mmdiag apply {strategy}` did not apply ({applied.status})", where=path)
    try:
        after = run_installed()
    except BaseException:
        if applied.status == "applied":
            try:
                undo_patch(inst, confirm=lambda diff: True)
            except MmdiagError:
                pass
        raise
    report = build_report(before, after, crit, before_path=f"{path} (installed)",
                          after_path=f"{path} (after mmdiag apply {strategy})")
    res = VerifyResult(report, before, after, out, applied)
    if keep_runs:
        res.before_json = os.path.join(keep_runs, "before.json")
        res.after_json = os.path.join(keep_runs, "after.json")
        before.save(res.before_json)
        after.save(res.after_json)
    if out:
        render_to(report, out)
    return res
