"""Where the live rules' function names really live: the definitions in real
source files (SGLang wheels read from their zip, never imported; mmdiag's own
modules and the patch code it writes into SGLang; torch, pyzmq and the
standard library as installed), indexed by qualified name."""
from __future__ import annotations

import ast
import os
import re
import sysconfig
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mmdiag.live.rules import Frame

REPO = Path(__file__).resolve().parent.parent

# The files of a wheel the scheduler's multimodal path runs through (all releases).
SGLANG_FILES = (
    "srt/managers/scheduler.py", "srt/managers/schedule_batch.py", "srt/managers/mm_utils.py",
    "srt/managers/io_struct.py", "srt/managers/tp_worker.py", "srt/utils/common.py", "srt/utils.py",
    "srt/managers/scheduler_components/request_receiver.py", "srt/managers/scheduler_components/idle_sleeper.py",
    "srt/multimodal/cache/identity.py", "srt/multimodal/processors/hash_executor.py",
    "srt/distributed/device_communicators/shm_broadcast.py", "srt/managers/tokenizer_manager.py",
    "srt/managers/scheduler_runtime_checker_mixin.py",
)
_DEF = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", re.M)
# Methods mmdiag's patches add by renaming SGLang's (rename_method(..., "_mmdiag_orig_x")).
_RENAMED = re.compile(r"[\"'](_mmdiag_\w+)[\"']")


@dataclass(frozen=True)
class Def:
    qualname: str
    file: str      # as py-spy shows it: the path inside site-packages
    line: int

    def frame(self) -> Frame:
        return Frame(self.qualname, self.file, self.line)


def index_source(text: str, file: str) -> dict[str, Def]:
    """qualname (and short name) -> definition, for every def / class in `text`;
    code held in strings (mmdiag's patch templates) is found by its `def NAME`."""
    out: dict[str, Def] = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        tree = None

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{prefix}{child.name}"
                d = Def(q, file, child.lineno)
                out.setdefault(q, d)
                out.setdefault(child.name, d)
                walk(child, q + "." if isinstance(child, ast.ClassDef) else q + ".<locals>.")
    if tree is not None:
        walk(tree, "")
    for m in list(_DEF.finditer(text)) + list(_RENAMED.finditer(text)):
        out.setdefault(m.group(1), Def(m.group(1), file, text.count("\n", 0, m.start()) + 1))
    return out


@lru_cache(maxsize=16)
def wheel_defs(wheel: str) -> dict[str, Def]:
    """Definitions in a wheel's scheduler-path files, read from the zip."""
    out: dict[str, Def] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("sglang/") and name[len("sglang/"):] in SGLANG_FILES:
                text = z.read(name).decode("utf-8", "replace")
                for k, v in index_source(text, "site-packages/" + name).items():
                    out.setdefault(k, v)
    return out


def _files(root: Path, patterns) -> list[Path]:
    return [p for pat in patterns for p in sorted(root.glob(pat))]


@lru_cache(maxsize=1)
def c10d_defs() -> dict[str, Def]:
    """torch.distributed's collectives (where a gloo wait shows on a stack)."""
    p = Path(torch.__file__).parent / "distributed" / "distributed_c10d.py"
    return index_source(p.read_text(errors="replace"), "torch/distributed/distributed_c10d.py")


@lru_cache(maxsize=1)
def local_defs() -> dict[str, Def]:
    """mmdiag's own code (replay, the mm path's primitives, strategies, SGLang patches and runtime), torch's
    distributed and pickling modules, pyzmq's socket layer, the standard library's
    threading, queue and futures."""
    roots = [(REPO / "mmdiag", ["replay/*.py", "mmpath/*.py", "strategies/*.py", "sglang/patches/*.py", "sglang/runtime.py"])]
    troot = Path(torch.__file__).parent
    roots.append((troot, ["distributed/distributed_c10d.py", "_tensor.py", "_utils.py", "storage.py",
                          "multiprocessing/reductions.py"]))
    try:
        import zmq
        roots.append((Path(zmq.__file__).parent, ["sugar/*.py"]))
    except ImportError:
        pass
    std = Path(sysconfig.get_paths()["stdlib"])
    roots.append((std, ["threading.py", "queue.py", "concurrent/futures/_base.py", "pickle.py",
                        # the tokenizer side's event loop and hash pool (waiting for work)
                        "selectors.py", "asyncio/runners.py", "asyncio/base_events.py", "concurrent/futures/thread.py"]))
    out: dict[str, Def] = {}
    for root, pats in roots:
        for p in _files(root, pats):
            rel = os.path.relpath(p, root.parent)
            for k, v in index_source(p.read_text(errors="replace"), rel).items():
                out.setdefault(k, v)
    return out
