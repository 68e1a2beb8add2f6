"""mmdiag as a library: the one facade the CLI calls and users import.

    from mmdiag import api
    run = api.replay("trace.jsonl", tp=4, strategies=["commit", "batch"])
    rec = api.recommend([run])
    rep = api.report("before.json", "after.json", output="report.html")

Every function returns data (a Run, a Recommendation, a Report, ...) and prints nothing;
problems a user can act on are raised as MmdiagError (mmdiag.errors) with what, where and
what to do. Long operations take `progress`, a callable fed dicts
{"label": str, "done": int, "total": int}, and `log`, a callable fed one human line.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from typing import Any, Callable, Iterable

from . import strategies as registry
from .errors import MmdiagError
from .fileio import check_writable
from .run import Run
from .vocab import DEFAULT_HASH, DEFAULT_SEGMENTS

Progress = Callable[[dict], None]
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- traces -------------------------------------------------------------------------

def default_profile() -> str:
    from .workloads import defaults
    return defaults()["workload"]


def default_tp() -> int:
    from .workloads import defaults
    return int(defaults()["tp"])


def synth_trace(output: str, profile: str | None = None, n: int | None = None, *,
                request_rate: float | str | None = None, max_concurrency: int | None = None, seed: int = 0,
                repeat_share: float | None = None, model: str | None = None,
                image: dict[str, Any] | None = None) -> tuple[int, str]:
    """Write a trace from a workload profile (default: the default one) or, when any of
    `image` (bench_serving's image options: image_count, image_resolution, random_image_count,
    random_input_len, random_range_ratio) is set, from bench_serving's image dataset for `model`.
    Returns (requests written, what was synthesized)."""
    from .workloads import ImageDataset, load_workload, synth_images_to_file, synth_to_file

    kw = dict(request_rate=request_rate, max_concurrency=max_concurrency, seed=seed, repeat_share=repeat_share)
    image = {k: v for k, v in (image or {}).items() if v is not None}
    if image:
        if profile:
            raise MmdiagError("give --profile or bench_serving's image options (--image-count, "
                              "--image-resolution, --random-*), not both")
        model = model or load_workload(default_profile()).data["model"]
        count = synth_images_to_file(model, n, output, ImageDataset.from_options(**image), **kw)
        return count, f"bench_serving image dataset, {model}"
    if model:
        raise MmdiagError("--model goes with the image options; a profile names its own model")
    profile = profile or default_profile()
    return synth_to_file(profile, n, output, **kw), load_workload(profile).name


def trace_from_dump(paths: list[str], output: str, *, model: str | None = None,
                    default_size: tuple[int, int] | None = None, max_gap: float | None = None):
    """Convert SGLang request dumps into a trace (a Conversion: requests, files, skipped, ...);
    max_gap: shorten every idle gap between arrivals to at most this many seconds."""
    from .ingest.dump import convert
    return convert(list(paths), output, model=model, default_size=default_size, max_gap=max_gap)


def trace_info(path: str) -> dict[str, Any]:
    """Validate every line of a trace and return its totals."""
    from .trace import scan
    from .units import mb

    header, st = scan(path)
    return {"schema": header.schema, "source": header.source, "arrival": header.arrival,
            "model": header.model.get("name"), "requests": st.requests, "mm_requests": st.mm_requests,
            "items": st.items, "modalities": st.modalities, "mm_mb": round(mb(st.mm_bytes), 1),
            "max_request_mb": round(mb(st.max_request_bytes), 1), "span_s": st.duration_s}


def trace_profiles() -> list[dict[str, Any]]:
    """The bundled workload profiles: name, description, whether it is the default."""
    from .workloads import load_workload, workload_names
    default = default_profile()
    return [{"name": n, "description": load_workload(n).description, "default": n == default}
            for n in workload_names()]


# --- replay ---------------------------------------------------------------------------

def replay_options(**kw: Any):
    """ReplayOptions from keyword arguments (unknown ones refused); tp defaults to profiles/defaults.toml."""
    from .replay import ReplayOptions

    known = {f.name for f in fields(ReplayOptions)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise TypeError(f"unknown replay option(s): {', '.join(unknown)}")
    if kw.get("tp") is None:
        kw["tp"] = default_tp()
    if kw.get("impl", "mmdiag") == "sglang" and kw.get("strategies"):
        raise MmdiagError("--strategy does not apply with --impl sglang",
                          fix="the install's own code decides; use `mmdiag apply STRATEGY` to change it")
    kw["strategies"] = [] if kw.get("impl") == "sglang" else registry.resolve(list(kw.get("strategies") or []))
    if kw.get("impl") == "sglang":  # the model's settings: the install's own code decides these
        for flag, given, why, fix in (
                ("--hash", kw.get("hash") not in (None, DEFAULT_HASH), "hashes with its own code",
                 f"`mmdiag apply {kw.get('hash')}` changes the install's hash"),
                ("--segments", kw.get("segments") not in (None, DEFAULT_SEGMENTS), "writes its own segments",
                 f"`mmdiag apply {kw.get('segments')}` makes the install reuse them"),
                ("--shm-map", kw.get("shm_map") is not None, "takes each feature out of its segment its own way "
                 "(a clone to 0.5.20, a copy-on-write map from 0.5.21)", "model the other with --impl mmdiag")):
            if given:
                raise MmdiagError(f"with --impl sglang the install {why}", where=flag,
                                  fix=f"leave {flag} out; {fix}")
    if kw.get("hash") not in (None, DEFAULT_HASH):
        from .mmpath import hashing
        hashing.check(kw["hash"])
    if kw.get("skip_hash"):
        per_rank = [n for n in kw["strategies"] if not registry.get(n).hashes_in_tokenizer]
        if per_rank:
            raise MmdiagError(f"--skip-hash with {', '.join(per_rank)}: these hash on the ranks, where "
                              "SGLANG_MM_SKIP_COMPUTE_HASH makes every rank draw its own hash (the ranks disagree)",
                              where="--strategy", fix="replay --skip-hash with --strategy precompute or shm")
        if kw.get("impl") == "sglang":
            kw["extra_env"] = {**(kw.get("extra_env") or {}), "SGLANG_MM_SKIP_COMPUTE_HASH": "1"}
    return ReplayOptions(**kw)


def replay(trace: str, *, progress: Progress | None = None, threshold: str | None = None, **options: Any) -> Run:
    """Replay `trace` through real rank processes; `options` are ReplayOptions fields
    (tp, strategies, repeat, timeout, timeline, impl, sglang_path, ...); `threshold`: cond's
    (bytes, 'never' or a Run file: mmdiag.strategies.cond_threshold)."""
    from .replay import replay as run_replay

    opts = replay_options(**options)
    if threshold is not None:
        _with_threshold(opts, threshold)
    timelines = None
    if opts.timeline:
        from .render.timeline import combine_timeline
        check_writable(opts.timeline, "--timeline")
        timelines = lambda files: combine_timeline(files, opts.timeline)  # noqa: E731
    return run_replay(trace, opts, progress=progress, timelines=timelines)


def _with_threshold(opts, threshold: str) -> None:
    """--threshold: checked here, before any rank starts, and handed to rank 0 resolved."""
    import json

    from .analysis.costmodel import fit
    from .strategies import cond_threshold as T
    if "cond" not in opts.strategies:
        raise MmdiagError("--threshold sets the `cond` strategy's threshold, and cond is not replayed",
                          fix="add --strategy cond (or leave --threshold out)")
    opts.extra_env = {**opts.extra_env, T.OPTION_ENV: json.dumps(T.from_option(threshold, fit).to_dict())}


def _cond_threshold(strategy: str, threshold: str | None):
    """The threshold `apply cond` bakes in (mmdiag.strategies.cond_threshold.for_patch)."""
    from .analysis.costmodel import fit
    from .strategies import cond_threshold as T
    if strategy != "cond":
        if threshold is not None:
            raise MmdiagError(f"--threshold is `cond`'s option, not `{strategy}`'s", fix="leave --threshold out")
        return T.given(None)
    return T.given(T.for_patch(quick().get("runs_dir", "mmdiag-runs"), threshold, fit))


def quick() -> dict[str, Any]:
    """The [quick] table of profiles/defaults.toml: the default answer's size and budget."""
    from .workloads import defaults
    return defaults().get("quick", {})


