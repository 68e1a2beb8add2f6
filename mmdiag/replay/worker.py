"""A replay rank: `python -m mmdiag.replay.worker` (started by mmdiag's launcher,
or by `torchrun --nproc-per-node N -m mmdiag.replay.worker TRACE --out run.json`,
which spans nodes through env:// rendezvous).

Every rank joins one gloo group (SGLang's CPU group), runs each strategy's loop
in turn, and sends its measurements to rank 0, which writes the Run.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import strategies as strategy_registry
from ..errors import MmdiagError
from ..mmpath import memory
from ..mmpath.memory import RANK_MEMORY_ENV
from ..trace import scan
from ..units import MB
from ..vocab import REPLAY_RANK_TITLE
from .assemble import assemble_run, strategy_result
from . import heartbeat
from .comm import broadcast_pyobj, install_torch_timers
from .scheduler import Intake, ReplayScheduler, tokenizer_prepass
from .timers import PhaseTimers

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Started by mmdiag's launcher: go when it goes, even if it is SIGKILLed."""
    parent = int(os.environ.get("MMDIAG_PARENT_PID", "0"))
    if not parent:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(1)


def _set_title(rank: int) -> None:
    try:
        import setproctitle
        setproctitle.setproctitle(f"{REPLAY_RANK_TITLE}_TP{rank}")
    except ImportError:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmdiag.replay.worker",
                                description="One mmdiag replay rank (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from env, as torchrun sets them).")
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="Run JSON written by rank 0")
    p.add_argument("--strategy", action="append", default=[], help="strategy name (repeatable) or 'all'")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout, seconds")
    p.add_argument("--forward-ms", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--max-recv-mb", type=float, default=256.0,
                   help="most feature MB the entry rank admits in one loop iteration (bounds memory)")
    p.add_argument("--timeline-dir", default=None)
    p.add_argument("--progress-file", default=None)
    p.add_argument("--impl", choices=("mmdiag", "sglang"), default="mmdiag",
                   help="mmdiag: the strategies' models; sglang: the installed SGLang's own code (--sglang)")
    p.add_argument("--sglang", default=None, help="with --impl sglang: the install (default: this interpreter's)")
    p.add_argument("--enable-broadcast-flag", action="store_true",
                   help="with --impl sglang on flag releases: replay with --enable-broadcast-mm-inputs-process on")
    return p.parse_args(argv)


class _Progress:
    """Rank 0 writes where it is, a few times a second, for the launcher's bar."""

    def __init__(self, path: str | None):
        self.path, self.last, self.label = path, 0.0, ""

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
        now = time.time()
        if not self.path or (not force and now - self.last < 0.2):
            return
        self.last = now
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"label": self.label, "done": done, "total": total}, f)
        os.replace(tmp, self.path)


def _warm_up(rank: int, group, nbytes: int) -> None:
    """The first collectives of a size pay for buffers and page faults; pay them here,
    not in the first strategy measured."""
    size, _ = broadcast_pyobj(nbytes, rank, group)
    payload = torch.ones(max(size, 1), dtype=torch.uint8) if rank == 0 else None
    broadcast_pyobj(payload, rank, group)
    objs = [payload]
    dist.broadcast_object_list(objs, src=0, group=group)


def _make_strategy(name, rank, group, results, world, args, header, stats):
    """A strategy that configures itself from what this replay measured so far (cond's
    threshold: the crossover of the strategies before it) gets a provisional Run on rank 0
    and agrees with the other ranks itself; the others take no arguments."""
    cls = strategy_registry.get(name)
    if not hasattr(cls, "for_replay"):
        return cls()
    measured = assemble_run(results, world, args, header, stats) if rank == 0 and results else None
    return cls.for_replay(rank, group, measured)


