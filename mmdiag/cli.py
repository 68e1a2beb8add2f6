"""The `mmdiag` command line: a thin skin over the library.

Each command parses, calls one library function, renders. User mistakes arrive as
MmdiagError and leave as one line on stderr with a non-zero exit, no traceback.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import click

from . import strategies as strategy_registry
from .errors import MmdiagError
from .vocab import STRATEGIES

EXIT_INTERRUPTED = 130


class MmdiagGroup(click.Group):
    def invoke(self, ctx):
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"mmdiag: warning: {msg}", err=True)
        try:
            return super().invoke(ctx)
        except MmdiagError as e:
            click.echo(f"mmdiag: error: {e.one_line()}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("mmdiag: interrupted; every rank was stopped, no Run was written", err=True)
            ctx.exit(EXIT_INTERRUPTED)


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
      mmdiag replay trace.jsonl --tp 4 --json run.json     # every strategy, side by side
      mmdiag demo                                          # both steps on the default workload
      mmdiag profile --pid 1234 --json live.json           # attach to a live server (py-spy)
      mmdiag recommend run.json                            # which fix, and why, in numbers
      mmdiag doctor                                        # which path your SGLang runs
      mmdiag apply batch                                   # patch it (mmdiag apply --undo)

    \b
    Strategies (one name everywhere): revert, commit, dict, batch, precompute, async.
    Phases (per rank): recv, from_dict, pickle, broadcast, unpickle (+ forward, idle).
    """


# --- trace ---------------------------------------------------------------------

@main.group()
def trace():
    """Make and inspect request traces (trace.jsonl)."""


@trace.command("synth")
@click.option("--profile", "profile", default=None, metavar="NAME",
              help="workload profile from profiles/workloads (or a .toml path); default from profiles/defaults.toml")
@click.option("-n", "--num-prompts", "n", type=int, default=None,
              help="number of requests [default: the profile's; 1000 with the image options, as bench_serving]")
@click.option("--request-rate", default=None, metavar="R",
              help="Poisson arrivals at R req/s; inf sends every request at time 0 (bench_serving's meaning)")
@click.option("--max-concurrency", type=int, default=None,
              help="at most this many requests in flight (with --request-rate: both, as bench_serving)")
@click.option("--image-count", type=int, default=None,
              help="bench_serving's image dataset: images per request [default 1]")
@click.option("--image-resolution", default=None, metavar="RES",
              help="4k, 1080p, 720p, 360p, HxW (height first) or random:HxW-HxW [default 1080p]")
@click.option("--random-image-count", is_flag=True, default=None, help="1 to --image-count images per request")
@click.option("--random-input-len", type=int, default=None, help="text tokens per request [default 1024]")
@click.option("--random-range-ratio", type=float, default=None,
              help="text lengths drawn from [len * ratio, len] [default 0.0]")
@click.option("--model", "model", default=None, metavar="NAME",
              help="model geometry from profiles/models [default: the default profile's]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeat-share", type=float, default=None, metavar="S",
              help="share (0..1) of multimodal requests that repeat a recent request's images byte for byte "
                   "(items get content ids; for measuring hash caches)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="trace file to write")
def trace_synth(profile, n, request_rate, max_concurrency, image_count, image_resolution, random_image_count,
                random_input_len, random_range_ratio, model, seed, repeat_share, output):
    """Synthesize a trace from a workload profile, or from bench_serving's image options.

    Feature shapes follow real model geometry (Qwen2.5-VL: sides rounded to multiples
    of 28, one 1176-float row per 14x14 patch; video folds 2 frames per row).

    \b
    The image options mean what they mean to `python -m sglang.bench_serving
    --dataset-name image`, so the trace replays what you benchmarked, e.g.
      mmdiag trace synth --image-resolution 720p --image-count 2 --num-prompts 200 \\
          --request-rate 16 --max-concurrency 64 -o trace.jsonl
    """
    from .workloads import ImageDataset, defaults, load_workload, synth_images_to_file, synth_to_file

    kw = dict(request_rate=request_rate, max_concurrency=max_concurrency, seed=seed, repeat_share=repeat_share)
    image = dict(image_count=image_count, image_resolution=image_resolution, random_image_count=random_image_count,
                 random_input_len=random_input_len, random_range_ratio=random_range_ratio)
    if any(v is not None for v in image.values()):
        if profile:
            raise MmdiagError("give --profile or bench_serving's image options (--image-count, "
                              "--image-resolution, --random-*), not both")
        model = model or load_workload(defaults()["workload"]).data["model"]
        count = synth_images_to_file(model, n, output, ImageDataset.from_options(**image), **kw)
        click.echo(f"wrote {count} requests (bench_serving image dataset, {model}) to {output}")
        return
    if model:
        raise MmdiagError("--model goes with the image options; a profile names its own model")
    profile = profile or defaults()["workload"]
    count = synth_to_file(profile, n, output, **kw)
    click.echo(f"wrote {count} requests ({load_workload(profile).name}) to {output}")


def _size(ctx, param, value):
    if value is None:
        return None
    w, _, h = value.lower().partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise click.BadParameter(f"{value!r} is not WxH (e.g. 1120x700, width first)")
    return int(w), int(h)


@trace.command("from-dump")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="trace file to write")
@click.option("--model", "model", default=None, metavar="NAME",
              help="model geometry from profiles/models [default: matched from the dump's server_args.model_path]")
