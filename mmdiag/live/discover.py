"""Find the scheduler ranks behind a PID, by their process titles.

SGLang titles each scheduler process `sglang::scheduler` plus `_DP{d}`, `_TP{t}`,
`_EP{e}`, `_PP{p}` parts when those sizes are > 1 (children of the
`sglang.launch_server` process); mmdiag's replay titles its ranks
`mmdiag::scheduler_TP{r}` (children of the `mmdiag replay` launcher). The PID
given may be the main process, one scheduler process, or the replay launcher.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import psutil

from ..vocab import REPLAY_RANK_TITLE, SGLANG_SCHEDULER_TITLE, SGLANG_TOKENIZER_WORKER_TITLE
from .errors import LiveError

TITLE_PREFIXES = (SGLANG_SCHEDULER_TITLE, REPLAY_RANK_TITLE)
_PART = re.compile(r"_(DP|TP|EP|PP)(\d+)")


@dataclass
class RankProcess:
    pid: int
    title: str
    rank: int           # TP rank (unique index when DP > 1, see parse_title); a tokenizer: -1, -2, ...
    parts: dict[str, int] = field(default_factory=dict)
    role: str = "scheduler"  # a vocab.STAGES name: what the process does in the server's pipeline

    @property
    def label(self) -> str:
        """How messages name it: "rank 1", "tokenizer (main process)", "tokenizer worker 2"."""
        if self.rank >= 0:
            return f"rank {self.rank}"
        if self.title.startswith(SGLANG_TOKENIZER_WORKER_TITLE):
            return f"{self.role} worker {-self.rank}"
        return f"{self.role} (main process)"


@dataclass
class Discovery:
    target_pid: int
    target_title: str
    how: str                      # "scheduler" | "parent"
    ranks: list[RankProcess]
    seen: list[tuple[int, str]]   # every process looked at (pid, title), for messages
    # The tokenizer side sampled in the same window (the main process, tokenizer workers).
    tokenizers: list[RankProcess] = field(default_factory=list)

    @property
    def processes(self) -> list[RankProcess]:
        """Everything to sample: the ranks, then the tokenizer side."""
        return self.ranks + self.tokenizers

    def describe(self) -> str:
        who = ", ".join(f"{r.title} (pid {r.pid})" for r in self.ranks)
        if self.how == "scheduler":
            return f"PID {self.target_pid} is a scheduler rank: {who}"
        tok = "".join(f"; tokenizer: pid {t.pid}" for t in self.tokenizers)
        return f"PID {self.target_pid} ({self.target_title}): {len(self.ranks)} scheduler rank(s): {who}{tok}"


def title_of(p: psutil.Process) -> str:
    """The process title as `ps` shows it (setproctitle rewrites the command line)."""
    try:
        cmd = [c for c in p.cmdline() if c]
    except (psutil.AccessDenied, psutil.ZombieProcess):
        cmd = []
    if cmd:
        return " ".join(cmd)
    try:
        return p.name()
    except psutil.Error:
        return "?"


def parse_title(title: str) -> dict[str, int] | None:
    """`sglang::scheduler_DP0_TP1` -> {"DP": 0, "TP": 1}; None when not a scheduler title."""
    head = title.split()[0] if title.split() else ""
    for prefix in TITLE_PREFIXES:
        if head == prefix or head.startswith(prefix + "_"):
            rest = head[len(prefix):]
            parts = {k: int(v) for k, v in _PART.findall(rest)}
            if _PART.sub("", rest):
                return None  # e.g. sglang::scheduler_foo: not one of ours
            return parts
    return None


def is_python(pid: int) -> bool:
    """Whether the process runs a Python interpreter (what py-spy looks for: the
    executable or a mapped libpython)."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    if re.match(r"python[\d.]*", exe):
        return True
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libpython" in line for line in f)
    except OSError:
        return False


def _number(ranks: list[RankProcess]) -> list[RankProcess]:
    """Rank = TP index; with DP > 1 (several processes per TP index) the rank is
    dp * tp_size + tp so every process keeps a distinct rank."""
    ranks.sort(key=lambda r: (r.parts.get("DP", 0), r.parts.get("PP", 0), r.parts.get("TP", 0), r.pid))
    tps = [r.parts.get("TP", 0) for r in ranks]
    if len(set(tps)) != len(tps):
        tp_size = max(tps) + 1
        pp_size = max(r.parts.get("PP", 0) for r in ranks) + 1
        for r in ranks:
            r.rank = (r.parts.get("DP", 0) * pp_size + r.parts.get("PP", 0)) * tp_size + r.parts.get("TP", 0)
        if len({r.rank for r in ranks}) != len(ranks):
            for i, r in enumerate(ranks):
                r.rank = i
    return ranks


