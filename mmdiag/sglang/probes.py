"""What one SGLang install does on its multimodal path, read from its code structure (AST).

Each probe answers one question of `mmdiag doctor` with the file and line that says so:
the request handler and its mm call, the materializer, the broadcast flag (declared
where, default, read how), the entry-rank collective (group, source, entry test, the
error-broadcast protocol), SGLANG_MM_PRECOMPUTE_HASH (declared, hashing on the
tokenizer loop or in a thread pool), how features reach the ranks, and the CUDA
transport options. Probes never import SGLang and never depend on line numbers;
where to look and what names mean what is data (variants.toml [probes]).
"""
from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import astutil
from .facts import checked_span, facts, families, version_fit

Where = str  # "srt/managers/scheduler.py:1404"


@dataclass
class ReleaseFacts:
    handler: str | None = None  # Scheduler method calling the mm path on recv_req.mm_inputs
    handler_at: Where | None = None
    mm_call: str | None = None
    materializer: str | None = None  # from_dict | from_processor_output
    flag_declared: Where | None = None
    flag_default: str | None = None
    flag_read: str | None = None  # the expression _get_multimodal_inputs tests
    flag_read_at: Where | None = None
    group: str | None = None  # the CPU group of the entry-rank broadcast
    src: str | None = None
    entry_test: str | None = None
    error_protocol: str | None = None  # class the broadcast sends (inputs or error), 0.5.19+
    broadcast_at: Where | None = None
    precompute_env: Where | None = None  # SGLANG_MM_PRECOMPUTE_HASH declaration
    precompute_default: str | None = None
    precompute_hashing: str | None = None  # "tokenizer loop" | "thread pool (N workers)"
    precompute_at: Where | None = None
    transport: str = "pickle"  # vocab transport: how features reach the ranks
    transport_detail: str = "features pickled inside the recv broadcast (broadcast_pyobj)"
    transport_at: Where | None = None
    shm_barrier: bool = False
    shm_failure_agreement: bool = False
    cuda_ipc_env: Where | None = None  # SGLANG_USE_CUDA_IPC_TRANSPORT
    feature_transport_option: list[str] = field(default_factory=list)  # --mm-feature-transport choices
    feature_transport_at: Where | None = None
    family: str | None = None
    family_releases: str | None = None
    # the installed version against the family's releases (facts.version_fit): "in range",
    # "newer", "older", "unchecked", "other family", "unknown"; anything but "in range"
    # means the family was named from the code alone, and family_note says so
    family_fit: str | None = None
    family_note: str | None = None

    # Derived, for matching families (variants.toml [[families]].match)
    @property
    def flag_file(self) -> str | None:
        return self.flag_declared.split(":")[0] if self.flag_declared else None

    @property
    def receiver_file(self) -> str | None:
        return self.transport_at.split(":")[0] if self.transport_at else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _p(key: str):
    return facts()["probes"][key]


def parsed(pkg: Path, rel: str):
    """(text, tree) of pkg/rel, or (None, None) when missing or not Python."""
    p = pkg / rel
    try:
        text = p.read_text(encoding="utf-8")
        return text, astutil.parse(text, str(p))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None, None


def _class(tree, name):
    return astutil.find_class(tree, name) if tree is not None else None


def _methods(cls) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} if cls else {}


def _calls(node):
    return (n for n in ast.walk(node) if isinstance(n, ast.Call))


def _ann_field(tree, name):
    """Class-level `name: ... = default` anywhere in the module: (node, default source)."""
    for n in ast.walk(tree):
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == name:
            return n, (ast.unparse(n.value) if n.value is not None else None)
    return None, None


