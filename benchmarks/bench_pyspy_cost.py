"""What one py-spy recorder costs, by setting: the figures behind the profiler's choices
(README "Rate and cost": `--nolineno` unless --speedscope, the --gil recorder on every
other block). Prints figures; asserts nothing.

    python benchmarks/bench_pyspy_cost.py                 # mmdiag's own replay ranks, tp 2
    python benchmarks/bench_pyspy_cost.py --rate 50 100 200        # how the cost follows the rate

A replay (mmdiag's model, commit, Poisson arrivals) runs at --tp; one py-spy
`record --format raw --threads --idle --nonblocking` at a time samples rank 0 for
--seconds, once per setting, in alternating order over --rounds; the CPU py-spy used
(its rusage, read when it is reaped) is printed as a percentage of one core, median over
rounds. The target's own load changes little between settings (non-blocking: py-spy
reads its memory, never pauses it), so the differences are py-spy's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_profile import make_trace, start_replay, wait_ranks  # noqa: E402
from mmdiag.live.pyspy import find_pyspy  # noqa: E402
from mmdiag.proc import stop_group  # noqa: E402

SETTINGS = {  # name -> extra py-spy arguments
    "phases, line numbers": [],
    "phases, --nolineno (the default)": ["--nolineno"],
    "--gil, line numbers": ["--gil"],
    "--gil --nolineno (the default)": ["--gil", "--nolineno"],
}


def cost(spy: str, pid: int, seconds: float, rate: int, extra: list[str], out: str) -> float:
    """CPU seconds per wall second (one core = 1.0) of one py-spy recording."""
    cmd = [spy, "record", "-p", str(pid), "-f", "raw", "-o", out, "-r", str(rate), "-d", f"{seconds:g}",
           "--threads", "--idle", "--nonblocking", *extra]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"py-spy exited {p.returncode}: {' '.join(cmd)}")
    return (ru.ru_utime + ru.ru_stime) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, nargs="+", default=[100], help="sampling rates, Hz (each measured)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    spy = find_pyspy().path
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-pyspy-") as tmp:
        trace = os.path.join(tmp, "t.jsonl")
        n_settings = len(SETTINGS)
        make_trace(trace, int(8.0 * (a.rounds * n_settings * len(a.rate) * (a.seconds + 1) + 60)), rate=8.0)
        launcher = start_replay(trace, a.tp, ["--strategy", "commit"])
        try:
            disc = wait_ranks(launcher, a.tp)
            rank0 = min(disc.ranks, key=lambda r: r.rank)
            time.sleep(3.0)  # past warm-up
            cases = [(rate, name) for rate in a.rate for name in SETTINGS]
            got: dict[tuple[int, str], list[float]] = {c: [] for c in cases}
            for i in range(a.rounds):
                for rate, name in (cases if i % 2 == 0 else list(reversed(cases))):
                    got[(rate, name)].append(cost(spy, rank0.pid, a.seconds, rate, SETTINGS[name],
                                                  os.path.join(tmp, "x.raw")))
        finally:
            stop_group(launcher)
    print(f"machine: {os.cpu_count()} CPUs; replay tp {a.tp} (commit, Poisson 8 req/s, 4.7 MB images); "
          f"py-spy on rank 0 for {a.seconds:g} s, {a.rounds} rounds in alternating order")
    for (rate, name), xs in got.items():
        print(f"  {rate:>4} Hz  {name:<36} {100.0 * statistics.median(xs):5.1f}% of a core  "
              f"(rounds: {', '.join(f'{100.0 * x:.1f}' for x in xs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
