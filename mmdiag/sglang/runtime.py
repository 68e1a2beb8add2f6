"""Run an install's own multimodal scheduler path (patched or not) outside SGLang.

SGLang's import chain needs CUDA-only packages, so the code is taken out of the
install's files by AST and compiled into one module (registered in sys.modules
under a name derived from the install path, so objects pickle across ranks):

  from scheduler.py      Scheduler._process_and_broadcast_mm_inputs, _get_multimodal_inputs,
                         process_input_requests (and _mmdiag_* batch helpers,
                         _mmdiag_orig_process_input_requests, abort_request when patched),
                         handle_batch_generate_request, handle_batch_embedding_request,
                         is_health_check_generate_req
  from schedule_batch.py Modality, MultimodalDataItem, MultimodalInputs (SGLang's own)
  from mm_utils.py       data_hash, tensor_hash, hash_feature
  from utils/common.py   flatten_nested_list, broadcast_pyobj
  from tokenizer_manager.py  the _mmdiag_* helpers of an applied `precompute` or `shm`
  from mm_utils.py, and request_receiver.py or scheduler.py (0.5.10+, on request)
                         ShmPointerMMData, wrap/unwrap_shm_features and their helpers, the
                         receive after the recv broadcast (_finalize_shm_features, or to
                         0.5.12 the statement of recv_requests that does its part)

`from sglang... import` statements inside extracted functions are removed (the
names they bind are module globals here). Stand-ins, each minimal and documented
where defined below: request/abort classes, the dispatcher, the scheduler state
the extracted methods read, handle_generate_request/handle_embedding_request
(only their multimodal part, with the call expression taken from the install's
own handler), the untouched part of abort_request, and CUDA-only helpers.

API (what the replay calls, inside real gloo process groups):

    path = load_sglang_mm_path(sglang_dir)          # -> SGLangMMPath (call on every rank)
    sched = path.make_scheduler(cpu_group, enable_broadcast_mm_inputs_process=False)
    item = path.make_item(feature_tensor, modality="IMAGE")
    raw = path.make_mm_inputs([item, ...])           # the dict the tokenizer manager produces
    path.tokenizer_side(raw)                         # the install's tokenizer-side step
                                                     # (hashing when `precompute` is applied)
    reqs = [path.generate_req(rid, raw), path.generate_req(rid2), path.abort_req(rid3), ...]
    reqs = path.broadcast_pyobj(reqs, group)         # SGLang's own recv_requests transport
    reqs = path.finish_recv(sched, reqs)             # the rest of recv_requests (mmdiag's shm patch maps its segments)
    shm = path.shm_transport(cpu_group, prefix)      # 0.5.10+: the release's own shm transport (ReleaseShm):
    shm.wrap(raw); shm.receive(reqs)                 #   its segment write; its receive after broadcast_pyobj
    out = path.process_input_requests(sched, reqs)   # {rid: MultimodalInputs | None}
    path.stats                                       # RuntimeStats of this process
    path.dist.issue = fn                             # fn(obj_list, src=, group=) issues the
                                                     # extracted code's broadcast_object_list
    sched._mmdiag_mm_cache                           # batch only: {} after every call
"""
from __future__ import annotations

import __future__
import ast
import asyncio
import contextlib
import copy
import dataclasses
import enum
import functools
import hashlib
import importlib
import logging
import os
import pickle
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import astutil
from .detect import detect, mm_call_of, scheduler_methods
from .errors import UnknownLayout
from .facts import facts
from .locate import SGLangInstall, locate
from .probes import precompute_statement

logger = logging.getLogger("mmdiag.sglang.runtime")


# ---- stand-ins for io_struct request classes (only the fields the mm path reads) ----
@dataclass
class TokenizedGenerateReqInput:
    rid: str
    mm_inputs: Any = None
    input_ids: list = field(default_factory=list)
    positional_embed_overrides: Any = None


@dataclass
class TokenizedEmbeddingReqInput:
    rid: str
    image_inputs: Any = None
    input_ids: list = field(default_factory=list)
    positional_embed_overrides: Any = None


@dataclass
class BatchTokenizedGenerateReqInput:
    batch: list

    def __len__(self):
        return len(self.batch)

    def __iter__(self):
        return iter(self.batch)


@dataclass
class BatchTokenizedEmbeddingReqInput(BatchTokenizedGenerateReqInput):
    pass


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False


class RpcReqOutput:  # stand-in: never produced here (no RPC requests are replayed)
    pass


class CudaIpcTensorTransportProxy:  # stand-in: CPU path only, never matches a feature
    pass


class ShmPointerMMData:  # stand-in: features travel inline (pickled), never as shm handles
    pass


def gpu_tensor_hash(tensor):  # stand-in: mm_utils hashes CUDA tensors with a triton kernel
    raise RuntimeError("mmdiag runtime replays the CPU path; CUDA features are not supported")


class _EnvVar:
    def __init__(self, name):
        self.name = name

    def get(self):
        v = os.environ.get(self.name)
        if v is None:
            return False  # the mm path's variables are EnvBool(False) in every release
        return v.strip().lower() in ("1", "true", "yes", "on")

    def is_set(self):
        return self.name in os.environ


