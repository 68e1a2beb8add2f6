"""Option types shared by the commands: every number has a range, so a bad value is a
one-line usage error (exit 2), never an OverflowError deep inside. The replay's options
are declared once, in mmdiag.replay.options.ReplayOptions; the click options of `replay`,
`demo`, `recommend` and `apply --verify` are derived from its fields here."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

import click

from ..replay.options import (CONCURRENCY, MEGABYTES, MILLISECONDS, PORT, RANKS, REPEATS, SECONDS,  # noqa: F401
                              ReplayOptions, option_default, option_flag)

COUNT = click.IntRange(1, 100_000_000)
SEED = click.IntRange(0, 2**32 - 1)
ITEMS = click.IntRange(1, 1000)
TOKENS = click.IntRange(0, 10_000_000)
RATIO = click.FloatRange(0, 1)
PID = click.IntRange(1, 2**22)
RATE_HZ = click.IntRange(1, 1000)  # what the profiler accepts (live.profile._check_args)
REQ_PER_S = click.FloatRange(0, 1_000_000, min_open=True)

# Why repeats default differently: one replay shows the table (ReplayOptions.repeat); a verdict
# (recommend, apply --verify) needs at least two repeats per strategy to estimate the noise it judges against.
REPEAT_HELP_VERDICT = ("repeats per strategy; 2 by default because the verdict needs the repeats' noise "
                       "(a single replay cannot say whether a difference is significant)")

# cond's threshold: one wording for replay and apply (mmdiag.analysis.threshold says where it comes from).
THRESHOLD_HELP = ("cond's threshold: bytes (100000, 100k, 2M), never, or a Run file whose measured crossover "
                  "to use [default: SGLANG_MM_BROADCAST_THRESHOLD, else {measured}, else the seed's 100 KB example]")

REPLAY_FIELDS = {f.name: f for f in fields(ReplayOptions)}
# The fields `mmdiag replay` offers, in --help order.
REPLAY_CLI = tuple(n for n, f in REPLAY_FIELDS.items() if f.metadata["cli"])


def replay_option(name: str, **overrides: Any) -> Callable:
    """The click option of ReplayOptions field `name`, from its metadata (flag, type, default,
    help); `overrides` (help, default) for a command that replays for another purpose."""
    f = REPLAY_FIELDS[name]
    default = overrides.pop("default", option_default(f))
    kw: dict[str, Any] = {"help": f.metadata["help"], "metavar": f.metadata["metavar"]}
    if isinstance(default, bool):
        kw["is_flag"] = True
    elif isinstance(default, list):
        kw["multiple"] = True
    else:
        kw.update(type=f.metadata["type"], default=default, show_default=default is not None)
    kw.update(overrides)
    return click.option(option_flag(f), name, **{k: v for k, v in kw.items() if v is not None})


def threshold_option(measured: str, prefix: str = "") -> Callable:
    """--threshold (cond's): `measured` says which measured crossover is the default."""
    return click.option("--threshold", default=None, metavar="BYTES|never|RUN.json",
                        help=prefix + THRESHOLD_HELP.format(measured=measured))


def launch_options(what: str) -> Callable:
    """SGLang's own launch settings that decide a release's effective transport and who hashes
    (mmdiag.sglang.facts.Launch), for commands with no running server to read them from; the
    command gets them as one `launch` argument (None: none given)."""
    import functools

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*a: Any, dist_init_addr, skip_tokenizer_init, nnodes, rust_server, **kw: Any):
            from ..sglang.facts import Launch
            given = dist_init_addr is not None or skip_tokenizer_init or nnodes is not None or rust_server
            kw["launch"] = Launch(dist_init_addr, skip_tokenizer_init, nnodes or 1, rust_server) if given else None
            return f(*a, **kw)
        for opt in reversed([
            click.option("--dist-init-addr", metavar="HOST:PORT", default=None,
                         help=f"{what}: the server's --dist-init-addr (0.5.10 .. 0.5.18 then pickle the features)"),
            click.option("--skip-tokenizer-init", is_flag=True,
                         help=f"{what}: the server runs with --skip-tokenizer-init (features pickled)"),
            click.option("--nnodes", type=click.IntRange(1, 4096), default=None,
                         help=f"{what}: the server's --nnodes (0.5.19+ pickle the features above 1)"),
            click.option("--rust-server", is_flag=True,
                         help=f"{what}: the server runs with SGLANG_RUST_SERVER=1 (0.5.18+: items arrive hashed)"),
        ]):
            wrapper = opt(wrapper)
        return wrapper
    return deco
