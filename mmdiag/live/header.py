"""The configuration a live view measured, in one line: what the target's command
line and environment say (TP size, the broadcast flag, SGLANG_MM_PRECOMPUTE_HASH,
the feature transport; for a replay, its strategy and implementation)."""
from __future__ import annotations

import psutil

from .discover import Discovery

ENV_FLAGS = ("SGLANG_MM_PRECOMPUTE_HASH", "SGLANG_USE_CUDA_IPC_TRANSPORT")


def _argv(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _opt(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def config_line(disc: Discovery) -> str:
    argv = _argv(disc.target_pid)
    parts = [f"tp {_opt(argv, '--tp', '--tp-size') or len(disc.ranks)}"]
    if any("replay" in a for a in argv[:4]):
        strategies = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--strategy"]
        parts.append(f"replay --impl {_opt(argv, '--impl') or 'mmdiag'} --strategy {','.join(strategies) or 'all'}")
    if "--enable-broadcast-mm-inputs-process" in argv or "--enable-broadcast-flag" in argv:
        parts.append("broadcast flag on")
    transport = _opt(argv, "--mm-feature-transport")
    if transport:
        parts.append(f"transport {transport}")
    try:
        env = psutil.Process(disc.ranks[0].pid).environ() if disc.ranks else {}
    except psutil.Error:
        env = {}
    parts += [f"{k}={env[k]}" for k in ENV_FLAGS if env.get(k)]
    return " | ".join(parts)
