"""`mmdiag replay` and `mmdiag demo`."""
from __future__ import annotations

import textwrap

import click

from .. import api, progress
from .. import render as out
from ..errors import MmdiagError
from ..strategies import catalog
from ..vocab import STRATEGIES, TRANSPORTS
from . import options as o
from .app import mark_json, output_option, show


def legacy_json(what: str):
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
                        help=f"print {what} as JSON on stdout instead of the table (errors too); "
                             "put it after TRACE. `--json FILE` is the deprecated spelling of -o FILE")


def replay_options(f):
    opts = [
        click.option("--tp", type=o.RANKS, default=None,
                     help="tensor-parallel ranks (processes) [default: 4, from profiles/defaults.toml]"),
        click.option("--strategy", "strategies", multiple=True, metavar="NAME",
                     help=f"repeatable: {', '.join(STRATEGIES)} or all [default: all]"),
        legacy_json("the Run (schema mmdiag.replay/2)"),
        output_option("Run", "run", "write the Run"),
        click.option("--timeline", type=click.Path(dir_okay=False), default=None,
                     help="write one Chrome-trace/Perfetto JSON of every rank's phases (open in ui.perfetto.dev)"),
        click.option("--timeout", type=o.SECONDS, default=60.0, show_default=True,
                     help="seconds a rank waits in a collective before giving up (a dead rank stops the rest)"),
        click.option("--forward-ms", type=o.MILLISECONDS, default=0.0, show_default=True,
                     help="model step per busy loop iteration (GPU time stand-in; the GIL is free meanwhile)"),
        click.option("--max-concurrency", type=o.CONCURRENCY, default=None,
                     help="override the trace's closed-loop concurrency"),
        click.option("--max-recv-mb", type=o.MEGABYTES, default=256.0, show_default=True,
                     help="most feature MB (10^6 bytes) the entry rank takes in one iteration (bounds replay memory)"),
        click.option("--repeat", type=o.REPEATS, default=1, show_default=True, help=o.REPEAT_HELP_TABLE),
        click.option("--threshold", default=None, metavar="BYTES|never|RUN.json",
                     help=o.THRESHOLD_HELP.format(measured="the crossover of the strategies replayed before cond")),
        click.option("--port", type=o.PORT, default=None, help="rendezvous port on 127.0.0.1 [default: a free one]"),
        click.option("--impl", type=click.Choice(["mmdiag", "sglang"]), default="mmdiag", show_default=True,
                     help="mmdiag: every strategy's model; sglang: the installed SGLang's own code, as patched"),
        click.option("--sglang", "sglang_path", metavar="PATH", default=None,
                     help="with --impl sglang: site-packages sglang folder or checkout's python/ "
                          "[default: this interpreter's]"),
        click.option("--enable-broadcast-flag", is_flag=True,
                     help="with --impl sglang on 0.5.5.post3+: replay as if --enable-broadcast-mm-inputs-process were on"),
        click.option("--transport", type=click.Choice(TRANSPORTS), default=None,
                     help="how features reach the ranks: pickle (in the recv broadcast, SGLang <= 0.5.9) or shm "
                          "(shared-memory handles, 0.5.10+) [default: what the trace's or installed release implies]"),
        click.option("--quiet", "-q", is_flag=True, help="no progress on stderr"),
    ]
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
    if any(s.ranks_agree is False for s in run.strategies.values()):
        raise MmdiagError("ranks ended with different hashes or pad values; the measurements are not valid")
    return run


def strategies_help() -> str:
    """The strategies as the registry describes them, for --help (click keeps \\b blocks as written)."""
    cat = catalog()
    width = max(len(s["name"]) for s in cat)
    lines = [textwrap.fill(s["summary"], 96, initial_indent=f"  {s['name'].ljust(width)}  ",
                           subsequent_indent=" " * (width + 4)) for s in cat]
    return "\b\nStrategies (mmdiag strategies):\n" + "\n".join(lines)


@click.command("replay", epilog=strategies_help())
@click.argument("trace_file", metavar="TRACE")
@replay_options
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
    """
    run_replay(trace_file, **kw)


@click.command("demo", epilog=strategies_help())
@click.option("--profile", default=None, metavar="NAME", help="workload profile [default: profiles/defaults.toml]")
@click.option("-n", "n", type=o.COUNT, default=None,
              help="requests to synthesize [default: [quick] requests in profiles/defaults.toml]")
@replay_options
def demo_cmd(profile, n, **kw):
    """Synthesize the default workload and replay it over every strategy (the README's first command).
    The Run is kept (-o, default ./mmdiag-runs/demo-<time>.json)."""
    if not kw["output"] and kw["json_out"] in (None, "-"):
        kw["output"] = api.default_run_path("demo")
    run_replay(None, demo={"profile": profile, "n": n}, **kw)