def run_rank(args: argparse.Namespace) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _set_title(rank)
    timeout = timedelta(seconds=args.timeout)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timeout)
    group = dist.group.WORLD
    installed = None
    if args.impl == "sglang":
        from ..sglang.runtime import load_sglang_mm_path
        from .sglang_impl import InstalledPath
        installed = load_sglang_mm_path(args.sglang)
        names = [InstalledPath(installed, args.enable_broadcast_flag).name]
    else:
        names = strategy_registry.resolve(args.strategy)
    tracer = None
    if args.timeline_dir:
        from viztracer import VizTracer
        tracer = VizTracer(output_file=os.path.join(args.timeline_dir, f"rank{rank}.json"),
                           max_stack_depth=0, verbose=0, pid_suffix=False, process_name=f"rank {rank}")
        tracer.start()
    header = stats = None
    if rank == 0:
        header, stats = scan(args.trace)
    _warm_up(rank, group, stats.max_request_bytes if stats else 0)
    timers = PhaseTimers(rank, tracer=tracer, stats_dir=os.environ.get("MMDIAG_STATS_DIR"))
    install_torch_timers(timers)
    progress = _Progress(args.progress_file) if rank == 0 else None

    if rank == 0:
        max_conc = args.max_concurrency
        if max_conc is None and header.arrival.get("mode") == "closed":
            max_conc = int(header.arrival["max_concurrency"])
        image_token_id = int(header.model.get("image_token_id", 0))
    # The launcher's heap ceiling for a rank; under torchrun, the byte cap's bound.
    heap_ceiling = int(os.environ.get(RANK_MEMORY_ENV, 0)) or (
        memory.RANK_BASE_BYTES + int(args.max_recv_mb * MB))
    results = {}
    described: dict[str, dict] = {}
    prepass = None
    for name in names:
        runs = []
        for rep in range(args.repeat):
            strategy = (InstalledPath(installed, args.enable_broadcast_flag) if installed is not None
                        else _make_strategy(name, rank, group, results, world, args, header, stats))
            timers.reset(name)
            sched = ReplayScheduler(rank, world, strategy, timers, cpu_group=group, timeout=timeout,
                                    forward_ms=args.forward_ms, progress=progress, heap_ceiling=heap_ceiling)
            tok_s: dict[int, float] = {}
            if rank == 0:
                progress.label = f"{name}" + (f" {rep + 1}/{args.repeat}" if args.repeat > 1 else "")
                sched.image_token_id = image_token_id
                if strategy.hashes_in_tokenizer and installed is None:
                    if prepass is None:  # once per replay: the same trace for every repeat
                        prepass = tokenizer_prepass(args.trace)
                    sched.precomputed, tok_s = prepass
            dist.barrier(group=group)
            intake = (Intake(args.trace, time.time(), max_conc, int(args.max_recv_mb * MB))
                      if rank == 0 else None)
            try:
                outcome = sched.event_loop(intake, stats.requests if stats else None)
                if installed is not None:
                    tok_s = sched.tokenizer_s
            finally:
                if intake is not None:
                    intake.close()
            if rank == 0:
                described[name] = strategy.describe()
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(outcome, gathered, dst=0, group=group)
            if rank == 0:
                runs.append(strategy_result(name, gathered, tok_s, stats, tok_in_latency=installed is None))
                progress(stats.requests, stats.requests, force=True)
            del outcome, sched, strategy
        if rank == 0:
            results[name] = runs
    if tracer is not None:
        tracer.stop()
        tracer.save()
    dist.barrier(group=group)
    if rank == 0:
        run = assemble_run(results, world, args, header, stats)
        run.config["strategies"] = described
        if installed is not None:
            det = installed.detection
            run.config["impl"] = "sglang"
            run.config["sglang"] = {"path": str(installed.install.package_dir), "version": installed.install.version,
                                    "variant": det.variant, "patched": det.patched,
                                    "enable_broadcast_flag": args.enable_broadcast_flag}
        run.save(args.out)
    # Everyone waits until the Run is on disk, then leaves without tearing the gloo
    # group down: its teardown races with peers that already left and can abort the
    # process (std::terminate from a gloo thread), failing a run that had succeeded.
    dist.barrier(group=group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_now(code: int) -> None:
    """Leave without tearing the gloo group down (see the end of run_rank)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    args = parse_args(argv)
    rank = os.environ.get("RANK", "?")
    if rank != "?":
        heartbeat.start(int(rank))
    try:
        return run_rank(args)
    except KeyboardInterrupt:
        return 130
    except MmdiagError as e:
        print(f"mmdiag replay: rank {rank}: {e.one_line()}", file=sys.stderr)
        _exit_now(e.exit_code)
    except (RuntimeError, ConnectionError, OSError) as e:
        # A peer that died shows up here as a failed or timed-out collective.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mmdiag replay: rank {rank}: collective failed on {socket.gethostname()}: {first}", file=sys.stderr)
        if os.environ.get("MMDIAG_DEBUG"):
            traceback.print_exc()
        _exit_now(3)


if __name__ == "__main__":
    sys.exit(main())