class _Envs:  # stand-in for sglang.srt.environ.envs: this process's environment, read when asked
    def __getattr__(self, name):
        return _EnvVar(name)


class _EmptyBatch:  # stand-in for Scheduler.running_batch: nothing running
    def is_empty(self):
        return True


class _Dispatcher:  # stand-in for sglang.utils.TypeBasedDispatcher
    def __init__(self, mapping):
        self._mapping = mapping

    def __call__(self, obj):
        for ty, fn in self._mapping:
            if isinstance(obj, ty):
                return fn(obj)
        raise ValueError(f"mmdiag runtime: no handler for {type(obj).__name__}")


@dataclass
class RuntimeStats:
    """Counters of this process, for tests and the replay's phase timers."""

    from_dict_calls: int = 0
    from_dict_s: float = 0.0
    hash_calls: int = 0
    hash_s: float = 0.0
    collectives: int = 0
    collective_s: float = 0.0
    # Hashing done by tokenizer_side (the tokenizer manager, phase `tokenizer_hash`),
    # kept out of the scheduler's hash counters above.
    tokenizer_hash_calls: int = 0
    tokenizer_hash_s: float = 0.0

    def reset(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)


class _DistProxy:
    """torch.distributed for the extracted code: counts and times broadcast_object_list,
    issued by `issue` when set (the replay's timed collective, mmdiag.mmpath.collectives)."""

    def __init__(self, stats):
        self._stats = stats
        self.issue = None

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def broadcast_object_list(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return (self.issue or torch.distributed.broadcast_object_list)(*a, **k)
        finally:
            self._stats.collectives += 1
            self._stats.collective_s += time.perf_counter() - t0


class _TorchProxy:
    def __init__(self, dist_proxy):
        self.distributed = dist_proxy

    def __getattr__(self, name):
        return getattr(torch, name)


class _StripSGLangImports(ast.NodeTransformer):
    """Drop `from sglang... import x` inside extracted code; x is a module global here."""

    def __init__(self):
        self.names: list[str] = []

    def visit_ImportFrom(self, node):
        if node.module and node.module.split(".")[0] == "sglang":
            self.names += [a.asname or a.name for a in node.names]
            return ast.Pass()
        return node


def _extract(path: Path, names: list[str], *, cls: str | None = None, required=True) -> list[ast.stmt]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, str(path))
    body = tree.body
    if cls is not None:
        c = astutil.find_class(tree, cls)
        if c is None:
            raise UnknownLayout(f"class {cls} not found", where=str(path))
        body = c.body
    found = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            found[node.name] = node
    missing = [n for n in names if n not in found]
    if missing and required:
        raise UnknownLayout(f"{', '.join(missing)} not found", where=str(path),
                            fix="mmdiag's runtime does not know this layout")
    return [found[n] for n in names if n in found]


def _top_level(path: Path) -> dict[str, ast.stmt]:
    """Module-level functions, classes and simple assignments of one file, by name."""
    st = path.stat()
    return _top_level_cached(path, st.st_mtime_ns, st.st_size)  # a patched file is read again


@functools.lru_cache(maxsize=64)
def _top_level_cached(path: Path, _mtime: int, _size: int) -> dict[str, ast.stmt]:
    tree = astutil.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, ast.stmt] = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(n.name, n)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None:
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, n)
    return out


# Modules a release's code may import for real in the rank processes: the standard
# library and the pure dependencies of the mm path (never sglang, never anything CUDA-only).
_REAL_IMPORTS = frozenset({"numpy", "torch", "msgspec"}) | frozenset(sys.stdlib_module_names)


def _imports_of(path: Path) -> dict[str, list[tuple[ast.stmt, ast.alias]]]:
    """Every name an import statement of the file binds (anywhere in it), with the statement."""
    st = path.stat()
    return _imports_cached(path, st.st_mtime_ns, st.st_size)  # a patched file is read again


@functools.lru_cache(maxsize=64)
def _imports_cached(path: Path, _mtime: int, _size: int) -> dict[str, list[tuple[ast.stmt, ast.alias]]]:
    tree = astutil.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, list] = {}
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                bound = a.asname or (a.name.split(".")[0] if isinstance(n, ast.Import) else a.name)
                out.setdefault(bound, []).append((n, a))
    return out


