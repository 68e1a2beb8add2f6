"""`mmdiag apply xxh3` (any hash of mmdiag.mmpath.hashing.PATCHABLE): the install's content
hash becomes that hash instead of SGLang's sha256, for the tokenizer and every rank.

Every release 0.5.4 .. 0.5.23 hashes a feature in srt/managers/mm_utils.py: `hash_feature`
-> `tensor_hash` -> `data_hash` (to 0.5.9 through `tobytes`, from 0.5.10 by feeding
`hashlib.sha256()` objects zero-copy uint8 views, incrementally). The tokenizer
(SGLANG_MM_PRECOMPUTE_HASH, its hash pool, mmdiag's precompute and shm patches) and every
scheduler rank call these same functions, so changing them changes the hash everywhere.
The patch swaps the callee `hashlib.sha256` in those three functions only (not the other
sha256 uses: request identities, pad-value derivation from a hash, LoRA checks) for a
module-level `_mmdiag_content_hasher`, whose objects have sha256's update() and digest();
the first 8 digest bytes are kept as before, so the hash has the same width and the same
pad-value arithmetic, and equal bytes give equal hashes in every process.
CUDA features (gpu_tensor_hash, a triton kernel) and SGLANG_MM_SKIP_COMPUTE_HASH keep
their own behaviour. The hasher's package must import in the server's Python: apply
refuses otherwise (a server that cannot import it would fail on its first image).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from ...mmpath.hashing import HASHERS, PATCHABLE, PREFIX_CACHE
from ...vocab import DEFAULT_HASH
from .. import astutil
from ..errors import SGLangError, UnknownLayout
from ..facts import layouts
from .common import MARK, Plan, append_module_code, module_constant

FUNCTIONS = ("data_hash", "tensor_hash", "hash_feature")  # mm_utils' feature hashing, callee to caller
SHA256 = "hashlib.sha256"
HASHER = "_mmdiag_content_hasher"
NAME_CONST = "_MMDIAG_CONTENT_HASH"  # the applied hash's name, read back by doctor


def helper(name: str) -> str:
    module, ctor = HASHERS[name]
    return f'''
{MARK} {name} -- the content hash is {module}.{ctor} in sha256's place (first 8 digest bytes kept).
{NAME_CONST} = "{name}"


def {HASHER}(*data):
    """A {module}.{ctor} hasher where mm_utils made a sha256 one: update(), digest()."""
    import {module}

    return {module}.{ctor}(*data)
'''


def _functions(text: str) -> dict[str, ast.FunctionDef]:
    """mm_utils' hashing functions (variants.toml [layouts] targets of the same names)."""
    return {name: node for name in FUNCTIONS if (node := astutil.target_node(text, name, "mm_utils.py")) is not None}


def _sha256_sites(fn: ast.FunctionDef) -> list[ast.Attribute]:
    return [n.func for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == SHA256]


def _swap(text: str, sites: list[ast.Attribute], name: str) -> str:
    """Replace each `hashlib.sha256` callee by the hasher, marking its line."""
    lines = text.splitlines(keepends=True)
    for node in sorted(sites, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        raw = lines[node.lineno - 1].encode("utf-8")  # ast offsets count UTF-8 bytes
        line = (raw[:node.col_offset] + HASHER.encode() + raw[node.end_col_offset:]).decode("utf-8")
        body = line.rstrip("\r\n")
        if "#" not in body and not body.endswith("\\"):
            line = f"{body}  {MARK} {name}" + line[len(body):]
        lines[node.lineno - 1] = line
    return "".join(lines)


def zero_copy_tensor_hash(name: str) -> str:
    """tensor_hash for releases whose CPU path concatenates and copies through tobytes()
    (0.5.4 .. 0.5.9: two copies of every feature, which cost more than xxh3 itself): the
    tensors' uint8 views are fed one after another instead, as 0.5.10+ feed sha256. The same
    bytes in the same order, minus 0.5.9's bfloat16-to-float32 widening (hashed as stored)."""
    return f'''def tensor_hash(tensor_list) -> int:
    """
    hash a tensor or a tensor list
    """
    {MARK} {name} -- zero-copy uint8 views fed in order (was: concat, tobytes, data_hash)
    if isinstance(tensor_list, list):
        tensors = [x.flatten() if isinstance(x, torch.Tensor) else x for x in flatten_nested_list(tensor_list)]
    else:
        tensors = [tensor_list]
    if any(t.is_cuda for t in tensors):
        return gpu_tensor_hash(torch.concat(tensors).cuda())
    hasher = {HASHER}()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        hasher.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return int.from_bytes(hasher.digest()[:8], byteorder="big", signed=False)
'''


def _copies(fn: ast.FunctionDef) -> bool:
    """The release's tensor_hash copies the bytes it hashes (tobytes)."""
    return any(isinstance(n, ast.Attribute) and n.attr == "tobytes" for n in ast.walk(fn))


def _replace_function(text: str, fn: ast.FunctionDef, source: str) -> str:
    lines = text.splitlines(keepends=True)
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    return "".join(lines[:start - 1]) + source + "".join(lines[fn.end_lineno:])


def hash_of(text: str | None) -> str | None:
    """The content hash a mm_utils.py text hashes features with (vocab.HASHES); None: unknown."""
    tree, applied = module_constant(text, NAME_CONST)
    if applied is not None or tree is None:
        return applied
    data_hash = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "data_hash"), None)
    return DEFAULT_HASH if data_hash is not None and _sha256_sites(data_hash) else None


