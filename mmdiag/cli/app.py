"""The one click application and its one error handler.

Every command is a thin skin over mmdiag.api: parse, call, render. A MmdiagError from
anywhere leaves as `mmdiag: error: what; what to do` on stderr (and, under --json, as
{"error": ..., "fix": ...} on stdout) with the error's exit code; never a traceback.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from typing import Any, Callable, Iterator

import click

from ..errors import MmdiagError, Terminated
from .. import render
from ..fileio import dumps_json

EXIT_ACCEPTANCE_FAILED = 1
EXIT_INTERRUPTED = 130
_JSON = "mmdiag.json"   # ctx.meta key: this invocation prints machine JSON on stdout
_ARGV = "mmdiag.argv"

# What Ctrl-C or SIGTERM left behind, by command.
_RANKS_STOPPED = "every rank was stopped, no Run was written"
INTERRUPTED = {"replay": _RANKS_STOPPED, "demo": _RANKS_STOPPED, "recommend": _RANKS_STOPPED,
               "profile": "py-spy was stopped, nothing was written",
               "top": "py-spy was stopped, the target runs on untouched",
               "apply": "the install was left as it was before this command"}
DEFAULT_INTERRUPTED = "nothing was written"


@contextlib.contextmanager
def _sigterm_as_error(outcome: Callable[[], str]) -> Iterator[None]:
    """SIGTERM unwinds every command as Ctrl-C does (temporary files removed, processes
    stopped), then exits 143; a replay sets its own handler inside this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated(f"terminated by SIGTERM; {outcome()}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def mark_json(ctx: click.Context, value: Any = True) -> None:
    """From now on this invocation's errors are also printed as JSON on stdout."""
    if value:
        ctx.meta[_JSON] = True


def wants_json(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(_JSON)) or "--json" in ctx.meta.get(_ARGV, ())


def _error_json(e: MmdiagError) -> str:
    what = f"{e.where}: {e.what}" if e.where else e.what
    return dumps_json({"error": what, "fix": e.fix, "exit_code": e.exit_code})


class MmdiagGroup(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGV, list(args))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        old = warnings.showwarning
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"mmdiag: warning: {msg}", err=True)
        try:
            with _sigterm_as_error(lambda: _left_behind(ctx)):
                return super().invoke(ctx)
        except MmdiagError as e:
            click.echo(f"mmdiag: error: {e.one_line()}", err=True)
            detail = getattr(e, "detail", "")
            if detail:
                click.echo(detail, err=True, nl=False)
            if wants_json(ctx):
                click.echo(_error_json(e))
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            # Bad options are user mistakes like any other: one line, exit 2.
            sub = e.ctx.command_path if e.ctx else ctx.command_path
            what, fix = e.format_message().rstrip("."), f"see `{sub} --help`"
            what = what[:1].lower() + what[1:]
            click.echo(f"mmdiag: error: {what}; {fix}", err=True)
            if wants_json(ctx):   # the same words on both channels
                click.echo(dumps_json({"error": what, "fix": fix, "exit_code": e.exit_code}))
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            what = f"interrupted; {_left_behind(ctx)}"
            click.echo(f"mmdiag: {what}", err=True)
            if wants_json(ctx):   # a JSON reader learns the outcome too, as with SIGTERM
                click.echo(dumps_json({"error": what, "fix": None, "exit_code": EXIT_INTERRUPTED}))
            ctx.exit(EXIT_INTERRUPTED)
        finally:
            warnings.showwarning = old


def _left_behind(ctx: click.Context) -> str:
    """What an interrupted subcommand left (`trace` for `trace synth`)."""
    return INTERRUPTED.get(ctx.invoked_subcommand, DEFAULT_INTERRUPTED)


def json_switch(what: str):
    """The one --json convention: a switch printing `what` as JSON on stdout instead of text,
    in every outcome (an error prints {"error", "fix", "exit_code"} and exits non-zero)."""
    return click.option("--json", "as_json", is_flag=True,
                        callback=lambda ctx, p, v: (mark_json(ctx, v), v)[1],
                        help=f"print {what} as JSON on stdout (errors too, as {{\"error\", \"fix\", \"exit_code\"}})")


def formats_help(kind: str, stem: str) -> str:
    """'run.txt, run.json, run.md': the files a result of type `kind` can be written as (from
    mmdiag.render's table, so a new renderer shows up here by itself)."""
    return ", ".join(f"{stem}{r.extensions[0]}" for r in render.RENDERERS.values() if r.supports(kind))


# The result types some command's -o writes, in the order the commands add them (main's help
# lists the formats these can be written as).
OUTPUT_KINDS: list[str] = []


def output_option(kind: str, stem: str, what: str | None = None):
    """-o/--output FILE for a result of type `kind` (a class name mmdiag.render knows)."""
    if kind not in OUTPUT_KINDS:
        OUTPUT_KINDS.append(kind)
    return click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                        help=f"{what or 'write the result'} to this file; the extension picks the format "
                             f"({formats_help(kind, stem)})")


def show(obj: Any, as_json: bool, fmt: str = "text") -> None:
    """The one way a command prints its result: JSON under --json, else `fmt` (text)."""
    click.echo(render.render(obj, "json" if as_json else fmt), nl=False)


@click.group(cls=MmdiagGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mmdiag")
def main():
    """Diagnose SGLang's multimodal-input path under tensor parallelism.

    \b
    Upstream commit 17a57fd86 (PR #11910) made the entry TP rank materialize each
    request's images/video once and broadcast the result to the other ranks with a
    blocking broadcast_object_list. That helps large video and hurts small images at
    high concurrency. mmdiag measures which way it goes for YOUR traffic:

    \b
      mmdiag trace synth --profile small-image-c96 -o trace.jsonl
      mmdiag replay trace.jsonl --tp 4 -o run.json         # every strategy, side by side
      mmdiag demo                                          # both steps on the default workload
      mmdiag profile --pid 1234 -o live.json               # attach to a live server (py-spy)
      mmdiag recommend run.json                            # which fix, and why, in numbers
      mmdiag doctor                                        # which path your SGLang runs
      mmdiag apply batch                                   # patch it (mmdiag apply --undo)

    \b
    Output: --json prints the command's result as JSON on stdout (errors too);
    -o FILE writes it to a file whose extension picks the format:
    {output_formats}.
    Exit codes: 0 ok, 1 acceptance failed (report, apply --verify), 2 bad input,
    3 a replay fault or a busy lock, 4 a profiled rank exited, 5 ptrace refused,
    6 py-spy failed, 130 Ctrl-C, 143 SIGTERM (nothing left running or half-written);
    Ctrl-C while profile or top samples keeps what was sampled, as py-spy does (exit 0).
    """