class _Resolver:
    """Where a name the extracted code uses is defined: a module-level def, class or
    assignment of the files given, else what their imports bind. `from sglang.X import
    y` is followed into X's file in this install (re-exports of a package's __init__
    included), so a release that moved a class (Modality to multimodal/modality.py in
    0.5.19) or added a module on the path (multimodal/cache/identity.py) is followed
    without a list per release; the standard library, numpy, torch and msgspec are
    imported for real. Anything else stays unresolved (and fails loudly in _exec)."""

    def __init__(self, pkg: Path, files: list[Path], ns: dict):
        self.pkg, self.ns = pkg, ns
        self.files: list[Path] = []
        self.table: dict[str, ast.stmt] = {}
        for f in files:
            if f.is_file():
                self.add_file(f)

    def _module_file(self, module: str, level: int, origin: Path) -> Path | None:
        if level:
            base = origin.parent
            for _ in range(level - 1):
                base = base.parent
            parts = module.split(".") if module else []
        else:
            if module.split(".")[0] != "sglang":
                return None
            base, parts = self.pkg, module.split(".")[1:]
        target = base.joinpath(*parts)
        for cand in (target.with_suffix(".py"), target / "__init__.py"):
            if cand.is_file():
                return cand
        return None

    def add_file(self, path: Path) -> None:
        if path not in self.files:
            self.files.append(path)
            for k, v in _top_level(path).items():
                self.table.setdefault(k, v)

    def _from_file(self, name: str, path: Path, depth: int) -> ast.stmt | None:
        node = _top_level(path).get(name)
        if node is not None:
            self.add_file(path)  # what the definition uses is found beside it
            return node
        return self._via_imports(name, path, depth + 1) if depth < 4 else None

    def _via_imports(self, name: str, origin: Path, depth: int = 0) -> ast.stmt | None:
        for n, a in _imports_of(origin).get(name, ()):
            if isinstance(n, ast.Import):
                if a.name.split(".")[0] in _REAL_IMPORTS:
                    self.ns[name] = importlib.import_module(a.name if a.asname else a.name.split(".")[0])
                return None
            f = self._module_file(n.module or "", n.level, origin)
            if f is not None:
                node = self._from_file(a.name, f, depth)
                if node is not None:
                    return node
            elif not n.level and (n.module or "").split(".")[0] in _REAL_IMPORTS:
                mod = importlib.import_module(n.module)
                if hasattr(mod, a.name):
                    self.ns[name] = getattr(mod, a.name)
                    return None
        return None

    def lookup(self, name: str) -> ast.stmt | None:
        if name in self.table:
            return self.table[name]
        for f in self.files:
            node = self._via_imports(name, f)
            if node is not None or name in self.ns:
                return node
        return None

    def closure(self, nodes: list[ast.stmt]) -> list[ast.stmt]:
        """`nodes` plus the definitions they use (constants such as MM_PAD_SHIFT_VALUE,
        _compute_pad_value, resolve_multimodal_item_hash, ...), each after what it uses."""
        import builtins
        have = {getattr(n, "name", None) for n in nodes} | set(dir(builtins))
        out: list[ast.stmt] = []

        def visit(node: ast.stmt) -> None:
            for m in ast.walk(node):
                if isinstance(m, ast.Name) and m.id not in have and m.id not in self.ns:
                    have.add(m.id)
                    dep = self.lookup(m.id)
                    if dep is not None and dep not in out:
                        visit(dep)
            if node not in out:
                out.append(node)

        for n in nodes:
            visit(n)
        return out


def _module_name(install: SGLangInstall) -> str:
    h = hashlib.sha256(str(install.package_dir).encode()).hexdigest()[:12]
    return f"_mmdiag_sglang_rt_{h}"


def _mm_handler_source(name: str, attr: str, callee: str | None, error_cls: str | None) -> str:
    """Stand-in handler: the install's multimodal call on recv_req.<attr>, nothing else;
    from 0.5.19 a _MultimodalInputProcessingError rejects the request (its handler aborts
    it), recorded in self.rejected."""
    call = f"{callee}(recv_req.{attr})" if callee else "None"
    guard = (f"        try:\n            image_inputs = {call}\n"
             f"        except {error_cls} as error:\n            self.rejected[recv_req.rid] = str(error)\n"
             if error_cls else f"        image_inputs = {call}\n")
    return (
        f"def {name}(self, recv_req):\n"
        f"    image_inputs = None\n"
        f"    if recv_req.{attr} is not None:\n"
        f"{guard}"
        f"    self.mm_results[recv_req.rid] = image_inputs\n"
    )


class _ServerArgs:
    """Stand-in for the server's settings the mm path reads (server_args., later
    get_mm().): the broadcast flag of the scheduler being built, the CPU transport."""

    def __init__(self):
        self.enable_broadcast_mm_inputs_process = False
        self.mm_feature_transport = "cpu"
        self.enable_pd_role_switch = False


def _base_namespace(dist: _DistProxy, settings: _ServerArgs) -> dict:
    """Module globals the extracted code finds: real modules, the request stand-ins, and
    stand-ins for what only a GPU server has (NVTX ranges, CUDA transports)."""
    return {
        "torch": _TorchProxy(dist), "np": np, "dist": dist, "time": time,
        "pickle": pickle, "hashlib": hashlib, "logger": logger, "dataclasses": dataclasses,
        "Enum": enum.Enum, "auto": enum.auto, "functools": functools, "lru_cache": functools.lru_cache,
        "wraps": functools.wraps, "os": os, "sys": sys,
        **{n: getattr(typing, n) for n in typing.__all__},
        "TokenizedGenerateReqInput": TokenizedGenerateReqInput,
        "TokenizedEmbeddingReqInput": TokenizedEmbeddingReqInput,
        "BatchTokenizedGenerateReqInput": BatchTokenizedGenerateReqInput,
        "BatchTokenizedEmbeddingReqInput": BatchTokenizedEmbeddingReqInput,
        "AbortReq": AbortReq, "RpcReqOutput": RpcReqOutput,
        "CudaIpcTensorTransportProxy": CudaIpcTensorTransportProxy, "ShmPointerMMData": ShmPointerMMData,
        "gpu_tensor_hash": gpu_tensor_hash, "envs": _Envs(),
        "get_mm": lambda: settings, "get_disagg": lambda: settings,
        # NVTX ranges exist only under a CUDA profiler: the decorators leave functions as they are.
        "scheduler_nvtx_method": lambda name: (lambda fn: fn), "profile_range": _no_range,
        "NVTX_SCHEDULER_ENABLED": False,
        "sock_send": _no_rpc,
    }