def _env_field(tree, name):
    """`NAME = EnvBool(False)` in environ.py: (node, "False")."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets):
            v = n.value
            if isinstance(v, ast.Call) and len(v.args) == 1:
                v = v.args[0]
            return n, ast.unparse(v)
    return None, None


def probe_handler(rf: ReleaseFacts, sched: dict, mm_calls: list[str]) -> None:
    for name, m in sched.items():
        if name in _p("mm_methods"):
            continue
        for c in _calls(m):
            callee = ast.unparse(c.func)
            if callee in mm_calls and any(ast.unparse(a) == "recv_req.mm_inputs" for a in c.args):
                rf.handler, rf.mm_call = name, callee
                rf.handler_at = f"{_p('scheduler')}:{m.lineno}"
                return


def probe_materializer(rf: ReleaseFacts, sched: dict) -> None:
    for name in ("_get_multimodal_inputs", rf.handler):
        for c in _calls(sched.get(name) or ast.Pass()):
            f = c.func
            if isinstance(f, ast.Attribute) and ast.unparse(f.value) == "MultimodalInputs":
                rf.materializer = f.attr
                return


def probe_flag(rf: ReleaseFacts, pkg: Path, sched: dict) -> None:
    name = _p("flag_field")
    for rel in _p("flag_files"):
        _, tree = parsed(pkg, rel)
        node, default = _ann_field(tree, name) if tree is not None else (None, None)
        if node is not None:
            rf.flag_declared, rf.flag_default = f"{rel}:{node.lineno}", default
            break
    gmi = sched.get("_get_multimodal_inputs")
    for n in ast.walk(gmi) if gmi else ():
        if isinstance(n, ast.If) and name in ast.unparse(n.test):
            rf.flag_read, rf.flag_read_at = ast.unparse(n.test), f"{_p('scheduler')}:{n.lineno}"
            return


def probe_collective(rf: ReleaseFacts, sched: dict, tree) -> None:
    m = sched.get("_process_and_broadcast_mm_inputs")
    if m is None:
        return
    for c in _calls(m):
        if ast.unparse(c.func).endswith("broadcast_object_list"):
            kw = {k.arg: ast.unparse(k.value) for k in c.keywords}
            rf.group, rf.src = kw.get("group"), kw.get("src")
            rf.broadcast_at = f"{_p('scheduler')}:{c.lineno}"
            break
    for n in ast.walk(m):
        # The entry test: the branch that materializes and then broadcasts.
        if isinstance(n, ast.If) and any(isinstance(x, ast.Call) and ast.unparse(x.func).startswith(
                "MultimodalInputs.") for b in n.body for x in ast.walk(b)) and "broadcast_object_list" in ast.unparse(n):
            rf.entry_test = ast.unparse(n.test)
            break
    names = {ast.unparse(c.func) for c in _calls(m)}
    cls = _p("error_protocol_class")
    if cls in names and _class(tree, cls) is not None:
        rf.error_protocol = cls


def probe_precompute(rf: ReleaseFacts, pkg: Path) -> None:
    env = _p("precompute_env")
    _, tree = parsed(pkg, _p("environ"))
    node, default = _env_field(tree, env) if tree is not None else (None, None)
    if node is None:
        return
    rf.precompute_env, rf.precompute_default = f"{_p('environ')}:{node.lineno}", default
    _, tm = parsed(pkg, _p("tokenizer_manager"))
    n = precompute_statement(tm)
    if n is not None:
        body = "\n".join(ast.unparse(b) for b in n.body)
        rf.precompute_at = f"{_p('tokenizer_manager')}:{n.lineno}"
        if "hash_executor" in body:
            rf.precompute_hashing = f"thread pool ({_pool_workers(pkg)} workers, hash_executor.set_pad_values)"
        else:
            rf.precompute_hashing = "tokenizer loop (set_pad_value per item, synchronously)"


def precompute_statement(tm_tree) -> ast.If | None:
    """The tokenizer manager's `if envs.SGLANG_MM_PRECOMPUTE_HASH.get() ...:` (0.5.7+)."""
    env = _p("precompute_env")
    for n in ast.walk(tm_tree) if tm_tree is not None else ():
        if isinstance(n, ast.If) and env in ast.unparse(n.test):
            return n
    return None


def _pool_workers(pkg: Path) -> str:
    _, tree = parsed(pkg, _p("hash_executor"))
    for n in ast.walk(tree) if tree is not None else ():
        if isinstance(n, ast.FunctionDef) and n.name == "__init__":
            for a, d in zip(n.args.kwonlyargs, n.args.kw_defaults):
                if a.arg == "max_workers" and d is not None:
                    return ast.unparse(d)
    return "?"