@click.option("--default-size", callback=_size, default=None, metavar="WxH",
              help="size for images given as URLs (never fetched); without it such requests are left out")
def trace_from_dump(paths, output, model, default_size):
    """Convert SGLang request dumps into a trace of the traffic the server really had.

    \b
    PATH: dump files (*.pkl) or folders of them, as SGLang writes with
      python -m sglang.srt.managers.configure_logging --dump-requests-folder DIR
      or the server's --crash-dump-folder DIR.
    Arrivals come from each request's created_time, feature shapes from each image's real
    size (read from its header: data URI, base64, bytes or a local file) and the model
    geometry. A dump is loaded without running anything in it: only SGLang's request
    classes are read, as plain fields; anything else is refused.
    """
    from .ingest.dump import convert, skipped_text

    conv = convert(list(paths), output, model=model, default_size=default_size)
    click.echo(f"wrote {conv.requests} requests from {conv.files} dump file(s) to {output} "
               f"(model {conv.model_path or '?'}, geometry {conv.model})")
    if conv.defaulted:
        click.echo(f"  {conv.defaulted} image(s) given as URLs took --default-size")
    if conv.skipped:
        click.echo(f"  left out: {skipped_text(conv)}")


@trace.command("info")
@click.argument("trace_file", metavar="TRACE")
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
def trace_info(trace_file, as_json):
    """Validate a trace (every line) and print its totals."""
    from .trace import scan

    header, st = scan(trace_file)
    d = {"schema": header.schema, "source": header.source, "arrival": header.arrival,
         "model": header.model.get("name"), "requests": st.requests, "mm_requests": st.mm_requests,
         "items": st.items, "modalities": st.modalities, "mm_gb": round(st.mm_bytes / 1e9, 3),
         "max_request_mb": round(st.max_request_bytes / 2**20, 1), "span_s": st.duration_s}
    if as_json:
        click.echo(json.dumps(d, indent=1))
    else:
        for k, v in d.items():
            click.echo(f"{k:15} {v}")


@trace.command("profiles")
def trace_profiles():
    """List the bundled workload profiles."""
    from .workloads import defaults, load_workload, workload_names

    default = defaults()["workload"]
    for name in workload_names():
        wl = load_workload(name)
        mark = " (default)" if name == default else ""
        click.echo(f"{name}{mark}\n    {wl.description}\n")


# --- replay --------------------------------------------------------------------

