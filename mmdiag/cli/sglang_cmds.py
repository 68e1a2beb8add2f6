"""`mmdiag doctor` and `mmdiag apply`."""
from __future__ import annotations

import sys

import click

from .. import api, progress
from .. import render as out
from ..errors import MmdiagError
from ..sglang.patches import PATCHES
from . import options as o
from .analysis_cmds import show_report
from .app import json_switch, output_option, show

SGLANG_PATH_HELP = "site-packages `sglang` folder or a git checkout's python/ (default: this interpreter's)"


@click.command("doctor")
@click.option("--sglang", "sglang_path", metavar="PATH", help=SGLANG_PATH_HELP)
@click.option("--pid", type=o.PID, default=None,
              help="a running server's PID (or one of its scheduler processes): its effective settings")
@json_switch("the detection")
@output_option("Detection", "doctor", "write the detection")
@o.launch_options("without --pid")
def doctor_command(sglang_path, pid, as_json, output, launch):
    """Find SGLang and report its multimodal path variant and any mmdiag patch.
    With --pid: the running server's release, TP/DP sizes, broadcast flag,
    SGLANG_MM_PRECOMPUTE_HASH, feature transport, and whether a patch on disk is
    newer than the server. Exit 1 when the variant is unknown, 2 when no SGLang is found."""
    if pid is not None:
        if output:
            raise MmdiagError("-o goes with doctor without --pid; use --json and redirect")
        if launch is not None:
            raise MmdiagError("--pid reads the launch settings from the server's command line and environment",
                              fix="leave out --dist-init-addr, --skip-tokenizer-init, --nnodes and --rust-server")
        srv = api.doctor_server(pid, sglang_path)
        click.echo(out.render(srv.to_dict(), "json") if as_json else out.render(srv, "text"), nl=False)
        return
    if output:
        out.check_output(output, "Detection", "-o")
    det = api.doctor(sglang_path, launch)
    if output:
        out.write(det, output, what="-o")
    show(det, as_json)
    if det.variant is None:
        raise click.exceptions.Exit(1)


_STATUS = {
    "dry-run": "dry run: nothing was written",
    "applied": "applied `{strategy}` to {files}; manifest {manifest}; undo: {undo}",
    "already-applied": "`{strategy}` already applied: nothing to do (undo: {undo})",
    "nothing-to-do": "nothing to patch",
    "undone": "undone `{strategy}`: original bytes restored",
    "declined": "declined: nothing was written",
    "settings": "nothing was written: this release ships the fix; set what the notes say",
}


def _confirm(yes: bool):
    def show(diff: str) -> bool:
        if diff:
            click.echo(diff, nl=False)
        if yes:
            return True
        if not sys.stdin.isatty():
            raise MmdiagError("not a terminal: pass --yes to write (or --dry-run); nothing was changed")
        return click.confirm("write these changes?", default=False)
    return show


@click.command("apply")
@click.argument("strategy", required=False, type=click.Choice(PATCHES))
@click.option("--sglang", "sglang_path", metavar="PATH", help=SGLANG_PATH_HELP)
@click.option("--dry-run", is_flag=True, help="show the diff, write nothing")
@click.option("--yes", "-y", is_flag=True, help="do not ask before writing")
@click.option("--undo", is_flag=True, help="restore the original files recorded by the last apply")
@click.option("--verify", is_flag=True,
              help="replay the installed code, apply, replay again, and write the acceptance report")
@click.option("--trace", "trace", type=click.Path(dir_okay=False), default=None,
              help="with --verify: the trace to replay [default: the bundled default workload]")
@o.replay_option("tp", help="with --verify: ranks to replay with [default: 4]")
@o.replay_option("repeat", default=2, help="with --verify: " + o.REPEAT_HELP_VERDICT)
@click.option("--criteria", type=click.Path(dir_okay=False), default=None,
              help="with --verify: acceptance criteria file [default: profiles/criteria/default.toml]")
@output_option("Report", "report", "with --verify: write the acceptance report")
@o.threshold_option("the crossover in the Run `mmdiag recommend` kept last", prefix="with cond: ")
def apply_command(strategy, sglang_path, dry_run, yes, undo, verify, trace, tp, repeat, criteria, output, threshold):
    """Patch the installed SGLang with STRATEGY, or --undo. A content hash (xxh3) stacks
    on a strategy: the install hashes features with it instead of sha256. `pool` stacks
    too (0.5.10+): the release's own shared-memory writer reuses pre-faulted segments
    (bound: the server's MMDIAG_SHM_POOL_MB) instead of a new one per feature. One --undo
    restores every file.

    With --verify: measure before and after with `mmdiag replay --impl sglang` and judge
    the result against the acceptance criteria (exit 1 when it fails).

    \b
      mmdiag apply batch --dry-run          # the diff, nothing written
      mmdiag apply batch --verify -o report.html
      mmdiag apply --undo                   # byte-exact restore
    """
    if undo == (strategy is not None):
        raise MmdiagError(f"give a STRATEGY or --undo (not both); strategies: {', '.join(PATCHES)}")
    if verify:
        if undo or dry_run:
            raise MmdiagError("--verify applies a STRATEGY; it does not combine with --undo or --dry-run")
        with progress.stderr() as bar:
            res = api.verify(strategy, sglang_path=sglang_path, trace=trace, tp=tp, criteria=criteria, output=output,
                             repeat=repeat, threshold=threshold, confirm=_confirm(yes), progress=bar,
                             log=lambda s: click.echo(s, err=True))
        show_report(res.report, output, False,
                    failed_note=f"; the patch stays applied ({res.applied.undo or 'mmdiag apply --undo'} restores)")
        return
    if undo:
        if threshold is not None:
            raise MmdiagError("--threshold goes with `apply cond`, not --undo")
        res = api.undo(sglang_path=sglang_path, dry_run=dry_run, confirm=_confirm(yes))
    else:
        res = api.apply(strategy, sglang_path=sglang_path, dry_run=dry_run, confirm=_confirm(yes), threshold=threshold)
    if res.status == "dry-run" and res.diff:
        click.echo(res.diff, nl=False)
    for n in res.notes:
        click.echo(f"note: {n}")
    click.echo(_STATUS[res.status].format(strategy=res.strategy, files=", ".join(res.files), manifest=res.manifest,
                                          undo=res.undo))
    if res.status == "declined":
        raise click.exceptions.Exit(1)
