"""Click commands `recommend` and `report` (registered by mmdiag/cli.py). Thin: parse, call, render.

MmdiagError is handled here too (one line on stderr, its exit code, no traceback), so
the commands behave the same when invoked on their own.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import click

from ..errors import MmdiagError

EXIT_ACCEPTANCE_FAILED = 1


def _one_line_errors(f):
    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except MmdiagError as e:
            click.echo(f"mmdiag: error: {e.one_line()}", err=True)
            raise click.exceptions.Exit(e.exit_code)
    return wrapper


def _load_runs(paths):
    from ..run import Run
    return [Run.load(p) for p in paths]


def replay_default(tp: int | None = None, repeat: int | None = None, n: int | None = None,
                   profile: str | None = None, quiet: bool = False, save: str | None = None):
    """What `recommend` does with no Runs: replay the bundled default workload until the answer is
    decided (mmdiag.analysis.adaptive); the Run is kept and the path said. Returns the merged Run."""
    from .adaptive import recommend_default

    res, _ = recommend_default(tp=tp, n=n, profile=profile, repeat=repeat, save=save,
                               log=lambda s: None if quiet else click.echo(s, err=True))
    return res.run


@click.command("recommend")
@click.argument("runs", nargs=-1, metavar="[RUN.json ...]", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the recommendation as JSON (key `recommended`)")
@click.option("--tp", type=int, default=None, help="with no Runs: ranks for the replay [default: profiles/defaults.toml]")
@click.option("--repeat", type=int, default=None,
              help="with no Runs: exactly this many repeats per strategy [default: a stopping rule: 2, then more "
                   "of the undecided strategies until decided or the budget in profiles/defaults.toml [quick]]")
@click.option("-n", "n", type=int, default=None,
              help="with no Runs: requests to synthesize [default: [quick] requests in profiles/defaults.toml]")
@click.option("--profile", default=None, metavar="NAME", help="with no Runs: workload profile [default: profiles/defaults.toml]")
@click.option("--save", type=click.Path(dir_okay=False), default=None,
              help="with no Runs: where to keep the replayed Run [default: ./mmdiag-runs/recommend-<time>.json]")
@_one_line_errors
def recommend_command(runs, as_json, tp, repeat, n, profile, save):
    """Recommend the patch for the measured workload: revert, dict, batch, precompute, or none.

    \b
    Reads replay Runs (mmdiag replay --json) and/or live profiles. With none, it
    replays the default workload first, so one command gives an answer.
    It fits a cost model (materialization per MB, pickle+broadcast+unpickle per MB and
    per collective at the rank count, requests per loop iteration), places the
    workload against the feature size where broadcasting pays, and judges the
    strategies' throughput against the repeat noise. commit (the regression) and async
    (no patch ships it) are shown but never recommended.
    """
    from ..render.recommend_text import render_recommendation
    from .recommend import recommend

    if repeat is not None and repeat < 1:
        raise MmdiagError("--repeat must be at least 1")
    if runs:
        loaded = _load_runs(runs)
    else:
        loaded = [replay_default(tp=tp, repeat=repeat, n=n, profile=profile, quiet=as_json, save=save)]
    rec = recommend(loaded)
    if not runs and loaded[0].path:
        rec.notes.append(f"the replayed Run is kept in {loaded[0].path}")
    if as_json:
        click.echo(json.dumps(rec.to_dict(), indent=1))
    else:
        click.echo(render_recommendation(rec), nl=False)


@click.command("report")
@click.argument("before", metavar="BEFORE.json", type=click.Path(dir_okay=False))
@click.argument("after", metavar="AFTER.json", type=click.Path(dir_okay=False))
@click.option("--criteria", type=click.Path(dir_okay=False), default=None,
              help="acceptance criteria TOML [default: profiles/criteria/default.toml]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write the report: report.html (tables + charts, standalone) or report.md")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--before-strategy", default=None, metavar="NAME", help="strategy of BEFORE to compare")
@click.option("--after-strategy", default=None, metavar="NAME", help="strategy of AFTER to compare")
@click.option("--before-bench", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="live server: bench_serving --output-file of the runs BEFORE.json was profiled during "
                   "(repeatable; each line is one run, several runs are the repeats)")
@click.option("--after-bench", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="the same for AFTER.json")
@_one_line_errors
def report_command(before, after, criteria, output, as_json, before_strategy, after_strategy,
                   before_bench=(), after_bench=()):
    """Compare two Runs against acceptance criteria; exit 1 when acceptance fails.

    \b
    Which strategies are compared:
      --before-strategy / --after-strategy when given; else a Run with one strategy
      (a replay of installed code, a live profile) gives that one; else before is
      `commit` (the regression) and after is what `mmdiag recommend` picks.
    Both Runs must be of one kind (two replays or two live profiles) and one rank
    count. A live server: two profiles (mmdiag profile --json) with the bench_serving
    result files of the runs each was taken during (--before-bench, --after-bench):
    throughput and latency come from bench_serving, its runs are the repeats. Differences are judged with the replay repeats (Welch t-test, p < 0.05):
    inside the noise is "not significant", never a win. A criterion the Run cannot
    measure (GIL in a replay) is n/a: neither pass nor fail.
    Exit status: 0 accepted, 1 a criterion failed, 2 bad input.
    """
    from ..render.report_md import render_text
    from ..run import Run
    from .criteria import load_criteria
    from .report import build_report
    from .verify import check_report_output, render_to

    crit = load_criteria(criteria)
    if output:
        check_report_output(output)
    b = Run.load(before)
    a = b if os.path.abspath(after) == os.path.abspath(before) else Run.load(after)
    if before_bench or after_bench:
        from ..ingest.bench_serving import with_bench
        if not (before_bench and after_bench):
            raise MmdiagError("give bench_serving results for both sides (--before-bench and --after-bench)")
        b, a = with_bench(b, list(before_bench), before), with_bench(a, list(after_bench), after)
    rep = build_report(b, a, crit, before_path=before, after_path=after,
                       before_strategy=before_strategy, after_strategy=after_strategy)
    if output:
        render_to(rep, output)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        click.echo(render_text(rep), nl=False)
        if output:
            click.echo(f"report written to {output}")
    if not rep.passed:
        if not as_json:
            failed = ", ".join(c.key for c in rep.criteria if c.status == "fail")
            click.echo(f"mmdiag: acceptance failed: {failed}", err=True)
        raise click.exceptions.Exit(EXIT_ACCEPTANCE_FAILED)


def run_verify(sglang_path, strategy, trace, tp=None, criteria=None, output=None, repeat=2,
               timeout=60.0, enable_broadcast_flag=False, keep_runs=None, confirm=None) -> int:
    """The body of `mmdiag apply STRATEGY --verify`: replay the install, apply, replay, report.
    Prints the report and returns the exit status (0 accepted, 1 acceptance failed);
    MmdiagError propagates (the caller prints it as one line)."""
    from ..render.report_md import render_text
    from ..workloads import defaults, synth_to_file
    from .verify import verify

    tp = int(tp if tp is not None else defaults()["tp"])
    with tempfile.TemporaryDirectory(prefix="mmdiag-verify-") as tmp:
        if trace is None:
            trace = os.path.join(tmp, "trace.jsonl")
            synth_to_file(defaults()["workload"], None, trace)
            click.echo(f"no --trace: replaying the default workload {defaults()['workload']!r}", err=True)
        res = verify(sglang_path, strategy, trace, tp, criteria, output, repeat=repeat, timeout=timeout,
                     enable_broadcast_flag=enable_broadcast_flag, keep_runs=keep_runs, confirm=confirm)
    click.echo(render_text(res.report), nl=False)
    if output:
        click.echo(f"report written to {output}")
    if not res.report.passed:
        failed = ", ".join(c.key for c in res.report.criteria if c.status == "fail")
        click.echo(f"mmdiag: acceptance failed: {failed}; the patch stays applied (mmdiag apply --undo restores)",
                   err=True)
        return EXIT_ACCEPTANCE_FAILED
    return 0