def default_run_path(what: str) -> str:
    """Where a command keeps a Run nobody asked to save: [quick] runs_dir/<what>-<time>.json."""
    from .workflows.adaptive import default_path

    path = default_path(quick().get("runs_dir", "mmdiag-runs"), what)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise MmdiagError(f"cannot create the folder for the Run ({e.strerror})", where=path,
                          fix="run from a writable folder or give -o PATH") from None
    return path


def demo(profile: str | None = None, n: int | None = None, *, log: Log = _quiet,
         progress: Progress | None = None, **options: Any) -> Run:
    """Synthesize a workload profile (default: the default one; [demo] requests unless `n`)
    and replay it ([demo] repeats unless `repeat`: the table shows each strategy's noise)."""
    from .workloads import defaults
    demo_cfg = defaults().get("demo", {})
    profile = profile or default_profile()
    n = n or demo_cfg.get("requests") or quick().get("requests")   # minutes on 2 cores, not ten
    if options.get("repeat") is None:
        options["repeat"] = int(demo_cfg.get("repeat", 1))
    with tempfile.TemporaryDirectory(prefix="mmdiag-demo-") as tmp:
        path = os.path.join(tmp, "trace.jsonl")
        count, _ = synth_trace(path, profile, n)
        log(f"synthesized {count} requests of profile {profile!r}")
        return replay(path, progress=progress, **options)


