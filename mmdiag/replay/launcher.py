"""Start N replay ranks as separate processes in one gloo group, watch them, and
leave nothing behind.

The ranks get the same environment torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so one worker serves both launchers. Each rank runs in
its own session (Ctrl-C reaches only this launcher, which then stops them in
order) and dies with the launcher even if the launcher is SIGKILLed
(PR_SET_PDEATHSIG, set in the worker). Nothing then cleans up after them, so each
replay first removes what a SIGKILLed launcher left: its job folder and its
shared-memory segments (sweep_orphans), as soon as the launcher that owned them is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

from ..errors import MmdiagError, ReplayError
from ..proc import on_sigterm
from ..mmpath import memory
from ..run import Run
from ..trace import scan
from ..units import MB, fmt_gb, fmt_mb
from ..mmpath import shm
from ..vocab import TRANSPORTS
from . import heartbeat
from .options import JOB_ENV, RankJob, ReplayOptions

GRACE_S = 5.0
JOB_DIR_PREFIX = "mmdiag-replay-"
# A job folder whose owner cannot be judged (a launcher in another PID namespace on a shared /tmp,
# or an older mmdiag's folder) is an orphan only when its ranks have not beaten for this long.
ORPHAN_S = 60.0
# Arrivals spread over longer than this: say up front that the replay waits them out.
LONG_SPAN_S = 600.0


def _launcher_pid(prefix: str) -> int | None:
    """The launcher PID in a segment prefix this module made (mmdiag-PID-PORT-)."""
    parts = prefix.split("-")
    return int(parts[1]) if len(parts) == 4 and parts[0] == "mmdiag" and parts[1].isdigit() else None


def sweep_orphans() -> int:
    """Remove the job folders (and their segments) of launchers that no longer run: a SIGKILLed
    launcher's ranks die with it (PDEATHSIG) before they can. The owner named in the segment
    prefix (shm.owner_prefix) decides at once; a live launcher's are left alone. Returns how
    many folders were removed."""
    import glob
    import shutil
    n = 0
    for d in glob.glob(os.path.join(tempfile.gettempdir(), JOB_DIR_PREFIX + "*")):
        try:
            with open(os.path.join(d, "job.json")) as f:
                job = json.load(f)
            prefix, tp = job["shm_prefix"], int(job["options"]["tp"])
            beats = heartbeat.read(os.path.join(d, "heartbeat"), tp)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue   # another user's, or a launcher still writing it
        gone = shm.owner_gone(prefix)
        if gone is None:   # cannot be judged here: the launcher's PID and its ranks' beats
            pid = (shm.owner_of(prefix) or (None,))[0] or _launcher_pid(prefix)
            gone = not (pid is None or pid == os.getpid() or _alive(pid)
                        or any(time.monotonic() - b < ORPHAN_S for b in beats if b))
        if not gone:
            continue
        shm.sweep(prefix)
        shutil.rmtree(d, ignore_errors=True)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ReplayError(f"port {port} is already in use", where="--port",
                              fix="pick another port or leave --port out to use a free one") from None


def _kill_all(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.time() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("mmdiag replay:"):
            return ln.split(": ", 1)[1]
    return lines[-1] if lines else ""


def replay(trace: str, opts: ReplayOptions, progress: Callable[[dict], None] | None = None) -> Run:
    """Replay `trace` through opts.tp rank processes; return the Run (and write
    opts.timeline if asked). Raises ReplayError naming the rank that failed."""
    if opts.transport is not None and opts.transport not in TRANSPORTS:
        raise MmdiagError(f"unknown transport {opts.transport!r}", where="--transport",
                          fix=f"choose from: {', '.join(TRANSPORTS)}")
    for flag, value, ok in [("--tp", opts.tp, opts.tp >= 1), ("--repeat", opts.repeat, opts.repeat >= 1),
                            ("--timeout", opts.timeout, opts.timeout > 0),
                            ("--max-recv-mb", opts.max_recv_mb, opts.max_recv_mb > 0),
                            ("--max-concurrency", opts.max_concurrency,
                             opts.max_concurrency is None or opts.max_concurrency >= 1)]:
        if not ok:
            raise MmdiagError(f"{flag} must be {'positive' if flag in ('--timeout', '--max-recv-mb') else 'at least 1'}, got {value}")
    header, stats = scan(trace)  # a malformed trace fails here, before any process starts
    est = check_memory(opts, header, stats)
    if stats.duration_s > LONG_SPAN_S:
        warnings.warn(f"the trace's arrivals span {stats.duration_s / 60:.0f} min and each strategy's replay waits "
                      "them out; for a shorter one: trace synth -n or --request-rate, trace from-dump --max-gap",
                      stacklevel=2)
    if opts.tp > (os.cpu_count() or 1):
        warnings.warn(f"--tp {opts.tp} is more than this machine's {os.cpu_count()} cores: "
                      "ranks share cores, so timings are pessimistic", stacklevel=2)
    if opts.port is not None:
        check_port(opts.port)
    port = opts.port or free_port()
    sweep_orphans()
    shm.sweep_dead_owners()   # segments of a dead replay whose job folder is gone (or never was: torchrun)
    with _sigterm_as_error(), tempfile.TemporaryDirectory(prefix=JOB_DIR_PREFIX) as tmp:
        out = os.path.join(tmp, "run.json")
        prog = os.path.join(tmp, "progress.json")
        tl_dir = os.path.join(tmp, "timeline") if opts.timeline else None
        if tl_dir:
            os.makedirs(tl_dir)
        prefix = shm.owner_prefix(port)
        job = RankJob(trace=os.path.abspath(trace), out=out, options=opts, progress_file=prog,
                      timeline_dir=tl_dir, heap_ceiling=est.heap_ceiling, shm_prefix=prefix)
        job.save(os.path.join(tmp, "job.json"))
        cmd = [sys.executable, "-m", "mmdiag.replay.worker"]
        if opts.impl == "sglang":
            from ..sglang.runtime import load_sglang_mm_path
            load_sglang_mm_path(opts.sglang_path)  # an unknown install fails here, in one line
        procs: list[subprocess.Popen] = []
        logs = [os.path.join(tmp, f"rank{r}.log") for r in range(opts.tp)]
        beats = os.path.join(tmp, "heartbeat")
        heartbeat.create(beats, opts.tp)
        try:
            for r in range(opts.tp):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(opts.tp),
                           LOCAL_WORLD_SIZE=str(opts.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           MMDIAG_PARENT_PID=str(os.getpid()), MMDIAG_LAUNCHER="mmdiag",
                           **{heartbeat.ENV: beats, JOB_ENV: os.path.join(tmp, "job.json")},
                           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **opts.extra_env)
                with open(logs[r], "w") as log:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
            _watch(procs, logs, prog, beats, progress)
        except BaseException:
            _kill_all(procs)
            raise
        finally:
            shm.sweep(prefix)  # what a killed rank left in /dev/shm
        run = Run.load(out)
        if tl_dir:
            from ..render.timeline import combine_timeline
            try:
                combine_timeline([os.path.join(tl_dir, f"rank{r}.json") for r in range(opts.tp)], opts.timeline)
            except MmdiagError as e:  # the measurements stand without the picture
                warnings.warn(f"no timeline: {e.one_line()}", stacklevel=2)
        return run


def check_memory(opts: ReplayOptions, header, stats) -> memory.MemoryEstimate:
    """Refuse, before any rank starts, a replay that cannot fit in this machine's memory."""
    conc = opts.max_concurrency
    if conc is None and header.arrival.get("mode") == "closed":
        conc = int(header.arrival["max_concurrency"])
    from ..replay.scheduler import MAX_PENDING
    from ..strategies import REGISTRY
    background = [n for n in opts.strategies if getattr(REGISTRY.get(n), "cost_class", None) == "background"]
    shared = "shm" in (opts.transport, *(REGISTRY[n].transport for n in opts.strategies))

    def at(tp: int, recv: int, conc, backlog: int) -> memory.MemoryEstimate:
        return memory.estimate(tp, stats.mm_bytes, stats.max_request_bytes, recv, conc,
                               backlog_requests=backlog, shared_copy=shared)
    est = at(opts.tp, int(opts.max_recv_mb * MB), conc, MAX_PENDING if background else 0)
    avail = memory.available_bytes()
    if est.total > avail:
        raise MmdiagError(f"this replay needs {est.explain()}, more than the {fmt_gb(avail)} "
                          "this machine has available", where=f"--tp {opts.tp}",
                          fix=_memory_fix(opts.tp, est, avail, stats.max_request_bytes, background, at))
    return est


