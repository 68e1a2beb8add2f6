"""Benchmark (not a test): the release's own shared-memory writer, fresh segments vs `mmdiag apply pool`.

    .venv/bin/python benchmarks/bench_pool_patch.py [--version 0.5.23] [--rows 4000] [--pairs 30]

Takes two copies of a real wheel (tests/sglang_wheels.py; needs MMDIAG_WHEEL_CACHE or network),
applies `mmdiag apply pool` to one, and loads each one's own ShmPointerMMData, wrap_shm_features
and its receive (tests/whole_server_target.load_release; a group of one, in this
process). Each pair writes the same (rows, 1176) float32 feature (4000 rows: a 1120x700 image,
18.8 MB) once with the release as shipped (a new segment per feature) and once patched (a pooled
segment), in alternating order, then receives it as a rank does (unpickle the handle, barrier-free
finalize: the copy-on-write map or clone, the unlink / rename) and lets the feature go before the
next pair. Prints the median ms per feature of the write (wrap_shm_features) and of the receive,
for each, and the median of the per-pair ratio of the writes.
"""
from __future__ import annotations

import argparse
import gc
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def loaded(pkg: Path):
    """(write(feature) -> request, receive(request) -> tensor) of one install's own code."""
    from whole_server_target import load_release
    path = load_release(str(pkg))
    wrap, receive_all = path.ns["wrap_shm_features"], path.shm_transport().receive

    def write(feature, rid):
        return wrap(path.generate_req(rid, path.make_mm_inputs([path.make_item(feature)])))

    def receive(req):
        reqs = [pickle.loads(pickle.dumps(req))]  # what a rank gets from the recv broadcast
        receive_all(reqs)
        return reqs[0].mm_inputs.mm_items[0].feature
    return path, write, receive


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.23")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--pairs", type=int, default=30)
    a = ap.parse_args()
    import torch
    from sglang_wheels import site_packages
    import mmdiag.sglang.apply as A
    from mmdiag.sglang.locate import locate
    from mmdiag.sglang.patches.segment_pool import POOL_ENV
    os.environ.pop(POOL_ENV, None)  # the default bound
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-") as tmp:
        fresh_pkg = site_packages(a.version, Path(tmp) / "fresh")
        pool_pkg = site_packages(a.version, Path(tmp) / "pool")
        A.apply(locate(str(pool_pkg)), "pool")
        sides = {"fresh": loaded(fresh_pkg), "pool": loaded(pool_pkg)}
        feature = torch.randn(a.rows, 1176)
        ms = {k: {"write": [], "receive": []} for k in sides}
        ratios = []
        for i in range(a.pairs + 1):
            order = ("fresh", "pool") if i % 2 == 0 else ("pool", "fresh")
            got = {}
            for k in order:
                _path, write, receive = sides[k]
                t0 = time.perf_counter()
                req = write(feature, f"{k}{i}")
                t1 = time.perf_counter()
                out = receive(req)
                t2 = time.perf_counter()
                assert torch.equal(out, feature)
                del out, req
                gc.collect()  # the rank lets the feature go (its map, and with it its lock)
                got[k] = (t1 - t0, t2 - t1)
            if i == 0:
                continue  # the first pays the pool's creation
            for k, (w, r) in got.items():
                ms[k]["write"].append(w * 1e3)
                ms[k]["receive"].append(r * 1e3)
            ratios.append(got["fresh"][0] / got["pool"][0])
        sides["pool"][0].ns["_mmdiag_shm_pool_close"]()  # what atexit runs
        mb = a.rows * 1176 * 4 / 1e6
        print(f"SGLang {a.version}'s own ShmPointerMMData, as shipped vs `mmdiag apply pool`; a {a.rows}x1176 float32 "
              f"feature ({mb:.1f} MB); {a.pairs} pairs, alternating order, one process (a group of one); "
              "median ms per feature")
        for k, label in (("fresh", "fresh segment (release)"), ("pool", "pooled segment (apply pool)")):
            w, r = ms[k]["write"], ms[k]["receive"]
            print(f"  {label:28s} write {statistics.median(w):6.2f} ms ({mb / statistics.median(w):5.2f} GB/s)"
                  f"   receive {statistics.median(r):6.2f} ms")
        print(f"  write, fresh / pool, median of the pairs' ratios: {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
