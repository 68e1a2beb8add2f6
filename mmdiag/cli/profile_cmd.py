"""`mmdiag profile`: attach py-spy to a live server (or a replay), or analyse raw files."""
from __future__ import annotations

import click

from .. import api
from .. import render as out
from ..live.errors import LiveError, TargetExitedError
from ..live.profile import DEFAULT_DURATION_S, DEFAULT_RATE_HZ, PYSPY_DEFAULT_RATE_HZ
from ..live.top import DEFAULT_RATE_HZ as TOP_RATE_HZ, DEFAULT_WINDOW_S as TOP_WINDOW_S
from ..vocab import PROFILE_SCHEMA
from . import options as o
from .app import output_option, show
from .replay_cmds import legacy_json


@click.command("profile")
@click.option("--pid", type=o.PID, default=None,
              help="the SGLang server's main PID, one scheduler's PID, or an `mmdiag replay` PID")
@click.option("--duration", type=o.SECONDS, default=DEFAULT_DURATION_S, show_default=True, help="seconds to sample")
@click.option("--rate", type=o.RATE_HZ, default=None,
              help=f"samples per second per rank [default: {DEFAULT_RATE_HZ}; with --from-raw: the rate the files "
                   f"were recorded at, default {PYSPY_DEFAULT_RATE_HZ} as py-spy's]")
@legacy_json("the Run (schema mmdiag.profile/2)")
@output_option("Run", "profile", "write the Run")
@click.option("--speedscope", type=click.Path(dir_okay=False), default=None,
              help="write every rank's sampled stacks for https://www.speedscope.app")
@click.option("--raw-dir", type=click.Path(file_okay=False), default=None,
              help="keep py-spy's raw files here (rank<N>.pid<P>.raw / .gil.raw), for --from-raw")
@click.option("--from-raw", "from_raw_flag", is_flag=True,
              help="analyse py-spy raw files (FILES) recorded elsewhere instead of attaching")
@click.option("--no-gil", is_flag=True, help="no GIL figures: skip the --gil recorder that otherwise runs on every other "
              "block (about a seventh of py-spy's CPU)")
@click.option("--pyspy", default=None, metavar="PATH", help="py-spy binary [default: $MMDIAG_PYSPY, PATH, beside python]")
@click.option("--rules", default=None, type=click.Path(dir_okay=False), help="stack->phase rules TOML [default: bundled]")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines on stderr")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
def profile_command(pid, duration, rate, json_out, output, speedscope, raw_dir, from_raw_flag, no_gil, pyspy,
                    rules, quiet, files):
    """Attach to a live SGLang server (or an mmdiag replay) and attribute each scheduler
    rank's time to the multimodal phases, with GIL sampling; from the server's main PID,
    the tokenizer side too, and name the stage that bounds throughput.

    \b
      mmdiag profile --pid 1234                  # server main PID: scheduler ranks and tokenizer side
      mmdiag profile --pid 1234 -o prof.json --speedscope prof.speedscope.json
      mmdiag profile --from-raw rank0.raw rank0.gil.raw rank1.raw ...
    \b
    Samples with py-spy (non-blocking, every thread, plus a --gil recorder) on all
    ranks over the same window, in 2 s blocks (at least 5 blocks of 1 s or more: a
    6 s window uses 1.2 s blocks); psutil gives CPU%. Phases: recv,
    from_dict, pickle, broadcast, unpickle, forward, other, idle, and shm_open /
    shm_sync / shm_map on 0.5.10+ (rules: mmdiag/live/rules.toml). Every share comes
    with its 95% interval: the defaults (100 Hz, 30 s) keep it near +/-2 points on a
    host with cores to spare; a shorter --duration widens it as 1/sqrt(duration), and
    the profile says which --duration would bring it back to +/-2.
    The tokenizer side (the main process, or its sglang::tokenizer_worker processes,
    and the hash pool's threads) is sampled in the same window, with phases
    tokenizer_hash, tokenizer_shm, other, idle; each stage (tokenizer, scheduler) gets
    its busy share, service time per multimodal request and capacity, and the Run's
    bottleneck says which stage caps throughput (requests are counted from the
    tokenizer's /dev/shm segments, 0.5.16+; elsewhere busy shares alone).
    Ctrl-C ends the window early, as py-spy record does: what was sampled is
    shown and written, with a note, exit 0 (a Ctrl-C before sampling begins, or
    a second one: exit 130, nothing written).
    Exit codes: 4 a rank exited during the window (what was sampled is kept),
    5 ptrace refused, 6 py-spy missing or failed, 2 bad input.
    """
    as_json = json_out == "-"
    files_out = [(p, w) for p, w in ((output, "-o"), (None if as_json else json_out, "--json")) if p]
    for path, what in files_out:
        out.check_output(path, "Run", what)
    run = _collect(pid, duration, rate, speedscope, raw_dir, from_raw_flag, no_gil, pyspy, rules, files,
                   log=(lambda s: None) if quiet or as_json else (lambda s: click.echo(f"mmdiag: {s}", err=True)))
    show(run, as_json)
    for path, what in files_out:
        out.write(run, path, what=what, fix="the profile is shown above; free space or choose another path")
        if not as_json:
            click.echo(f"\nRun written to {path}")
    if speedscope and not as_json:
        click.echo(f"speedscope written to {speedscope} (open in https://www.speedscope.app)")
    _exited(run, [p for p, _ in files_out])


