"""`mmdiag doctor --pid PID`: the effective multimodal settings of a running SGLang server,
read from its live processes (never from a text someone pasted):

- the server process (the PID, or the parent of the scheduler PID given): its command
  line (`--tp-size`, `--dp-size`, `--enable-broadcast-mm-inputs-process`,
  `--mm-feature-transport`, and `--dist-init-addr`, `--nnodes`, `--skip-tokenizer-init`, which
  turn a shared-memory release back to pickling: facts.effective_transport) and
  `/proc/PID/environ` (SGLANG_MM_PRECOMPUTE_HASH, SGLANG_MM_SKIP_COMPUTE_HASH,
  SGLANG_USE_CUDA_IPC_TRANSPORT, SGLANG_RUST_SERVER), its start time; who hashes;
- its scheduler ranks by process title (`sglang::scheduler_TP1`, ...), for TP/DP sizes
  when the command line leaves them at their defaults;
- the SGLang package that process imports: found by its own interpreter (the path it was
  started by, not /proc/PID/exe's resolved binary: a venv's), with its own environment and
  working directory (importlib.util.find_spec: nothing is imported),
  then probed like `mmdiag doctor` (release, defaults, transport);
- whether an mmdiag patch on disk is newer than the server's start (not picked up yet);
- the content hash it runs: the install's (sha256, or what `mmdiag apply xxh3` wrote, once
  the server started after it), or random under SGLANG_MM_SKIP_COMPUTE_HASH.

`header_lines(pid)` gives the same in a few lines for other views (`mmdiag profile`).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from ..sglang.errors import SGLangError
from ..sglang.facts import Launch, at_least, effective_transport, facts, rust_hashes, since
from ..mmpath.hashing import PREFIX_CACHE
from ..vocab import DEFAULT_HASH, SEGMENTS_FRESH, SEGMENTS_POOL, TRANSPORT_PICKLE, TRANSPORT_SHM

_TRUE = ("1", "true", "yes", "on")
_FIND = ("import importlib.util as u, sys; s = u.find_spec('sglang'); "
         "print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')")


@dataclass
class ServerSettings:
    pid: int  # the server process
    cmdline: list[str]
    started: str  # ISO time the server process started
    ranks: list[tuple[int, str]]  # (pid, title) of its scheduler processes
    tp_size: int
    dp_size: int
    broadcast_flag: bool
    broadcast_flag_source: str  # "command line" | "default of the release"
    precompute_env: str | None  # SGLANG_MM_PRECOMPUTE_HASH as the server's environment has it
    precompute_effective: bool
    feature_transport: str
    feature_transport_source: str
    sglang_dir: str | None
    version: str | None
    family: str | None
    patch: str | None  # the mmdiag strategy applied on disk
    patch_pending: bool  # the patch was written after the server started: not running yet
    skip_hash_env: str | None = None  # SGLANG_MM_SKIP_COMPUTE_HASH as the server's environment has it
    launch: dict[str, Any] = field(default_factory=dict)  # facts.Launch: what decides transport and hashing
    hashing: str = ""  # who hashes each item, once or on every rank
    # the content hash the running server uses (vocab.HASHES, or "random" under SGLANG_MM_SKIP_COMPUTE_HASH)
    content_hash: str | None = None
    # how the running server's writer gets its segments (vocab.SEGMENTS); None: no segments reach the ranks
    segments: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _opt(argv: list[str], *names: str) -> str | None:
    """The value of the first of `names` on a command line (`--x V` or `--x=V`)."""
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def _int(argv, *names, default: int) -> int | None:
    v = _opt(argv, *names)
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def server_process(pid: int):
    """(server psutil.Process, [(rank pid, title)]): the PID itself or, for a scheduler
    PID, its parent; ranks by their titles (discover.py)."""
    from .discover import discover, parse_title, title_of
    disc = discover(pid)  # LiveError (an MmdiagError) when PID is neither a server nor a rank
    proc = psutil.Process(pid)
    if disc.how == "scheduler":
        proc = proc.parent()
        kids = [c for c in proc.children(recursive=True) if parse_title(title_of(c)) is not None]
        ranks = [(c.pid, title_of(c)) for c in kids]
    else:
        ranks = [(r.pid, r.title) for r in disc.ranks]
    return proc, sorted(ranks)


def _interpreters(proc, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
    """The interpreter paths that give the process its sys.prefix, un-resolved: a venv's
    bin/python is a symlink to the base interpreter, and only the link's own path leads
    Python to the pyvenv.cfg beside it (so /proc/PID/exe, resolved, finds the base's
    packages, not the venv's). argv[0] (found on the process's PATH when bare), then the
    environment's VIRTUAL_ENV / CONDA_PREFIX interpreters, then /proc/PID/exe."""
    out = []
    a0 = argv[0] if argv else ""
    if os.path.basename(a0).startswith("python"):  # not a title that setproctitle wrote
        if os.sep in a0:
            out.append(os.path.join(cwd, a0))
        else:
            found = shutil.which(a0, path=env.get("PATH", ""))
            out += [found] if found else []
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if env.get(var):
            out += [os.path.join(env[var], "bin", n) for n in ("python3", "python")]
    try:
        out.append(proc.exe())
    except psutil.Error:
        pass
    seen: set[str] = set()
    return [p for p in out if os.path.isfile(p) and not (p in seen or seen.add(p))]


