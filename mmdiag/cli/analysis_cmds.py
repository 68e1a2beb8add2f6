"""`mmdiag recommend` and `mmdiag report`."""
from __future__ import annotations

import click

from .. import api
from .. import render as out
from . import options as o
from .app import EXIT_ACCEPTANCE_FAILED, json_switch, output_option, show


@click.command("recommend")
@click.argument("runs", nargs=-1, metavar="[RUN.json ...]", type=click.Path(dir_okay=False))
@json_switch("the recommendation (key `recommended`)")
@output_option("Recommendation", "recommendation", "write the recommendation")
@o.replay_option("tp", help="with no Runs: ranks for the replay [default: profiles/defaults.toml]")
@o.replay_option("repeat", default=None,
                 help="with no Runs: exactly this many repeats per strategy [default: a stopping rule: 2, then more "
                      "of the undecided strategies until decided or the budget in profiles/defaults.toml [quick]]")
@click.option("-n", "n", type=o.COUNT, default=None,
              help="with no Runs: requests to synthesize [default: [quick] requests in profiles/defaults.toml]")
@click.option("--profile", default=None, metavar="NAME", help="with no Runs: workload profile [default: profiles/defaults.toml]")
@click.option("--save", type=click.Path(dir_okay=False), default=None,
              help="with no Runs: where to keep the replayed Run [default: ./mmdiag-runs/recommend-<time>.json]")
@click.option("--release", default=None, metavar="VERSION",
              help="the SGLang release to advise: whether upgrading, SGLANG_MM_PRECOMPUTE_HASH=1 or `mmdiag apply "
                   "shm` pays on it [default: the trace's source.sglang_version]")
@o.launch_options("with --release")
def recommend_command(runs, as_json, output, tp, repeat, n, profile, save, release, launch):
    """Recommend the patch for the measured workload: revert, dict, batch, precompute, cond, shm, or none.

    \b
    Reads replay Runs (mmdiag replay -o run.json) and/or live profiles. With none, it
    replays the default workload first, so one command gives an answer.
    It fits a cost model (materialization per MB, pickle+broadcast+unpickle per MB and
    per collective at the rank count, requests per loop iteration), places the
    workload against the feature size where broadcasting pays, and judges the
    strategies' throughput against the repeat noise. Strategies no patch ships (commit,
    the regression, among them: `mmdiag strategies`) are shown but never recommended.

    \b
      mmdiag replay trace.jsonl --tp 4 --repeat 2 -o run.json && mmdiag recommend run.json
      mmdiag recommend before.json after.json --json    # Runs of one workload are merged
    """
    if output:
        out.check_output(output, "Recommendation", "-o")
    if runs:
        loaded = api.load_runs(runs)
    else:
        if save:
            out.check_output(save, "Run", "--save")
        log = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
        loaded = [api.replay_default(tp=tp, repeat=repeat, n=n, profile=profile, save=save, log=log)]
    rec = api.recommend(loaded, release=release, launch=launch)
    if not runs and loaded[0].path:
        rec.notes.append(f"the replayed Run is kept in {loaded[0].path}")
    if output:
        out.write(rec, output, what="-o")
    show(rec, as_json)


@click.command("report")
@click.argument("before", metavar="BEFORE.json", type=click.Path(dir_okay=False))
@click.argument("after", metavar="AFTER.json", type=click.Path(dir_okay=False))
@click.option("--criteria", type=click.Path(dir_okay=False), default=None,
              help="acceptance criteria TOML [default: profiles/criteria/default.toml]")
@output_option("Report", "report", "write the report (HTML with charts)")
@json_switch("the report")
@click.option("--before-strategy", default=None, metavar="NAME", help="strategy of BEFORE to compare")
@click.option("--after-strategy", default=None, metavar="NAME", help="strategy of AFTER to compare")
@click.option("--before-bench", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="live server: bench_serving --output-file of the runs BEFORE.json was profiled during "
                   "(repeatable; each line is one run, several runs are the repeats)")
@click.option("--after-bench", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="the same for AFTER.json")
def report_command(before, after, criteria, output, as_json, before_strategy, after_strategy,
                   before_bench, after_bench):
    """Compare two Runs against acceptance criteria; exit 1 when acceptance fails.

    \b
    Which strategies are compared:
      --before-strategy / --after-strategy when given; else a Run with one strategy
      (a replay of installed code, a live profile) gives that one; else before is
      `commit` (the regression) and after is what `mmdiag recommend` picks.
    Both Runs must be of one kind (two replays or two live profiles) and one rank
    count. A live server: two profiles (mmdiag profile -o X.json) with the bench_serving
    result files of the runs each was taken during (--before-bench, --after-bench):
    throughput and latency come from bench_serving, its runs are the repeats.
    Differences are judged with the repeats (Welch t-test, p < 0.05):
    inside the noise is "not significant", never a win. A criterion the Run cannot
    measure (GIL in a replay) is n/a: neither pass nor fail.
    Exit status: 0 accepted, 1 a criterion failed, 2 bad input.

    \b
      mmdiag report before.json after.json -o report.html
      mmdiag report before.json after.json --before-strategy commit --after-strategy batch
    """
    rep = api.report(before, after, criteria, output=output, before_strategy=before_strategy,
                     after_strategy=after_strategy, before_bench=before_bench, after_bench=after_bench)
    show_report(rep, output, as_json)


def show_report(rep, output: str | None, as_json: bool, failed_note: str = "") -> None:
    """Print a Report (text or JSON); exit 1 (after saying which criteria) when it failed."""
    show(rep, as_json)
    if output and not as_json:
        click.echo(f"report written to {output}")
    if not rep.passed:
        if not as_json:
            failed = ", ".join(c.key for c in rep.criteria if c.status == "fail")
            click.echo(f"mmdiag: acceptance failed: {failed}{failed_note}", err=True)
        raise click.exceptions.Exit(EXIT_ACCEPTANCE_FAILED)