def _collect(pid, duration, rate, speedscope, raw_dir, from_raw_flag, no_gil, pyspy, rules, files, log):
    if from_raw_flag:
        if pid is not None:
            raise LiveError("give either --pid or --from-raw FILES, not both")
        if not files:
            raise LiveError("--from-raw needs py-spy raw files", fix="mmdiag profile --from-raw rank0.raw rank1.raw")
        if speedscope:
            raise LiveError("--speedscope is for a live profile; py-spy can write speedscope itself "
                            "(py-spy record --format speedscope)")
        return api.profile_from_raw(list(files), rate=rate or PYSPY_DEFAULT_RATE_HZ, rules=rules)
    if files:
        raise LiveError(f"unexpected argument {files[0]!r}", fix="files are for --from-raw")
    if pid is None:
        raise LiveError("--pid is required (or --from-raw FILES)",
                        fix="find it with `ps -eo pid,args | grep -e sglang -e mmdiag`")
    return api.profile(pid, duration, rate, pyspy=pyspy, raw_dir=raw_dir, rules=rules, gil=not no_gil,
                       speedscope=speedscope, log=log)


def _exited(run, written: list[str]) -> None:
    exited = run.live.exited if run.live else []
    if exited:
        e = exited[0]
        more = f" (and {len(exited) - 1} more)" if len(exited) > 1 else ""
        raise TargetExitedError(f"{e.get('who') or 'rank ' + str(e['rank'])} (pid {e['pid']}) exited during the "
                                f"profile{more}; "
                                f"what was sampled ({e['samples']} samples, about {e['sampled_s']:.1f} s) "
                                "is reported above" + (f" and in {written[0]}" if written else ""))


@click.command("top")
@click.option("--pid", type=o.PID, required=True,
              help="the SGLang server's main PID, one scheduler's PID, or an `mmdiag replay` PID")
@click.option("--window", type=click.FloatRange(2.0, 3600.0), default=TOP_WINDOW_S, show_default=True,
              help="seconds of samples behind each figure (a sliding window of 1 s blocks); at 10 s a share "
                   "carries about +/-3 points, `mmdiag profile` gives the tighter figure")
@click.option("--rate", type=o.RATE_HZ, default=TOP_RATE_HZ, show_default=True, help="samples per second per rank")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help=f"on exit, write a Run (schema {PROFILE_SCHEMA}) covering the whole watch")
@click.option("--duration", type=o.SECONDS, default=None, help="quit by itself after this many seconds")
@click.option("--no-gil", is_flag=True, help="skip the --gil recorder (no GIL figures)")
@click.option("--pyspy", default=None, metavar="PATH", help="py-spy binary [default: $MMDIAG_PYSPY, PATH, beside python]")
@click.option("--rules", default=None, type=click.Path(dir_okay=False), help="stack->phase rules TOML [default: bundled]")
def top_command(pid, window, rate, output, duration, no_gil, pyspy, rules):
    """A live view of each scheduler rank, refreshed about once a second, like
    `py-spy top`: phase shares with their 95% intervals over a sliding window, the
    share spent waiting, GIL held, CPU%, the multimodal path and configuration.

    \b
    Keys: p pause, tab / arrows / 0-9 switch rank, v switch view (one rank's
    phases, every rank side by side, one phase on every rank), f the next phase
    on every rank, q quit. py-spy never pauses the target;
    quitting detaches and leaves it as it was. Without a terminal it prints a
    plain frame per second.
    """
    if output:
        out.check_output(output, "Run", "-o")
    run = api.top(pid, rate=rate, window_s=window, output=output, pyspy=pyspy, rules=rules, gil=not no_gil,
                  duration=duration, log=lambda s: click.echo(f"mmdiag: {s}", err=True))
    if run is not None:
        out.write(run, output, what="-o", fix="free space or choose another path")
        click.echo(f"Run of the whole watch ({run.live.duration_s:.0f} s) written to {output}", err=True)
