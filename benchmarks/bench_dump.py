"""Benchmark (not a test): `trace from-dump` on a folder of SGLang request dumps.

    .venv/bin/python benchmarks/bench_dump.py [--files F] [--per-file N] [--resolution WxH] [--version V]

Builds F dump files of N requests each with the real wheel's request classes (as the
tests do, tests/sglang_dumps.py; needs MMDIAG_WHEEL_CACHE or network for the wheel), each
request one random-noise JPEG (quality 85, as bench_serving's image dataset makes them),
then converts the folder in a fresh process and prints the wall time, requests/s, MB of
dumps read per second and the converter's peak RSS, which should stay near one dump file's
size however many files the folder holds (files are read one at a time).
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

CONVERT = r"""
import resource, sys, time
from mmdiag.ingest.dump import convert
t = time.perf_counter()
conv = convert([sys.argv[1]], sys.argv[2])
print(conv.requests, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def jpeg_uri(w: int, h: int) -> str:
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--per-file", type=int, default=100)
    ap.add_argument("--resolution", default="1120x700", help="WxH of every image")
    ap.add_argument("--version", default="0.5.23", help="SGLang wheel whose request classes build the dumps")
    a = ap.parse_args()
    from sglang_dumps import make_dump

    w, h = (int(x) for x in a.resolution.split("x"))
    uri = jpeg_uri(w, h)
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-dump-") as tmp:
        folder = os.path.join(tmp, "dumps")
        os.makedirs(folder)
        t0 = time.perf_counter()
        for f in range(a.files):
            reqs = [{"rid": f"f{f}r{i}", "created": 1000.0 + f * a.per_file + i * 0.01, "text": "describe",
                     "images": [uri]} for i in range(a.per_file)]
            make_dump(a.version, os.path.join(folder, f"{f:04d}.pkl"), reqs, server_args="dict")
        built = time.perf_counter() - t0
        total = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        out = subprocess.run([sys.executable, "-c", CONVERT, folder, os.path.join(tmp, "t.jsonl")],
                             capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
        n, secs, rss_kb = out.stdout.split()
    n, secs, rss = int(n), float(secs), int(rss_kb) / 1024
    print(f"dumps: {a.files} files x {a.per_file} requests, one {w}x{h} JPEG each ({len(uri) / 1e6:.2f} MB "
          f"as a data URI); {total / 1e6:.0f} MB on disk, built in {built:.1f} s")
    print(f"convert: {n} requests in {secs:.2f} s = {n / secs:,.0f} req/s, {total / 1e6 / secs:,.0f} MB/s of dumps")
    print(f"peak RSS of the converting process: {rss:,.0f} MiB (largest dump file: {total / a.files / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
