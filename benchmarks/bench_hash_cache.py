"""Benchmark (not a test): would caching or deferring the feature hash help SGLang's scheduler?
(001_0d22b879c37f50bc.txt, 方案3: 优化from_dict本身: a cache keyed by id(feature), or a lazy hash.)

    .venv/bin/python benchmarks/bench_hash_cache.py [--profile small-image-c96] [-n 60] [--repeat-share 0 0.3]
                                                    [--trace T ...] [--sglang-dir D ...]

Per trace (synthesized with `trace synth --repeat-share S`: a share S of multimodal requests repeats a
recent request's images byte for byte), every request's features go through a pickle round trip as the
recv broadcast delivers them to each scheduler rank (fresh objects, as in SGLang), and then, timed:
  none      SGLang's hash_feature on every item (mmdiag.mmpath.items: its copies, then sha256)
  id-cache  the seed's cache keyed by id(feature): hits, and hits that return another image's hash
            (ids of freed features are reused by new ones)
  content   a cache keyed by the bytes themselves (blake2b-128 over the buffer, no copy), hashing on a miss:
            it still reads every byte to make the key
  sha-only  no cache: sha256 straight over the buffer (hash_feature without its two copies)
  upstream  the key comes with the request (the tokenizer's hash, SGLANG_MM_PRECOMPUTE_HASH): nothing read
and, from the SGLang wheels' own scheduler.py, where a lazily computed hash would first be needed.
"""
from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from mmdiag.mmpath.items import data_hash, hash_feature
from mmdiag.trace import TraceReader
from mmdiag.workloads import synth_to_file

MB = 2 ** 20
ID_CACHE_SIZE = 1000  # the seeds' cache_max_size


def feature(shape, dtype, content: int) -> torch.Tensor:
    """Identical bytes for the same content id, different bytes otherwise."""
    t = torch.full(tuple(shape), float(content % 251 + 1), dtype=getattr(torch, dtype))
    t.view(-1)[0] = content
    return t


def blake_key(f: torch.Tensor) -> bytes:
    return hashlib.blake2b(memoryview(f.contiguous().numpy()).cast("B"), digest_size=16).digest()


def sha_only(f: torch.Tensor) -> int:
    return data_hash(memoryview(f.contiguous().numpy()).cast("B"))


def measure(trace: str) -> dict:
    t = {k: 0.0 for k in ("none", "id", "content", "sha", "upstream")}
    id_cache: dict[int, int] = {}
    content_cache: dict[bytes, int] = {}
    upstream: dict[int, int] = {}
    c = {"n": 0, "items": 0, "id_hits": 0, "id_wrong": 0, "content_hits": 0, "bytes": 0}

    def by_id(f, h):
        cached = id_cache.get(id(f))
        if cached is None:
            id_cache[id(f)] = hash_feature(f)
            if len(id_cache) > ID_CACHE_SIZE:
                id_cache.pop(next(iter(id_cache)))
        else:
            c["id_hits"] += 1
            c["id_wrong"] += cached != h

    def by_content(f, h):
        key = blake_key(f)
        if key in content_cache:
            c["content_hits"] += 1
        else:
            content_cache[key] = hash_feature(f)

    ways = [("none", lambda f, h: hash_feature(f)), ("id", by_id), ("content", by_content),
            ("sha", lambda f, h: sha_only(f)), ("upstream", lambda f, h: upstream.setdefault(h, h))]
    with TraceReader(trace) as reader:
        for tr in reader:
            if not tr.mm:
                continue
            c["n"] += 1
            sent = [feature(it.shape, it.dtype, it.content if it.content is not None else 10 ** 9 + c["n"] * 8 + k)
                    for k, it in enumerate(tr.mm)]
            received = pickle.loads(pickle.dumps(sent, protocol=pickle.HIGHEST_PROTOCOL))  # the recv broadcast
            del sent
            for f in received:
                c["items"] += 1
                c["bytes"] += f.numel() * f.element_size()
                h = hash_feature(f)  # the truth, untimed
                rot = c["items"] % len(ways)  # rotate the order: no way always runs first on cold buffers
                for name, fn in ways[rot:] + ways[:rot]:
                    t0 = time.perf_counter()
                    fn(f, h)
                    t[name] += time.perf_counter() - t0
            del received  # the request finishes; its features are freed (their ids can be reused)
            gc.collect()
    n = max(c["n"], 1)
    return {"requests": c["n"], "items": c["items"], "mb_per_request": c["bytes"] / MB / n,
            "ms": {k: v * 1000 / n for k, v in t.items()}, **{k: c[k] for k in ("id_hits", "id_wrong", "content_hits")}}