def replay_default(tp: int | None = None, repeat: int | None = None, n: int | None = None,
                   profile: str | None = None, *, save: str | None = None, log: Log = _quiet) -> Run:
    """What `recommend` does with no Runs: replay the bundled default workload until the answer
    is decided (mmdiag.workflows.adaptive; `repeat`: exactly that many repeats instead), keep the
    Run at `save` (default: default_run_path) and return it (its `path` says where)."""
    from .workflows.adaptive import recommend_default

    res, _ = recommend_default(tp=tp, n=n, profile=profile, repeat=repeat, save=save, log=log)
    return res.run


# --- live profile ---------------------------------------------------------------------

def profile(pid: int, duration: float | None = None, rate: int | None = None, *, log: Log = _quiet,
            **kw: Any) -> Run:
    """Attach py-spy to a live server's scheduler ranks (or a replay) and attribute their time.
    `kw`: pyspy, raw_dir, rules, gil, speedscope (see mmdiag.live.profile.profile)."""
    from .live.profile import DEFAULT_DURATION_S, DEFAULT_RATE_HZ
    from .live.profile import profile as live_profile

    speedscope = kw.pop("speedscope", None)
    if speedscope:
        from . import render
        from .render.speedscope import SampledStacks
        check_writable(speedscope, "--speedscope")
        kw["on_stacks"] = lambda stacks: render.write(SampledStacks(stacks), speedscope, "speedscope",
                                                      what="--speedscope")
    return live_profile(pid, DEFAULT_DURATION_S if duration is None else duration, rate or DEFAULT_RATE_HZ,
                        log=log, **kw)


def top(pid: int, *, log: Log = _quiet, **kw: Any) -> Run | None:
    """The live per-rank view (mmdiag.live.top samples, mmdiag.render.top draws) until q,
    Ctrl-C or `duration`; a Run of the whole watch when `output` is given (the caller writes
    it). `kw`: rate, window_s, output, pyspy, rules, gil, duration."""
    from .live.top import top as live_top
    from .render.top import show
    return live_top(pid, show, log=log, **kw)


def profile_from_raw(files: list[str], rate: int | None = None, rules: str | None = None) -> Run:
    """The profile's analysis on py-spy raw files recorded elsewhere (one rank per file)."""
    from .live.profile import PYSPY_DEFAULT_RATE_HZ, from_raw
    return from_raw(list(files), rate=rate or PYSPY_DEFAULT_RATE_HZ, rules=rules)


# --- analysis -------------------------------------------------------------------------

def load_runs(runs: Iterable[Run | str]) -> list[Run]:
    return [r if isinstance(r, Run) else Run.load(r) for r in runs]


def recommend(runs: Iterable[Run | str], release: str | None = None, launch=None):
    """The patch to apply for the measured workload (a Recommendation); for `release`
    (default: the trace's SGLang version) also which release step pays, as the server is
    launched (`launch`: mmdiag.sglang.facts.Launch, one node by default)."""
    from .analysis.recommend import recommend as _recommend
    return _recommend(load_runs(runs), release=release, launch=launch)


