"""`mmdiag replay` and `mmdiag demo`."""
from __future__ import annotations

import functools
import os
import textwrap

import click

from .. import api, progress
from .. import render as out
from ..errors import MmdiagError
from ..strategies import catalog
from ..vocab import REPLAY_SCHEMA
from . import options as o
from .app import mark_json, output_option, show


def legacy_json(what: str, arg: str | None = None):
    """--json: the switch (JSON on stdout). `--json FILE`, the old form, still writes FILE
    (as -o FILE does) with a deprecation line; '-' is the switch, as before."""
    def callback(ctx, param, value):
        if value == "-":
            mark_json(ctx)
        elif value is not None:
            click.echo(f"mmdiag: warning: `--json {value}` is deprecated: use `-o {value}` "
                       "(a bare --json prints the JSON on stdout)", err=True)
        return value
    return click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                        callback=callback,
                        help=f"print {what} as JSON on stdout instead of the table (errors too)"
                             + (f"; put it after {arg}" if arg else "")
                             + ". `--json FILE` is the deprecated spelling of -o FILE")


def replay_options(f, arg: str | None = None, overrides: dict | None = None):
    """Every ReplayOptions field `mmdiag replay` offers, and the command's own options
    (output, cond's threshold, quiet) after the field they follow in --help; `overrides`:
    a field's default and help where a command differs (demo's repeats)."""
    after = {"strategies": [legacy_json(f"the Run (schema {REPLAY_SCHEMA})", arg), output_option("Run", "run", "write the Run")],
             "repeat": [o.threshold_option("the crossover of the strategies replayed before cond")]}
    opts = []
    for name in o.REPLAY_CLI:
        opts += [o.replay_option(name, **(overrides or {}).get(name, {})), *after.get(name, [])]
    opts.append(click.option("--quiet", "-q", is_flag=True, help="no progress on stderr"))
    for opt in reversed(opts):
        f = opt(f)
    return f


def run_replay(trace_file: str | None, json_out, output, quiet, demo: dict | None = None, **kw):
    """Check the outputs, replay (or synthesize and replay), render; the body of both commands."""
    as_json = json_out == "-"
    files = [(p, w) for p, w in ((output, "-o"), (None if as_json else json_out, "--json")) if p]
    for path, what in files:
        out.check_output(path, "Run", what)
    with progress.stderr(enabled=not quiet and not as_json) as bar:
        if demo is not None:
            run = api.demo(demo["profile"], demo["n"], log=lambda s: click.echo(s, err=True), progress=bar, **kw)
        else:
            run = api.replay(trace_file, progress=bar, **kw)
    show(run, as_json)
    for path, what in files:
        out.write(run, path, what=what)
        if not as_json:
            click.echo(f"\nRun written to {path}")
    if kw.get("timeline") and not as_json:
        click.echo(f"timeline written to {kw['timeline']} (open in https://ui.perfetto.dev)")
    if files and not as_json:
        click.echo(_next_step([p for p, _ in files], run))
    if any(s.ranks_agree is False for s in run.strategies.values()):
        raise MmdiagError("ranks ended with different hashes or pad values; the measurements are not valid")
    return run


def _next_step(paths: list[str], run) -> str:
    """The recommend command for a file it can read: Run.load reads only the JSON renderer's
    output, so a .txt/.md Run gets how to write a JSON one instead."""
    readable = [p for p in paths if out.for_path(p, run).name == "json"]
    if readable:
        return f"next: mmdiag recommend {readable[0]}   # which fix, from this Run"
    stem = os.path.splitext(paths[0])[0]
    return (f"next: mmdiag recommend reads the Run as JSON, not {paths[0]}: replay with -o {stem}.json, "
            f"then mmdiag recommend {stem}.json   # which fix, from this Run")


def strategies_help() -> str:
    """The strategies as the registry describes them, for --help (click keeps \\b blocks as written)."""
    cat = catalog()
    width = max(len(s["name"]) for s in cat)
    lines = [textwrap.fill(s["summary"], 96, initial_indent=f"  {s['name'].ljust(width)}  ",
                           subsequent_indent=" " * (width + 4)) for s in cat]
    return "\b\nStrategies (mmdiag strategies):\n" + "\n".join(lines)


@click.command("replay", epilog=strategies_help())
@click.argument("trace_file", metavar="TRACE")
@functools.partial(replay_options, arg="TRACE")   # --json FILE would take TRACE before it
def replay_cmd(trace_file, **kw):
    """Replay TRACE through --tp real rank processes, strategy by strategy.

    \b
    Every rank is a separate process in one torch.distributed gloo group, as SGLang's
    CPU group. Rank 0 (the entry rank) admits requests at their arrival times and sends
    each loop iteration's requests to all ranks by pickle over broadcast (SGLang's
    recv_requests / broadcast_pyobj); then every rank handles them with the strategy
    (listed below).
    \b
    Materialization costs SGLang's: sha256 over each feature's bytes. Every rank must
    end with the same hashes and pad values; that is checked.

    \b
      mmdiag trace synth --profile small-image-c96 -n 200 -o trace.jsonl
      mmdiag replay trace.jsonl --tp 4 --repeat 2 -o run.json
      mmdiag recommend run.json                      # which fix, from this Run
    \b
    The table, one row per strategy: req/s (throughput), vs commit (against the 17a57fd
    baseline), p50/p99 ms (from arrival until every rank holds the request's inputs),
    MB/req and coll/req (feature bytes sent and own collectives per request), req/iter
    (requests per loop iteration), CPU s of all ranks, ranks agree (same hashes everywhere);
    then each rank's time per request by phase. Ctrl-C stops every rank; nothing is written.
    """
    run_replay(trace_file, **kw)


@click.command("demo", epilog=strategies_help())
@click.option("--profile", default=None, metavar="NAME", help="workload profile [default: profiles/defaults.toml]")
@click.option("-n", "n", type=o.COUNT, default=None,
              help="requests to synthesize [default: [demo] requests in profiles/defaults.toml]")
@functools.partial(replay_options, overrides={"repeat": {
    "default": None, "help": "run each strategy N times [default: [demo] repeat in profiles/defaults.toml, 2: "
                             "the table shows each strategy's +/- noise]"}})
def demo_cmd(profile, n, **kw):
    """Synthesize the default workload and replay it over every strategy (the README's first command).
    The Run is kept (-o, default ./mmdiag-runs/demo-<time>.json)."""
    if not kw["output"] and kw["json_out"] in (None, "-"):
        kw["output"] = api.default_run_path("demo")
    run_replay(None, demo={"profile": profile, "n": n}, **kw)
