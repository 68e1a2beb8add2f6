"""Running py-spy (the PyPI package's binary) and reading what it writes.

Per rank non-blocking `py-spy record --format raw --threads --idle` processes
run over the same window: one with every sample of every thread (phases), and
on part of the blocks one with `--gil` (only samples of the thread holding the GIL). All ranks' recorders
start together; the window opens when every one of them reports sampling and
closes when mmdiag sends them SIGINT together (py-spy then writes what it has).
Recorders run in their own session (a Ctrl-C reaches mmdiag, which stops them)
and die with mmdiag even if it is SIGKILLed (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .errors import LiveError, PtraceError, PySpyError, RawParseError
from .rules import Frame

TESTED_VERSIONS = ((0, 3), (0, 4))
ENV_PYSPY = "MMDIAG_PYSPY"
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_THREAD = re.compile(r"^thread \((?P<tid>0x[0-9a-fA-F]+|\d+)\)(?:: (?P<name>.*))?$")
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# --- locating py-spy --------------------------------------------------------------

@dataclass(frozen=True)
class PySpy:
    path: str
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])


def find_pyspy(explicit: str | None = None) -> PySpy:
    """py-spy from `explicit`, $MMDIAG_PYSPY, PATH, or beside this Python (its venv)."""
    src = explicit or os.environ.get(ENV_PYSPY)
    if src:
        path = src if os.sep in src else shutil.which(src)
        if not path or not os.access(path, os.X_OK):
            how = "--pyspy" if explicit else f"${ENV_PYSPY}"
            raise PySpyError(f"py-spy not found at {src} ({how})",
                             fix="point it at a py-spy binary, or unset it to use the one on PATH")
    else:
        path = shutil.which("py-spy")
        if path is None:
            beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
            path = beside if os.access(beside, os.X_OK) else None
        if path is None:
            raise PySpyError("py-spy not found on PATH",
                             fix=f"pip install py-spy (in mmdiag's environment), or set ${ENV_PYSPY}")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PySpyError(f"cannot run {path} ({e})", fix="reinstall py-spy (pip install py-spy)") from None
    m = re.search(r"py-spy (\d+\.\d+\.\d+\S*)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise PySpyError(f"{path} is not py-spy (`--version` said {(out.stdout + out.stderr).strip()[:60]!r})",
                         fix="point $MMDIAG_PYSPY at a py-spy binary")
    return PySpy(path, m.group(1))


def check_version(spy: PySpy) -> str | None:
    """A warning when this py-spy is not one mmdiag was tested with."""
    if spy.version_tuple[:2] not in TESTED_VERSIONS:
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VERSIONS)
        return f"py-spy {spy.version} is not a version mmdiag was tested with ({tested}); output may not parse"
    return None


# --- why ptrace was refused ---------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _has_cap_sys_ptrace() -> bool | None:
    status = _read("/proc/self/status") or ""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.M)
    return None if not m else bool(int(m.group(1), 16) & (1 << 19))


def _in_container() -> bool:
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    cg = _read("/proc/1/cgroup") or ""
    return any(k in cg for k in ("docker", "kubepods", "containerd", "lxc", "podman"))


def explain_ptrace(pid: int, *, ptrace_scope: str | None = "auto", my_uid: int | None = None,
                   target_uid: int | None = None, cap: bool | None | str = "auto",
                   container: bool | None = None) -> str:
    """Why the kernel refused to let py-spy read `pid`, and how to fix it (one line).
    The keyword arguments override what is read from this machine (for tests)."""
    if ptrace_scope == "auto":
        ptrace_scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    my_uid = os.geteuid() if my_uid is None else my_uid
    if target_uid is None:
        try:
            import psutil
            target_uid = psutil.Process(pid).uids().effective
        except Exception:
            target_uid = my_uid
    cap = _has_cap_sys_ptrace() if cap == "auto" else cap
    container = _in_container() if container is None else container
    if target_uid != my_uid and my_uid != 0:
        return (f"ptrace refused: PID {pid} runs as uid {target_uid} and mmdiag as uid {my_uid}; "
                f"run mmdiag as that user or with sudo")
    if container and not cap:
        return ("ptrace refused: this container lacks CAP_SYS_PTRACE; restart it with "
                "`--cap-add SYS_PTRACE` (docker) or securityContext.capabilities.add: [SYS_PTRACE] (Kubernetes)")
    if ptrace_scope and ptrace_scope.isdigit() and int(ptrace_scope) >= 1 and not cap:
        level = {"1": "1 (only a parent may trace)", "2": "2 (only CAP_SYS_PTRACE may trace)",
                 "3": "3 (no tracing at all)"}.get(ptrace_scope, ptrace_scope)
        fix = ("reboot with a lower setting; 3 cannot be lowered at run time" if ptrace_scope == "3"
               else "run mmdiag with sudo, or `sudo sysctl kernel.yama.ptrace_scope=0`")
        return f"ptrace refused: kernel.yama.ptrace_scope is {level}; {fix}"
    if not cap and my_uid != 0:
        return (f"ptrace refused reading PID {pid}; run mmdiag with sudo or give py-spy CAP_SYS_PTRACE "
                f"(`sudo setcap cap_sys_ptrace+ep $(which py-spy)`)")
    return (f"ptrace refused reading PID {pid} (a seccomp/AppArmor/SELinux policy may block "
            "process_vm_readv); allow ptrace for mmdiag's user or run it on the host")


def classify_failure(stderr: str, pid: int, spy: PySpy) -> LiveError:
    """Turn py-spy's stderr into one actionable error."""
    errors = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith(("Error:", "error:"))]
    first = errors[0].split(":", 1)[1].strip() if errors else (stderr.strip().splitlines() or ["no output"])[-1]
    low = stderr.lower()
    if "failed to find python version" in low or "failed to find a python interpreter" in low \
            or "doesn't appear to be a python" in low:
        return LiveError(f"PID {pid} is not a Python process (py-spy: {first})",
                         fix="pass an SGLang scheduler or server PID")
    if "permission denied" in low or "operation not permitted" in low or "os error 1)" in low:
        return PtraceError(explain_ptrace(pid))
    if "no such file or directory" in low or "no such process" in low or "os error 3)" in low:
        return LiveError(f"process {pid} exited before py-spy could attach")
    return PySpyError(f"py-spy {spy.version} failed on PID {pid}: {first}")


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _env() -> dict[str, str]:
    return dict(os.environ, RUST_BACKTRACE="0")


