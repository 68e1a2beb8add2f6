"""Start N replay ranks as separate processes in one gloo group, watch them, and
leave nothing behind.

The ranks get the same environment torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so one worker serves both launchers. Each rank runs in
its own session (Ctrl-C reaches only this launcher, which then stops them in
order) and dies with the launcher even if the launcher is SIGKILLed
(PR_SET_PDEATHSIG, set in the worker).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MmdiagError, ReplayError
from ..run import Run
from ..trace import scan

GRACE_S = 5.0


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


@dataclass
class ReplayOptions:
    tp: int
    strategies: list[str]
    timeout: float = 60.0
    forward_ms: float = 0.0
    max_concurrency: int | None = None
    max_recv_mb: float = 256.0
    repeat: int = 1
    port: int | None = None
    timeline: str | None = None
    # "sglang": run the installed SGLang's own mm path (sglang_path, or this interpreter's).
    impl: str = "mmdiag"
    sglang_path: str | None = None
    enable_broadcast_flag: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


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
    for flag, value, ok in [("--tp", opts.tp, opts.tp >= 1), ("--repeat", opts.repeat, opts.repeat >= 1),
                            ("--timeout", opts.timeout, opts.timeout > 0),
                            ("--max-recv-mb", opts.max_recv_mb, opts.max_recv_mb > 0),
                            ("--max-concurrency", opts.max_concurrency,
                             opts.max_concurrency is None or opts.max_concurrency >= 1)]:
        if not ok:
            raise MmdiagError(f"{flag} must be {'positive' if flag in ('--timeout', '--max-recv-mb') else 'at least 1'}, got {value}")
    scan(trace)  # a malformed trace fails here, before any process starts
    if opts.tp > (os.cpu_count() or 1):
        warnings.warn(f"--tp {opts.tp} is more than this machine's {os.cpu_count()} cores: "
                      "ranks share cores, so timings are pessimistic", stacklevel=2)
    if opts.port is not None:
        check_port(opts.port)
    port = opts.port or free_port()
    with tempfile.TemporaryDirectory(prefix="mmdiag-replay-") as tmp:
        out = os.path.join(tmp, "run.json")
        prog = os.path.join(tmp, "progress.json")
        tl_dir = os.path.join(tmp, "timeline") if opts.timeline else None
        if tl_dir:
            os.makedirs(tl_dir)
        cmd = [sys.executable, "-m", "mmdiag.replay.worker", os.path.abspath(trace), "--out", out,
               "--timeout", str(opts.timeout), "--forward-ms", str(opts.forward_ms),
               "--repeat", str(opts.repeat), "--max-recv-mb", str(opts.max_recv_mb),
               "--progress-file", prog]
        for s in opts.strategies:
            cmd += ["--strategy", s]
        if opts.max_concurrency is not None:
            cmd += ["--max-concurrency", str(opts.max_concurrency)]
        if tl_dir:
            cmd += ["--timeline-dir", tl_dir]
        if opts.impl == "sglang":
            from ..sglang.runtime import load_sglang_mm_path
            load_sglang_mm_path(opts.sglang_path)  # an unknown install fails here, in one line
            cmd += ["--impl", "sglang"] + (["--sglang", opts.sglang_path] if opts.sglang_path else [])
            if opts.enable_broadcast_flag:
                cmd += ["--enable-broadcast-flag"]
        procs: list[subprocess.Popen] = []
        logs = [os.path.join(tmp, f"rank{r}.log") for r in range(opts.tp)]
        try:
            for r in range(opts.tp):
                env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(opts.tp),
                           LOCAL_WORLD_SIZE=str(opts.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           MMDIAG_PARENT_PID=str(os.getpid()), MMDIAG_LAUNCHER="mmdiag",
                           OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **opts.extra_env)
                with open(logs[r], "w") as log:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
            _watch(procs, logs, prog, opts, progress)
        except BaseException:
            _kill_all(procs)
            raise
        run = Run.load(out)
        if tl_dir:
            from ..render.timeline import combine_timeline
            try:
                combine_timeline([os.path.join(tl_dir, f"rank{r}.json") for r in range(opts.tp)], opts.timeline)
            except MmdiagError as e:  # the measurements stand without the picture
                warnings.warn(f"no timeline: {e.one_line()}", stacklevel=2)
        return run


def _watch(procs, logs, prog, opts: ReplayOptions, progress) -> None:
    failed: tuple[int, int] | None = None
    failed_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                # Blame the rank that died, not a peer whose collective failed because of it:
                # a signal first, then a rank whose last words are not a failed collective.
                bad.sort(key=lambda rc: (rc[1] > 0, "collective failed" in _last_line(logs[rc[0]])))
                failed, failed_at = bad[0], time.time()
        if all(c is not None for c in codes) and failed is None:
            return
        if failed is not None:
            # The others notice through their collectives; give them a moment, then stop them.
            if all(c is not None for c in codes) or time.time() - failed_at > GRACE_S:
                _kill_all(procs)
                r, c = failed
                how = f"was killed by signal {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
                detail = _last_line(logs[r])
                if os.environ.get("MMDIAG_DEBUG"):
                    for k, path in enumerate(logs):
                        with open(path, errors="replace") as f:
                            sys.stderr.write(f"--- rank {k} log ---\n{f.read()}")
                raise ReplayError(f"rank {r} {how}" + (f" ({detail})" if detail else ""),
                                  fix="the other ranks were stopped; rerun with MMDIAG_DEBUG=1 to see every rank's log")
        if progress is not None:
            try:
                with open(prog) as f:
                    progress(json.load(f))
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