@contextlib.contextmanager
def _no_range(*_a, **_k):
    yield


def _no_rpc(*_a, **_k):  # stand-in: the replay has no RPC / Rust front end to answer
    raise RuntimeError("mmdiag runtime: no RPC socket in a replay")


class SGLangMMPath:
    """The multimodal part of one install's scheduler, runnable in a gloo group."""

    def __init__(self, install: SGLangInstall):
        self.install = install
        self.detection = det = detect(install)
        if det.variant is None:
            raise UnknownLayout("unknown SGLang layout; " + "; ".join(det.notes),
                                where=str(install.package_dir), fix="the replay cannot run this code")
        self.variant = det.variant
        self.patched = det.patched
        self.stats = RuntimeStats()
        self.dist = _DistProxy(self.stats)  # one for `torch.distributed` and `dist` alike
        self.settings = _ServerArgs()
        self.module_name = _module_name(install)
        # Rebuild on every load (the files may have been patched meanwhile).
        mod = types.ModuleType(self.module_name)
        mod.__file__ = str(install.path("scheduler"))
        self.ns = ns = mod.__dict__
        ns.update(_base_namespace(self.dist, self.settings))
        sys.modules[self.module_name] = mod
        self.resolver = _Resolver(install.package_dir, [install.path(k) for k in (
            "schedule_batch", "mm_utils", "utils_common", "scheduler")], ns)
        self._load_items()
        self._load_scheduler()
        self._load_tokenizer_step()
        self.Modality = ns["Modality"]
        self.MultimodalDataItem = ns["MultimodalDataItem"]
        self.MultimodalInputs = ns["MultimodalInputs"]
        self.ProcessorOutput = ns.get("MultimodalProcessorOutput")  # 0.5.10+: what the tokenizer sends
        self._instrument()

    def _load_items(self) -> None:
        """schedule_batch's item classes and the hashing they call, with what they use."""
        install = self.install
        nodes: list[ast.stmt] = []
        nodes += _extract(install.path("utils_common"), ["flatten_nested_list", "broadcast_pyobj"])
        nodes += _extract(install.path("mm_utils"), ["data_hash", "tensor_hash", "hash_feature"])
        # 0.5.7+: schedule_batch imports mm_utils' GPU feature-buffer helpers inside methods
        # (CUDA-only paths; present so the imports resolve, never reached on CPU features)
        nodes += _extract(install.path("mm_utils"), ["get_new_expanded_mm_items", "init_feature_buffer",
                                                     "is_feature_buffer_initialized", "reset_buffer_offset",
                                                     "try_add_to_buffer"], required=False)
        sb = install.path("schedule_batch")
        nodes += _extract(sb, ["MultimodalDataItem", "MultimodalInputs"])
        nodes += _extract(sb, ["MultimodalProcessorOutput"], required=False)  # 0.5.10+
        tm = install.path("tokenizer_manager")
        if tm.exists():  # what an applied patch runs on the tokenizer side (precompute, shm)
            nodes += [n for name, n in _top_level(tm).items() if name.startswith(("_mmdiag_", "_MMDIAG_"))]
        for name in ("Modality", "MultimodalInputFormat"):  # schedule_batch's own, or imported (0.5.19+)
            if name not in {getattr(n, "name", None) for n in nodes}:
                node = self.resolver.lookup(name)
                nodes = ([node] if node is not None else []) + nodes
        self._exec(self.resolver.closure(nodes), self.ns, str(sb))

    def _load_scheduler(self) -> None:
        """A Scheduler class of the install's own mm methods (patched or not) and the
        stand-in handlers that call its mm entry point."""
        install, det, ns = self.install, self.detection, self.ns
        spans = scheduler_methods(install.path("scheduler").read_text(encoding="utf-8"))
        wanted = [n for n in spans if n in (
            "_process_and_broadcast_mm_inputs", "_get_multimodal_inputs", "process_input_requests",
            "handle_batch_generate_request", "handle_batch_embedding_request", "_tokenized_requests",
            "_mmdiag_orig_process_input_requests") or n.startswith("_mmdiag_")
            and n != "_mmdiag_orig_recv_requests"]  # shm's wrapped receive: the caller's broadcast_pyobj stands in
        if "_mmdiag_orig_abort_request" in spans:
            wanted.append("abort_request")  # the batch wrapper; the original part is a stand-in
        methods = [spans[n].node for n in wanted if n != "_mmdiag_orig_abort_request"]
        handler = det.facts.handler or "handle_generate_request"  # 0.5.22+: _handle_generate_request
        gen_callee = mm_call_of(spans.get(handler))
        emb_callee = mm_call_of(spans.get("handle_embedding_request"), "recv_req.image_inputs")
        if gen_callee is None:
            raise UnknownLayout(f"{handler} makes no call on recv_req.mm_inputs", where=str(install.path("scheduler")))
        err = "_MultimodalInputProcessingError" if self.resolver.lookup("_MultimodalInputProcessingError") else None
        handlers = ast.parse(_mm_handler_source("handle_generate_request", "mm_inputs", gen_callee, err)
                             + _mm_handler_source("handle_embedding_request", "image_inputs", emb_callee, err)).body
        cls = ast.ClassDef(name="Scheduler", bases=[], keywords=[], decorator_list=[],
                           body=methods + handlers, type_params=[])
        nodes = self.resolver.closure([cls])
        self._exec(nodes, ns, str(install.path("scheduler")))
        self.Scheduler = ns["Scheduler"]
        if "abort_request" not in self.Scheduler.__dict__:
            self.Scheduler.abort_request = _standin_abort
        else:
            self.Scheduler._mmdiag_orig_abort_request = _standin_abort

    def _load_tokenizer_step(self) -> None:
        """The release's own tokenizer-side hashing statement (0.5.7+: `if
        envs.SGLANG_MM_PRECOMPUTE_HASH.get() ...:`, reading this process's environment),
        as an async function of (self, mm_inputs); its thread pool from 0.5.21."""
        self._release_step = self._tm_self = self._loop = None
        text = self.install.path("tokenizer_manager").read_text(encoding="utf-8") \
            if self.install.path("tokenizer_manager").exists() else None
        stmt = precompute_statement(astutil.parse(text, "tokenizer_manager.py")) if text else None
        if stmt is None:
            return
        fn = ast.AsyncFunctionDef(name="_mmdiag_release_tokenizer_step", args=ast.arguments(
            posonlyargs=[], args=[ast.arg("self"), ast.arg("mm_inputs")], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=[stmt], decorator_list=[], returns=None, type_params=[])
        nodes = [fn]
        if "hash_executor" in ast.unparse(stmt):  # 0.5.21+: the release's pool does the hashing
            pool_file = self.install.package_dir / facts()["probes"]["hash_executor"]
            nodes = _extract(pool_file, ["MultimodalHashExecutor"]) + nodes
            self.resolver.add_file(pool_file)
        self._exec(self.resolver.closure(nodes), self.ns, str(self.install.path("tokenizer_manager")))
        self._release_step = self.ns["_mmdiag_release_tokenizer_step"]
        pool = self.ns["MultimodalHashExecutor"]() if "MultimodalHashExecutor" in self.ns else None
        self._tm_self = types.SimpleNamespace(mm_processor=types.SimpleNamespace(hash_executor=pool))

    @staticmethod
    def _exec(nodes, ns, filename):
        strip = _StripSGLangImports()
        nodes = copy.deepcopy(list(nodes))  # the trees are shared (astutil.parse caches them)
        mod = ast.fix_missing_locations(strip.visit(ast.Module(body=nodes, type_ignores=[])))
        code = compile(mod, filename, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
        exec(code, ns)
        missing = [n for n in strip.names if n not in ns]
        if missing:
            raise UnknownLayout(f"extracted code imports {', '.join(missing)}, unknown to mmdiag's runtime",
                                where=filename)

    def _instrument(self):
        st = self.stats

        def counted(fn, name):
            """fn, adding one call and its seconds to stats.<name>_calls / <name>_s."""
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(st, f"{name}_calls", getattr(st, f"{name}_calls") + 1)
                    setattr(st, f"{name}_s", getattr(st, f"{name}_s") + time.perf_counter() - t0)
            wrapper.__name__ = fn.__name__
            return wrapper

        self.ns["hash_feature"] = counted(self.ns["hash_feature"], "hash")
        name = self.materializer
        real = self.MultimodalInputs.__dict__[name].__func__
        setattr(self.MultimodalInputs, name, staticmethod(counted(real, "from_dict")))

    @property
    def materializer(self) -> str:
        """MultimodalInputs' materializing staticmethod: from_processor_output from 0.5.10."""
        return self.detection.facts.materializer or "from_dict"

    # ---------------------------------------------------------------- helpers
    def make_scheduler(self, cpu_group=None, *, enable_broadcast_mm_inputs_process: bool = False):
        """A stand-in Scheduler holding only the state the extracted methods read."""
        s = self.Scheduler.__new__(self.Scheduler)
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        s.cpu_group = s.tp_cpu_group = cpu_group
        rank_in_group = torch.distributed.get_rank(group=cpu_group) if initialized and cpu_group else 0
        s.tp_size = torch.distributed.get_world_size(group=cpu_group) if initialized and cpu_group else 1
        s.is_entry_rank = rank_in_group == 0
        s.entry_rank = torch.distributed.get_global_rank(cpu_group, 0) if initialized and cpu_group else 0
        # 0.5.8+: the broadcast reads the DP-TP group (the same ranks here)
        s.dp_tp_cpu_group = cpu_group
        s.dp_tp_group = types.SimpleNamespace(rank_in_group=rank_in_group, first_rank=s.entry_rank)
        s.server_args = self.settings  # read as server_args. (to 0.5.16) or get_mm(). (0.5.17+)
        self.settings.enable_broadcast_mm_inputs_process = enable_broadcast_mm_inputs_process
        s.model_config = types.SimpleNamespace(requires_mm_token_modalities=False)  # 0.5.21+
        _idle_server_state(s)
        s.chunked_req = None
        s.dllm_manager = types.SimpleNamespace(any_staging_reqs=lambda: False)  # 0.5.9: no dLLM staging
        s.running_batch = _EmptyBatch()
        s.offload_tags = set()
        s.return_health_check_ct = 0
        s.recv_from_rpc = None
        s.send_to_tokenizer = None
        s.mm_results = {}
        s.aborted = []
        s.rejected = {}  # rid -> error, requests the release's handler rejects (0.5.19+)
        s._request_dispatcher = _Dispatcher([
            (TokenizedGenerateReqInput, s.handle_generate_request),
            (TokenizedEmbeddingReqInput, s.handle_embedding_request),
            (BatchTokenizedEmbeddingReqInput, s.handle_batch_embedding_request),
            (BatchTokenizedGenerateReqInput, s.handle_batch_generate_request),
            (AbortReq, s.abort_request),
        ])
        return s

    def make_item(self, feature, modality: str = "IMAGE", **model_specific):
        item = self.MultimodalDataItem(modality=self.Modality[modality], feature=feature)
        item.model_specific_data.update(model_specific)
        return item

    def make_mm_inputs(self, items, **extra):
        """What the tokenizer sends: a dict, from 0.5.10 the release's MultimodalProcessorOutput."""
        if self.ProcessorOutput is not None:
            return self.ProcessorOutput(mm_items=list(items), **extra)
        return {"mm_items": list(items), **extra}

    @staticmethod
    def generate_req(rid: str, mm_inputs: dict | None = None):
        return TokenizedGenerateReqInput(rid=rid, mm_inputs=mm_inputs)

    @staticmethod
    def embedding_req(rid: str, image_inputs: dict | None = None):
        return TokenizedEmbeddingReqInput(rid=rid, image_inputs=image_inputs)

    @staticmethod
    def abort_req(rid: str = "", abort_all: bool = False):
        return AbortReq(rid=rid, abort_all=abort_all)

    @staticmethod
    def batch_req(reqs):
        return BatchTokenizedGenerateReqInput(batch=list(reqs))

    def release_precompute_on(self) -> bool:
        """The release hashes in its tokenizer manager: it has the SGLANG_MM_PRECOMPUTE_HASH
        statement (0.5.7+) and this process's environment turns it on."""
        return self._release_step is not None and _EnvVar("SGLANG_MM_PRECOMPUTE_HASH").get()

    def tokenizer_side(self, mm_inputs, hash_only: bool = False) -> bool:
        """The install's tokenizer-manager step after the processor; True if it hashed:
        mmdiag's `precompute` or `shm` patch, or the release's own SGLANG_MM_PRECOMPUTE_HASH
        statement (it reads the variable from this process's environment). hash_only: the
        `shm` patch's hashing without its segment write (SGLang's own set_pad_value on each
        item, as its export does first): the replay hashes before its window."""
        if mm_inputs is None:
            return False
        patched = self.ns.get("_mmdiag_precompute_mm_hashes") or self.ns.get("_mmdiag_shm_export")
        if patched is None and not self.release_precompute_on():
            return False
        if hash_only and patched is not None and patched is self.ns.get("_mmdiag_shm_export"):
            patched = _set_pad_values
        st = self.stats
        calls, hash_s, t0 = st.hash_calls, st.hash_s, time.perf_counter()
        try:
            if patched is not None:
                patched(mm_inputs)
            else:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                self._loop.run_until_complete(self._release_step(self._tm_self, mm_inputs))
        finally:
            st.tokenizer_hash_calls += st.hash_calls - calls
            st.tokenizer_hash_s += time.perf_counter() - t0
            st.hash_calls, st.hash_s = calls, hash_s
        return True

    def broadcast_pyobj(self, data, group=None, src_rank_in_group: int = 0):
        """SGLang's broadcast_pyobj over `group` (recv_requests' transport)."""
        if group is None or not torch.distributed.is_initialized():
            return data
        src = torch.distributed.get_global_rank(group, src_rank_in_group)
        return self.ns["broadcast_pyobj"](data, torch.distributed.get_rank(), group, src=src)

    def finish_recv(self, sched, recv_reqs):
        """The rest of the install's recv_requests after its broadcast_pyobj: `shm` maps
        its segments here (collectives on every rank); otherwise nothing."""
        fin = getattr(sched, "_mmdiag_shm_finalize", None)
        return recv_reqs if fin is None else fin(recv_reqs)

    def shm_transport(self, cpu_group=None, prefix: str | None = None) -> "ReleaseShm":
        """The install's own shared-memory feature transport (0.5.10+), loaded once. `prefix`:
        name the segments it creates so (a replay's, reclaimable after a kill); None: as
        the release names them."""
        if getattr(self, "_shm", None) is None:
            self._shm = ReleaseShm(self, cpu_group, prefix)
        return self._shm

    def process_input_requests(self, sched, recv_reqs) -> dict:
        """Run the install's process_input_requests; {rid: MultimodalInputs | None}."""
        sched.mm_results = {}
        sched.process_input_requests(recv_reqs)
        out, sched.mm_results = sched.mm_results, {}
        return out


def _idle_server_state(s) -> None:
    """Stand-ins for the server state process_input_requests reads from 0.5.10 on, as
    an idle server with nothing but this call has it: no sessions to reap, no pending
    flush, no RPC or Rust front end, nothing to send back to the tokenizer."""
    noop = types.SimpleNamespace(maybe_reap=lambda now: None, check_pending=lambda: None,
                                 send_output=lambda *a, **k: None)
    s.session_controller = s.flush_wrapper = noop
    s._check_pending_flush = lambda: None
    s.is_fully_idle = lambda **k: True
    s.return_health_check_ipcs = []
    s.ipc_channels = types.SimpleNamespace(recv_from_rpc=None, send_to_tokenizer=noop)
    s.external_corpus_manager = s.rust_server = None
    s.send_control_output = lambda output, recv_req: None
    s._event_loop_should_restart = False
    s.scheduler_stage_metrics = None  # 0.5.21+: stage metrics off (the server's default)


def _standin_abort(self, recv_req):
    """Stand-in for the rest of Scheduler.abort_request (queue removal): records the abort
    and which prepared results (batch) were still cached when it ran."""
    self.aborted.append(recv_req.rid)
    cache = getattr(self, "_mmdiag_mm_cache", None) or {}
    self.abort_snapshot = sorted(rid for (_raw, rid, _mm) in cache.values())


def load_sglang_mm_path(sglang_dir: str | Path | None = None) -> SGLangMMPath:
    """Load the multimodal path of the install at `sglang_dir` (None: this interpreter's)."""
    return SGLangMMPath(locate(None if sglang_dir is None else str(sglang_dir)))


def _set_pad_values(mm_inputs) -> None:
    """Hash each valid item with a feature (SGLang's own set_pad_value), as mmdiag's
    `shm` export does before it writes the segments."""
    items = mm_inputs.get("mm_items") if isinstance(mm_inputs, dict) else getattr(mm_inputs, "mm_items", None)
    for item in items or ():
        if not hasattr(item, "set_pad_value") or (hasattr(item, "is_valid") and not item.is_valid()):
            continue
        feature = item.feature if item.feature is not None else getattr(item, "precomputed_embeddings", None)
        if feature is not None and getattr(item, "hash", None) is None \
                and type(feature).__name__ != "CudaIpcTensorTransportProxy":
            item.set_pad_value()


# ---- the install's own shared-memory feature transport (0.5.10+) ----------------------
# mm_utils' transport: the write (ShmPointerMMData.__init__ via wrap_shm_features), the open
# (__setstate__, when a rank unpickles a handle), the copy-out (0.5.9: in __setstate__;
# materialize: a clone to 0.5.20, a copy-on-write map from 0.5.21) and what wraps them;
# the optional ones are later releases'.
SHM_FUNCTIONS = ("ShmPointerMMData", "wrap_shm_features", "unwrap_shm_features")
SHM_FUNCTIONS_LATER = ("_feature_has_shm", "has_shm_features", "_wrap_shm_or_inline", "_wrap_tensor_or_list", "_discard_tensor_or_list",
                       "discard_shm_features", "_unwrap_tensor_or_list")
RECEIVE = "_mmdiag_release_shm_receive"  # the receive's name here, whatever the release calls it


def _owned_shared_memory(prefix: str):
    """multiprocessing.shared_memory for the release's code, with two differences that
    are the replay's, not the release's: a segment the release creates without a name
    (0.5.10 .. 0.5.22; 0.5.23's make_shm_name is replaced the same way) is named
    `prefix`+n, so mmdiag's sweep reclaims what a killed replay leaves; and Python's
    resource tracker is not told of it (3.8 .. 3.12 register every attach, and at a rank's
    exit the tracker would unlink, and warn of, segments another rank already unlinked)."""
    from multiprocessing import resource_tracker, shared_memory

    seq = iter(range(1 << 62))

    class SharedMemory(shared_memory.SharedMemory):
        def __init__(self, name=None, create=False, size=0):
            if create and name is None:
                name = f"{prefix}{next(seq)}"
            register, resource_tracker.register = resource_tracker.register, _untracked
            try:
                super().__init__(name=name, create=create, size=size)
            finally:
                resource_tracker.register = register

        def unlink(self):
            unregister, resource_tracker.unregister = resource_tracker.unregister, _untracked
            try:
                super().unlink()
            finally:
                resource_tracker.unregister = unregister

    return types.SimpleNamespace(SharedMemory=SharedMemory), lambda kind="mm": f"{prefix}{kind}-{next(seq)}"


def _untracked(name, rtype):
    pass


class ReleaseShm:
    """The install's own shared-memory transport, compiled into its path's module (so
    handles unpickle on every rank by the module's name):

        shm = path.shm_transport(cpu_group, prefix)   # every rank, once (prefix: see there)
        shm.wrap(mm_inputs)                           # tokenizer side: the release's segments
        shm.take(reqs)                                # 0.5.9: the entry rank, before broadcast_pyobj
        shm.receive(reqs)                             # 0.5.10+: every rank, after broadcast_pyobj

    0.5.9 (`before_broadcast`) writes segments too, but its entry rank takes the features
    out as it unpickles each request from the tokenizer (its __setstate__ clones and
    unlinks; unwrap_shm_features puts the tensor back), then pickles them into the recv
    broadcast as before. `receive` is the release's own code after its recv broadcast: from 0.5.13
    SchedulerRequestReceiver._finalize_shm_features (barrier, unwrap_shm_features ->
    materialize, an all_reduce(MAX) of per-request failures), to 0.5.12 the statement of
    Scheduler.recv_requests that does its part of that (barrier, unwrap). Stand-ins are
    only the server state it reads (one node, tokenizer on, no DP attention)."""

    def __init__(self, path: "SGLangMMPath", cpu_group, prefix: str | None):
        self.path = path
        ns, pkg = path.ns, path.install.package_dir
        where = path.detection.facts.transport_at  # "file:function:line" of its unwrap call
        if not where:
            raise UnknownLayout("this install moves no features by shared memory",
                                where=str(pkg), fix="replay it with --transport pickle")
        rel, fn_name, _ = where.split(":")
        self.before_broadcast = path.detection.facts.transport != "shm"
        tp = torch.distributed.get_world_size(cpu_group) if cpu_group is not None else 1
        server = types.SimpleNamespace(skip_tokenizer_init=False, enable_dp_attention=False)
        # the parallel state: one TP group, no DP attention (named enable_dp_attention to 0.5.21, then attn_dp_enabled)
        parallel = types.SimpleNamespace(enable_dp_attention=False, attn_dp_enabled=False, tp_size=tp,
                                         tp_group=types.SimpleNamespace(cpu_group=cpu_group))
        import mmap
        from multiprocessing import shared_memory as as_released
        # a replay names what it writes; None: the release's own names, as in its server
        shared_memory, make_name = _owned_shared_memory(prefix) if prefix is not None else (as_released, None)
        ns.update({  # what the transport reads of a one-node GPU server
            # the transport the launch chose (doctor reads that from the server's flags): shm, not "default"
            "_get_is_default_transport": lambda: False,
            "get_serving": lambda: server, "get_global_server_args": lambda: server,
            "get_parallel": lambda: parallel,
            "BaseBatchReq": BatchTokenizedGenerateReqInput, "print_warning_once": logger.warning,
            "MMInputsProcessError": RuntimeError,
            "barrier": lambda group=None, **_: torch.distributed.barrier(group=group),
            "all_reduce": torch.distributed.all_reduce, "ReduceOp": torch.distributed.ReduceOp,
            "shared_memory": shared_memory, "mmap": mmap,
        })
        mm = path.install.path("mm_utils")
        nodes = _extract(mm, list(SHM_FUNCTIONS)) + _extract(mm, list(SHM_FUNCTIONS_LATER), required=False)
        path.resolver.add_file(mm)
        if not self.before_broadcast:
            nodes.append(_receive_node(pkg / rel, fn_name))
            path.resolver.add_file(pkg / rel)
        path._exec(path.resolver.closure(nodes), ns, str(mm))
        if make_name is not None:  # after the release's make_shm_name (0.5.23) was extracted
            ns["make_shm_name"] = make_name
        self.ShmPointerMMData = ns["ShmPointerMMData"]
        self._receive = ns.get(RECEIVE)
        self.receiver = types.SimpleNamespace(  # `self` of the receive: the receiver (0.5.13+) or scheduler
            model_config=types.SimpleNamespace(is_multimodal=True), server_args=server,
            tp_size=tp, tp_cpu_group=cpu_group, ps=parallel)

    def wrap(self, mm_inputs) -> None:
        self.path.ns["wrap_shm_features"](types.SimpleNamespace(mm_inputs=mm_inputs))

    def take(self, reqs: list) -> None:
        """0.5.9's entry rank on each request it unpickled from the tokenizer."""
        for req in reqs:
            self.path.ns["unwrap_shm_features"](req)

    def receive(self, reqs: list) -> list:
        """The release's receive on the release's request objects; returns them."""
        out = self._receive(self.receiver, reqs)
        return reqs if out is None else out


def _receive_node(path: Path, fn_name: str) -> ast.FunctionDef:
    """The release's receive as `RECEIVE(self, recv_reqs)`: the method that unwraps
    (_finalize_shm_features), or, where the unwrap sits in recv_requests itself (0.5.10 ..
    0.5.12), the statement of it that does, ending in `return recv_reqs`."""
    tree = astutil.parse(path.read_text(encoding="utf-8"), str(path))
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn_name), None)
    if fn is None:
        raise UnknownLayout(f"{fn_name} not found", where=str(path), fix="mmdiag's runtime does not know this layout")
    unwrap = facts()["probes"]["shm_unwrap"]
    calls = lambda node: {ast.unparse(c.func).split(".")[-1] for c in ast.walk(node) if isinstance(c, ast.Call)}
    if "broadcast_pyobj" not in calls(fn):
        node = copy.deepcopy(fn)
        node.name = RECEIVE
        return node
    stmt = next((s for s in fn.body if unwrap in calls(s)), None)
    if stmt is None:
        raise UnknownLayout(f"{fn_name} calls {unwrap} below its top level", where=str(path),
                            fix="mmdiag's runtime does not know this layout")
    node = ast.parse(f"def {RECEIVE}(self, recv_reqs):\n    return recv_reqs\n").body[0]
    node.body.insert(0, copy.deepcopy(stmt))
    return node