def dump(spy: PySpy, pid: int, timeout: float = 30.0) -> list[dict]:
    """`py-spy dump --json --nonblocking`: every thread's stack, `active` and
    `owns_gil`. Used to check a rank can be read before the window opens."""
    try:
        out = subprocess.run([spy.path, "dump", "--json", "--nonblocking", "-p", str(pid)],
                             capture_output=True, text=True, timeout=timeout, env=_env(),
                             preexec_fn=_pdeathsig)
    except subprocess.TimeoutExpired:
        raise PySpyError(f"py-spy {spy.version} dump of PID {pid} did not finish in {timeout:.0f} s") from None
    if out.returncode != 0:
        raise classify_failure(out.stderr, pid, spy)
    return parse_dump(out.stdout, spy.version, pid)


def parse_dump(text: str, version: str, pid: int) -> list[dict]:
    try:
        threads = json.loads(text)
        for t in threads:
            t["thread_id"], t["owns_gil"], t["active"]
            for f in t["frames"]:
                f["name"], f["filename"]
    except (ValueError, TypeError, KeyError) as e:
        raise PySpyError(f"py-spy {version}: `dump --json` output for PID {pid} does not parse "
                         f"({type(e).__name__}: {e})",
                         fix="install a py-spy mmdiag was tested with: pip install 'py-spy>=0.3,<0.5'") from None
    return threads


# --- recording ------------------------------------------------------------------------