def discover(pid: int) -> Discovery:
    try:
        proc = psutil.Process(pid)
        title = title_of(proc)
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(pid)
    except psutil.NoSuchProcess:
        raise LiveError(f"no process with PID {pid}",
                        fix="check the PID (e.g. `ps -ef | grep -e sglang -e mmdiag`)") from None
    except psutil.AccessDenied:
        raise LiveError(f"cannot read process {pid} (access denied)",
                        fix="run mmdiag as the user that runs the server, or as root") from None
    parts = parse_title(title)
    if parts is not None:
        rank = RankProcess(pid, title, parts.get("TP", 0), parts)
        return Discovery(pid, title, "scheduler", [rank], [(pid, title)])
    seen: list[tuple[int, str]] = [(pid, title)]
    ranks: list[RankProcess] = []
    owners: dict[int, tuple[str, int]] = {}  # the process each rank belongs to -> (title, ranks)
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for c in children:
        try:
            t = title_of(c)
            parent = c.ppid()
        except psutil.Error:
            continue
        seen.append((c.pid, t))
        cp = parse_title(t)
        if cp is not None:
            ranks.append(RankProcess(c.pid, t, cp.get("TP", 0), cp))
            owner = _owner(parent)
            owners[owner[0]] = (owner[1], owners.get(owner[0], ("", 0))[1] + 1)
    if ranks:
        if pid not in owners and not is_server(title):
            raise _not_a_server(pid, title, owners)
        return Discovery(pid, title, "parent", _number(ranks), seen, tokenizer_side(pid, title, seen))
    if not is_python(pid):
        raise LiveError(f"PID {pid} ({_clip(title)}) is not a Python process and has no scheduler children",
                        fix="pass the SGLang server's PID (python -m sglang.launch_server), one of its "
                            "sglang::scheduler processes, or an `mmdiag replay` PID")
    found = "; ".join(f"{p} {_clip(t, 50)}" for p, t in seen[:8]) + (f"; ... {len(seen) - 8} more" if len(seen) > 8 else "")
    raise LiveError(f"no scheduler ranks found under PID {pid}: no process titled "
                    f"{SGLANG_SCHEDULER_TITLE}* or {REPLAY_RANK_TITLE}*; found: {found}",
                    fix="pass the server's main PID or a scheduler's PID (see `ps -eo pid,args | grep scheduler`)")


def tokenizer_side(pid: int, title: str, seen: list[tuple[int, str]]) -> list[RankProcess]:
    """The server's tokenizer processes: its sglang::tokenizer_worker:{pid} children
    (--tokenizer-worker-num > 1), else the main process itself (it runs the
    TokenizerManager). An mmdiag replay or torchrun has none: its ranks tokenize."""
    workers = [(p, t) for p, t in seen if t.split()[0:1] and t.split()[0].startswith(SGLANG_TOKENIZER_WORKER_TITLE)]
    if not workers and not _NO_TOKENIZER.search(title) and is_python(pid):
        workers = [(pid, title)]
    return [RankProcess(p, t, -1 - i, {}, "tokenizer") for i, (p, t) in enumerate(workers)]


# Launchers whose main process tokenizes nothing (an mmdiag replay's rank 0 does it).
_NO_TOKENIZER = re.compile(r"(mmdiag(\.__main__)? replay|-m mmdiag replay|torchrun|torch\.distributed\.run)")


# What runs scheduler ranks as its children: SGLang's server (python -m
# sglang.launch_server, `sglang serve`), an mmdiag replay, torchrun starting one.
_SERVER = re.compile(r"(sglang[./]launch_server|sglang serve|\bsglang::|mmdiag(\.__main__)? replay|"
                     r"-m mmdiag replay|\bmmdiag replay|torchrun|torch\.distributed\.run)")


def is_server(title: str) -> bool:
    return bool(_SERVER.search(title))


def _owner(ppid: int) -> tuple[int, str]:
    """The process a rank belongs to: its parent, or the parent's parent while the
    parent is itself a rank or a torchrun agent under a server."""
    pid = ppid
    for _ in range(4):
        try:
            p = psutil.Process(pid)
            t = title_of(p)
            up = p.ppid()
        except psutil.Error:
            return pid, "?"
        if parse_title(t) is None and not re.search(r"torchrun|torch\.distributed\.run", t):
            return pid, t
        pid = up
    return ppid, "?"


def _not_a_server(pid: int, title: str, owners: dict[int, tuple[str, int]]) -> LiveError:
    """The PID given only has scheduler ranks further down its tree (init, a shell,
    a wrapper script): say what was found there and which PID to pass."""
    found = "; ".join(f"PID {o} ({_clip(t, 50)}) with {n} rank(s)" for o, (t, n) in sorted(owners.items()))
    return LiveError(f"PID {pid} ({_clip(title, 40)}) is not an SGLang server, an mmdiag replay or a scheduler; "
                     f"scheduler ranks further down its process tree belong to: {found}",
                     fix=f"pass the PID of the server or replay to profile (e.g. --pid {min(owners)})")


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