def first_pad_use(scheduler_py: Path) -> str:
    """Where handle_generate_request materializes mm inputs and where it first reads pad values."""
    tree = ast.parse(scheduler_py.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("handle_generate_request", "_handle_generate_request"):
            calls = [(c.lineno, ast.unparse(c.func)) for c in ast.walk(node) if isinstance(c, ast.Call)]
            mat = [ln for ln, f in calls if f.endswith(("_process_and_broadcast_mm_inputs", "_get_multimodal_inputs",
                                                        "from_dict", "from_processor_output"))]
            pad = [ln for ln, f in calls if "pad_input_ids" in f]
            if mat and pad:
                return (f"{node.name}: materialized at line {min(mat)}, pad values read at line {min(pad)} "
                        f"({min(pad) - min(mat)} lines later, same call)")
    return "handle_generate_request with both calls not found"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="small-image-c96")
    ap.add_argument("-n", type=int, default=60)
    ap.add_argument("--repeat-share", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--trace", nargs="*", default=[], help="measure these traces instead of synthesizing")
    ap.add_argument("--sglang-dir", nargs="*", default=None,
                    help="unpacked sglang packages to read scheduler.py from [default: MMDIAG_WHEEL_CACHE/unpacked/*]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        traces = list(args.trace)
        for share in ([] if traces else args.repeat_share):
            p = os.path.join(tmp, f"share{share}.jsonl")
            synth_to_file(args.profile, args.n, p, repeat_share=share)
            traces.append(p)
        rows = []
        for tr in traces:
            r = measure(tr)
            ms = r["ms"]
            save = lambda k: f"{100 * (1 - ms[k] / ms['none']):+.0f}%" if ms["none"] else "-"  # noqa: E731
            rows.append([Path(tr).stem, r["requests"], f"{r['mb_per_request']:.1f}", f"{ms['none']:.1f}",
                         f"{ms['id']:.1f} ({save('id')})", f"{r['id_hits']}/{r['items']} ({r['id_wrong']} wrong)",
                         f"{ms['content']:.1f} ({save('content')})", f"{r['content_hits']}/{r['items']}",
                         f"{ms['sha']:.1f} ({save('sha')})", f"{ms['upstream']:.3f}"])
    print("hash cost per multimodal request in one scheduler rank, ms (saving against SGLang's hash_feature)")
    print(tabulate(rows, headers=["trace", "mm reqs", "MB/req", "none", "id-cache", "id hits",
                                  "content-cache", "content hits", "sha-only", "upstream key"]))
    root = Path(os.environ.get("MMDIAG_WHEEL_CACHE", ".cache/sglang-wheels")) / "unpacked"
    dirs = args.sglang_dir if args.sglang_dir is not None else sorted(
        str(d / "sglang") for d in root.glob("*") if "-" not in d.name)  # one plain unpack per release
    if dirs:
        print("\nwhere a lazy hash would first be needed (each wheel's scheduler.py)")
        for d in dirs:
            p = Path(d) / "srt" / "managers" / "scheduler.py"
            if p.exists():
                print(f"  {Path(d).parent.name}: {first_pad_use(p)}")
    print(f"\nhost: {os.cpu_count()} cores, torch {torch.__version__}, python {sys.version.split()[0]}; "
          f"means over the multimodal requests of each trace")
    print("id-cache: every hit is a freed feature's id reused by a new one (features arrive freshly unpickled), "
          "so a correct hit never happens and a wrong one returns another image's hash; a saving shown there "
          "comes only from wrong hits")
    print("content-cache: the key must read every byte; keyed by sha256 over the buffer (the cheapest correct "
          "key here) the key is the hash itself, so a hit saves nothing beyond sha-only; only a key that comes "
          "with the request (upstream) skips reading the bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
