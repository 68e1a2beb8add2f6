"""Click commands `doctor` and `apply` (registered by mmdiag/cli.py). Thin: parse, call, render."""
from __future__ import annotations

import json
import sys

import click

from ..errors import MmdiagError
from ..vocab import PATCHABLE_STRATEGIES
from .apply import apply as apply_patch
from .apply import undo as undo_patch
from .detect import detect
from .locate import locate


def _fail(e: MmdiagError) -> None:
    click.echo(f"mmdiag: error: {e.one_line()}", err=True)
    detail = getattr(e, "detail", "")
    if detail:
        click.echo(detail, err=True, nl=False)
    raise click.exceptions.Exit(e.exit_code)


def render_doctor(det) -> str:
    i = det.install
    rows = [
        ("sglang", str(i.package_dir)),
        ("layout", f"{i.layout} (found by {i.found_by})"),
        ("version", i.version or "unknown"),
        ("variant", det.variant or "unknown"),
        ("path", det.summary),
        ("scheduler.py", f"{det.scheduler_lines} lines; mm call: {det.mm_call}"),
    ]
    for target, lay in det.layouts.items():
        rows.append((target, lay or "unknown layout"))
    if det.flag:
        f = det.flag
        rows.append(("flag", f"{f['option']} default {f.get('default')} "
                             f"({f['file']}:{f['field_line']}, option at line {f.get('option_line')})"))
    if det.manifest:
        m = det.manifest
        rows.append(("mmdiag patch", f"{m['strategy']} ({m.get('status')}, {m.get('created')}; "
                                     f"files: {', '.join(m['files'])}; undo: mmdiag apply --undo)"))
    elif det.patch_markers:
        rows.append(("mmdiag patch", f"markers {det.patch_markers} but no manifest"))
    else:
        rows.append(("mmdiag patch", "none"))
    if det.release:
        rows.append(("release facts", f"{det.release['version']}: {det.release['variant']}"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    out += [f"note: {n}" for n in det.notes]
    return "\n".join(out) + "\n"


@click.command("doctor")
@click.option("--sglang", "sglang_path", metavar="PATH",
              help="site-packages `sglang` folder or a git checkout's python/ (default: this interpreter's)")
@click.option("--json", "as_json", is_flag=True, help="print the detection as JSON")
def doctor_command(sglang_path, as_json):
    """Find SGLang and report its multimodal path variant and any mmdiag patch."""
    try:
        det = detect(locate(sglang_path))
    except MmdiagError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(det.to_dict(), indent=1, default=str))
    else:
        click.echo(render_doctor(det), nl=False)
    if det.variant is None:
        raise click.exceptions.Exit(1)


@click.command("apply")
@click.argument("strategy", required=False, type=click.Choice(PATCHABLE_STRATEGIES))
@click.option("--sglang", "sglang_path", metavar="PATH",
              help="site-packages `sglang` folder or a git checkout's python/ (default: this interpreter's)")
@click.option("--dry-run", is_flag=True, help="show the diff, write nothing")
@click.option("--yes", "-y", is_flag=True, help="do not ask before writing")
@click.option("--undo", is_flag=True, help="restore the original files recorded by the last apply")
@click.option("--verify", is_flag=True,
              help="replay the installed code, apply, replay again, and write the acceptance report")
@click.option("--trace", "trace", type=click.Path(dir_okay=False), default=None,
              help="with --verify: the trace to replay [default: the bundled default workload]")
@click.option("--tp", type=int, default=None, help="with --verify: ranks to replay with [default: 4]")
@click.option("--repeat", type=int, default=2, show_default=True, help="with --verify: repeats per replay")
@click.option("--criteria", type=click.Path(dir_okay=False), default=None,
              help="with --verify: acceptance criteria file [default: profiles/criteria/default.toml]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="with --verify: write the report here (.html or .md)")
def apply_command(strategy, sglang_path, dry_run, yes, undo, verify, trace, tp, repeat, criteria, output):
    """Patch the installed SGLang with STRATEGY (revert, dict, batch, precompute), or --undo.

    With --verify: measure before and after with `mmdiag replay --impl sglang` and judge
    the result against the acceptance criteria (exit 1 when it fails).
    """
    if undo == (strategy is not None):
        click.echo("mmdiag: error: give a STRATEGY or --undo (not both); "
                   f"strategies: {', '.join(PATCHABLE_STRATEGIES)}", err=True)
        raise click.exceptions.Exit(2)

    def confirm(diff: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            click.echo("mmdiag: error: not a terminal: pass --yes to write (or --dry-run); nothing was changed",
                       err=True)
            raise click.exceptions.Exit(2)
        return click.confirm("write these changes?", default=False)

    def show(diff: str) -> bool:
        if diff:
            click.echo(diff, nl=False)
        return confirm(diff)

    if verify:
        if undo or dry_run:
            click.echo("mmdiag: error: --verify applies a STRATEGY; it does not combine with --undo or --dry-run",
                       err=True)
            raise click.exceptions.Exit(2)
        from ..analysis.commands import run_verify
        try:
            code = run_verify(sglang_path, strategy, trace, tp=tp, criteria=criteria, output=output,
                              repeat=repeat, confirm=show)
        except MmdiagError as e:
            _fail(e)
        raise click.exceptions.Exit(code)
    try:
        inst = locate(sglang_path)
        if undo:
            res = undo_patch(inst, dry_run=dry_run, confirm=show)
        else:
            res = apply_patch(inst, strategy, dry_run=dry_run, confirm=show)
    except MmdiagError as e:
        _fail(e)
    if res.status == "dry-run" and res.diff:
        click.echo(res.diff, nl=False)
    for n in res.notes:
        click.echo(f"note: {n}")
    msg = {
        "dry-run": "dry run: nothing was written",
        "applied": f"applied `{res.strategy}` to {', '.join(res.files)}; manifest {res.manifest}",
        "already-applied": f"`{res.strategy}` already applied: nothing to do",
        "nothing-to-do": "nothing to patch",
        "undone": f"undone `{res.strategy}`: original bytes restored",
        "declined": "declined: nothing was written",
    }[res.status]
    click.echo(msg)
    if res.status == "declined":
        raise click.exceptions.Exit(1)