class _Bar:
    """A progress line on stderr: a redrawn bar on a terminal, a line per step otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty, self.label = enabled, sys.stderr.isatty(), None

    def __call__(self, p: dict) -> None:
        if not self.enabled:
            return
        label, done, total = p.get("label", ""), p.get("done", 0), p.get("total") or 0
        if self.tty:
            width = 30
            fill = int(width * done / total) if total else 0
            click.echo(f"\r  {label:<14} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} requests",
                       err=True, nl=False)
        if label != self.label:
            if self.label is not None and self.tty:
                click.echo("", err=True)
            elif not self.tty:
                click.echo(f"  replaying {label} ...", err=True)
            self.label = label

    def close(self) -> None:
        if self.enabled and self.tty and self.label is not None:
            click.echo("", err=True)


def _replay_options(f):
    opts = [
        click.option("--tp", type=int, default=None, help="tensor-parallel ranks (processes) [default: 4, from profiles/defaults.toml]"),
        click.option("--strategy", "strategies", multiple=True, metavar="NAME",
                     help=f"repeatable: {', '.join(STRATEGIES)} or all [default: all]"),
        click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                     help="write the Run (schema mmdiag.replay/1) here; '-' prints it instead of the table"),
        click.option("--timeline", type=click.Path(dir_okay=False), default=None,
                     help="write one Chrome-trace/Perfetto JSON of every rank's phases (open in ui.perfetto.dev)"),
        click.option("--timeout", type=float, default=60.0, show_default=True,
                     help="seconds a rank waits in a collective before giving up (a dead rank stops the rest)"),
        click.option("--forward-ms", type=float, default=0.0, show_default=True,
                     help="model step per busy loop iteration (GPU time stand-in; the GIL is free meanwhile)"),
        click.option("--max-concurrency", type=int, default=None, help="override the trace's closed-loop concurrency"),
        click.option("--max-recv-mb", type=float, default=256.0, show_default=True,
                     help="most feature MB the entry rank takes in one iteration (bounds replay memory)"),
        click.option("--repeat", type=int, default=1, show_default=True,
                     help="run each strategy N times; the report judges differences against this noise"),
        click.option("--port", type=int, default=None, help="rendezvous port on 127.0.0.1 [default: a free one]"),
        click.option("--impl", type=click.Choice(["mmdiag", "sglang"]), default="mmdiag", show_default=True,
                     help="mmdiag: every strategy's model; sglang: the installed SGLang's own code, as patched"),
        click.option("--sglang", "sglang_path", metavar="PATH", default=None,
                     help="with --impl sglang: site-packages sglang folder or checkout's python/ [default: this interpreter's]"),
        click.option("--enable-broadcast-flag", is_flag=True,
                     help="with --impl sglang on 0.5.5.post3+: replay as if --enable-broadcast-mm-inputs-process were on"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bar"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_replay(trace_file, tp, strategies, json_out, timeline, timeout, forward_ms, max_concurrency,
                max_recv_mb, repeat, port, quiet, impl="mmdiag", sglang_path=None, enable_broadcast_flag=False):
    from .render.table import render_run
    from .replay import ReplayOptions, replay
    from .workloads import defaults

    tp = tp if tp is not None else int(defaults()["tp"])
    if repeat < 1:
        raise MmdiagError("--repeat must be at least 1")
    if impl == "sglang" and strategies:
        raise MmdiagError("--strategy does not apply with --impl sglang",
                          fix="the install's own code decides; use `mmdiag apply STRATEGY` to change it")
    names = strategy_registry.resolve(list(strategies))
    bar = _Bar(enabled=not quiet and json_out != "-")
    opts = ReplayOptions(tp=tp, strategies=names, timeout=timeout, forward_ms=forward_ms,
                         max_concurrency=max_concurrency, max_recv_mb=max_recv_mb, repeat=repeat,
                         port=port, timeline=timeline, impl=impl, sglang_path=sglang_path,
                         enable_broadcast_flag=enable_broadcast_flag)
    if json_out and json_out != "-":
        _check_writable(json_out)
    if timeline:
        _check_writable(timeline)
    try:
        run = replay(trace_file, opts, progress=bar)
    finally:
        bar.close()
    if json_out == "-":
        click.echo(json.dumps(run.to_dict(), indent=1))
    else:
        click.echo(render_run(run))
        if json_out:
            run.save(json_out)
            click.echo(f"\nRun written to {json_out}")
        if timeline:
            click.echo(f"timeline written to {timeline} (open in https://ui.perfetto.dev)")
    if any(s.ranks_agree is False for s in run.strategies.values()):
        raise MmdiagError("ranks ended with different hashes or pad values; the measurements are not valid")
    return run


def _check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise MmdiagError("directory does not exist", where=path)
    if not os.access(d, os.W_OK):
        raise MmdiagError("directory is not writable", where=path)


@main.command("replay")
@click.argument("trace_file", metavar="TRACE")
@_replay_options
def replay_cmd(trace_file, **kw):
    """Replay TRACE through --tp real rank processes, strategy by strategy.

    \b
    Every rank is a separate process in one torch.distributed gloo group, as SGLang's
    CPU group. Rank 0 (the entry rank) admits requests at their arrival times and sends
    each loop iteration's requests to all ranks by pickle over broadcast (SGLang's
    recv_requests / broadcast_pyobj); then every rank handles them with the strategy:
    \b
      revert      every rank materializes (pre-17a57fd)
      commit      entry rank materializes, broadcast_object_list per request (17a57fd)
      dict        broadcast the raw dict per request, every rank materializes
      batch       one broadcast_object_list per loop iteration
      precompute  hashes computed before the scheduler (shown as tokenizer time)
      async       17a57fd's broadcast on a background thread
    \b
    Materialization costs SGLang's: sha256 over each feature's bytes. Every rank must
    end with the same hashes and pad values; that is checked.
    """
    _run_replay(trace_file, **kw)


@main.command("demo")
@click.option("--profile", default=None, metavar="NAME", help="workload profile [default: profiles/defaults.toml]")
@click.option("-n", "n", type=int, default=None,
              help="requests to synthesize [default: [quick] requests in profiles/defaults.toml]")
@_replay_options
def demo_cmd(profile, n, **kw):
    """Synthesize the default workload and replay it over every strategy (the README's first command).
    The Run is kept (--json, default ./mmdiag-runs/demo-<time>.json)."""
    from .analysis.adaptive import default_path
    from .workloads import defaults, synth_to_file

    d = defaults()
    profile = profile or d["workload"]
    n = n or d.get("quick", {}).get("requests")   # about a minute on 2 cores, not five
    if not kw.get("json_out"):
        kw["json_out"] = default_path(d.get("quick", {}).get("runs_dir", "mmdiag-runs"), "demo")
        os.makedirs(os.path.dirname(kw["json_out"]), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmdiag-demo-") as tmp:
        path = os.path.join(tmp, "trace.jsonl")
        count = synth_to_file(profile, n, path)
        click.echo(f"synthesized {count} requests of profile {profile!r}", err=True)
        _run_replay(path, **kw)


def _register_commands():
    # Each subpackage owns its commands; the CLI only gathers them.
    from .analysis.commands import recommend_command, report_command
    from .live.commands import profile_command
    from .sglang.commands import apply_command, doctor_command

    for cmd in (profile_command, doctor_command, apply_command, recommend_command, report_command):
        main.add_command(cmd)


_register_commands()

if __name__ == "__main__":
    main()
