"""The configuration a live view measured, in a few lines: for an SGLang server,
what `mmdiag doctor --pid` reads from its live processes (server.py);
for an mmdiag replay, its own command line (TP size, implementation, strategies,
the broadcast flag) and the SGLang variables in its ranks' environment."""
from __future__ import annotations

import psutil

from ..errors import MmdiagError
from .discover import Discovery

ENV_FLAGS = ("SGLANG_MM_PRECOMPUTE_HASH", "SGLANG_USE_CUDA_IPC_TRANSPORT")


def _argv(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _replay_line(disc: Discovery, argv: list[str]) -> str:
    def opt(name: str) -> list[str]:
        return [a for i, a in enumerate(argv) if i and argv[i - 1] == name]
    parts = [f"tp {(opt('--tp') or [len(disc.ranks)])[0]}",
             f"replay --impl {(opt('--impl') or ['mmdiag'])[0]} --strategy {','.join(opt('--strategy')) or 'all'}"]
    if "--enable-broadcast-flag" in argv:
        parts.append("broadcast flag on")
    try:
        env = psutil.Process(disc.ranks[0].pid).environ() if disc.ranks else {}
    except psutil.Error:
        env = {}
    return " | ".join(parts + [f"{k}={env[k]}" for k in ENV_FLAGS if env.get(k)])


def config_lines(disc: Discovery) -> list[str]:
    owner = disc.target_pid
    if disc.how == "scheduler":
        try:
            owner = psutil.Process(owner).ppid()
        except psutil.Error:
            pass
    argv = _argv(owner)
    if any(a == "replay" or a.endswith("mmdiag.replay.worker") for a in argv[:4]):
        return [_replay_line(disc, argv)]
    from .server import header_lines
    try:
        return header_lines(disc.target_pid)
    except MmdiagError as e:
        return [f"configuration not read ({e.one_line()})"]
