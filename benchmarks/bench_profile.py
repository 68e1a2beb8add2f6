"""Benchmark of `mmdiag profile` (issue 3): accuracy against the replay's own timers
and overhead on the replay's throughput. Prints its figures.

    python benchmarks/bench_profile.py [--tp 4] [--window 30] [--pairs 5] [--profile-rate HZ]

Accuracy: a `mmdiag replay` at --tp ranks (strategies commit, then revert) runs a
Poisson trace with MMDIAG_STATS_DIR set; `profile()` samples every rank for --window
seconds at the default rate; the replay's phase timers are snapshotted when the
window opens and closes. For every phase above 5% (either side) the difference in
percentage points must be <= 5.

Overhead: the same replay run to completion on a closed-loop trace (saturated, so
throughput is the replay's capacity), without and with the profiler attached at
the default rate for the whole run, in alternating pairs (A B, B A, ...); the
median of the per-pair throughput ratios must be >= 0.98.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from mmdiag.live import DEFAULT_RATE_HZ, profile
from mmdiag.live.discover import discover
from mmdiag.live.truth import compare, snapshot, window_shares
from mmdiag.trace import MMItem, TraceHeader, TraceRequest, write_trace
from mmdiag.vocab import PHASES

PY = sys.executable
BOUND_POINTS = 5.0
MAX_OVERHEAD = 0.02


def make_trace(path, n, rate=None, rows=1000, closed=None, seed=0):
    rng, t, reqs = random.Random(seed), 0.0, []
    for i in range(n):
        if rate:
            t += rng.expovariate(rate)
        reqs.append(TraceRequest(f"r{i:06d}", t, 128, (MMItem("image", (rows, 1176)),)))
    arrival = {"mode": "poisson", "request_rate": rate} if rate else {"mode": "closed", "max_concurrency": closed}
    write_trace(path, TraceHeader(arrival=arrival), iter(reqs))


def start_replay(trace, tp, strategy, out=None, stats=None):
    env = dict(os.environ)
    if stats:
        env["MMDIAG_STATS_DIR"] = stats
    cmd = [PY, "-m", "mmdiag", "replay", trace, "--tp", str(tp), "--strategy", strategy, "-q", "--timeout", "60"]
    if out:
        cmd += ["-o", out]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_ranks(launcher, tp, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            d = discover(launcher.pid)
            if len(d.ranks) == tp:
                return d
        except Exception:
            pass
        if launcher.poll() is not None:
            raise RuntimeError("replay exited before its ranks appeared")
        time.sleep(0.05)
    raise RuntimeError("replay ranks did not appear")


def stop(launcher):
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def accuracy(tmp, tp, window, strategy, rate, prate=DEFAULT_RATE_HZ):
    trace = os.path.join(tmp, f"acc-{strategy}.jsonl")
    make_trace(trace, int(rate * (window + 60)), rate=rate)
    stats = os.path.join(tmp, f"stats-{strategy}")
    os.makedirs(stats)
    launcher = start_replay(trace, tp, strategy, stats=stats)
    try:
        wait_ranks(launcher, tp)
        deadline = time.time() + 60
        while len(snapshot(stats)) < tp and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3.0)  # past warm-up
        snaps = {}
        run = profile(launcher.pid, duration=window, rate=prate, on_window=lambda w: snaps.__setitem__(w, snapshot(stats)))
    finally:
        stop(launcher)
    truth = window_shares(snaps["start"], snaps["end"])
    rows = compare({r.rank: r.phases_pct for r in run.ranks}, truth, min_pct=5.0)
    return run, truth, rows


def one_throughput(tmp, trace, tp, strategy, with_profiler, tag, rate=DEFAULT_RATE_HZ):
    out = os.path.join(tmp, f"tput-{tag}.json")
    launcher = start_replay(trace, tp, strategy, out=out)
    prof = {}
    th = None
    try:
        if with_profiler:
            wait_ranks(launcher, tp)

            def _run():
                try:
                    prof["run"] = profile(launcher.pid, duration=600, rate=rate)
                except Exception as e:  # noqa: BLE001 - reported below
                    prof["error"] = e
            th = threading.Thread(target=_run)
            th.start()
        launcher.wait(timeout=600)
    finally:
        stop(launcher)
        if th:
            th.join()
    if "error" in prof:
        raise prof["error"]
    with open(out) as f:
        d = json.load(f)
    return d["strategies"][strategy]["throughput_rps"], prof.get("run")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson req/s of the accuracy trace")
    ap.add_argument("--requests", type=int, default=400, help="requests of the closed-loop overhead trace")
    ap.add_argument("--profile-rate", type=int, default=DEFAULT_RATE_HZ, help="sampling rate (default: mmdiag's)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; tp {a.tp}; "
          f"profiler rate {a.profile_rate} Hz (default {DEFAULT_RATE_HZ}; + a --gil recorder at the same rate)")
    ok = True
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-profile-") as tmp:
        if not a.skip_accuracy:
            for strategy in ("commit", "revert"):
                run, truth, rows = accuracy(tmp, a.tp, a.window, strategy, a.rate, a.profile_rate)
                print(f"\naccuracy, strategy {strategy} (detected: {run.config['live']['strategy_detected']}), "
                      f"window {run.config['live']['duration_s']:.1f} s, Poisson {a.rate} req/s, 4.7 MB images")
                print(f"  {'rank':>4} {'phase':<10} {'profile %':>9} {'replay %':>9} {'diff pts':>8}")
                for r in rows:
                    print(f"  {r['rank']:>4} {r['phase']:<10} {r['profile']:>9.1f} {r['replay']:>9.1f} {r['diff']:>8.1f}")
                worst = {}
                for r in rows:
                    worst[r["phase"]] = max(worst.get(r["phase"], 0.0), r["diff"])
                print("  worst |diff| per phase (points): " + ", ".join(f"{p} {worst[p]:.1f}" for p in PHASES if p in worst))
                passed = all(r["diff"] <= BOUND_POINTS for r in rows)
                ok &= passed
                print(f"  within {BOUND_POINTS:.0f} points for every phase above 5%: {'PASS' if passed else 'FAIL'}")
        if not a.skip_overhead:
            trace = os.path.join(tmp, "closed.jsonl")
            make_trace(trace, a.requests, closed=16)
            ratios = []
            print(f"\noverhead, strategy commit, closed loop (16 in flight), {a.requests} requests; pairs alternate order")
            for i in range(a.pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                res = {}
                for w in order:
                    rps, run = one_throughput(tmp, trace, a.tp, "commit", w, f"{i}-{int(w)}", a.profile_rate)
                    res[w] = rps
                    if run is not None:
                        samples = min(r.samples for r in run.ranks)
                        res["samples"] = samples
                ratio = res[True] / res[False]
                ratios.append(ratio)
                print(f"  pair {i + 1} ({'A B' if not order[0] else 'B A'}): without {res[False]:.2f} req/s, "
                      f"with {res[True]:.2f} req/s ({res.get('samples', 0)} samples/rank), ratio {ratio:.3f}")
            med = statistics.median(ratios)
            overhead = 1.0 - med
            passed = overhead <= MAX_OVERHEAD
            ok &= passed
            print(f"  median ratio {med:.3f} -> overhead {100 * overhead:.1f}% "
                  f"(ratios {', '.join(f'{r:.3f}' for r in ratios)}; limit {100 * MAX_OVERHEAD:.0f}%): "
                  f"{'PASS' if passed else 'FAIL'}")
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