@dataclass
class Recorder:
    pid: int
    out: str
    gil: bool
    proc: subprocess.Popen
    err_path: str

    def stderr(self) -> str:
        try:
            with open(self.err_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def started(self) -> bool:
        return "Sampling process" in self.stderr()

    @property
    def target_exited(self) -> bool:
        return "process exited" in self.stderr()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def start_recorder(spy: PySpy, pid: int, out: str, rate: int, max_s: float, gil: bool,
                   log_dir: str | None = None, lines: bool = True) -> Recorder:
    """lines=False: --nolineno, which spares py-spy reading each frame's line table
    (about a tenth of its CPU); the rules match functions and files, not lines."""
    cmd = [spy.path, "record", "-p", str(pid), "-f", "raw", "-o", out, "-r", str(rate),
           "-d", str(int(math.ceil(max_s))), "--threads", "--idle", "--nonblocking"]
    if gil:
        cmd.append("--gil")
    if not lines:
        cmd.append("--nolineno")
    err_path = os.path.join(log_dir, os.path.basename(out) + ".log") if log_dir else out + ".log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True, env=_env(), preexec_fn=_pdeathsig)
    return Recorder(pid, out, gil, proc, err_path)


def stop_all(recorders: list[Recorder], grace: float = 10.0) -> None:
    """SIGINT every recorder (py-spy writes its file), then wait; SIGKILL stragglers."""
    for r in recorders:
        r.stop()
    deadline = time.monotonic() + grace
    for r in recorders:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.kill()


# --- the raw format ------------------------------------------------------------------

@dataclass
class ThreadSamples:
    tid: int
    name: str | None
    stacks: Counter = field(default_factory=Counter)  # tuple[Frame, ...] (root first) -> count

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())


def parse_raw(text: str, source: str, version: str | None = None) -> dict[int, ThreadSamples]:
    """py-spy's `record --format raw --threads` output: one line per distinct stack,
    `thread (TID)[: NAME];frame (file:line);...;leaf (file:line) COUNT`, root first."""
    who = f"py-spy {version} " if version else ""
    fix = ("record with `py-spy record --format raw --threads --idle -o FILE` (py-spy 0.3/0.4)"
           if not version else "install a py-spy mmdiag was tested with: pip install 'py-spy>=0.3,<0.5'")
    threads: dict[int, ThreadSamples] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            raise RawParseError(f"{who}raw output does not parse: line {lineno} is not `stack count`",
                                where=source, fix=fix)
        parts = m.group("stack").split(";")
        t = _THREAD.match(parts[0])
        if t is None:
            if parts[0].startswith("process "):
                raise RawParseError(f"line {lineno}: recorded with --subprocesses; record each rank's PID on its own",
                                    where=source, fix=fix)
            raise RawParseError(f"{who}raw output does not parse: line {lineno} has no `thread (ID)` frame "
                                "(recorded without --threads?)", where=source, fix=fix)
        tid_s = t.group("tid")
        tid = int(tid_s, 16) if tid_s.startswith("0x") else int(tid_s)
        frames = []
        for p in parts[1:]:
            fm = _FRAME.match(p)
            if fm:
                frames.append(Frame(fm.group("name"), fm.group("file"),
                                    int(fm.group("line")) if fm.group("line") else None))
            else:
                frames.append(Frame(p))
        ts = threads.setdefault(tid, ThreadSamples(tid, t.group("name")))
        if t.group("name") and not ts.name:
            ts.name = t.group("name")
        ts.stacks[tuple(frames)] += int(m.group("count"))
    return threads


def read_raw(path: str, version: str | None = None) -> dict[int, ThreadSamples]:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except FileNotFoundError:
        raise RawParseError("no such file", where=path,
                            fix="give py-spy raw files (py-spy record --format raw, or mmdiag profile --raw-dir DIR)") from None
    except UnicodeDecodeError:
        raise RawParseError("not text: not a py-spy raw file", where=path,
                            fix="record with `py-spy record --format raw --threads --idle -o FILE`") from None
    except OSError as e:
        raise RawParseError(f"cannot read ({e.strerror})", where=path) from None
    return parse_raw(text, path, version)


def main_thread(threads: dict[int, ThreadSamples], pid: int | None = None) -> ThreadSamples | None:
    """The interpreter's main thread: named MainThread, else TID == PID (Linux),
    else the lowest TID."""
    if not threads:
        return None
    for t in threads.values():
        if t.name == "MainThread":
            return t
    if pid is not None and pid in threads:
        return threads[pid]
    return threads[min(threads)]
