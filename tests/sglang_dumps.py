"""Request dumps built with SGLang's own request classes, from a real wheel.

Importing sglang.srt.managers.io_struct pulls in torch, zmq, msgspec, pydantic and most of
SGLang, so the dump is built in a subprocess that imports only what the classes are:
the wheel's source of GenerateReqInput (with its base classes from the same module),
ImageData (sglang/srt/utils/common.py) and, for 0.5.4-0.5.1x, the ServerArgs dataclass
(sglang/srt/server_args.py, its __post_init__ left out: that resolves the model from the
hub). Each class is compiled from the wheel's bytes, unchanged, into a module of its real
name, so pickle records exactly the names a server's dump holds, then the dump is written
as TokenizerManager.dump_requests does: pickle.dump({"server_args", "requests":
[(obj, out_dict, created_time, finished_time), ...]}).
"""
from __future__ import annotations

import json
import subprocess
import sys

from sglang_wheels import wheel

BUILDER = r'''
import __future__, abc, ast, dataclasses, enum, json, pickle, sys, types, typing, zipfile

whl, out, spec = sys.argv[1], sys.argv[2], json.load(sys.stdin)
z = zipfile.ZipFile(whl)

def module(member, modname, names, drop=()):
    tree = ast.parse(z.read(member))
    defs = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    order = []
    def need(name):
        for b in defs[name].bases:
            if isinstance(b, ast.Name) and b.id in defs:
                need(b.id)
        if name not in order:
            order.append(name)
    for n in names:
        need(n)
    body = []
    for n in order:
        d = defs[n]
        d.body = [x for x in d.body if not (isinstance(x, ast.FunctionDef) and x.name in drop)] or [ast.Pass()]
        body.append(d)
    parts = modname.split(".")
    for i in range(1, len(parts) + 1):   # empty parent packages, so pickle can import the name
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[".".join(parts[:i])])
    mod = sys.modules[modname]
    ns = mod.__dict__
    ns.update({k: getattr(typing, k) for k in typing.__all__})
    ns.update(dataclass=dataclasses.dataclass, field=dataclasses.field, dataclasses=dataclasses,
              ABC=abc.ABC, Enum=enum.Enum)
    code = compile(ast.Module(body, []), member, "exec", flags=__future__.annotations.compiler_flag,
                   dont_inherit=True)
    exec(code, ns)
    return mod

def msgspec_server_args(model_path):
    """0.5.2x's ServerArgs: a msgspec Struct (dict=True) pickled by its own __reduce__ through
    _rebuild_server_args. Both are compiled from the wheel unchanged; the Struct is built as the
    wheel's msgspec.defstruct builds it, with two of its fields (the rest need all of SGLang)."""
    import msgspec
    tree = ast.parse(z.read("sglang/srt/server_args.py"))
    rebuild = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_rebuild_server_args")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    reduce_ = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__reduce__")
    mod = types.ModuleType("sglang.srt.server_args")
    for name in ("sglang", "sglang.srt"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    mod.msgspec = msgspec
    exec(compile(ast.Module([rebuild, reduce_], []), "sglang/srt/server_args.py", "exec"), mod.__dict__)
    mod.ServerArgs = msgspec.defstruct("ServerArgs", [("model_path", str), ("tp_size", int, 1)],
                                       namespace={"__reduce__": mod.__dict__.pop("__reduce__")},
                                       dict=True, module=mod.__name__)
    sa = mod.ServerArgs(model_path=model_path, tp_size=2)
    sa.__dict__["_resolved"] = True    # resolution bookkeeping travels outside the fields
    return sa

io = module("sglang/srt/managers/io_struct.py", "sglang.srt.managers.io_struct", ["GenerateReqInput"])
ut = module("sglang/srt/utils/common.py", "sglang.srt.utils.common", ["ImageData"])
if spec["server_args"] == "dataclass":
    sa = module("sglang/srt/server_args.py", "sglang.srt.server_args", ["ServerArgs"], drop=("__post_init__",))
    server_args = sa.ServerArgs(model_path=spec["model_path"], tp_size=2)
elif spec["server_args"] == "msgspec":
    server_args = msgspec_server_args(spec["model_path"])
elif spec["server_args"] == "dict":
    server_args = {"model_path": spec["model_path"], "tp_size": 2}
else:
    server_args = None

def image(ref):
    if isinstance(ref, dict) and "pil" in ref:   # the Engine API's PIL images
        from PIL import Image
        return Image.new("RGB", tuple(ref["pil"]))
    return ut.ImageData(url=ref["url"]) if isinstance(ref, dict) else ref

reqs = []
for r in spec["requests"]:
    obj = io.GenerateReqInput(text=r.get("text"), input_ids=r.get("input_ids"),
                              image_data=[image(x) for x in r["images"]] or None,
                              video_data=r.get("videos") or None,
                              sampling_params={"max_new_tokens": 8}, rid=r["rid"])
    out_dict = {"text": "ok", "meta_info": r.get("meta_info", {"id": r["rid"]})}
    reqs.append((obj, out_dict, r["created"], r["created"] + 0.5))
with open(out, "wb") as f:
    pickle.dump({"server_args": server_args, "requests": reqs}, f)
print(type(reqs[0][0]).__module__, type(server_args).__module__)
'''


def make_dump(version: str, out, requests: list[dict], *, server_args: str = "dataclass",
              model_path: str = "Qwen/Qwen2.5-VL-7B-Instruct") -> str:
    """Write one dump with `version`'s own classes. requests: dicts with rid, created,
    images (data URIs, paths, {"url": ...} for ImageData, {"pil": [w, h]} for a PIL image), videos,
    text / input_ids, meta_info."""
    spec = {"server_args": server_args, "model_path": model_path, "requests": requests}
    r = subprocess.run([sys.executable, "-c", BUILDER, str(wheel(version)), str(out)], input=json.dumps(spec),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "sglang.srt.managers.io_struct", r.stdout
    return str(out)
