"""Replay options, declared once.

`ReplayOptions` is what a caller chooses (the CLI's flags, `mmdiag.api.replay`'s
keywords); `RankJob` is what every rank needs: the trace, where rank 0 writes the
Run, and the options. The launcher hands a RankJob to its ranks as a JSON file
(named by MMDIAG_REPLAY_JOB); a rank started by torchrun reads the same fields from
its command line, whose flags are derived from the fields below (their metadata),
never declared a second time.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..vocab import TRANSPORTS

JOB_ENV = "MMDIAG_REPLAY_JOB"


def _opt(default: Any, help: str, flag: str | None = None, worker: bool = True, **kw: Any) -> Any:
    meta = {"help": help, "flag": flag, "worker": worker}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ReplayOptions:
    tp: int = _opt(None, "tensor-parallel ranks (processes)", worker=False)
    strategies: list[str] = _opt([], "strategy name (repeatable) or 'all'", flag="--strategy")
    timeout: float = _opt(60.0, "collective timeout, seconds")
    forward_ms: float = _opt(0.0, "model step per busy loop iteration, ms")
    max_concurrency: int | None = _opt(None, "closed-loop concurrency (default: the trace's)")
    max_recv_mb: float = _opt(256.0, "most feature MB the entry rank admits in one loop iteration (bounds memory)")
    repeat: int = _opt(1, "replay each strategy this many times")
    port: int | None = _opt(None, "rendezvous port", worker=False)
    timeline: str | None = _opt(None, "Chrome-trace JSON of every rank's phases", worker=False)
    # "sglang": run the installed SGLang's own mm path (sglang_path, or this interpreter's).
    impl: str = _opt("mmdiag", "mmdiag: the strategies' models; sglang: the installed SGLang's own code")
    sglang_path: str | None = _opt(None, "with --impl sglang: the install", flag="--sglang")
    enable_broadcast_flag: bool = _opt(False, "with --impl sglang on flag releases: the broadcast flag on")
    # How features reach the ranks (vocab.TRANSPORTS); None: as the trace or the installed release implies.
    transport: str | None = _opt(None, f"feature transport: {', '.join(TRANSPORTS)}")
    # Tokenizer workers that hash (SGLang 0.5.21+ hashes in a pool of 2); None: the release's.
    tokenizer_workers: int | None = _opt(None, "tokenizer-side hashing workers (default: the release's)")
    extra_env: dict[str, str] = _opt({}, "environment for the ranks", worker=False)


@dataclass
class RankJob:
    trace: str
    out: str
    options: ReplayOptions
    progress_file: str | None = None
    timeline_dir: str | None = None
    heap_ceiling: int = 0  # bytes a rank may keep between iterations (MemoryEstimate.heap_ceiling)
    shm_prefix: str = ""   # shared-memory segment names start with this (the launcher sweeps it)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str) -> "RankJob":
        with open(path) as f:
            d = json.load(f)
        return cls(**{**d, "options": ReplayOptions(**d["options"])})


def _worker_fields():
    return [f for f in fields(ReplayOptions) if f.metadata["worker"]]


def worker_parser() -> argparse.ArgumentParser:
    """The torchrun command line, derived from ReplayOptions' fields."""
    p = argparse.ArgumentParser(prog="python -m mmdiag.replay.worker",
                                description="One mmdiag replay rank (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT "
                                            "from env, as torchrun sets them).")
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="Run JSON written by rank 0")
    for f in _worker_fields():
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is MISSING else f.default
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        elif isinstance(default, list):
            p.add_argument(flag, dest=f.name, action="append", default=[], help=f.metadata["help"])
        else:
            kind = {"float": float, "int": int}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, dest=f.name, type=kind, default=default, help=f.metadata["help"])
    return p


def job_from_argv(argv: list[str] | None) -> RankJob:
    ns = vars(worker_parser().parse_args(argv))
    trace, out = ns.pop("trace"), ns.pop("out")
    return RankJob(trace=os.path.abspath(trace), out=out, options=ReplayOptions(tp=None, **ns))


def job_for_this_rank(argv: list[str] | None) -> RankJob:
    path = os.environ.get(JOB_ENV)
    return RankJob.load(path) if path else job_from_argv(argv)
