"""`mmdiag apply STRATEGY --verify`: the whole loop in one call.

    replay the installed SGLang's own mm path  (ReplayOptions(impl="sglang"))   -> before Run
    apply STRATEGY to the install              (mmdiag.sglang.apply.apply)
    replay the patched install the same way                                      -> after Run
    compare against the acceptance criteria    (mmdiag.analysis.report)         -> report file

Before the (minutes-long) first replay, the strategy is checked: an install that already
carries an mmdiag patch is refused (the "before" replay would measure patched code
labelled installed), and so is a strategy with nothing to change on this release (a dry
run of the patch plan, e.g. `revert` where the broadcast is behind a flag).

Where the release ships the strategy behind an environment variable (`precompute` is
SGLANG_MM_PRECOMPUTE_HASH=1 from 0.5.7), nothing is written: the before replay runs the
release's code with the variable off in the rank processes, the after replay with it
set as `apply` says (the broadcast flag off), and the release's own code reads it.

If the after replay fails (the patched code crashes or hangs a rank), the patch is
undone before the error is raised: a verify never leaves a broken install behind; if
that undo fails too, the error says the patch is still applied. A patch that runs but
fails acceptance stays applied; the report says so and `mmdiag apply --undo` restores
the original bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .. import render
from ..errors import MmdiagError
from ..run import Run
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


def check_applicable(inst: Any, strategy: str) -> Any:
    """Refuse, before any replay, a verify that cannot mean anything: the install already
    carries an mmdiag patch (the "before" replay would measure patched code labelled
    installed), or `strategy` has nothing to change on it. Uses the patcher's own detection
    and plan (a dry run: nothing is written); its errors (unknown layout, ...) propagate.
    Returns the dry run (status "dry-run", or "settings" with the environment to set)."""
    from ..sglang.apply import apply as apply_patch
    from ..sglang.detect import detect

    det = detect(inst)
    if det.patched or det.manifest or det.patch_markers:
        raise MmdiagError(
            f"mmdiag strategy `{det.patched or '?'}` is already applied to this install: the \"before\" replay "
            "would measure patched code as the installed one", where=str(inst.package_dir),
            fix=f"nothing was replayed or changed; run `{inst.undo_command}` first, then verify again")
    dry = apply_patch(inst, strategy, dry_run=True)
    if dry.status == "settings" and not dry.settings.get("env"):
        dry.status = "nothing-to-do"  # only the flag's default (off): what is installed already runs
    if dry.status == "nothing-to-do":
        why = "; ".join(dry.notes) or "the patch plan changes nothing"
        raise MmdiagError(f"`{strategy}` has nothing to change on this install ({why}): there is no after to "
                          "compare", where=str(inst.package_dir),
                          fix="nothing was replayed or changed; pick another strategy (mmdiag recommend)")
    if dry.status not in ("dry-run", "settings"):
        raise MmdiagError(f"`mmdiag apply {strategy}` cannot be applied here ({dry.status})",
                          where=str(inst.package_dir))
    return dry


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
        render.check_output(out, "Report")
    inst = locate(install_path)
    path = str(inst.package_dir)
    dry = check_applicable(inst, strategy)  # before the minutes-long replays, not after the first
    env = dry.settings.get("env", {}) if dry.status == "settings" else {}

    def run_installed(extra_env: dict[str, str], flag: bool) -> Run:
        opts = ReplayOptions(tp=tp, strategies=[], repeat=repeat, timeout=timeout, impl="sglang",
                             sglang_path=path, enable_broadcast_flag=flag, extra_env=extra_env)
        return replay(trace, opts, progress=progress)

    # The setting's variables off in the before ranks, whatever this shell has.
    before = run_installed({k: "0" for k in env}, enable_broadcast_flag)
    if env:  # the release ships it: the same code, the setting in the ranks' environment
        after = run_installed(env, False)
        return _finish(before, after, crit, path, f"{' '.join(f'{k}={v}' for k, v in env.items())}, "
                       "broadcast flag off", out, dry, keep_runs)
    applied = apply_patch(inst, strategy, confirm=confirm or (lambda diff: True))
    if applied.status != "applied":
        why = "; ".join(applied.notes)
        raise MmdiagError(f"`mmdiag apply {strategy}` did not apply ({applied.status}{': ' + why if why else ''})",
                          where=path)
    try:
        after = run_installed({}, enable_broadcast_flag)
    except BaseException as e:
        try:
            undo_patch(inst, confirm=lambda diff: True)
        except BaseException as u:  # noqa: BLE001 - whatever it was, the user must learn the patch stayed
            first = e.one_line() if isinstance(e, MmdiagError) else (f"{type(e).__name__}: {e}" if str(e)
                                                                    else type(e).__name__)
            second = u.one_line() if isinstance(u, MmdiagError) else f"{type(u).__name__}: {u}"
            raise MmdiagError(
                f"the replay after `mmdiag apply {strategy}` failed ({first}), and undoing the patch failed too "
                f"({second}): `{strategy}` is STILL APPLIED to this install", where=path,
                fix=f"run `mmdiag apply --undo --sglang {path}` (or reinstall SGLang)") from e
        raise
    return _finish(before, after, crit, path, f"after mmdiag apply {strategy}", out, applied, keep_runs)


def _finish(before: Run, after: Run, crit, path: str, after_label: str, out: str | None, applied: Any,
            keep_runs: str | None) -> VerifyResult:
    """The report of a before/after pair, written to `out`; the Runs kept in `keep_runs`."""
    report = build_report(before, after, crit, before_path=f"{path} (installed)",
                          after_path=f"{path} ({after_label})")
    res = VerifyResult(report, before, after, out, applied)
    if keep_runs:
        res.before_json = os.path.join(keep_runs, "before.json")
        res.after_json = os.path.join(keep_runs, "after.json")
        before.save(res.before_json)
        after.save(res.after_json)
    if out:
        render.write(report, out)
    return res
