"""How long `mmdiag profile` takes to end after Ctrl-C (README: "ends within a few seconds"),
on an idle or a loaded host. Prints figures; asserts nothing.

    python benchmarks/bench_profile_stop.py                  # tp 2, Ctrl-C 6 s into a 60 s window
    python benchmarks/bench_profile_stop.py --burn 4         # with 4 busy-looping processes

A replay (mmdiag's model, commit, Poisson arrivals) runs at --tp; `mmdiag profile --pid
LAUNCHER --duration 60 -o p.json` samples it; --after seconds after py-spy begins sampling
it gets SIGINT (what Ctrl-C sends), and the seconds until it exits are printed with its
exit code and whether it wrote the Run, per round.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_profile import PY, make_trace, start_replay, wait_ranks  # noqa: E402
from mmdiag.proc import stop_group  # noqa: E402


def _sampling(tmpdir: str) -> bool:
    return any("Sampling process" in open(f, errors="replace").read()
               for f in glob.glob(os.path.join(tmpdir, "mmdiag-*", "*.log")))


def one(launcher_pid: int, after: float, tmp: str, k: int) -> tuple[float, int, bool]:
    tmpdir, out = os.path.join(tmp, f"t{k}"), os.path.join(tmp, f"p{k}.json")
    os.makedirs(tmpdir)
    p = subprocess.Popen([PY, "-m", "mmdiag", "profile", "--pid", str(launcher_pid), "--duration", "60", "-q",
                          "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, TMPDIR=tmpdir))
    deadline = time.time() + 90
    while time.time() < deadline and not _sampling(tmpdir):
        time.sleep(0.05)
    time.sleep(after)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait()
    took = time.monotonic() - t0
    wrote = os.path.exists(out) and json.load(open(out))["live"]["interrupted"] is True
    return took, p.returncode, wrote


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--after", type=float, default=6.0, help="seconds of sampling before the Ctrl-C")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burn", type=int, default=0, help="busy-looping processes loading the host meanwhile")
    a = ap.parse_args()
    burners = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(a.burn)]
    try:
        with tempfile.TemporaryDirectory(prefix="mmdiag-bench-stop-") as tmp:
            trace = os.path.join(tmp, "t.jsonl")
            make_trace(trace, int(8.0 * (a.rounds * (a.after + 30) + 60)), rate=8.0)
            launcher = start_replay(trace, a.tp, ["--strategy", "commit"])
            try:
                wait_ranks(launcher, a.tp)
                time.sleep(3.0)
                got = [one(launcher.pid, a.after, tmp, k) for k in range(a.rounds)]
            finally:
                stop_group(launcher)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    print(f"machine: {os.cpu_count()} CPUs, {a.burn} busy loops; replay tp {a.tp} (commit, Poisson 8 req/s); "
          f"Ctrl-C {a.after:g} s into a 60 s profile window")
    for k, (took, code, wrote) in enumerate(got):
        print(f"  round {k + 1}: ended {took:5.2f} s after Ctrl-C, exit {code}, Run written: {wrote}")
    print(f"  median {statistics.median(t for t, _, _ in got):.2f} s, worst {max(t for t, _, _ in got):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
