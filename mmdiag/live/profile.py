"""`mmdiag profile`: attach to live scheduler ranks and attribute their time to phases.

    run = profile(pid)                             # a Run, schema mmdiag.profile/2
    run = from_raw(["rank0.raw", "rank0.gil.raw", "rank1.raw"])

The Run has its ranks once, under `strategies.<path>`, where <path> is the
multimodal path seen on the stacks (commit, revert, ...): each with the contract's
rank, cpu_s, wall_s and phases_ms (= share x window: the same wall time per phase a
replay times), and its `profile` part (mmdiag.run.ProfileRank: pid, title,
samples, phases_pct with their 95% half-widths, GIL held/wait, CPU, per-phase GIL,
threads). A live profile measures no requests: `requests` is 0 and
`throughput_rps` null. How it was taken (py-spy version, window, processes found,
ranks that exited, the collection's notes) is `live` (mmdiag.run.LiveInfo).
Findings are computed from the Run when shown (mmdiag.analysis.findings).

From a server's main PID the tokenizer side (the main process or its tokenizer workers,
discover.tokenizer_side) is sampled in the same window, and the multimodal requests of the
window are counted (requests.py): the Run's `stages` and `bottleneck` (stages.py).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any, Callable

import psutil

from ..proc import on_sigterm
from ..run import LiveInfo, ProfileRank, RankResult, Run, StrategyResult
from ..vocab import PHASES, PROFILE_SCHEMA
from .attribute import RankProfile, RankSamples, attribute, detect_strategy, move_entry_idle
from .discover import discover
from .errors import LiveError, PySpyError, RawParseError
from .header import config_lines
from .pyspy import check_version, dump, find_pyspy, read_raw
from .requests import SegmentCounter
from .rules import RuleSet, load_rules
from .sampler import REGISTRY, CpuMeter, Sampler, rank_samples, reattach_gaps_s, span_s
from .stages import bottleneck, build_stages
from .stats import duration_for, t95

# Defaults chosen so every phase share's 95% interval is within +/-2 points (README,
# "How precise a profile is"): 100 Hz for 30 s is 3000 samples per rank, +/-1.8 points
# for a share of 50% if samples were independent; blocks of 2 s give 15 blocks for the
# batch-means estimate of the real (autocorrelated) spread. py-spy reads the target
# without pausing it (--nonblocking); faster sampling costs py-spy CPU linearly while
# autocorrelated samples add little precision.
DEFAULT_DURATION_S = 30.0
DEFAULT_RATE_HZ = 100
DEFAULT_BLOCK_S = 2.0
MIN_BLOCKS, MIN_BLOCK_S = 5, 1.0
TARGET_CI_PTS = 2.0
PYSPY_DEFAULT_RATE_HZ = 100  # py-spy record's own default (for --from-raw files)
PROBE_TRIES = 3  # py-spy dump attempts per rank before the window
ATTACH_TIMEOUT_S = 60.0  # a loaded host can take long to let py-spy in
CPU_POLL_S = 0.5
# Ctrl-C ends the window as py-spy record does (stop, keep what was sampled, say so, exit 0);
# the block in flight is kept only if py-spy writes it within this, so a loaded host still
# ends in a few seconds (the window's end otherwise waits up to Sampler.stop's 10 s).
INTERRUPT_GRACE_S = 2.0
_REGISTRY = REGISTRY  # live recorders' pids (for tests: nothing left behind)
TERMINATED = "terminated by SIGTERM; py-spy was stopped and nothing was written"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _host() -> dict[str, Any]:
    import platform
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform()}


def _check_args(duration: float, rate: int) -> None:
    if not (duration > 0):
        raise LiveError(f"--duration must be more than 0 seconds, got {duration}")
    if not (1 <= rate <= 1000):
        raise LiveError(f"--rate must be 1..1000 samples per second, got {rate}")


def _ipc_note(pids: list[int]) -> list[str]:
    for pid in pids:
        try:
            env = psutil.Process(pid).environ()
        except psutil.Error:
            continue
        if env.get("SGLANG_USE_CUDA_IPC_TRANSPORT") == "1":
            return ["SGLANG_USE_CUDA_IPC_TRANSPORT=1: features travel as CUDA IPC handles, not CPU tensors; "
                    "mmdiag's replay models the CPU path only"]
    return []


def block_length(duration: float, block_s: float = DEFAULT_BLOCK_S) -> float:
    """Blocks of block_s, shorter for a short window so it still has MIN_BLOCKS
    (Student t on 1 degree of freedom is 12.7: two blocks say next to nothing)."""
    return min(block_s, max(MIN_BLOCK_S, duration / MIN_BLOCKS))


def _probe(spy, ranks) -> None:
    """Every rank must be readable before the window opens (clear errors: not Python, ptrace)."""
    errs: dict[int, BaseException] = {}

    def one(p: int) -> None:
        for attempt in range(PROBE_TRIES):
            try:
                dump(spy, p)
                errs.pop(p, None)
                return
            except LiveError as e:
                errs[p] = e
                # A non-blocking read of a running process can fail now and then (py-spy:
                # "Failed to get stack traces"): try again; a stated reason (ptrace) is final.
                if type(e) is not PySpyError:
                    return
                time.sleep(0.2 * (attempt + 1))
    # Daemons: a SIGTERM while they run must not keep mmdiag alive until their dumps end.
    probes = [threading.Thread(target=one, args=(r.pid,), daemon=True) for r in ranks]
    for t in probes:
        t.start()
    for t in probes:
        t.join()
    if errs:
        raise next(iter(errs.values()))


def _out_dir(raw_dir: str | None, tmp: str) -> str:
    if not raw_dir:
        return tmp
    try:
        os.makedirs(raw_dir, exist_ok=True)
    except OSError as e:
        raise LiveError(f"cannot create the directory ({e.strerror})", where=f"--raw-dir {raw_dir}") from None
    return raw_dir


def _sample_window(sampler: Sampler, cpus: dict[int, CpuMeter], duration: float,
                   on_window: Callable[[str], None] | None, tick: Callable[[], Any] | None = None) -> tuple[float, bool]:
    """Run the window: poll the chains (each block is read as it ends) and CPU
    times until `duration` is up, every rank exited, or Ctrl-C. Returns (seconds, interrupted)."""
    for c in cpus.values():
        c.poll(first=True)
    t0 = time.monotonic()
    if on_window:
        on_window("start")
    end, next_poll = t0 + duration, t0 + CPU_POLL_S
    # Ctrl-C is taken as a flag the loop reads, not as an exception that could land anywhere
    # (inside the spawn of the next py-spy block, say): the window ends at once, every time.
    # A SIGINT the caller ignores (a background job of a script) stays ignored.
    ctrl_c = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    take = main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, lambda *_: ctrl_c.set()) if take else None
    try:
        while time.monotonic() < end and not sampler.all_exited() and not ctrl_c.is_set():
            sampler.poll()
            ctrl_c.wait(min(0.05, max(0.0, end - time.monotonic())))
            if time.monotonic() >= next_poll:
                for c in cpus.values():
                    c.poll()
                if tick:
                    tick()
                next_poll += CPU_POLL_S
    except KeyboardInterrupt:  # raised before the handler was set, or off the main thread
        ctrl_c.set()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C raises again (exit 130)
    interrupted = ctrl_c.is_set()
    for c in cpus.values():
        c.poll()
    t1 = time.monotonic()
    if on_window:
        on_window("end")
    # a second Ctrl-C while the last block is collected ends mmdiag with nothing written (exit 130)
    sampler.stop(grace=INTERRUPT_GRACE_S) if interrupted else sampler.stop()
    return t1 - t0, interrupted


def profile(pid: int, duration: float = DEFAULT_DURATION_S, rate: int = DEFAULT_RATE_HZ, *,
            pyspy: str | None = None, raw_dir: str | None = None, rules: str | None = None,
            gil: bool = True, on_window: Callable[[str], None] | None = None,
            on_stacks: Callable[[list[RankSamples]], None] | None = None,
            log: Callable[[str], None] | None = None, block_s: float = DEFAULT_BLOCK_S) -> Run:
    """Attach to `pid` (server main process, one scheduler, or an mmdiag replay),
    sample every scheduler rank for `duration` seconds at `rate` Hz, return a Run.

    raw_dir: keep py-spy's raw files there (rank{r}.pid{p}.b{k}.raw, .gil.raw), for --from-raw.
    on_window: called with "start" / "end" as the common window opens and closes.
    on_stacks: called with every rank's sampled stacks (with line numbers) before the Run is
    built (api writes them as a speedscope file).
    Ctrl-C ends the window early and keeps what was sampled, as py-spy record does (the CLI
    shows and writes it, exit 0); a Ctrl-C before the window opens, or a second one, raises
    KeyboardInterrupt (nothing written, exit 130). SIGTERM (in the main thread) stops py-spy,
    removes the temporary files and raises Terminated (exit 143).
    """
    with on_sigterm(TERMINATED):
        return _profile(pid, duration, rate, pyspy, raw_dir, rules, gil, on_window, on_stacks, log, block_s)


def _profile(pid, duration, rate, pyspy, raw_dir, rules, gil, on_window, on_stacks, log, block_s) -> Run:
    _check_args(duration, rate)
    log = log or (lambda s: None)
    # The intervals' t quantile imports scipy.stats: seconds, up to 15 on a loaded 2-core host.
    # Import it while the ranks are found and probed, never after the window (Ctrl-C would wait).
    stats_ready = threading.Thread(target=t95, args=(MIN_BLOCKS - 1,), daemon=True)
    stats_ready.start()
    spy = find_pyspy(pyspy)
    w = check_version(spy)
    if w:
        warnings.warn(w, stacklevel=2)
    ruleset = load_rules(rules)
    disc = discover(pid)
    log(disc.describe())
    _probe(spy, disc.processes)
    stats_ready.join()
    block_s = block_length(duration, block_s)
    tmp = tempfile.mkdtemp(prefix="mmdiag-profile-")
    counter = SegmentCounter([t.pid for t in disc.tokenizers])
    counted: dict[str, int] = {}

    def window_edge(w: str) -> None:  # the request count over exactly the sampled window
        counted[w] = counter.read()
        if on_window:
            on_window(w)
    try:
        sampler = Sampler(spy, disc.processes, rate, block_s, _out_dir(raw_dir, tmp), tmp, gil, lines=on_stacks is not None)
        cpus = {r.rank: CpuMeter(r.pid) for r in disc.processes}
        try:
            counting = bool(disc.tokenizers) and counter.start()
            sampler.start(ATTACH_TIMEOUT_S)
            log(f"sampling {len(disc.ranks)} rank(s)" + (f" and {len(disc.tokenizers)} tokenizer process(es)"
                if disc.tokenizers else "") + f" at {rate} Hz for {duration:g} s in blocks of "
                f"{block_s:g} s (py-spy {spy.version}, non-blocking)")
            window, interrupted = _sample_window(sampler, cpus, duration, window_edge, counter.read)
        finally:
            sampler.kill()
            counter.close()
        if interrupted:
            log("interrupted: ended the window early, keeping what was sampled")
        samples, exited = [], []
        for ch in sampler.chains:
            r = ch.rank
            samples.append(rank_samples(r, ch.blocks, rate))
            if ch.exited or not cpus[r.rank].alive:
                n = max((t.samples for t in samples[-1].threads.values()), default=0)
                exited.append({"rank": r.rank, "who": r.label, "pid": r.pid, "samples": n, "sampled_s": n / rate})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if all(sum(t.samples for t in s.threads.values()) == 0 for s in samples):
        raise LiveError(f"no samples were taken in the {window:.1f} s window"
                        + (" (every rank exited)" if len(exited) == len(samples) else ""),
                        fix="check the server is running and rerun")
    if on_stacks:
        on_stacks(samples)
    notes = _window_notes(disc, duration, window, interrupted, sampler.start_skew()["max_s"], rate)
    requests = counted["end"] - counted["start"] if counting and "end" in counted else None
    if disc.tokenizers and not requests:
        notes.append("no multimodal requests counted in the window (no shared-memory segment created by the "
                     "tokenizer side" + (f": {counter.error}" if counter.error else "") + "): the stage verdict "
                     "compares busy shares only")
    live = {"source": "live", "target_pid": disc.target_pid, "target_title": disc.target_title,
            "config": _config(disc), "found": [{"pid": p, "title": t} for p, t in disc.seen],
            "duration_s": round(window, 3), "requested_duration_s": duration, "rate_hz": rate,
            "block_s": block_s, "blocks": {str(ch.rank.rank): len(ch.blocks) for ch in sampler.chains},
            # where a rank's samples fall short of span x rate: between blocks, or inside them (py-spy behind)
            "span_s": {str(ch.rank.rank): round(span_s(ch.blocks), 3) for ch in sampler.chains},
            "reattach_gaps_s": {str(ch.rank.rank): round(reattach_gaps_s(ch.blocks), 3) for ch in sampler.chains},
            "pyspy": {"path": spy.path, "version": spy.version}, "exited": exited, "interrupted": interrupted,
            "recorder_start_skew": sampler.start_skew()}
    return build_run(samples, ruleset, window, cpus, live, notes, exited, gil=gil, requests=requests or None)


def _config(disc) -> dict[str, Any]:
    lines = config_lines(disc)
    return {"summary": "; ".join(lines), "lines": lines}


def _window_notes(disc, duration, window, interrupted, skew, rate) -> list[str]:
    notes = _ipc_note([r.pid for r in disc.ranks])
    if interrupted:
        notes.append(f"interrupted after {window:.1f} s of the {duration:g} s asked for")
    if skew is not None and window > 0 and skew > max(2.0 / rate, 0.02 * window):
        notes.append(f"py-spy recorders started up to {skew:.2f} s apart ({100.0 * skew / window:.1f}% of the "
                     f"{window:.1f} s window): ranks' samples cover slightly different spans")
    return notes


def gil_notes(profiles: list[RankProfile], gil: bool) -> tuple[list[int], list[str]]:
    """The ranks whose GIL figures were asked for and not measured, and why (notes)."""
    none = [p.rank for p in profiles if p.gil_note is None and p.gil_held_pct is None]
    notes = [f"rank {p.rank}: {p.gil_note}" for p in profiles if p.gil_note]
    if gil and none:
        notes.append(f"no GIL recording for rank(s) {', '.join(map(str, none))} (py-spy --gil wrote no file)")
    missing = [p.rank for p in profiles if p.gil_held_pct is None] if gil else []
    if missing:
        notes.append(f"GIL held/wait of rank(s) {', '.join(map(str, missing))} are not measured (shown as -), not 0%")
    return missing, notes


def precision_notes(profiles: list[RankProfile], window: float | None) -> list[str]:
    """Say when an interval is wider than the target, and what window would meet it."""
    wide = [(h, p.rank, k) for p in profiles for k, h in (p.phases_ci or {}).items() if h is not None and h > TARGET_CI_PTS]
    if not wide:
        return []
    h, rank, phase = max(wide)
    s = (f"precision: {len(wide)} share(s) have a 95% interval wider than +/-{TARGET_CI_PTS:g} points "
         f"(widest: rank {rank} {phase} +/-{h:.1f})")
    if window:
        s += f"; a window of about {duration_for(h, window, TARGET_CI_PTS):.0f} s would bring them within it"
    return [s]


def build_run(samples: list[RankSamples], ruleset: RuleSet, window: float | None,
              cpus: dict[int, CpuMeter] | None, live: dict[str, Any], notes: list[str],
              exited: list[dict] | None = None, gil: bool = False, requests: int | None = None) -> Run:
    """gil: GIL figures were recorded (or given): say which ranks lack them, and why.
    Samples of negative rank are the tokenizer side (stages.py); requests: multimodal
    requests counted over the window (mmdiag.live.requests), for the stage verdict."""
    tokenizers = [s for s in samples if s.rank < 0]
    samples = [s for s in samples if s.rank >= 0]
    profiles: list[RankProfile] = [attribute(s, ruleset) for s in sorted(samples, key=lambda s: s.rank)]
    gil_missing, gnotes = gil_notes(profiles, gil)
    live = dict(live, gil_missing=gil_missing)
    notes = list(notes) + gnotes + move_entry_idle(profiles) + precision_notes(profiles, window)
    # The tokenizer side's frames count too: where it hashes (SGLANG_MM_PRECOMPUTE_HASH), the path is precompute.
    strategy = detect_strategy(profiles + [attribute(t, ruleset) for t in tokenizers], ruleset)
    cpu_pct = {p.rank: (cpus[p.rank].cpu_pct() if cpus else None) for p in profiles}
    ranks: list[RankResult] = []
    for p in profiles:
        wall = window if window is not None else p.samples / live.get("rate_hz", DEFAULT_RATE_HZ)
        tpct = cpus[p.rank].thread_pct() if cpus else {}
        threads = [{"tid": p.pid, "name": "MainThread", "cpu_pct": tpct.get(p.pid) if p.pid else None}] if cpus else []
        threads += [dict(t, cpu_pct=tpct.get(t["tid"])) for t in p.other_threads]
        ranks.append(RankResult(
            rank=p.rank, cpu_s=round(cpus[p.rank].cpu_s(), 3) if cpus else 0.0, wall_s=round(wall, 3),
            phases_ms={k: round(p.phases_pct[k] * wall * 10.0, 1) for k in PHASES},
            profile=ProfileRank(pid=p.pid, title=p.title, samples=p.samples, phases_pct=p.phases_pct,
                                phases_ci=p.phases_ci, gil_held_pct=p.gil_held_pct, gil_held_ci=p.gil_held_ci,
                                gil_wait_pct=p.gil_wait_pct, gil_wait_ci=p.gil_wait_ci, cpu_pct=cpu_pct[p.rank],
                                phase_gil_pct=p.phase_gil_pct, wait_pct=p.wait_pct, wait_ci=p.wait_ci,
                                threads=threads, unmatched_top=p.top_other, phases_spread=p.phases_spread)))
    dur = window if window is not None else max((r.wall_s for r in ranks), default=0.0)
    strat = StrategyResult(name=strategy, requests=0, duration_s=round(dur, 3), throughput_rps=None,
                           latency_ms={}, ranks=ranks)
    tp = max(len(ranks), max((r.rank for r in ranks), default=-1) + 1)
    info = LiveInfo(**{k: v for k, v in live.items() if k in LiveInfo.__dataclass_fields__},
                    strategy_detected=strategy, rules=ruleset.source, notes=notes)
    stages = build_stages(tokenizers, profiles, ruleset, requests, dur) if tokenizers else []
    return Run(schema=PROFILE_SCHEMA, tp=tp, strategies={strategy: strat}, created=_now_iso(), host=_host(),
               live=info, stages=stages, bottleneck=bottleneck(stages, requests, dur))


_GIL_NAME = re.compile(r"[._-]gil(?=[._-]|$)", re.I)


def from_raw(files: list[str], rate: int = PYSPY_DEFAULT_RATE_HZ, rules: str | None = None) -> Run:
    """Analyse py-spy raw files recorded elsewhere, one rank per file, or several
    files per rank (consecutive blocks, as --raw-dir keeps them, give intervals):
    `py-spy record --format raw --threads --idle -o rank0.raw --pid PID` (and,
    for GIL figures, the same with --gil into rank0.gil.raw). The rank is read
    from `rank<N>` or `TP<N>` in the file name, else the order given; the PID
    from `pid<N>`. `rate` (the -r used) turns sample counts into seconds."""
    if not files:
        raise LiveError("--from-raw needs at least one file")
    ruleset = load_rules(rules)
    main_files, gil_files = [], {}
    for f in files:
        base = os.path.basename(f)
        if _GIL_NAME.search(base):
            gil_files[_GIL_NAME.sub("", base)] = f
        else:
            main_files.append(f)
    if not main_files:
        raise RawParseError("only --gil recordings given; the phase shares need the --idle recording of each rank",
                            where=files[0], fix="add rank<N>.raw next to rank<N>.gil.raw")
    by_rank: dict[int, list[str]] = {}
    tok: dict[int, list[str]] = {}  # tokenizer<K> files (--raw-dir keeps the tokenizer side so)
    for i, f in enumerate(main_files):
        t = re.match(r"tokenizer(\d+)\.", os.path.basename(f))
        if t:
            tok.setdefault(-1 - int(t.group(1)), []).append(f)
            continue
        m = re.search(r"rank(\d+)", os.path.basename(f)) or re.search(r"TP(\d+)", os.path.basename(f))
        by_rank.setdefault(int(m.group(1)) if m else -1 - i, []).append(f)
    samples = []
    for key, fs in sorted(by_rank.items(), key=lambda kv: (kv[0] < 0, abs(kv[0]))):
        rank = key if key >= 0 else max([k for k in by_rank if k >= 0] + [s.rank for s in samples] + [-1]) + 1
        blocks = []
        for f in sorted(fs):  # rank0.pid7.b0000.raw, b0001, ...: consecutive blocks
            threads = read_raw(f)
            if not threads:
                raise RawParseError("no samples in the file", where=f,
                                    fix="record with `py-spy record --format raw --threads --idle -o FILE`")
            g = gil_files.get(os.path.basename(f))
            blocks.append((threads, read_raw(g) if g else None))
        pm = re.search(r"pid(\d+)", os.path.basename(fs[0]))
        title = os.path.basename(fs[0]) if len(fs) == 1 else f"{os.path.basename(fs[0])} (+{len(fs) - 1} blocks)"
        # The blocks given with a --gil file are those recorded with one (mmdiag's own
        # --raw-dir has one every GIL_EVERY blocks): the GIL figures come from them.
        samples.append(RankSamples.from_blocks(rank, int(pm.group(1)) if pm else None, title, blocks,
                                               gil_planned=sum(g is not None for _, g in blocks)))
    for rank, fs in sorted(tok.items(), reverse=True):
        pm = re.search(r"pid(\d+)", os.path.basename(fs[0]))
        samples.append(RankSamples.from_blocks(rank, int(pm.group(1)) if pm else None, "tokenizer",
                                               [(read_raw(f), None) for f in sorted(fs)]))
    live = {"source": "raw", "files": list(files), "rate_hz": rate, "target_pid": None}
    return build_run(samples, ruleset, None, None, live, [], gil=bool(gil_files))
