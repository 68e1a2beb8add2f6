"""Benchmark of the whole-server profile (issue 22): per stage and per phase, `mmdiag profile
--pid MAIN` at its defaults against the target's own timers, and the stage verdict. Prints
its figures.

    python benchmarks/bench_stages.py --wheel sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl --tp 2

The target (tests/whole_server_target.py) runs the release's own code on both sides in real
processes titled like SGLang's: tokenizer-side preprocessing, hashing in the release's hash
pool and its shared-memory write in the main process; the receive path on
sglang::scheduler_TP{r} ranks. The profile's window is bracketed by snapshots of the
target's timers. Every share must be within 3 points of the timers, the bottleneck stage
must be the one the timers say saturates first, and the requests the profiler counted
(mmdiag.live.requests) are set beside the ones the target sent.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_profile import cpu_throttle, unpack_wheel  # noqa: E402
from mmdiag.live import DEFAULT_DURATION_S, DEFAULT_RATE_HZ, profile  # noqa: E402
from mmdiag.live.stats import pm  # noqa: E402
from mmdiag.live.truth import (snapshot, snapshot_tokenizer, tokenizer_window_shares, truth_bottleneck,  # noqa: E402
                               window_shares)
from mmdiag.proc import stop_group  # noqa: E402
from mmdiag.vocab import STAGE_PHASES  # noqa: E402

PY = sys.executable
TARGET = os.path.join(REPO, "tests", "whole_server_target.py")
BOUND_POINTS = 3.0


def start_target(pkg, tp, rate, rows, stats, forward_ms):
    return subprocess.Popen([PY, TARGET, "--sglang", pkg, "--tp", str(tp), "--rate", str(rate), "--rows", str(rows),
                             "--stats", stats, "--forward-ms", str(forward_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_ready(proc, stats, tp, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        tok = snapshot_tokenizer(stats)
        if len(snapshot(stats)) == tp and tok and tok["requests"] > 0:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the target exited ({proc.returncode}) before it served")
        time.sleep(0.2)
    raise RuntimeError("the target did not start serving")


def measure(pkg, tp, rate, rows, window, prate, forward_ms, warmup=3.0):
    """(run, rank timers, tokenizer timers, requests the target sent in the window, throttle)."""
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-stages-") as stats:
        proc = start_target(pkg, tp, rate, rows, stats, forward_ms)
        try:
            wait_ready(proc, stats, tp)
            time.sleep(warmup)
            snaps = {}

            def on_window(w):
                snaps[w] = (snapshot(stats), snapshot_tokenizer(stats), cpu_throttle())
            run = profile(proc.pid, duration=window, rate=prate, on_window=on_window)
        finally:
            stop_group(proc)
    (r0, t0, c0), (r1, t1, c1) = snaps["start"], snaps["end"]
    throttle = None if c0 is None or c1 is None else tuple(b - a for a, b in zip(c0, c1))
    return run, window_shares(r0, r1), tokenizer_window_shares(t0, t1), t1["requests"] - t0["requests"], throttle


def rows_of(run, ranks, tok):
    """(stage, server, phase, profile %, its 95% half-width, timers %) for every share."""
    out = []
    for st in run.stages:
        for sv in st.servers:
            if st.role == "tokenizer":
                truth = tok.get(sv.name.split(" (")[0])
            else:
                truth = ranks.get(int(sv.name.split()[-1]))
            if truth is None:
                continue
            for p in STAGE_PHASES[st.role]:
                a, b = sv.phases_pct.get(p, 0.0), truth.get(p, 0.0)
                if max(a, b) > 0.05:
                    out.append((st.role, sv.name, p, a, sv.phases_ci.get(p), b))
    return out


def report(run, ranks, tok, sent, throttle, tp, rate, rows) -> bool:
    live = run.live
    print(f"\ntp {tp}, Poisson {rate} req/s, one {rows}x1176 float32 image a request ({rows * 1176 * 4 / 1e6:.1f} MB); "
          f"window {live.duration_s:.1f} s at {live.rate_hz} Hz; CPU quota "
          + ("not readable" if throttle is None else f"throttled {throttle[0]} periods"))
    print(f"  {'stage':<9} {'server':<22} {'phase':<15} {'profile % +/-95%':>17} {'timers %':>9} {'gap':>5}")
    rows_ = rows_of(run, ranks, tok)
    for stage, server, p, a, h, b in rows_:
        print(f"  {stage:<9} {server:<22} {p:<15} {pm(a, h):>17} {b:>9.1f} {abs(a - b):>5.1f}")
    worst = max((abs(a - b) for *_, a, _h, b in rows_), default=float("nan"))
    truth = truth_bottleneck(tok, ranks)
    b = run.bottleneck or {}
    counted = b.get("requests")
    print(f"  requests in the window: counted by the profiler {counted}, sent by the target {sent}")
    print("  samples per server (window x rate = %.0f a thread): " % (live.duration_s * live.rate_hz)
          + ", ".join(f"{sv.name} {sv.samples}" for st in run.stages for sv in st.servers))
    for st in run.stages:
        print(f"  stage {st.role}: bound by {st.bound_by}, busy {pm(st.busy_pct, st.busy_ci)}%, service "
              f"{pm(st.service_ms, st.service_ci)} ms a request, capacity {pm(st.capacity_rps, st.capacity_ci)} req/s")
    print(f"  verdict: {b.get('text')}")
    ok_share = worst <= BOUND_POINTS
    ok_stage = b.get("stage") == truth
    print(f"  worst gap {worst:.1f} points (bound {BOUND_POINTS:g}): {'PASS' if ok_share else 'FAIL'}; bottleneck by "
          f"the timers: {truth}, named: {b.get('stage')}: {'PASS' if ok_stage else 'FAIL'}")
    return ok_share and ok_stage


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", help="an SGLang 0.5.21+ wheel (0.5.23 tested)")
    ap.add_argument("--sglang", help="an unpacked sglang package folder instead of --wheel")
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--forward-ms", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=DEFAULT_DURATION_S, help="profile window (default: mmdiag's)")
    ap.add_argument("--profile-rate", type=int, default=DEFAULT_RATE_HZ, help="sampling rate (default: mmdiag's)")
    a = ap.parse_args()
    if not (a.wheel or a.sglang):
        ap.error("give --wheel or --sglang")
    print(f"machine: {os.cpu_count()} CPUs; profiler at {a.profile_rate} Hz for {a.window:g} s "
          f"(defaults {DEFAULT_RATE_HZ} Hz, {DEFAULT_DURATION_S:g} s)")
    ok = True
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-stages-pkg-") as tmp:
        pkg = a.sglang or unpack_wheel(a.wheel, tmp)
        for tp in a.tp:
            ok &= report(*measure(pkg, tp, a.rate, a.rows, a.window, a.profile_rate, a.forward_ms), tp, a.rate, a.rows)
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
