"""Every strategy under each transport, at each --tp, for two workloads: the default
workload, and one request per loop iteration of 1120x700 images (closed loop at
concurrency 1). Prints the median request throughput of the repeats and its ratio to
`revert` on `pickle`, and what bounds it (the scheduler loop, or the tokenizer stage);
then the release steps `mmdiag recommend --release` weighs for --release (upgrading,
SGLANG_MM_PRECOMPUTE_HASH=1, `mmdiag apply shm`) and the one it picks.

With --sglang-wheel W (a pure-Python SGLang wheel whose recv broadcast pickles features,
0.5.4.post1 .. 0.5.9) the release's own code also runs in the ranks (replay --impl
sglang): as it is, with SGLANG_MM_PRECOMPUTE_HASH=1 (0.5.7+), and with `mmdiag apply shm`
written into a copy of it: the patched configurations, measured; from 0.5.8 also those two
with SGLANG_MM_SKIP_COMPUTE_HASH=1 (no hashing: a random hash drawn once in the tokenizer).

    python benchmarks/bench_transport.py --tp 4 8 --repeat 3 -n 40 \
        --sglang-wheel .cache/sglang-wheels/sglang-0.5.9-py3-none-any.whl      # a 32-core host
    python benchmarks/bench_transport.py --tp 2 --repeat 1 -n 4 --tiny   # a smoke test
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmdiag import api  # noqa: E402
from mmdiag import strategies as strategy_registry  # noqa: E402
from mmdiag.analysis import release_steps as RS  # noqa: E402
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


SKIP = "+skip"  # a row replayed with --skip-hash (SGLANG_MM_SKIP_COMPUTE_HASH=1)


def measure(trace: str, tp: int, repeat: int, strategies: list[str], runs: list) -> dict[tuple[str, str], tuple[float, str]]:
    """Every strategy under each transport; those that hash before the scheduler once more
    with --skip-hash (rows NAME+skip): release steps weigh those too."""
    out = {}
    once = [n for n in strategies if strategy_registry.get(n).hashes_in_tokenizer]
    for tr in TRANSPORTS:
        for names, skip in ((strategies, False), (once, True)):
            if not names:
                continue
            run = api.replay(trace, tp=tp, strategies=names, transport=tr, repeat=repeat, skip_hash=skip)
            runs.append(run)
            for name, s in run.strategies.items():
                tok = s.tokenizer_ms or {}
                bound = "tokenizer" if tok and tok.get("capacity_rps", 1e18) <= tok.get("loop_rps", 0) else "loop"
                out[(name + (SKIP if skip else ""), tr)] = (s.throughput_rps, bound)  # the median repeat
    return out


def unpack(wheel: str, dest: str) -> str:
    """The wheel's Python files (the bytes SGLang ships) under dest; returns its sglang folder."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("sglang/") and name.endswith(".py"):
                z.extract(name, dest)
    return os.path.join(dest, "sglang")


def installed(trace: str, tp: int, repeat: int, wheel: str, tmp: str) -> dict[str, float | None]:
    """The release's own code in the ranks: as it is, with the hash variable, with `apply shm`,
    and (0.5.8+) with SGLANG_MM_SKIP_COMPUTE_HASH=1 on the two that draw the hash once."""
    from mmdiag.sglang.apply import apply
    from mmdiag.sglang.locate import locate
    from mmdiag.sglang.facts import at_least, since
    out = {}
    pre, skip = {"SGLANG_MM_PRECOMPUTE_HASH": "1"}, {"SGLANG_MM_SKIP_COMPUTE_HASH": "1"}
    configs = [("as it is", {}, None), ("SGLANG_MM_PRECOMPUTE_HASH=1", pre, None), ("mmdiag apply shm", {}, "shm")]
    if at_least(locate(unpack(wheel, tempfile.mkdtemp(dir=tmp))).version, since("skip_hash_family")):
        # no hashing at all: a random hash drawn once in the tokenizer (repeated images lose
        # prefix-cache reuse; alone, on a per-rank path, the ranks would disagree)
        configs += [("PRECOMPUTE_HASH=1 + SKIP_COMPUTE_HASH=1", {**pre, **skip}, None),
                    ("apply shm + SKIP_COMPUTE_HASH=1", skip, "shm")]
    for label, env, patch in configs:
        pkg = unpack(wheel, tempfile.mkdtemp(dir=tmp))
        if patch and apply(locate(pkg), patch).status != "applied":
            continue
        env = {**env, "MMDIAG_STATE_DIR": os.path.join(tmp, "state")}
        run = api.replay(trace, tp=tp, impl="sglang", sglang_path=pkg, repeat=repeat, extra_env=env)
        res = next(iter(run.strategies.values()))
        out[label] = res.throughput_rps if res.ranks_agree else None  # a divergent run measures nothing
    return out


def release_steps(runs: list, release: str) -> None:
    rec = api.recommend(runs, release=release)
    for st in rec.release_steps:
        rps = f"{st.expected_rps:.1f}" if st.expected_rps else "-"
        print(f"  {st.step:<92}{rps:>10} req/s  {st.vs_current or 0:>5.2f}x  ({st.source})")
    best = RS.best(rec.release_steps)
    print(f"  pays most: {best.step if best else 'none measured'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-n", type=int, default=40, help="requests per workload")
    ap.add_argument("--strategy", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--tiny", action="store_true", help="56x56 images: a smoke test of the script")
    ap.add_argument("--sglang-wheel", help="also run this SGLang wheel's own code: as it is, with the hash "
                    "variable, and with `mmdiag apply shm`")
    ap.add_argument("--release", default="0.5.9", help="the release whose steps recommend weighs [%(default)s]")
    a = ap.parse_args()
    strategies = sorted(set(a.strategy) | {"revert"}, key=STRATEGIES.index)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for label, synth_args in workloads(a.n, a.tiny).items():
            trace = os.path.join(tmp, "trace.jsonl")
            synth(synth_args, trace)
            for tp in a.tp:
                runs: list = []
                res = measure(trace, tp, a.repeat, strategies, runs)
                base = res[BASE][0]
                print(f"\n{label}, tp {tp}, {a.n} requests, median of {a.repeat} "
                      f"(ratio to {BASE[0]} on {BASE[1]}: {base:.1f} req/s)")
                print(f"  {'strategy':<16}" + "".join(f"{t + ' req/s':>14}{'x':>7}{'bound':>11}" for t in TRANSPORTS))
                for name in strategies + [n + SKIP for n in strategies if (n + SKIP, TRANSPORTS[0]) in res]:
                    cells = "".join(f"{res[(name, t)][0]:>14.1f}{res[(name, t)][0] / base:>7.2f}{res[(name, t)][1]:>11}"
                                    for t in TRANSPORTS)
                    print(f"  {name:<16}{cells}", flush=True)
                if a.sglang_wheel:
                    print(f"  installed {os.path.basename(a.sglang_wheel)} (replay --impl sglang):")
                    for label, rps in installed(trace, tp, a.repeat, a.sglang_wheel, tmp).items():
                        print(f"    {label:<40}" + (f"{rps:>10.1f} req/s {rps / base:>6.2f}x" if rps is not None
                                                    else "  ranks disagree on hashes: not valid"), flush=True)
                print(f"  release steps on SGLang {a.release} (mmdiag recommend --release {a.release}):")
                release_steps(runs, a.release)
    print(f"\n{time.time() - t0:.0f} s wall on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
