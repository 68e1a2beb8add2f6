"""A replay rank: `python -m mmdiag.replay.worker` (started by mmdiag's launcher,
or by `torchrun --nproc-per-node N -m mmdiag.replay.worker TRACE --out run.json`,
which spans nodes through env:// rendezvous).

Every rank joins one gloo group (SGLang's CPU group), runs each strategy's loop
in turn, and sends its measurements to rank 0, which writes the Run.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import strategies as strategy_registry
from ..errors import MmdiagError
from ..mmpath import hashing, memory, shm
from ..mmpath import transport as transport_mod
from ..mmpath.collectives import broadcast_pyobj, install_torch_timers
from ..mmpath.timers import PhaseTimers
from ..run import SGLangConfig
# What a release implies (variants.toml [defaults]): its transport and tokenizer workers.
from ..sglang.facts import (at_least, default_tokenizer_workers, default_transport, entry_rank_copies_out,
                            hashes_in_place, shm_clones, since)
from ..trace import scan
from ..units import MB
from ..vocab import AXES, DEFAULT_HASH, DEFAULT_SEGMENTS, REPLAY_RANK_TITLE, TRANSPORT_PICKLE, TRANSPORT_SHM
from . import heartbeat
from .assemble import assemble_run, strategy_result
from .options import job_for_this_rank
from .scheduler import Intake, ReplayScheduler, tokenizer_prepass

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


def _make_strategy(name, rank, group, results, world, job, header, stats):
    """A strategy that configures itself from what this replay measured so far (cond's
    threshold: the crossover of the strategies before it) gets, on rank 0, the cost model
    fitted on a provisional Run, and agrees with the other ranks itself; the others take no
    arguments."""
    cls = strategy_registry.get(name)
    if not hasattr(cls, "for_replay"):
        return cls()
    model = None
    if rank == 0 and results:
        from ..analysis.costmodel import fit  # the one cost model; cond is handed it, not importing analysis
        model = fit([assemble_run(results, world, job, header, stats)])
    return cls.for_replay(rank, group, model)


class _Plan:
    """What this replay runs: the strategies and how each is made (mmdiag's models, or
    the installed SGLang as a plug-in), the transport, the tokenizer's workers."""

    def __init__(self, job, rank: int, header, group=None):
        o = job.options
        self.installed = None
        if o.impl == "sglang":
            from ..sglang.runtime import load_sglang_mm_path
            from .sglang_impl import InstalledPath
            self.installed = load_sglang_mm_path(o.sglang_path)
            self.make = lambda name, *a: InstalledPath(self.installed, o.enable_broadcast_flag)
            self.names = [self.make("").name]
            version = self.installed.install.version
            if o.skip_hash and not at_least(version, since("skip_hash_family")):
                raise MmdiagError(f"--skip-hash: SGLang {version} does not read SGLANG_MM_SKIP_COMPUTE_HASH "
                                  f"(from {since('skip_hash_family')})", where="--sglang",
                                  fix="leave --skip-hash out, or replay a release that reads it")
        else:
            self.make = _make_strategy
            self.names = strategy_registry.resolve(o.strategies)
            # Only rank 0 read the trace: every rank takes its release, so all move features alike.
            got = [header.source.get("sglang_version") if header is not None else None]
            if group is not None:
                dist.broadcast_object_list(got, src=0, group=group)
            version = got[0]
        # Features travel as the release moves them: pickled in the recv broadcast to 0.5.9,
        # by shared memory from 0.5.10 (with --impl sglang the release's own code, else mmdiag's segments).
        self.transport = o.transport or default_transport(version)
        self.workers = o.tokenizer_workers or default_tokenizer_workers(version)
        # The release's own segments: copied out per rank to 0.5.20, mapped copy-on-write after (with
        # no release known, mapped). mmdiag's `shm` patch on a pickling release always maps.
        self.shm_map = o.shm_map or ("clone" if version is not None and shm_clones(version) else "cow")
        # 0.5.9 pickles features its tokenizer wrote into segments, copied back out by the entry rank.
        self.via_segment = self.transport == TRANSPORT_PICKLE and entry_rank_copies_out(version)
        # Process-wide, as SGLang's data_hash: the tokenizer stage and every rank hash alike, and
        # feed it as the release does (two copies to 0.5.9, in place from 0.5.10).
        hashing.use(o.hash, in_place=hashes_in_place(version))
        port = os.environ.get("MASTER_PORT", "0")
        self.prefix = job.shm_prefix or shm.owner_prefix(port)   # torchrun: this rank owns what it writes

    def release_transport(self, strategy, group, timers):
        """With --impl sglang on a release that writes segments (0.5.9+): its own transport,
        where the replay moves features as the release does (not a --transport it does not use)."""
        if self.installed is None:
            return None
        own = strategy.release_transport(group, timers, self.prefix)
        return own if own is not None and own.name == self.transport_of(strategy) else None

    def transport_of(self, strategy) -> str:
        return strategy.transport or self.transport