def probe_transport(rf: ReleaseFacts, pkg: Path) -> None:
    unwrap = _p("shm_unwrap")
    for rel in _p("receiver_files"):
        _, tree = parsed(pkg, rel)
        for fn in ast.walk(tree) if tree is not None else ():
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = [(c.lineno, ast.unparse(c.func)) for c in _calls(fn)]
            at = [ln for ln, f in calls if f == unwrap]
            if not at:
                continue
            rf.transport_at = f"{rel}:{fn.name}:{at[0]}"
            bcast = [ln for ln, f in calls if f.endswith("broadcast_pyobj")]
            if bcast and min(at) < max(bcast) and not any(f.endswith("barrier") for _, f in calls):
                rf.transport = "pickle"
                rf.transport_detail = ("shared-memory handles unwrapped on the entry rank before "
                                       "broadcast_pyobj: features still pickled inside the recv broadcast")
                return
            rf.transport = "shm"
            rf.shm_barrier = any(f.split(".")[-1] == "barrier" for _, f in calls)
            rf.shm_failure_agreement = any(f.split(".")[-1] == "all_reduce" for _, f in calls)
            rf.transport_detail = ("shared-memory handles (name, shape, dtype) in the recv broadcast; every rank "
                                   "opens the segment" + (", barrier on the TP CPU group" if rf.shm_barrier else "")
                                   + (", all_reduce(MAX) of per-request failures" if rf.shm_failure_agreement else ""))
            return


def probe_cuda(rf: ReleaseFacts, pkg: Path) -> None:
    _, tree = parsed(pkg, _p("environ"))
    node, _ = _env_field(tree, _p("cuda_ipc_env")) if tree is not None else (None, None)
    if node is not None:
        rf.cuda_ipc_env = f"{_p('environ')}:{node.lineno}"
    for rel in _p("flag_files"):
        _, t = parsed(pkg, rel)
        node, _ = _ann_field(t, _p("feature_transport_field")) if t is not None else (None, None)
        if node is not None:
            rf.feature_transport_at = f"{rel}:{node.lineno}"
            rf.feature_transport_option = sorted({
                c.value for lit in ast.walk(node.annotation) if isinstance(lit, ast.Subscript)
                and ast.unparse(lit.value) == "Literal" for c in ast.walk(lit.slice)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)})
            return


def match_family(rf: ReleaseFacts, variant: str | None, version: str | None = None) -> None:
    """The first family in variants.toml whose `match` holds for these facts, and where
    `version` stands against its releases. The code decides the family: a release whose
    multimodal path did not change keeps its family when only its version is new."""
    rf.family = rf.family_releases = rf.family_fit = rf.family_note = None
    d = rf.to_dict() | {"variant": variant, "flag_file": rf.flag_file, "receiver_file": rf.receiver_file,
                        "has_precompute_env": rf.precompute_env is not None,
                        "precompute_in_pool": (rf.precompute_hashing or "").startswith("thread pool"),
                        "has_feature_transport_option": bool(rf.feature_transport_option)}
    for fam in families():
        if all(d.get(k) == v for k, v in fam["match"].items()):
            rf.family, rf.family_releases = fam["name"], fam["releases"]
            rf.family_fit = version_fit(version, fam["releases"])
            rf.family_note = _fit_note(version, fam, rf.family_fit)
            return


def _fit_note(version: str | None, fam: dict[str, Any], fit: str) -> str | None:
    if fit == "in range":
        return None
    matches = f"its multimodal path matches the {fam['releases']} family ({fam['name']})"
    first, last = checked_span()
    if fit == "other family":
        other = next(f for f in families() if version_fit(version, f["releases"]) == "in range")
        return (f"version {version} is a release of the {other['releases']} family ({other['name']}), but "
                f"{matches} (a modified install or checkout): the code wins")
    if fit == "pre-release":
        base = _base_version(version)
        return (f"{version} is a pre-release of {base} (release candidates are outside the releases mmdiag checked); "
                f"{matches}: mmdiag takes it by its code, and by version as a release before {base} (PEP 440)")
    if fit == "unknown":
        return (f"version {version or 'unknown'} cannot be compared with the releases mmdiag checked "
                f"({first} .. {last}); {matches}, named from its code alone")
    where = {"newer": f"newer than {last}, the newest release checked",
             "older": f"older than {first}, the oldest release checked",
             "unchecked": f"mmdiag checked {first} .. {last}, not this one"}[fit]
    return (f"{version} is not a release mmdiag has checked ({where}); {matches}: "
            "the facts above are read from its code, not assumed from its version")


def _base_version(version: str) -> str:
    from packaging.version import Version
    return Version(version).base_version


def probe(pkg: Path, variant: str | None) -> ReleaseFacts:
    rf = ReleaseFacts()
    _, tree = parsed(pkg, _p("scheduler"))
    sched = _methods(_class(tree, "Scheduler"))
    probe_handler(rf, sched, _p("mm_calls"))
    probe_materializer(rf, sched)
    probe_flag(rf, pkg, sched)
    probe_collective(rf, sched, tree)
    probe_precompute(rf, pkg)
    probe_transport(rf, pkg)
    probe_cuda(rf, pkg)
    match_family(rf, variant)
    return rf
