"""Every strategy under each transport, at each --tp, for two workloads: the default
workload, and one request per loop iteration of 1120x700 images (closed loop at
concurrency 1). Prints the median request throughput of the repeats and its ratio to
`revert` on `pickle`, and what bounds it (the scheduler loop, or the tokenizer stage).

    python benchmarks/bench_transport.py --tp 4 8 --repeat 3 -n 40      # a 32-core host
    python benchmarks/bench_transport.py --tp 2 --repeat 1 -n 4 --tiny   # a smoke test
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmdiag import api  # noqa: E402
from mmdiag.vocab import STRATEGIES, TRANSPORTS  # noqa: E402

BASE = ("revert", "pickle")


def workloads(n: int, tiny: bool) -> dict[str, list[str]]:
    res = "56x56" if tiny else "700x1120"  # bench_serving's HxW: 1120 wide, 700 high
    return {"default workload": ["-n", str(n)] + (["--image-resolution", res, "--max-concurrency", "8"] if tiny else []),
            f"{res} x1, one request per iteration": ["-n", str(n), "--image-resolution", res, "--image-count", "1",
                                                     "--max-concurrency", "1"]}


def synth(args: list[str], path: str) -> None:
    subprocess.run([sys.executable, "-m", "mmdiag", "trace", "synth", *args, "-o", path],
                   cwd=ROOT, check=True, capture_output=True)


def measure(trace: str, tp: int, repeat: int, strategies: list[str]) -> dict[tuple[str, str], tuple[float, str]]:
    out = {}
    for tr in TRANSPORTS:
        run = api.replay(trace, tp=tp, strategies=strategies, transport=tr, repeat=repeat)
        for name, s in run.strategies.items():
            tok = s.tokenizer_ms or {}
            bound = "tokenizer" if tok and tok.get("capacity_rps", 1e18) <= tok.get("loop_rps", 0) else "loop"
            out[(name, tr)] = (s.throughput_rps, bound)  # the median repeat (merge_repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-n", type=int, default=40, help="requests per workload")
    ap.add_argument("--strategy", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--tiny", action="store_true", help="56x56 images: a smoke test of the script")
    a = ap.parse_args()
    strategies = sorted(set(a.strategy) | {"revert"}, key=STRATEGIES.index)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for label, synth_args in workloads(a.n, a.tiny).items():
            trace = os.path.join(tmp, "trace.jsonl")
            synth(synth_args, trace)
            for tp in a.tp:
                res = measure(trace, tp, a.repeat, strategies)
                base = res[BASE][0]
                print(f"\n{label}, tp {tp}, {a.n} requests, median of {a.repeat} "
                      f"(ratio to {BASE[0]} on {BASE[1]}: {base:.1f} req/s)")
                print(f"  {'strategy':<11}" + "".join(f"{t + ' req/s':>14}{'x':>7}{'bound':>11}" for t in TRANSPORTS))
                for name in strategies:
                    cells = "".join(f"{res[(name, t)][0]:>14.1f}{res[(name, t)][0] / base:>7.2f}{res[(name, t)][1]:>11}"
                                    for t in TRANSPORTS)
                    print(f"  {name:<11}{cells}", flush=True)
    print(f"\n{time.time() - t0:.0f} s wall on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
