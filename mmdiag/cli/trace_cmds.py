"""`mmdiag trace synth|info|profiles`."""
from __future__ import annotations

import click

from .. import api
from ..ingest.dump import MAX_GAP_S
from . import options as o
from .app import json_switch, show


@click.group()
def trace():
    """Make and inspect request traces (trace.jsonl)."""


@trace.command("synth")
@click.option("--profile", "profile", default=None, metavar="NAME",
              help="workload profile from profiles/workloads (or a .toml path); default from profiles/defaults.toml")
@click.option("-n", "--num-prompts", "n", type=o.COUNT, default=None,
              help="number of requests [default: the profile's; 1000 with the image options, as bench_serving]")
@click.option("--request-rate", default=None, metavar="R",
              help="Poisson arrivals at R req/s; inf sends every request at time 0 (bench_serving's meaning)")
@click.option("--max-concurrency", type=o.CONCURRENCY, default=None,
              help="at most this many requests in flight (with --request-rate: both, as bench_serving)")
@click.option("--image-count", type=o.ITEMS, default=None,
              help="bench_serving's image dataset: images per request [default 1]")
@click.option("--image-resolution", default=None, metavar="RES",
              help="4k, 1080p, 720p, 360p, HxW (height first) or random:HxW-HxW [default 1080p]")
@click.option("--random-image-count", is_flag=True, default=None, help="1 to --image-count images per request")
@click.option("--random-input-len", type=o.TOKENS, default=None, help="text tokens per request [default 1024]")
@click.option("--random-range-ratio", type=o.RATIO, default=None,
              help="text lengths drawn from [len * ratio, len] [default 0.0]")
@click.option("--model", "model", default=None, metavar="NAME",
              help="model geometry from profiles/models [default: the default profile's]")
@click.option("--seed", type=o.SEED, default=0, show_default=True)
@click.option("--repeat-share", type=o.RATIO, default=None, metavar="S",
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
    image = dict(image_count=image_count, image_resolution=image_resolution, random_image_count=random_image_count,
                 random_input_len=random_input_len, random_range_ratio=random_range_ratio)
    count, what = api.synth_trace(output, profile, n, request_rate=request_rate, max_concurrency=max_concurrency,
                                  seed=seed, repeat_share=repeat_share, model=model, image=image)
    click.echo(f"wrote {count} requests ({what}) to {output}")


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
@click.option("--max-gap", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="shorten every idle gap between arrivals to at most S seconds [default: refuse a gap "
                   f"over {MAX_GAP_S:g} s, which a replay would wait out]")
def trace_from_dump(paths, output, model, default_size, max_gap):
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
    from ..ingest.dump import skipped_text

    conv = api.trace_from_dump(list(paths), output, model=model, default_size=default_size, max_gap=max_gap)
    click.echo(f"wrote {conv.requests} request{'' if conv.requests == 1 else 's'} from {conv.files} dump file(s) to {output} "
               f"(model {conv.model_path or '?'}, geometry {conv.model})")
    if conv.defaulted:
        click.echo(f"  {conv.defaulted} image(s) given as URLs took --default-size")
    if conv.gaps_shortened:
        click.echo(f"  {conv.gaps_shortened} idle gap(s) over {max_gap:g} s shortened to {max_gap:g} s (--max-gap)")
    if conv.skipped:
        click.echo(f"  left out: {skipped_text(conv)}")


@trace.command("info")
@click.argument("trace_file", metavar="TRACE")
@json_switch("the totals")
def trace_info(trace_file, as_json):
    """Validate a trace (every line) and print its totals (sizes in MB = 10^6 bytes)."""
    show(api.trace_info(trace_file), as_json)


@trace.command("profiles")
def trace_profiles():
    """List the bundled workload profiles."""
    for p in api.trace_profiles():
        mark = " (default)" if p["default"] else ""
        click.echo(f"{p['name']}{mark}\n    {p['description']}\n")