def _mapped_sglang(proc) -> str | None:
    """An `sglang` package under a site-packages folder the process has mapped (its
    extension modules: torch's, SGLang's Rust parts) or holds open."""
    paths = []
    try:
        paths = [m.path for m in proc.memory_maps(grouped=True)] + [f.path for f in proc.open_files()]
    except psutil.Error:
        pass
    for p in paths:
        i = p.find(f"{os.sep}site-packages{os.sep}")
        if i >= 0:
            cand = os.path.join(p[:i], "site-packages", "sglang")
            if os.path.isfile(os.path.join(cand, "__init__.py")):
                return cand
    return None


def sglang_dir_of(proc) -> str | None:
    """The `sglang` package the server imports: its own interpreter, as the process started
    it (un-resolved path), with its environment and working directory, answers find_spec (no
    import of SGLang); else a site-packages `sglang` the process has mapped."""
    try:
        argv, env, cwd = proc.cmdline(), proc.environ(), proc.cwd()
    except psutil.Error:
        return None
    for exe in _interpreters(proc, argv, env, cwd):
        try:
            r = subprocess.run([exe, "-c", _FIND], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.stdout.strip():
            return r.stdout.strip()
    return _mapped_sglang(proc)


def _sizes(argv, ranks) -> tuple[int, int]:
    from .discover import parse_title
    parts = [parse_title(t) or {} for _, t in ranks]
    tp_titles = max((p.get("TP", 0) for p in parts), default=0) + 1
    dp_titles = max((p.get("DP", 0) for p in parts), default=0) + 1
    return _int(argv, "--tp-size", "--tp", default=tp_titles), _int(argv, "--dp-size", "--dp", default=dp_titles)


def read_server(pid: int, sglang_path: str | None = None) -> ServerSettings:
    """The effective settings of the server behind PID (see the module docstring)."""
    from ..sglang.detect import detect
    from ..sglang.locate import locate
    try:
        proc, ranks = server_process(pid)
        argv, env, t0 = proc.cmdline(), proc.environ(), proc.create_time()
    except psutil.NoSuchProcess:
        raise SGLangError(f"no process with PID {pid}", fix="check the PID (ps -eo pid,args | grep sglang)") from None
    except psutil.AccessDenied:
        raise SGLangError(f"cannot read process {pid} (access denied)",
                          fix="run mmdiag as the user that runs the server, or as root") from None
    notes: list[str] = []
    pkg = sglang_path or sglang_dir_of(proc)
    det = None
    if pkg:
        try:
            det = detect(locate(pkg))
        except SGLangError as e:
            notes.append(f"the server's SGLang at {pkg} could not be read: {e.one_line()}")
    else:
        notes.append("could not find the `sglang` package the server imports; pass --sglang PATH")
    f = det.facts if det else None
    if f is not None and f.family_note:
        notes.append(f.family_note)
    tp, dp = _sizes(argv, ranks)
    flag_on = "--enable-broadcast-mm-inputs-process" in argv
    flag_src = "command line" if flag_on else "default of the release"
    if flag_on and f is not None and f.flag_declared is None:
        notes.append("--enable-broadcast-mm-inputs-process is on the command line but this release has no such flag")
    pre = env.get("SGLANG_MM_PRECOMPUTE_HASH")
    pre_on = (pre or "").strip().lower() in _TRUE
    pre_effective = pre_on and f is not None and f.precompute_env is not None
    if pre_on and f is not None and f.precompute_env is None:
        notes.append("SGLANG_MM_PRECOMPUTE_HASH is set but this release does not read it "
                     "(`mmdiag apply precompute` patches it in)")
    launch = launch_of(argv, env)
    version = det.install.version if det else None
    transport, tsrc = _transport(argv, env, f, version, launch)
    patch, pending = None, False
    content_hash = det.content_hash if det is not None else None
    segments = det.segments if det is not None else None
    if det is not None and det.manifest:
        patch = "+".join(det.manifest.get("patches") or [det.manifest["strategy"]])
        mm_utils = det.install.path("mm_utils")
        if content_hash != DEFAULT_HASH and mm_utils.exists() and os.stat(mm_utils).st_mtime > t0:
            content_hash = DEFAULT_HASH  # the server imported SGLang's own before the patch
        if (SEGMENTS_POOL in det.manifest.get("patches", ()) and mm_utils.exists()
                and os.stat(mm_utils).st_mtime > t0):
            segments = SEGMENTS_FRESH  # the server imported the release's own writer before the patch
        written = max((os.stat(det.install.package_dir / rel).st_mtime for rel in det.manifest["files"]
                       if (det.install.package_dir / rel).exists()), default=0.0)
        pending = written > t0
        if pending:
            notes.append(f"the mmdiag patch `{patch}` was written after the server started: restart the server "
                         "to run it")
    skip = env.get("SGLANG_MM_SKIP_COMPUTE_HASH")
    if (skip or "").strip().lower() in _TRUE:
        if det is not None and not at_least(det.install.version, since("skip_hash_family")):
            notes.append(f"SGLANG_MM_SKIP_COMPUTE_HASH is set but this release does not read it "
                         f"(from {since('skip_hash_family')})")
        else:
            content_hash = "random"
            notes.append(_skip_hash_note(det, patch, flag_on, pre_effective))
    strategy = det.manifest.get("strategy") if det is not None and det.manifest else None
    hashing = who_hashes(det, version, launch, strategy, flag_on, pre_effective)
    if launch.rust_server and det is not None and not rust_hashes(version, launch):
        first = facts()["rust_server"]["images_from"]
        notes.append(f"SGLANG_RUST_SERVER=1 is set but this release's Rust front end takes no images (from {first}): "
                     "the Python tokenizer manager handles multimodal requests")
    started = _dt.datetime.fromtimestamp(t0, _dt.timezone.utc).isoformat(timespec="seconds")
    return ServerSettings(proc.pid, argv, started, ranks, tp, dp, flag_on, flag_src, pre, pre_effective,
                          transport, tsrc, str(det.install.package_dir) if det else pkg,
                          det.install.version if det else None, f.family if f else None, patch, pending,
                          skip, asdict(launch), hashing, content_hash, segments, notes)


def _skip_hash_note(det, patch: str | None, flag_on: bool, pre_effective: bool) -> str:
    """SGLANG_MM_SKIP_COMPUTE_HASH=1 draws a random hash wherever an item would be hashed:
    safe where that happens once (the tokenizer, or the entry rank before 17a57fd's
    broadcast), a divergence where every TP rank materializes on its own (measured:
    `replay --impl sglang` on 0.5.9 ends with ranks disagreeing on hashes and pad values)."""
    from .. import strategies
    strategy = det.manifest.get("strategy") if det is not None and det.manifest else None
    patched = strategies.REGISTRY.get(strategy) if strategy else None
    once = pre_effective or bool(patched and patched.hashes_in_tokenizer)
    per_rank = not once and det is not None and (
        strategy in ("revert", "dict") or det.variant == "per-rank"
        or (det.variant == "broadcast-flag" and not flag_on and strategy is None))
    if per_rank:
        return ("SGLANG_MM_SKIP_COMPUTE_HASH=1 while every TP rank materializes on its own: each rank draws its "
                "own random hash, so the ranks disagree on pad values and prefix-cache keys; set "
                "SGLANG_MM_PRECOMPUTE_HASH=1 as well (the tokenizer draws it once), or unset it")
    return ("SGLANG_MM_SKIP_COMPUTE_HASH=1: items are not hashed (a random hash is drawn " +
            ("once, in the tokenizer" if once else "where the path hashes") +
            "), so repeated images no longer share prefix-cache entries")


def launch_of(argv: list[str], env: dict[str, str]) -> Launch:
    """The launch settings (facts.Launch) from a server's command line and environment."""
    return Launch(dist_init_addr=_opt(argv, "--dist-init-addr"),
                  skip_tokenizer_init="--skip-tokenizer-init" in argv,
                  nnodes=_int(argv, "--nnodes", default=1),
                  rust_server=(env.get(facts()["rust_server"]["env"]) or "").strip().lower() in _TRUE)


def who_hashes(det, version: str | None, launch: Launch, patch: str | None, flag_on: bool,
               pre_effective: bool) -> str:
    """Who computes each item's hash: the Rust front end, the tokenizer once, the entry rank
    once (then broadcast), or every TP rank on its own."""
    from ..strategies import REGISTRY
    if rust_hashes(version, launch):
        return (f"the Rust front end's workers ({facts()['rust_server']['env']}=1), before the scheduler: items "
                "arrive hashed, no rank hashes")
    if pre_effective:
        how = det.facts.precompute_hashing if det is not None else None
        return "the tokenizer, once (SGLANG_MM_PRECOMPUTE_HASH=1" + (f"; {how})" if how else ")")
    cls = REGISTRY.get(patch) if patch else None
    if cls is not None and cls.hashes_in_tokenizer:
        return f"the tokenizer, once (mmdiag patch `{patch}`)"
    variant = det.variant if det is not None else None
    entry = (cls is not None and cls.collectives != "none") or (cls is None and (
        variant == "broadcast-always" or (variant == "broadcast-flag" and flag_on)))
    if entry:
        return "the entry rank, once, then broadcast to the others"
    return "every TP rank, each on its own" if det is not None else "unknown (release not found)"


def _transport(argv, env, f, version: str | None, launch: Launch) -> tuple[str, str]:
    opt = _opt(argv, "--mm-feature-transport")
    if opt and opt != "cpu":
        return opt, "--mm-feature-transport"
    if (env.get("SGLANG_USE_CUDA_IPC_TRANSPORT") or "").strip().lower() in _TRUE:
        return "cuda_ipc", "SGLANG_USE_CUDA_IPC_TRANSPORT=1"
    if f is None:
        return "unknown", "release not found"
    return effective_transport(version, TRANSPORT_SHM if f.transport == TRANSPORT_SHM else TRANSPORT_PICKLE, launch)


def header_lines(pid: int, sglang_path: str | None = None) -> list[str]:
    """A few lines naming the configuration a server runs: for `doctor --pid` and the
    head of `mmdiag profile`. Raises an MmdiagError when PID is not a server or rank."""
    return settings_lines(read_server(pid, sglang_path))


def settings_lines(s: ServerSettings) -> list[str]:
    pre = ("on" if s.precompute_effective else f"set to {s.precompute_env!r}, not read by this release"
           if s.precompute_env else "unset")
    lines = [
        f"server pid {s.pid}, started {s.started}; SGLang {s.version or 'unknown'} "
        f"({s.family or 'unknown family'}) at {s.sglang_dir or '?'}",
        f"TP {s.tp_size}, DP {s.dp_size}, {len(s.ranks)} scheduler process(es); "
        f"broadcast flag {'on' if s.broadcast_flag else 'off'} ({s.broadcast_flag_source}); "
        f"SGLANG_MM_PRECOMPUTE_HASH {pre}; feature transport {s.feature_transport} ({s.feature_transport_source})",
        f"hashing: {s.hashing}",
        f"mmdiag patch: {s.patch or 'none'}" + (" (written after the server started: not running yet)"
                                                 if s.patch_pending else "")
        + f"; content hash {s.content_hash or 'unknown'}"
        + (f" ({PREFIX_CACHE[s.content_hash]})" if s.content_hash in PREFIX_CACHE else "")
        + (f"; shm segments {s.segments}" if s.segments else ""),
    ]
    return lines + [f"note: {n}" for n in s.notes]
