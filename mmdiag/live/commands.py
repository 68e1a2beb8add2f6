"""The click command `mmdiag profile` (registered by mmdiag/cli.py). Thin: parse, call, render."""
from __future__ import annotations

import json
import os
import warnings

import click
from tabulate import tabulate

from ..errors import MmdiagError
from ..run import Run
from .errors import LiveError, TargetExitedError
from .profile import DEFAULT_DURATION_S, DEFAULT_RATE_HZ, PYSPY_DEFAULT_RATE_HZ
from .stats import pm

EXIT_INTERRUPTED = 130
SHOWN = ("recv", "from_dict", "pickle", "broadcast", "unpickle", "forward", "other", "idle")


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_profile(run: Run) -> str:
    live = run.config.get("live", {})
    (name, strat), = run.strategies.items()
    head = []
    if live.get("source") == "live":
        head.append(f"profile of PID {live['target_pid']} ({live.get('target_title', '')}): "
                    f"{len(run.ranks or [])} rank(s), {live['duration_s']:.1f} s at {live['rate_hz']} Hz, "
                    f"py-spy {live['pyspy']['version']}; multimodal path: {name}")
    else:
        head.append(f"profile from {len(live.get('files', []))} py-spy raw file(s); multimodal path: {name}")
    gil_ci = live.get("gil_held_ci", {})
    rows = []
    for r in run.ranks or []:
        ci = r.phases_ci or {}
        wp, wc = live.get("wait_pct", {}).get(str(r.rank), {}), live.get("wait_ci", {}).get(str(r.rank), {})
        rows.append([r.rank, r.pid if r.pid is not None else "-", r.samples]
                    + [pm(r.phases_pct.get(p), ci.get(p)) for p in SHOWN] + [pm(wp.get("all"), wc.get("all"))]
                    + [pm(r.gil_held_pct, gil_ci.get(str(r.rank))), _f(r.gil_wait_pct), _f(r.cpu_pct, "{:.0f}")])
    table = tabulate(rows, headers=["rank", "pid", "samples"] + [f"{p} %" for p in SHOWN]
                     + ["of which waiting %", "GIL held %", "GIL wait %", "CPU %"], tablefmt="simple",
                     disable_numparse=True)
    out = ("\n".join(head) + "\n\nshares of wall time in percent, +/- the 95% interval (README: "
           "how precise a profile is)\n\n" + table + "\n")
    if run.findings:
        out += "\nfindings:\n" + "\n".join(f"  - {f}" for f in run.findings) + "\n"
    return out