def describe(name: str | None) -> str:
    """`xxh3 (content hash kept)`: for doctor."""
    if name is None:
        return "unknown (mm_utils.data_hash not found)"
    return f"{name} ({PREFIX_CACHE.get(name, '?')})"


# ------------------------------------------------------------ the server's Python

def server_python(install) -> Path | None:
    """<prefix>/bin/python* for an install in <prefix>/lib/pythonX.Y/site-packages; None otherwise."""
    site = install.package_dir.parent
    if install.layout != "site-packages" or site.name not in ("site-packages", "dist-packages"):
        return None
    pyver = site.parent.name  # pythonX.Y
    prefix = site.parent.parent.parent
    for exe in (pyver, "python3", "python"):
        p = prefix / "bin" / exe
        if pyver.startswith("python") and p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def check_importable(install, name: str) -> None:
    """One-line refusal unless the hasher's module imports in the server's environment."""
    module = HASHERS[name][0]
    if install.found_by == "interpreter":  # found through this Python: it is the server's
        import importlib.util
        if importlib.util.find_spec(module) is None:
            raise SGLangError(f"`{name}` needs the {module} package, which this Python (the install's) cannot "
                              "import", where=sys.executable, fix=f"pip install {module} and retry; nothing was changed")
        return
    py = server_python(install)
    fix = (f"install it with that environment's pip ({'%s -m pip' % py if py else 'pip'} install {module}) "
           f"and retry; nothing was changed")
    if py is None:
        site = install.package_dir.parent
        if any(site.glob(f"{module}/__init__.py")) or any(site.glob(f"{module}-*.dist-info")):
            return  # no interpreter beside it (a copied tree): the package sits beside sglang
        where = (f"no Python found for {install.package_dir}" if install.layout == "checkout"
                 else f"{site}: no {module} package there and no Python beside it")
        raise SGLangError(f"`{name}` needs the {module} package in the server's Python, which mmdiag cannot find",
                          where=where, fix=f"run mmdiag with the server's Python, or {fix}")
    # -s -E: the server's own paths, not this shell's PYTHONPATH or user site (mmdiag's may differ)
    code = ("import sys, os; import " + module + "; "
            f"sys.exit(0 if {str(install.package_dir.parent)!r} in map(os.path.realpath, sys.path) else 3)")
    try:
        r = subprocess.run([str(py), "-s", "-E", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SGLangError(f"could not run the server's Python to check for {module} ({e})", where=str(py),
                          fix=fix) from None
    if r.returncode == 3:
        raise SGLangError(f"{py} does not see {install.package_dir.parent}: it is not this install's Python",
                          where=str(py), fix="run mmdiag with the server's Python; nothing was changed")
    if r.returncode not in (0, 3):
        raise SGLangError(f"`{name}` needs the {module} package, which the server's Python cannot import",
                          where=str(py), fix=fix)


# ------------------------------------------------------------------------ build

def build(det, texts: dict[str, str], name: str) -> Plan:
    if name not in PATCHABLE:
        raise KeyError(name)
    plan = Plan(name, det.variant)
    where = str(det.install.path("mm_utils"))
    text = texts.get("mm_utils")
    if text is None:
        raise UnknownLayout("srt/managers/mm_utils.py not found", where=where, fix="nothing was changed")
    current = hash_of(text)
    if current == name:
        plan.notes.append(f"this install already hashes with {name}: nothing to patch")
        return plan
    if current != DEFAULT_HASH:
        raise UnknownLayout(f"mm_utils hashes with {current or 'an unknown hash'}, not sha256", where=where,
                            fix="undo the other content-hash patch first (mmdiag apply --undo); nothing was changed")
    fns = _functions(text)
    sites = []
    for fn_name in FUNCTIONS:
        fn = fns.get(fn_name)
        if fn is None:
            raise UnknownLayout(f"mm_utils.{fn_name} not found", where=where, fix="nothing was changed")
        fp = astutil.fingerprint(fn)
        known = layouts(fn_name)
        if fp not in known:
            raise UnknownLayout(f"mm_utils.{fn_name} (line {fn.lineno}) matches no known layout (fingerprint {fp})",
                                where=where, fix="this code was changed from any release mmdiag knows; "
                                "nothing was changed")
        sites += _sha256_sites(fn)
    check_importable(det.install, name)
    new = _swap(text, sites, name)
    if _copies(fns["tensor_hash"]):  # swap first (lines stay put), then replace the copying function
        new = _replace_function(new, _functions(new)["tensor_hash"], zero_copy_tensor_hash(name))
        plan.notes.append("tensor_hash feeds the hash zero-copy views instead of concatenating and copying "
                          "through tobytes()")
    plan.new_texts["mm_utils"] = append_module_code(new, helper(name))
    plan.notes.append(f"features are hashed with {HASHERS[name][0]}.{HASHERS[name][1]} by the tokenizer and every "
                      f"rank ({len(sites)} sha256 call(s) in {', '.join(FUNCTIONS)}); {PREFIX_CACHE[name]}; "
                      "restart the server to use it")
    return plan
