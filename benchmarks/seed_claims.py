"""Benchmark (not a test): the seeds' claims next to what mmdiag measures for them.

    .venv/bin/python benchmarks/seed_claims.py [--tp 4 8] [--profiles small-image-c96 video-large mixed]
        [--requests small-image-c96=64 video-large=12 mixed=48] [--repeat 1] [--runs RUN.json ...]
        [--seeds-dir ../shared/seeds] [--json OUT]

Each claim (benchmarks/seed_claims.toml: the seed file, the proposal, the claim quoted from the
file) is turned into a figure of one replay Run per (profile, tp): a throughput ratio, a p99
ratio, CPU, pickle time or bytes. A claim with a number gets a verdict: `holds` when the
measured figure reaches it (inside tie_pct for `best_of`), `no` otherwise. `--runs` reads
existing Runs instead of replaying (their profile and tp label the columns). The hash-cache
proposal (001, 方案3) is measured by benchmarks/bench_hash_cache.py, summarized at the end.
Run it where cores >= tp (on 2 cores the ranks share them and every ratio is pessimistic).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tabulate import tabulate

from mmdiag.analysis.breakdown import cpu_pct, max_or_nan
from mmdiag.replay import ReplayOptions, replay
from mmdiag.run import Run
from mmdiag.workloads import synth_to_file

HERE = Path(__file__).resolve().parent
CLAIMS = HERE / "seed_claims.toml"
DEFAULT_REQUESTS = {"small-image-c96": 64, "video-large": 12, "mixed": 48}


def load_claims() -> dict:
    with open(CLAIMS, "rb") as f:
        return tomllib.load(f)


def needed_strategies(claims: list[dict]) -> list[str]:
    from mmdiag.vocab import STRATEGIES
    names = set()
    for c in claims:
        names.add(c["num"])
        den = c.get("den", [])
        names.update([den] if isinstance(den, str) else den)
    return [n for n in STRATEGIES if n in names]


def _pickle_ms_per_mm(s) -> float:
    r0 = s.rank(0)
    return r0.phases_ms.get("pickle", 0.0) / max(s.mm_requests, 1)


def _bytes_per_collective(s) -> float:
    r0 = s.rank(0).replay
    return r0.bytes_sent / r0.collectives if r0 and r0.collectives else math.nan


def figure(run: Run, c: dict) -> float:
    """The claim's metric on one Run (nan when a strategy it needs was not replayed)."""
    st = run.strategies
    num = st.get(c["num"])
    dens = c.get("den", [])
    dens = [dens] if isinstance(dens, str) else dens
    if num is None or any(d not in st for d in dens):
        return math.nan
    den = st[dens[0]] if dens else None
    m = c["metric"]
    if m == "throughput_ratio":
        return num.throughput_rps / den.throughput_rps
    if m == "p99_speedup":
        return den.latency_ms["p99"] / num.latency_ms["p99"]
    if m == "max_cpu_pct":
        return max_or_nan(cpu_pct(r) for r in num.ranks)
    if m == "cpu_saving":
        return 1.0 - sum(r.cpu_s for r in num.ranks) / sum(r.cpu_s for r in den.ranks)
    if m == "pickle_speedup":
        p = _pickle_ms_per_mm(num)
        return _pickle_ms_per_mm(den) / p if p else math.inf
    if m == "bytes_ratio":
        return _bytes_per_collective(den) / _bytes_per_collective(num)
    if m == "best_of":
        return num.throughput_rps / max(st[d].throughput_rps for d in dens)
    raise ValueError(f"unknown metric {m!r} in {CLAIMS}")


def verdict(c: dict, x: float, tie_pct: float) -> str:
    if math.isnan(x):
        return "not replayed"
    if "max" in c:
        return "holds" if x <= c["max"] else "no"
    if "min" not in c:
        return "(no number claimed)"
    slack = tie_pct / 100 if c["metric"] == "best_of" else 0.0
    return "holds" if x >= c["min"] * (1 - slack) else "no"


def fmt(c: dict, x: float) -> str:
    if math.isnan(x):
        return "-"
    if c["metric"] == "max_cpu_pct":
        return f"{x:.0f}%"
    if c["metric"] == "cpu_saving":
        return f"{100 * x:.0f}%"
    return f"{x:.2f}x"


def claimed(c: dict) -> str:
    if "max" in c:
        return f"<= {c['max']:g}%"
    if "min" not in c:
        return "-"
    return f">= {100 * c['min']:.0f}%" if c["metric"] == "cpu_saving" else f">= {c['min']:g}x"


def what(c: dict) -> str:
    den = c.get("den", [])
    den = " | ".join(den) if isinstance(den, list) else den
    return {"throughput_ratio": f"req/s {c['num']} / {den}", "p99_speedup": f"p99 {den} / {c['num']}",
            "max_cpu_pct": f"busiest rank CPU, {c['num']}", "cpu_saving": f"CPU s saved, {c['num']} vs {den}",
            "pickle_speedup": f"pickle ms/req {den} / {c['num']}",
            "bytes_ratio": f"bytes/collective {den} / {c['num']}",
            "best_of": f"req/s {c['num']} / best of {den}"}[c["metric"]]


