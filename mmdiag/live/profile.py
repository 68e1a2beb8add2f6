"""`mmdiag profile`: attach to live scheduler ranks and attribute their time to phases.

    run = profile(pid, duration=30, rate=20)       # a Run, schema mmdiag.profile/1
    run = from_raw(["rank0.raw", "rank0.gil.raw", "rank1.raw"])

The Run has the contract's `ranks[]` (rank, pid, title, samples, phases_pct,
gil_held_pct, gil_wait_pct, cpu_pct, and phases_ms = share x window so analyses
written for replays read it) and the same ranks under `strategies.<path>`, where
<path> is the multimodal path seen on the stacks (commit, revert, ...). A live
profile measures no requests: `requests` is 0 and `throughput_rps` / latencies
are NaN / empty. Live details (py-spy version, window, per-phase GIL, threads,
processes found, ranks that exited) are under `config.live`.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import psutil

from ..run import RankResult, Run, StrategyResult
from ..vocab import PHASES, PROFILE_SCHEMA
from .attribute import RankProfile, RankSamples, attribute, detect_strategy, move_entry_idle
from .discover import discover
from .errors import LiveError, PySpyError, RawParseError
from .findings import findings
from .pyspy import (Recorder, check_version, classify_failure, dump, find_pyspy, read_raw,
                    start_recorder, stop_all)
from .rules import RuleSet, load_rules

# py-spy costs about 0.4 ms of CPU per sample of a scheduler rank (mostly process_vm_readv
# system time); 20 Hz keeps that (two recorders per rank) near 1% of a core per rank, and
# 30 s gives 600 samples per rank (a 50% share within +-2 points at 1 sigma).
DEFAULT_DURATION_S = 30.0
DEFAULT_RATE_HZ = 20
PYSPY_DEFAULT_RATE_HZ = 100  # py-spy record's own default (for --from-raw files)
ATTACH_TIMEOUT_S = 20.0
CPU_POLL_S = 0.5
_REGISTRY: set[int] = set()  # live recorders' pids (for tests: nothing left behind)


@dataclass
class _Cpu:
    """psutil CPU times of one rank, polled through the window (an exited rank keeps its last)."""
    pid: int
    t0: float = math.nan
    cpu0: float = math.nan
    t1: float = math.nan
    cpu1: float = math.nan
    threads0: dict[int, float] = field(default_factory=dict)
    threads1: dict[int, float] = field(default_factory=dict)
    alive: bool = True

    def poll(self, first: bool = False) -> None:
        if not self.alive:
            return
        try:
            p = psutil.Process(self.pid)
            ct = p.cpu_times()
            th = {t.id: t.user_time + t.system_time for t in p.threads()}
            now = time.monotonic()
            if p.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(self.pid)
        except psutil.Error:
            self.alive = False
            return
        if first:
            self.t0, self.cpu0, self.threads0 = now, ct.user + ct.system, th
        self.t1, self.cpu1, self.threads1 = now, ct.user + ct.system, th

    def cpu_pct(self) -> float | None:
        dt = self.t1 - self.t0
        return round(100.0 * (self.cpu1 - self.cpu0) / dt, 1) if dt > 0 else None

    def cpu_s(self) -> float:
        return 0.0 if math.isnan(self.cpu1) else self.cpu1 - self.cpu0

    def thread_pct(self) -> dict[int, float]:
        dt = self.t1 - self.t0
        if not dt > 0:
            return {}
        return {tid: round(100.0 * (c - self.threads0.get(tid, 0.0)) / dt, 1) for tid, c in self.threads1.items()}


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


def profile(pid: int, duration: float = DEFAULT_DURATION_S, rate: int = DEFAULT_RATE_HZ, *,
            pyspy: str | None = None, raw_dir: str | None = None, rules: str | None = None,
            gil: bool = True, on_window: Callable[[str], None] | None = None,
            speedscope: str | None = None, log: Callable[[str], None] | None = None) -> Run:
    """Attach to `pid` (server main process, one scheduler, or an mmdiag replay),
    sample every scheduler rank for `duration` seconds at `rate` Hz, return a Run.

    raw_dir: keep py-spy's raw files there (rank{r}.raw, rank{r}.gil.raw) for --from-raw.
    on_window: called with "start" / "end" as the common window opens and closes.
    Ctrl-C ends the window early and keeps what was sampled.
    """
    _check_args(duration, rate)
    log = log or (lambda s: None)
    spy = find_pyspy(pyspy)
    w = check_version(spy)
    if w:
        warnings.warn(w, stacklevel=2)
    ruleset = load_rules(rules)
    disc = discover(pid)
    log(disc.describe())
    # Every rank must be readable before the window opens (clear errors: not Python, ptrace).
    errs: dict[int, BaseException] = {}

    def _probe(p: int) -> None:
        try:
            dump(spy, p)
        except LiveError as e:
            errs[p] = e
    probes = [threading.Thread(target=_probe, args=(r.pid,)) for r in disc.ranks]
    for t in probes:
        t.start()
    for t in probes:
        t.join()
    if errs:
        raise next(iter(errs.values()))

    tmp = tempfile.mkdtemp(prefix="mmdiag-profile-")
    out_dir = tmp
    if raw_dir:
        try:
            os.makedirs(raw_dir, exist_ok=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LiveError(f"cannot create the directory ({e.strerror})", where=f"--raw-dir {raw_dir}") from None
        out_dir = raw_dir
    recorders: list[tuple[int, Recorder, Recorder | None]] = []
    cpus = {r.rank: _Cpu(r.pid) for r in disc.ranks}
    interrupted = False
    try:
        max_s = duration + ATTACH_TIMEOUT_S + 30
        spawned: dict[int, float] = {}  # id(recorder) -> monotonic time it was spawned
        t_spawn0 = time.monotonic()
        for r in disc.ranks:
            base = os.path.join(out_dir, f"rank{r.rank}.pid{r.pid}")
            a = start_recorder(spy, r.pid, base + ".raw", rate, max_s, gil=False, log_dir=tmp)
            spawned[id(a)] = time.monotonic()
            _REGISTRY.add(a.proc.pid)
            g = None
            if gil:
                g = start_recorder(spy, r.pid, base + ".gil.raw", rate, max_s, gil=True, log_dir=tmp)
                spawned[id(g)] = time.monotonic()
                _REGISTRY.add(g.proc.pid)
            recorders.append((r.rank, a, g))
        every = [x for _, a, g in recorders for x in (a, g) if x is not None]
        sampling: dict[int, float] = {}  # id(recorder) -> when it was first seen sampling (20 ms polls)
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while True:
            now = time.monotonic()
            for x in every:
                if id(x) not in sampling and x.started:
                    sampling[id(x)] = now
            if all(id(x) in sampling or x.proc.poll() is not None for x in every):
                break
            if now > deadline:
                raise PySpyError(f"py-spy {spy.version} did not start sampling within {ATTACH_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        start_skew = _start_skew(recorders, spawned, sampling, t_spawn0)
        failed = [x for x in every if not x.started]
        if failed:
            x = failed[0]
            raise classify_failure(x.stderr(), x.pid, spy)
        for c in cpus.values():
            c.poll(first=True)
        t0 = time.monotonic()
        if on_window:
            on_window("start")
        log(f"sampling {len(disc.ranks)} rank(s) at {rate} Hz for {duration:g} s "
            f"(py-spy {spy.version}, non-blocking)")
        end = t0 + duration
        next_poll = t0 + CPU_POLL_S
        try:
            while time.monotonic() < end:
                if all(x.proc.poll() is not None for x in every):
                    break  # every target exited
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                if time.monotonic() >= next_poll:
                    for c in cpus.values():
                        c.poll()
                    next_poll += CPU_POLL_S
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: ending the window early, keeping what was sampled")
        for c in cpus.values():
            c.poll()
        t1 = time.monotonic()
        if on_window:
            on_window("end")
        stop_all(every)
        window = t1 - t0
        samples: list[RankSamples] = []
        exited: list[dict] = []
        gil_missing: list[int] = []
        by_rank = {r.rank: r for r in disc.ranks}
        for rank, a, g in recorders:
            rp = by_rank[rank]
            if not os.path.exists(a.out):
                raise classify_failure(a.stderr(), rp.pid, spy)
            threads = read_raw(a.out, spy.version)
            gthreads = None  # no GIL figures: --no-gil, or the --gil recording is missing
            if g is not None:
                if os.path.exists(g.out):
                    gthreads = read_raw(g.out, spy.version)
                else:
                    gil_missing.append(rank)
            samples.append(RankSamples(rank, rp.pid, rp.title, threads, gthreads))
            if a.target_exited or not cpus[rank].alive:
                n = max((t.samples for t in threads.values()), default=0)
                exited.append({"rank": rank, "pid": rp.pid, "samples": n, "sampled_s": n / rate})
    finally:
        for _, a, g in recorders:
            for x in (a, g):
                if x is not None:
                    x.kill()
                    _REGISTRY.discard(x.proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)
    if all(sum(t.samples for t in s.threads.values()) == 0 for s in samples):
        raise LiveError(f"no samples were taken in the {window:.1f} s window"
                        + (" (every rank exited)" if len(exited) == len(samples) else ""),
                        fix="check the server is running and rerun")
    if speedscope:
        from .speedscope import write_speedscope
        try:
            write_speedscope(speedscope, samples)
        except OSError as e:
            raise LiveError(f"cannot write the speedscope file ({e.strerror or e})", where=f"--speedscope {speedscope}",
                            fix="free space or choose another path") from None
    notes = _ipc_note([r.pid for r in disc.ranks])
    if interrupted:
        notes.append(f"interrupted after {window:.1f} s of the {duration:g} s asked for")
    if gil_missing:
        notes.append(f"no GIL recording for rank(s) {', '.join(map(str, gil_missing))} (py-spy --gil wrote no "
                     "file): their GIL held/wait figures are not measured (shown as -), not 0%")
    skew = start_skew["max_s"]
    if skew is not None and window > 0 and skew > max(2.0 / rate, 0.02 * window):
        notes.append(f"py-spy recorders started up to {skew:.2f} s apart ({100.0 * skew / window:.1f}% of the "
                     f"{window:.1f} s window): ranks' samples cover slightly different spans")
    live = {"source": "live", "target_pid": disc.target_pid, "target_title": disc.target_title,
            "found": [{"pid": p, "title": t} for p, t in disc.seen],
            "duration_s": round(window, 3), "requested_duration_s": duration, "rate_hz": rate,
            "pyspy": {"path": spy.path, "version": spy.version}, "exited": exited, "interrupted": interrupted,
            "recorder_start_skew": start_skew, "gil_missing": gil_missing}
    return build_run(samples, ruleset, window, cpus, live, notes, exited)


def _start_skew(recorders, spawned: dict[int, float], sampling: dict[int, float], t0: float) -> dict[str, Any]:
    """When each recorder was spawned and first seen sampling, in seconds after the
    first spawn (recorders start one after another, so ranks' samples begin at
    slightly different times), and the largest gap between first samples."""
    rows = []
    for rank, a, g in recorders:
        for kind, x in (("idle", a), ("gil", g)):
            if x is None:
                continue
            s = sampling.get(id(x))
            rows.append({"rank": rank, "recorder": kind, "spawned_s": round(spawned[id(x)] - t0, 3),
                         "sampling_s": round(s - t0, 3) if s is not None else None})
    seen = [r["sampling_s"] for r in rows if r["sampling_s"] is not None]
    return {"max_s": round(max(seen) - min(seen), 3) if seen else None, "recorders": rows}


def build_run(samples: list[RankSamples], ruleset: RuleSet, window: float | None,
              cpus: dict[int, _Cpu] | None, live: dict[str, Any], notes: list[str],
              exited: list[dict] | None = None) -> Run:
    profiles: list[RankProfile] = [attribute(s, ruleset) for s in sorted(samples, key=lambda s: s.rank)]
    notes = list(notes) + move_entry_idle(profiles)
    strategy = detect_strategy(profiles, ruleset)
    cpu_pct = {p.rank: (cpus[p.rank].cpu_pct() if cpus else None) for p in profiles}
    ranks: list[RankResult] = []
    for p in profiles:
        wall = window if window is not None else p.samples / live.get("rate_hz", DEFAULT_RATE_HZ)
        ranks.append(RankResult(
            rank=p.rank, cpu_s=round(cpus[p.rank].cpu_s(), 3) if cpus else 0.0, wall_s=round(wall, 3),
            phases_ms={k: round(p.phases_pct[k] * wall * 10.0, 1) for k in PHASES},
            pid=p.pid, title=p.title, samples=p.samples, phases_pct=p.phases_pct,
            gil_held_pct=p.gil_held_pct, gil_wait_pct=p.gil_wait_pct, cpu_pct=cpu_pct[p.rank]))
    live = dict(live)
    live["strategy_detected"] = strategy
    live["rules"] = ruleset.source
    live["phase_gil_pct"] = {str(p.rank): p.phase_gil_pct for p in profiles}
    threads = {}
    for p in profiles:
        tpct = cpus[p.rank].thread_pct() if cpus else {}
        rows = [{"tid": p.pid, "name": "MainThread", "cpu_pct": tpct.get(p.pid) if p.pid else None}] if cpus else []
        for t in p.other_threads:
            rows.append(dict(t, cpu_pct=tpct.get(t["tid"])))
        threads[str(p.rank)] = rows
    live["threads"] = threads
    live["unmatched_top"] = {str(p.rank): p.top_other for p in profiles}
    dur = window if window is not None else max((r.wall_s for r in ranks), default=0.0)
    strat = StrategyResult(name=strategy, requests=0, duration_s=round(dur, 3), throughput_rps=math.nan,
                           latency_ms={}, ranks=ranks)
    tp = max(len(ranks), max((r.rank for r in ranks), default=-1) + 1)
    return Run(schema=PROFILE_SCHEMA, tp=tp, strategies={strategy: strat}, created=_now_iso(), host=_host(),
               config={"live": live}, ranks=ranks,
               findings=findings(profiles, strategy, cpu_pct, exited, notes))


_GIL_NAME = re.compile(r"[._-]gil(?=[._-]|$)", re.I)


def from_raw(files: list[str], rate: int = PYSPY_DEFAULT_RATE_HZ, rules: str | None = None) -> Run:
    """Analyse py-spy raw files recorded elsewhere, one rank per file:
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
    samples = []
    used: set[int] = set()
    for i, f in enumerate(main_files):
        base = os.path.basename(f)
        m = re.search(r"rank(\d+)", base) or re.search(r"TP(\d+)", base)
        rank = int(m.group(1)) if m else i
        if rank in used:
            rank = max(used) + 1
        used.add(rank)
        pm = re.search(r"pid(\d+)", base)
        threads = read_raw(f)
        if not threads:
            raise RawParseError("no samples in the file", where=f,
                                fix="record with `py-spy record --format raw --threads --idle -o FILE`")
        g = gil_files.get(base)
        gthreads = read_raw(g) if g else None
        samples.append(RankSamples(rank, int(pm.group(1)) if pm else None, base, threads, gthreads))
    live = {"source": "raw", "files": list(files), "rate_hz": rate, "target_pid": None}
    return build_run(samples, ruleset, None, None, live, [])