def _memory_fix(tp: int, est: memory.MemoryEstimate, avail: int, max_request: int, background: list[str], at) -> str:
    """Only the changes that can help: a single request too large for the machine is beyond every option."""
    if at(1, max_request, 1, 0).total > avail:
        return (f"the trace's largest request alone carries {fmt_mb(max_request)} of features, more than any "
                "setting fits here: replay a trace with smaller features, or on a machine with more memory")
    fixes = []
    fits = [t for t in range(tp - 1, 0, -1) if at(t, est.in_flight, None, est.backlog).total <= avail]
    if fits:
        fixes.append(f"lower --tp (to {fits[0]} or less)")
    elif tp > 1:
        fixes.append("lower --tp")
    if est.in_flight > max_request:
        fixes.append("lower --max-recv-mb or --max-concurrency")
    if background:
        fixes.append(f"leave out {' and '.join(background)} (a background strategy queues a backlog)")
    return ", or ".join(fixes) or "replay on a machine with more memory"


def _sigterm_as_error():
    """SIGTERM stops a replay the way Ctrl-C does: ranks stopped, temporary files removed."""
    return on_sigterm("terminated by SIGTERM; every rank was stopped, no Run was written")


def _blame(procs, codes, logs, beats, low_memory: bool) -> ReplayError:
    """Name the rank that caused a failure: one killed by a signal; else one whose
    heartbeat stopped (its peers' collectives timed out waiting for it); else one
    whose last words are not a failed collective."""
    stale = heartbeat.stale_ranks(beats, len(procs), [c is None for c in codes])
    bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
    killed = [(r, c) for r, c in bad if c < 0]
    fix = "the other ranks were stopped; rerun with MMDIAG_DEBUG=1 to see every rank's log"
    if not killed and stale:
        r, age = stale[0]
        state = ""
        with contextlib.suppress(Exception):
            import psutil
            if psutil.Process(procs[r].pid).status() == psutil.STATUS_STOPPED:
                state = ", the process is stopped (SIGSTOP?)"
        waiting = ", ".join(str(k) for k, _ in bad) or "the others"
        return ReplayError(f"rank {r} stopped making progress (no heartbeat for {age:.0f} s{state}); "
                           f"rank {waiting} gave up waiting for it in a collective", fix=fix)
    bad.sort(key=lambda rc: (rc[1] > 0, "collective failed" in _last_line(logs[rc[0]])))
    r, c = bad[0]
    how = f"was killed by signal {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
    detail = _last_line(logs[r])
    if c == -signal.SIGKILL and low_memory:
        how += " (memory was nearly exhausted: likely the kernel's OOM killer)"
        fix = "lower --tp, --max-recv-mb or --max-concurrency; " + fix
    return ReplayError(f"rank {r} {how}" + (f" ({detail})" if detail else ""), fix=fix)


def _watch(procs, logs, prog, beats, progress) -> None:
    failed_at: float | None = None
    low_memory = False
    while True:
        codes = [p.poll() for p in procs]
        low_memory = low_memory or memory.memory_low()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.time()
            error = _blame(procs, codes, logs, beats, low_memory)
        if all(c is not None for c in codes) and failed_at is None:
            return
        if failed_at is not None:
            # The others notice through their collectives; give them a moment, then stop them.
            if all(c is not None for c in codes) or time.time() - failed_at > GRACE_S:
                _kill_all(procs)
                if os.environ.get("MMDIAG_DEBUG"):
                    for k, path in enumerate(logs):
                        with open(path, errors="replace") as f:
                            sys.stderr.write(f"--- rank {k} log ---\n{f.read()}")
                raise error
        if progress is not None:
            try:
                with open(prog) as f:
                    progress(json.load(f))
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