def request_counts(args) -> dict[str, int]:
    sizes = dict(DEFAULT_REQUESTS)
    sizes.update({k: int(v) for k, v in (s.split("=", 1) for s in args.requests)})
    return {p: sizes[p] for p in args.profiles if p in sizes}


def replay_runs(args, names: list[str]) -> list[tuple[str, Run]]:
    sizes = request_counts(args)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            trace = os.path.join(tmp, f"{profile}.jsonl")
            synth_to_file(profile, sizes.get(profile), trace)
            for tp in args.tp:
                t0 = time.time()
                run = replay(trace, ReplayOptions(tp=tp, strategies=names, repeat=args.repeat, timeout=300))
                print(f"  replayed {profile} at tp {tp}: {time.time() - t0:.0f} s", file=sys.stderr)
                out.append((f"{profile} tp{tp}", run))
    return out


def hash_cache_summary(n: int) -> list[str]:
    sys.path.insert(0, str(HERE))
    from bench_hash_cache import measure
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in (0.0, 0.3):
            p = os.path.join(tmp, f"s{share}.jsonl")
            synth_to_file("small-image-c96", n, p, repeat_share=share)
            r = measure(p)
            ms = r["ms"]
            lines.append(f"repeat share {share}: id()-keyed cache {r['id_hits'] - r['id_wrong']} correct / "
                         f"{r['id_wrong']} wrong hits of {r['items']}; content-keyed cache "
                         f"{100 * (1 - ms['content'] / ms['none']):+.0f}% ({r['content_hits']} hits); "
                         f"copy-free sha256 {100 * (1 - ms['sha'] / ms['none']):+.0f}%; "
                         f"SGLang's hash_feature {ms['none']:.1f} ms per request")
    return lines


def check_quotes(claims: list[dict], seeds_dir: str) -> list[str]:
    """Each quoted fragment must appear in its seed file (when the seeds are at hand)."""
    bad = []
    for c in claims:
        p = Path(seeds_dir) / c["seed"]
        if not p.exists():
            return [f"{p} not found: quotes not checked"]
        text = p.read_text(encoding="utf-8", errors="replace")
        bad += [f"{c['seed']}: {frag.strip()!r} not found" for frag in c["quote"].replace("...", ";").split(";")
                if frag.strip() and frag.strip() not in text]
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--profiles", nargs="+", default=list(DEFAULT_REQUESTS))
    ap.add_argument("--requests", nargs="*", default=[], metavar="PROFILE=N")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--runs", nargs="*", default=[], help="existing Run JSON files instead of replaying")
    ap.add_argument("--hash-n", type=int, default=24, help="requests per trace of the hash-cache summary (0: skip)")
    ap.add_argument("--seeds-dir", default=next((str(d) for d in (HERE.parent / "shared" / "seeds",
                                                               HERE.parent.parent / "shared" / "seeds") if d.is_dir()),
                                              "shared/seeds"), help="where the seed files are (to check the quotes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = load_claims()
    claims, tie = data["claims"], float(data.get("tie_pct", 3.0))
    names = needed_strategies(claims)
    if args.runs:
        runs = [(f"{(r.trace.get('source') or {}).get('profile', Path(p).stem)} tp{r.tp}", r)
                for p in args.runs for r in [Run.load(p)]]
    else:
        runs = replay_runs(args, names)
    rows, out = [], []
    for c in claims:
        row = [c["seed"][:3], c["proposal"], c["quote"], claimed(c), what(c)]
        for label, run in runs:
            x = figure(run, c)
            row.append(f"{fmt(c, x)} {verdict(c, x, tie)}")
            out.append({"seed": c["seed"], "proposal": c["proposal"], "quote": c["quote"], "claim": claimed(c),
                        "measure": what(c), "run": label, "value": None if math.isnan(x) else x,
                        "verdict": verdict(c, x, tie)})
        rows.append(row)
    print(tabulate(rows, headers=["seed", "proposal", "the seed says", "claim", "mmdiag measures",
                                  *[label for label, _ in runs]], tablefmt="github"))
    host = runs[0][1].host if runs else {}
    sizes = "from --runs" if args.runs else ", ".join(f"{p}={n}" for p, n in request_counts(args).items())
    print(f"\nhost {host.get('hostname')} ({host.get('cpus')} cores); repeats {args.repeat}; requests {sizes}; "
          "a ratio inside about 15% is within run-to-run noise at one repeat")
    print("not measured here: 000 方案3 共享内存 (shared memory), a transport rather than a strategy")
    for label, run in runs:
        th = run.described("cond").get("threshold")
        if th:
            print(f"cond's threshold in {label}: {th.get('text')}")
    for q in check_quotes(claims, args.seeds_dir):
        print(f"quote check: {q}")
    if args.hash_n:
        print("\n001 方案3 (优化from_dict本身: id(feature) cache, lazy hash), benchmarks/bench_hash_cache.py:")
        for line in hash_cache_summary(args.hash_n):
            print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