def report(before: Run | str, after: Run | str, criteria: str | None = None, *, output: str | None = None,
           before_strategy: str | None = None, after_strategy: str | None = None,
           before_bench: list[str] | None = None, after_bench: list[str] | None = None):
    """Compare two Runs against acceptance criteria (a Report; `.passed`); write it to `output`
    (format by extension) when given. Live profiles take their throughput and latency from
    bench_serving result files (`before_bench`, `after_bench`: the runs each was taken during)."""
    from .analysis.criteria import load_criteria
    from .analysis.report import build_report
    from .render import check_output, write

    crit = load_criteria(criteria)
    if output:
        check_output(output, kind="Report")
    before_path, after_path = (x if isinstance(x, str) else "<run>" for x in (before, after))
    b = load_runs([before])[0]
    same = isinstance(after, str) and isinstance(before, str) and os.path.abspath(after) == os.path.abspath(before)
    a = b if same else load_runs([after])[0]
    if before_bench or after_bench:
        from .ingest.bench_serving import with_bench
        if not (before_bench and after_bench):
            raise MmdiagError("give bench_serving results for both sides (--before-bench and --after-bench)")
        b, a = with_bench(b, list(before_bench), before_path), with_bench(a, list(after_bench), after_path)
    rep = build_report(b, a, crit, before_path=before_path, after_path=after_path,
                       before_strategy=before_strategy, after_strategy=after_strategy)
    if output:
        write(rep, output)
    return rep


def verify(strategy: str, *, sglang_path: str | None = None, trace: str | None = None, tp: int | None = None,
           log: Log = _quiet, threshold: str | None = None, **kw: Any):
    """Replay the installed SGLang, apply `strategy`, replay again, judge (a VerifyResult).
    `kw`: criteria, output, repeat, timeout, enable_broadcast_flag, keep_runs, confirm, progress."""
    from .workflows.verify import verify as _verify

    tp = tp if tp is not None else default_tp()
    with _cond_threshold(strategy, threshold), tempfile.TemporaryDirectory(prefix="mmdiag-verify-") as tmp:
        if trace is None:
            trace = os.path.join(tmp, "trace.jsonl")
            synth_trace(trace)
            log(f"no --trace: replaying the default workload {default_profile()!r}")
        return _verify(sglang_path, strategy, trace, tp, kw.pop("criteria", None), kw.pop("output", None), **kw)


# --- the installed SGLang ----------------------------------------------------------------

def doctor(sglang_path: str | None = None, launch=None):
    """Which multimodal path an SGLang install runs, and any mmdiag patch (a Detection); with
    `launch` (mmdiag.sglang.facts.Launch), the transport and hashing that launch gets."""
    from .sglang.detect import detect, with_launch
    from .sglang.locate import locate
    return with_launch(detect(locate(sglang_path)), launch)


def doctor_server(pid: int, sglang_path: str | None = None):
    """The running server's effective settings (mmdiag.live.server.ServerSettings)."""
    from .live.server import read_server
    return read_server(pid, sglang_path)


def apply(strategy: str, *, sglang_path: str | None = None, dry_run: bool = False,
          confirm: Callable[[str], bool] | None = None, threshold: str | None = None):
    """Patch the installed SGLang with `strategy` (backup, manifest; an ApplyResult). `threshold`:
    cond's (bytes, 'never' or a Run file; default: SGLANG_MM_BROADCAST_THRESHOLD, else the
    crossover in the Run `mmdiag recommend` kept last, else the seed's example, labelled)."""
    from .sglang.apply import apply as _apply
    from .sglang.locate import locate
    with _cond_threshold(strategy, threshold):
        return _apply(locate(sglang_path), strategy, dry_run=dry_run, confirm=confirm)


def undo(*, sglang_path: str | None = None, dry_run: bool = False, confirm: Callable[[str], bool] | None = None):
    """Restore the files the last `apply` changed, byte for byte (an ApplyResult)."""
    from .sglang.apply import undo as _undo
    from .sglang.locate import locate
    return _undo(locate(sglang_path), dry_run=dry_run, confirm=confirm)
