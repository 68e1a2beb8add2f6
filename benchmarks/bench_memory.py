"""Peak RSS per replay rank against trace length: the replay's memory must not grow
with the trace (issue 8). Prints one line per trace length.

    python benchmarks/bench_memory.py --tp 2 --strategy commit -n 48 192 500
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_per_rank(cmd: list[str], tp: int) -> tuple[list[float], float, int]:
    """Run cmd; poll its rank processes' RSS every 50 ms. Returns (peak MiB per rank, wall s, rc)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict[int, float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            kids = root.children(recursive=True)
        except psutil.Error:
            break
        for k in kids:
            try:
                name = " ".join(k.cmdline())
                if "mmdiag" not in name:
                    continue
                rank = int(name.rsplit("TP", 1)[1].split()[0]) if "scheduler_TP" in name else None
                if rank is None:
                    continue
                peaks[rank] = max(peaks.get(rank, 0.0), k.memory_info().rss / 2**20)
            except (psutil.Error, ValueError, IndexError):
                pass
        time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode:
        print(err.strip().splitlines()[-1] if err.strip() else "", file=sys.stderr)
    return [peaks.get(r, 0.0) for r in range(tp)], time.time() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--strategy", default="commit")
    ap.add_argument("--transport", default=None)
    ap.add_argument("--profile", default=None, help="workload profile [default: the default workload]")
    ap.add_argument("-n", type=int, nargs="+", default=[48, 192, 500])
    a = ap.parse_args()
    py = [sys.executable, "-m", "mmdiag"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"tp {a.tp}, strategy {a.strategy}, peak RSS per rank (MiB), polled every 50 ms")
        for n in a.n:
            trace = os.path.join(tmp, f"t{n}.jsonl")
            synth = py + ["trace", "synth", "-n", str(n), "-o", trace] + (["--profile", a.profile] if a.profile else [])
            subprocess.run(synth, cwd=ROOT, check=True, capture_output=True)
            cmd = py + ["replay", trace, "--tp", str(a.tp), "--strategy", a.strategy, "-q"]
            if a.transport:
                cmd += ["--transport", a.transport]
            peaks, wall, rc = peak_rss_per_rank(cmd, a.tp)
            print(f"  {n:>5} requests: " + "  ".join(f"rank {r} {p:7.0f}" for r, p in enumerate(peaks))
                  + f"   ({wall:.0f} s, exit {rc})", flush=True)


if __name__ == "__main__":
    main()
