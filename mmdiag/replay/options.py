"""Replay options, declared once.

`ReplayOptions` is what a caller chooses (the CLI's flags, `mmdiag.api.replay`'s
keywords); `RankJob` is what every rank needs: the trace, where rank 0 writes the
Run, and the options. The launcher hands a RankJob to its ranks as a JSON file
(named by MMDIAG_REPLAY_JOB); a rank started by torchrun reads the same fields from
its command line, whose flags are derived from the fields below (their metadata),
never declared a second time; so are `mmdiag replay`'s options (mmdiag.cli.options):
a new option is one field here.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

import click

from ..vocab import DEFAULT_HASH, DEFAULT_SEGMENTS, HASHES, SEGMENTS, SHM_MAPS, STRATEGIES, TRANSPORTS

JOB_ENV = "MMDIAG_REPLAY_JOB"

# Value ranges: a bad value is a one-line usage error (exit 2), never an OverflowError deep
# inside. Commands that take one of these for another purpose use the same (cli.options).
RANKS = click.IntRange(1, 1024)
REPEATS = click.IntRange(1, 1000)
CONCURRENCY = click.IntRange(1, 1_000_000)
PORT = click.IntRange(1, 65535)
SECONDS = click.FloatRange(0, 86_400, min_open=True)
MILLISECONDS = click.FloatRange(0, 3_600_000)
MEGABYTES = click.FloatRange(0, 1_000_000, min_open=True)


def _opt(default: Any, help: str, *, flag: str | None = None, type: Any = None, metavar: str | None = None,
         worker: bool = True, cli: bool = True) -> Any:
    """A replay option: its default, its --help text, its command-line flag (default: --field-name)
    and value type (a click type; the CLI's and the ranks'), whether ranks need it (the torchrun
    command line) and whether `mmdiag replay` offers it."""
    meta = {"help": help, "flag": flag, "type": type, "metavar": metavar, "worker": worker, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=default.copy, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ReplayOptions:
    """What a replay is asked to do. The fields' order is `mmdiag replay --help`'s."""

    tp: int = _opt(None, "tensor-parallel ranks (processes) [default: 4, from profiles/defaults.toml]",
                   type=RANKS, worker=False)
    strategies: list[str] = _opt([], f"repeatable: {', '.join(STRATEGIES)} or all [default: all]",
                                 flag="--strategy", metavar="NAME")
    timeline: str | None = _opt(None, "write one Chrome-trace/Perfetto JSON of every rank's phases "
                                      "(open in ui.perfetto.dev)", type=click.Path(dir_okay=False), worker=False)
    timeout: float = _opt(60.0, "seconds a rank waits in a collective before giving up (a dead rank stops the rest)",
                          type=SECONDS)
    forward_ms: float = _opt(0.0, "model step per busy loop iteration (GPU time stand-in; the GIL is free meanwhile)",
                             type=MILLISECONDS)
    max_concurrency: int | None = _opt(None, "override the trace's closed-loop concurrency", type=CONCURRENCY)
    max_recv_mb: float = _opt(256.0, "most feature MB (10^6 bytes) the entry rank takes in one iteration "
                                     "(bounds replay memory)", type=MEGABYTES)
    repeat: int = _opt(1, "run each strategy N times; 1 is enough for the table, the report judges differences "
                          "only with 2 or more", type=REPEATS)
    port: int | None = _opt(None, "rendezvous port on 127.0.0.1 [default: a free one]", type=PORT, worker=False)
    # "sglang": run the installed SGLang's own mm path (sglang_path, or this interpreter's).
    impl: str = _opt("mmdiag", "mmdiag: every strategy's model; sglang: the installed SGLang's own code, as patched",
                     type=click.Choice(["mmdiag", "sglang"]))
    sglang_path: str | None = _opt(None, "with --impl sglang: site-packages sglang folder or checkout's python/ "
                                         "[default: this interpreter's]", flag="--sglang", metavar="PATH")
    enable_broadcast_flag: bool = _opt(False, "with --impl sglang on 0.5.5.post3+: replay as if "
                                              "--enable-broadcast-mm-inputs-process were on")
    # How features reach the ranks (vocab.TRANSPORTS); None: as the trace or the installed release implies.
    transport: str | None = _opt(None, "how features reach the ranks: pickle (in the recv broadcast, SGLang <= 0.5.9) "
                                       "or shm (shared-memory handles, 0.5.10+) [default: what the trace's or "
                                       "installed release implies]", type=click.Choice(TRANSPORTS))
    # How every rank takes a feature out of the release's own segment (the shm transport): None,
    # as the release does (variants.toml [shm_materialize]).
    shm_map: str | None = _opt(None, "with the release's shm transport, how every rank takes each feature out of its "
                                     "segment: clone (copy it, ShmPointerMMData.materialize of 0.5.10 .. 0.5.20) or "
                                     "cow (copy-on-write map, 0.5.21+) [default: the trace's or installed release's]",
                               type=click.Choice(SHM_MAPS))
    # SGLANG_MM_SKIP_COMPUTE_HASH=1 (0.5.8+): a random hash instead of sha256 where items are hashed.
    skip_hash: bool = _opt(False, "replay SGLANG_MM_SKIP_COMPUTE_HASH=1: strategies that hash before the scheduler "
                                  "(precompute, shm) draw a random hash instead of hashing (repeated images then "
                                  "share no prefix-cache entry); with --impl sglang the ranks get the variable")
    # The shm transport's segments (vocab.SEGMENTS): fresh as the releases write them, or mmdiag's pool.
    segments: str = _opt(DEFAULT_SEGMENTS, "with the shm transport: fresh (a new segment per feature, as every release "
                                           "writes them; each write pays its page faults) or pool (reused, "
                                           "pre-faulted segments, as `mmdiag apply` installs them)",
                         type=click.Choice(SEGMENTS))
    # The content hash (vocab.HASHES): sha256 is SGLang's; xxh3 is what `mmdiag apply xxh3` installs.
    hash: str = _opt(DEFAULT_HASH, "content hash of every feature, wherever it is hashed (tokenizer stage and "
                                   "ranks): sha256 (SGLang's) or xxh3 (xxh3_128, memory speed; still a content "
                                   "hash, so repeated images keep their prefix-cache entries)",
                     type=click.Choice(HASHES))
    # Tokenizer workers that hash (SGLang 0.5.21+ hashes in a pool of 2); None: the release's.
    tokenizer_workers: int | None = _opt(None, "tokenizer-side hashing threads, to see the tokenizer stage's "
                                               "capacity with N of them [default: the release's: 1, 2 from 0.5.21]",
                                         type=click.IntRange(1, 256), metavar="N")
    extra_env: dict[str, str] = _opt({}, "environment for the ranks", worker=False, cli=False)


def option_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def option_flag(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


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


def worker_parser() -> argparse.ArgumentParser:
    """The torchrun command line, derived from ReplayOptions' fields."""
    p = argparse.ArgumentParser(prog="python -m mmdiag.replay.worker",
                                description="One mmdiag replay rank (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT "
                                            "from env, as torchrun sets them).")
    p.add_argument("trace")
    p.add_argument("--out", required=True, help="Run JSON written by rank 0")
    for f in fields(ReplayOptions):
        if not f.metadata["worker"]:
            continue
        flag, default, help = option_flag(f), option_default(f), f.metadata["help"].replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=help)
        elif isinstance(default, list):
            p.add_argument(flag, dest=f.name, action="append", default=[], help=help, metavar=f.metadata["metavar"])
        else:
            kind = {"float": float, "int": int}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, dest=f.name, type=kind, default=default, help=help, metavar=f.metadata["metavar"])
    return p


def job_from_argv(argv: list[str] | None) -> RankJob:
    ns = vars(worker_parser().parse_args(argv))
    trace, out = ns.pop("trace"), ns.pop("out")
    return RankJob(trace=os.path.abspath(trace), out=out, options=ReplayOptions(tp=None, **ns))


def job_for_this_rank(argv: list[str] | None) -> RankJob:
    path = os.environ.get(JOB_ENV)
    return RankJob.load(path) if path else job_from_argv(argv)
