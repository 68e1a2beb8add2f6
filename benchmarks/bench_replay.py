"""Benchmark (not a test): the strategies side by side on the bundled profiles at tp 2
and 4, and the harness's own overhead per request with no multimodal work.

    .venv/bin/python benchmarks/bench_replay.py [--tp 2 4] [--profiles ...] [-n N] [--repeat R] [--json OUT]

Prints one table per (profile, tp) and the overhead table; medians over --repeat runs.
Run it where cores >= tp (the device machine's 16+ cores), or the ranks share cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from tabulate import tabulate

from mmdiag.replay import ReplayOptions, replay
from mmdiag.trace import TraceHeader, TraceRequest, write_trace
from mmdiag.vocab import STRATEGIES
from mmdiag.workloads import load_workload, synth_to_file


def text_only_trace(path: str, n: int) -> None:
    reqs = (TraceRequest(f"r{i:06d}", 0.0, 256, ()) for i in range(n))
    write_trace(path, TraceHeader(source={"tool": "bench"}, arrival={"mode": "closed", "max_concurrency": 64}), reqs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--profiles", nargs="+", default=["small-image-c96", "video-large", "mixed"])
    ap.add_argument("-n", type=int, default=None, help="requests per trace (default: the profile's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--overhead-only", action="store_true", help="only the harness-overhead table")
    ap.add_argument("--no-overhead", action="store_true", help="skip the harness-overhead table")
    ap.add_argument("--json", default=None, help="write all Runs here as {profile: {tp: Run}}")
    args = ap.parse_args()
    print(f"host: {os.uname().nodename}, {os.cpu_count()} cores; repeat {args.repeat}; medians", flush=True)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prof in ([] if args.overhead_only else args.profiles):
            trace = os.path.join(tmp, f"{prof}.jsonl")
            n = synth_to_file(prof, args.n, trace)
            for tp in args.tp:
                t0 = time.time()
                run = replay(trace, ReplayOptions(tp=tp, strategies=args.strategies, repeat=args.repeat, timeout=300))
                out.setdefault(prof, {})[tp] = run.to_dict()
                base = statistics.median(run.strategies["commit"].repeats_rps) if "commit" in run.strategies else None
                rows = []
                for name, s in run.strategies.items():
                    med = statistics.median(s.repeats_rps)
                    rows.append([name, f"{med:.2f}", f"{min(s.repeats_rps):.2f}-{max(s.repeats_rps):.2f}",
                                 f"{med / base:.2f}x" if base else "-", f"{statistics.median(s.repeats_p99_ms):.0f}",
                                 f"{sum(r.cpu_s for r in s.ranks):.1f}",
                                 f"{s.ranks[0].phases_ms['from_dict'] / s.requests:.2f}",
                                 f"{s.ranks[-1].phases_ms['broadcast'] / s.requests:.2f}"])
                print(f"\n## {prof} ({n} requests, {load_workload(prof).data['arrival']}), tp {tp}, "
                      f"{time.time() - t0:.0f} s wall", flush=True)
                print(tabulate(rows, headers=["strategy", "req/s median", "range", "vs commit", "p99 ms",
                                              "CPU s all ranks", "rank0 from_dict ms/req", f"rank{tp - 1} broadcast ms/req"]))
        # Harness overhead: text-only requests, so only recv + the per-iteration sync remain.
        if args.no_overhead:
            _save(args.json, out)
            return 0
        trace = os.path.join(tmp, "text.jsonl")
        n = 2000
        text_only_trace(trace, n)
        rows = []
        for tp in args.tp:
            run = replay(trace, ReplayOptions(tp=tp, strategies=["revert"], repeat=args.repeat, timeout=300))
            s = run.strategies["revert"]
            per_req = [1000.0 / r for r in s.repeats_rps]
            rows.append([tp, f"{statistics.median(s.repeats_rps):.0f}", f"{statistics.median(per_req):.3f}",
                         f"{s.requests_per_iteration:.1f}"])
        print(f"\n## harness overhead ({n} text-only requests, closed loop 64)")
        print(tabulate(rows, headers=["tp", "req/s median", "ms per request", "req/iter"]))
    _save(args.json, out)
    return 0


def _save(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    sys.exit(main())
