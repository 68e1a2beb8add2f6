"""Benchmark (not a test): the `shm` patch's tokenizer-side write, new segments vs reused ones.

    .venv/bin/python benchmarks/bench_shm_patch_pool.py [--version 0.5.9] [--rows 4000] [--requests 30]

Applies `mmdiag apply shm` to a copy of a real wheel (tests/sglang_wheels.py; needs
MMDIAG_WHEEL_CACHE or network), then runs the patched release's own tokenizer helpers
(`_mmdiag_shm_write`) and receive (`_mmdiag_shm_finalize`, a group of one) on a
(rows, 1176) float32 feature (4000 rows: a 1120x700 image, 18.8 MB), one request at a
time, in /dev/shm: once with MMDIAG_SHM_POOL_MB=0 (a new segment per feature, mapped
copy-on-write by the rank) and once with the default pool (the segment reused once the
rank's map of it is gone; the rank maps it the same way). Prints the median and the
fastest ms per request of the write and of the rank's receive (on a shared, loaded host
the fastest is the cost, the median the wait).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def measure(pkg: Path, rows: int, n: int, pool_mb: str | None) -> tuple[list[float], list[float]]:
    import torch
    from mmdiag.sglang.runtime import load_sglang_mm_path
    from mmdiag.sglang.patches.shm import POOL_ENV
    if pool_mb is None:
        os.environ.pop(POOL_ENV, None)
    else:
        os.environ[POOL_ENV] = pool_mb
    path = load_sglang_mm_path(pkg)
    sched = path.make_scheduler(None)
    write = path.ns["_mmdiag_shm_write"]
    feature = torch.randn(rows, 1176)
    w_ms, r_ms = [], []
    for i in range(n):
        t = time.perf_counter()
        handle = write(feature)
        w_ms.append((time.perf_counter() - t) * 1e3)
        assert handle is not None, "no segment written: is /dev/shm full?"
        raw = path.make_mm_inputs([path.make_item(feature)])
        raw["mm_items"][0].feature = handle
        t = time.perf_counter()
        path.finish_recv(sched, [path.generate_req(f"r{i}", raw)])
        r_ms.append((time.perf_counter() - t) * 1e3)
        del raw  # the rank's tensor (a map or a copy) goes with the request
    path.ns["_mmdiag_shm_pool_close"]()
    path.ns["_mmdiag_shm_reclaim"](float("inf"))
    return w_ms[1:], r_ms[1:]  # the first pays the pool's creation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.9")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--requests", type=int, default=30)
    a = ap.parse_args()
    from sglang_wheels import site_packages
    import mmdiag.sglang.apply as A
    from mmdiag.sglang.locate import locate
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-") as tmp:
        pkg = site_packages(a.version, Path(tmp))
        A.apply(locate(str(pkg)), "shm")
        mb = a.rows * 1176 * 4 / 1e6
        print(f"SGLang {a.version} + apply shm, {mb:.1f} MB feature, {a.requests} requests; ms per request, "
              "median / fastest")
        for label, pool in (("new segment per feature", "0"), ("reused segment (pool)", None)):
            w, r = measure(pkg, a.rows, a.requests, pool)
            print(f"  {label:24s} tokenizer write {statistics.median(w):6.2f} / {min(w):6.2f} ms "
                  f"({mb / min(w):5.2f} GB/s)   rank receive {statistics.median(r):6.2f} / {min(r):6.2f} ms")


if __name__ == "__main__":
    main()