def _check_writable(path: str, what: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise LiveError("directory does not exist", where=f"{what} {path}")
    if not os.access(d, os.W_OK):
        raise LiveError("directory is not writable", where=f"{what} {path}")


@click.command("profile")
@click.option("--pid", type=int, default=None,
              help="the SGLang server's main PID, one scheduler's PID, or an `mmdiag replay` PID")
@click.option("--duration", type=float, default=DEFAULT_DURATION_S, show_default=True, help="seconds to sample")
@click.option("--rate", type=int, default=None,
              help=f"samples per second per rank [default: {DEFAULT_RATE_HZ}; with --from-raw: the rate the files "
                   f"were recorded at, default {PYSPY_DEFAULT_RATE_HZ} as py-spy's]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="write the Run (schema mmdiag.profile/1) here; '-' prints it instead of the table")
@click.option("--speedscope", type=click.Path(dir_okay=False), default=None,
              help="write every rank's sampled stacks for https://www.speedscope.app")
@click.option("--raw-dir", type=click.Path(file_okay=False), default=None,
              help="keep py-spy's raw files here (rank<N>.pid<P>.raw / .gil.raw), for --from-raw")
@click.option("--from-raw", "from_raw_flag", is_flag=True,
              help="analyse py-spy raw files (FILES) recorded elsewhere instead of attaching")
@click.option("--no-gil", is_flag=True, help="skip the --gil recorder (about a fifth of py-spy's CPU; no GIL figures)")
@click.option("--pyspy", default=None, metavar="PATH", help="py-spy binary [default: $MMDIAG_PYSPY, PATH, beside python]")
@click.option("--rules", default=None, type=click.Path(dir_okay=False), help="stack->phase rules TOML [default: bundled]")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines on stderr")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
def profile_command(pid, duration, rate, json_out, speedscope, raw_dir, from_raw_flag, no_gil, pyspy,
                    rules, quiet, files):
    """Attach to a live SGLang server (or an mmdiag replay) and attribute each scheduler
    rank's time to the multimodal phases, with GIL sampling.

    \b
      mmdiag profile --pid 1234                  # server main PID: finds sglang::scheduler* children
      mmdiag profile --pid 1234 --json prof.json --speedscope prof.speedscope.json
      mmdiag profile --from-raw rank0.raw rank0.gil.raw rank1.raw ...
    \b
    Samples with py-spy (non-blocking, every thread, plus a --gil recorder) on all
    ranks over the same window; psutil gives CPU%. Phases: recv, from_dict, pickle,
    broadcast, unpickle, forward, other, idle (rules: mmdiag/live/rules.toml).
    """
    try:
        _profile(pid, duration, rate, json_out, speedscope, raw_dir, from_raw_flag, no_gil, pyspy,
                 rules, quiet, files)
    except MmdiagError as e:
        click.echo(f"mmdiag: error: {e.one_line()}", err=True)
        raise click.exceptions.Exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("mmdiag: interrupted; py-spy was stopped, nothing was written", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


def _profile(pid, duration, rate, json_out, speedscope, raw_dir, from_raw_flag, no_gil, pyspy,
             rules, quiet, files):
    from .profile import from_raw, profile

    log = (lambda s: None) if quiet or json_out == "-" else (lambda s: click.echo(f"mmdiag: {s}", err=True))
    old = warnings.showwarning
    warnings.showwarning = lambda msg, *a, **k: click.echo(f"mmdiag: warning: {msg}", err=True)
    try:
        for path, what in ((json_out, "--json"), (speedscope, "--speedscope")):
            if path and path != "-":
                _check_writable(path, what)
        if from_raw_flag:
            if pid is not None:
                raise LiveError("give either --pid or --from-raw FILES, not both")
            if not files:
                raise LiveError("--from-raw needs py-spy raw files", fix="mmdiag profile --from-raw rank0.raw rank1.raw")
            run = from_raw(list(files), rate=rate or PYSPY_DEFAULT_RATE_HZ, rules=rules)
            if speedscope:
                raise LiveError("--speedscope is for a live profile; py-spy can write speedscope itself "
                                "(py-spy record --format speedscope)")
        else:
            if files:
                raise LiveError(f"unexpected argument {files[0]!r}", fix="files are for --from-raw")
            if pid is None:
                raise LiveError("--pid is required (or --from-raw FILES)", fix="find it with `ps -eo pid,args | grep -e sglang -e mmdiag`")
            run = profile(pid, duration, rate or DEFAULT_RATE_HZ, pyspy=pyspy, raw_dir=raw_dir, rules=rules, gil=not no_gil,
                          speedscope=speedscope, log=log)
    finally:
        warnings.showwarning = old
    if json_out == "-":
        click.echo(json.dumps(run.to_dict(), indent=1))
    else:
        click.echo(render_profile(run), nl=False)
        if json_out:
            try:
                run.save(json_out)
            except OSError as e:  # full disk, unwritable path, ...: one line, no traceback
                raise LiveError(f"cannot write the Run ({e.strerror or e})", where=f"--json {json_out}",
                                fix="the profile is shown above; free space or choose another path") from None
            click.echo(f"\nRun written to {json_out}")
        if speedscope:
            click.echo(f"speedscope written to {speedscope} (open in https://www.speedscope.app)")
    exited = run.config.get("live", {}).get("exited") or []
    if exited:
        e = exited[0]
        more = f" (and {len(exited) - 1} more)" if len(exited) > 1 else ""
        raise TargetExitedError(f"rank {e['rank']} (pid {e['pid']}) exited during the profile{more}; "
                                f"what was sampled ({e['samples']} samples, about {e['sampled_s']:.1f} s) is reported above"
                                + (f" and in {json_out}" if json_out and json_out != "-" else ""))