def _measure(job, plan, name, rep, rank, world, group, timers, ctx, results) -> Any:
    """One replay of one strategy; returns rank 0's StrategyResult (None elsewhere)."""
    o = job.options
    strategy = plan.make(name, rank, group, results, world, job, ctx["header"], ctx["stats"])
    transport = plan.release_transport(strategy, group, timers) or transport_mod.make(
        plan.transport_of(strategy), plan.prefix, o, clone=plan.transport == TRANSPORT_SHM and plan.shm_map == "clone",
        via_segment=plan.via_segment and strategy.transport is None)
    timers.reset(name)
    sched = ReplayScheduler(rank, world, strategy, timers, cpu_group=group, timeout=ctx["timeout"],
                            forward_ms=o.forward_ms, progress=ctx["progress"], heap_ceiling=ctx["heap_ceiling"],
                            transport=transport)
    outside: dict[int, float] = {}
    intake = None
    if rank == 0:
        ctx["progress"].label = name + (f" {rep + 1}/{o.repeat}" if o.repeat > 1 else "")
        strategy.image_token_id = ctx["image_token_id"]
        if strategy.hashes_in_tokenizer:
            key = "prepass" if plan.installed is None else "prepass_installed"  # the install hashes its own way
            if ctx.get(key) is None:  # once per replay: the same trace for every repeat
                ctx[key] = tokenizer_prepass(job.trace, None if plan.installed is None else strategy.hash_request,
                                             skip_hash=o.skip_hash)
            sched.precomputed, outside = ctx[key]
    dist.barrier(group=group)
    try:
        if rank == 0:
            intake = Intake(job.trace, time.time(), ctx["max_conc"], int(o.max_recv_mb * MB),
                            tokenizer_s=outside, workers=plan.workers)
        outcome = sched.event_loop(intake, ctx["stats"].requests if ctx["stats"] else None)
    finally:
        if intake is not None:
            intake.close()
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(outcome, gathered, dst=0, group=group)
    if rank != 0:
        return None
    # Transport facts of the entry rank (features kept inline, requests every rank rejected).
    ctx["described"][name] = {**strategy.describe(), "transport": outcome.transport}
    tok = dict(outcome.tokenizer)
    if outside:  # hashed before the window, replayed as the Intake's tokenizer stage
        tok["tokenizer_hash"] = outside
    res = strategy_result(name, gathered, tok, ctx["stats"], workers=plan.workers)
    ctx["progress"](ctx["stats"].requests, ctx["stats"].requests, force=True)
    return res


def run_rank(job) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _set_title(rank)
    o = job.options
    timeout = timedelta(seconds=o.timeout)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timeout)
    group = dist.group.WORLD
    header = stats = None
    if rank == 0:
        header, stats = scan(job.trace)
    plan = _Plan(job, rank, header, group)
    tracer = None
    if job.timeline_dir:
        from viztracer import VizTracer
        tracer = VizTracer(output_file=os.path.join(job.timeline_dir, f"rank{rank}.json"),
                           max_stack_depth=0, verbose=0, pid_suffix=False, process_name=f"rank {rank}")
        tracer.start()
    _warm_up(rank, group, stats.max_request_bytes if stats else 0)
    timers = PhaseTimers(rank, tracer=tracer, stats_dir=os.environ.get("MMDIAG_STATS_DIR"))
    install_torch_timers(timers)
    ctx: dict[str, Any] = {"header": header, "stats": stats, "timeout": timeout, "described": {},
                           "progress": _Progress(job.progress_file) if rank == 0 else None,
                           # The launcher's heap ceiling for a rank; under torchrun, the byte cap's bound.
                           "heap_ceiling": job.heap_ceiling or memory.RANK_BASE_BYTES + int(o.max_recv_mb * MB)}
    if rank == 0:
        ctx["max_conc"] = o.max_concurrency
        if ctx["max_conc"] is None and header.arrival.get("mode") == "closed":
            ctx["max_conc"] = int(header.arrival["max_concurrency"])
        ctx["image_token_id"] = int(header.model.get("image_token_id", 0))
    results: dict[str, list] = {}
    try:
        for name in plan.names:
            runs = [_measure(job, plan, name, rep, rank, world, group, timers, ctx, results) for rep in range(o.repeat)]
            if rank == 0:
                results[name] = runs
    finally:
        if rank == 0:
            shm.sweep(plan.prefix)
    if tracer is not None:
        tracer.stop()
        tracer.save()
    dist.barrier(group=group)
    if rank == 0:
        _write_run(job, plan, results, world, header, stats, ctx["described"])
    # Everyone waits until the Run is on disk, then leaves without tearing the gloo
    # group down: its teardown races with peers that already left and can abort the
    # process (std::terminate from a gloo thread), failing a run that had succeeded.
    dist.barrier(group=group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_run(job, plan, results, world, header, stats, described) -> None:
    run = assemble_run(results, world, job, header, stats)
    cfg = run.config
    cfg.strategies, cfg.transport, cfg.tokenizer_workers = described, plan.transport, plan.workers
    # None like a Run from before the option (they all mapped copy-on-write): merges with them
    cfg.shm_map = "clone" if plan.transport == TRANSPORT_SHM and plan.shm_map == "clone" else None
    cfg.skip_hash = job.options.skip_hash or None  # None like a Run from before the option: merges with them
    cfg.axes = {name: getattr(job.options, name) for name in AXES}
    if plan.installed is not None:
        det = plan.installed.detection
        # what the install's code does: its hash and segments (as `mmdiag apply` left them)
        cfg.axes.update(hash=det.content_hash or DEFAULT_HASH, segments=det.segments or DEFAULT_SEGMENTS)
        cfg.impl = "sglang"
        cfg.sglang = SGLangConfig(path=str(plan.installed.install.package_dir), version=plan.installed.install.version,
                                  variant=det.variant, patched=det.patched,
                                  enable_broadcast_flag=job.options.enable_broadcast_flag)
    run.save(job.out)


def _exit_now(code: int) -> None:
    """Leave without tearing the gloo group down (see the end of run_rank)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    job = job_for_this_rank(argv)
    rank = os.environ.get("RANK", "?")
    if rank != "?":
        heartbeat.start(int(rank))
    try:
        return run_rank(job)
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
