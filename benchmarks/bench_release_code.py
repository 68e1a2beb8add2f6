"""The release's own code against the model (issue 23): req/s of `replay --impl sglang` on real
SGLang trees patched by `mmdiag apply`, beside mmdiag's model of the same configuration.

One 1120x700 image per request, one request in flight (the tokenizer stage adds to every
request), --tp ranks, configurations alternating over --repeat rounds; the median round and
its ratio to the model's `revert` on pickle with sha256 are printed, with whether the ranks
agreed. The model's rows run an untagged trace (no release: sha256 fed through copies, one
hashing worker, as to 0.5.9) unless labelled "model as X" (the trace tagged X). Release trees:
`--tree VERSION=PATH` (an unpacked `sglang` package; on a host without the test wheels), else
the test suite's unpacked wheels (tests/sglang_wheels.py). Each tree is copied, xxhash is put
beside it (the server's Python must import it), and patched there.

    python benchmarks/bench_release_code.py --tp 2 -n 30 --repeat 2
    python benchmarks/bench_release_code.py --tp 8 -n 60 --repeat 2 --tree 0.5.9=/x/0.5.9/sglang --tree 0.5.23=/x/0.5.23/sglang
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tabulate import tabulate  # noqa: E402

from mmdiag import api  # noqa: E402

PRECOMPUTE = {"SGLANG_MM_PRECOMPUTE_HASH": "1"}  # 0.5.23 hashes in its tokenizer's pool
NO_POOL = {"MMDIAG_SHM_POOL_MB": "0"}             # mmdiag's shm patch writes a new segment per feature

# (label, the model's replay options) or (label, release, patches applied in order, ranks' environment)
CONFIGS = [
    ("model: revert, pickle, sha256", dict(strategies=["revert"], transport="pickle")),
    ("model: shm, fresh, sha256", dict(strategies=["shm"], transport="shm")),
    ("model: shm, pooled, xxh3", dict(strategies=["shm"], transport="shm", hash="xxh3", segments="pool")),
    ("0.5.9 apply shm, fresh, sha256", ("0.5.9", ["shm"], NO_POOL)),
    ("0.5.9 apply shm + xxh3, pooled", ("0.5.9", ["shm", "xxh3"], {})),
    # the model of 0.5.23 itself (the trace tagged so): sha256 in place, 2 hashing workers, copy-on-write maps
    ("model as 0.5.23: shm, fresh, sha256", dict(strategies=["shm"], transport="shm", as_release="0.5.23")),
    ("model as 0.5.23: shm, pooled, xxh3", dict(strategies=["shm"], transport="shm", hash="xxh3", segments="pool",
                                               as_release="0.5.23")),
    ("0.5.23 precompute, fresh, sha256", ("0.5.23", [], PRECOMPUTE)),
    ("0.5.23 precompute + apply xxh3, fresh", ("0.5.23", ["xxh3"], PRECOMPUTE)),
    ("0.5.23 precompute + apply xxh3 + pool", ("0.5.23", ["xxh3", "pool"], PRECOMPUTE)),
]


def _tree(version: str, given: dict[str, str]) -> Path:
    if version in given:
        return Path(given[version])
    sys.path.insert(0, str(ROOT / "tests"))
    from sglang_wheels import pristine  # the test wheels (MMDIAG_WHEEL_CACHE or pip download)
    return pristine(version)


def _install(version: str, patches: list[str], given: dict[str, str], into: Path) -> str:
    """A copy of `version`'s tree with xxhash beside it, patched by `patches`; its sglang path."""
    import xxhash
    site = into / f"{version}-{'-'.join(patches) or 'as-shipped'}" / "site-packages"
    shutil.copytree(_tree(version, given), site / "sglang")
    src = Path(xxhash.__file__).parent
    shutil.copytree(src, site / "xxhash")
    for d in src.parent.glob("xxhash-*.dist-info"):
        shutil.copytree(d, site / d.name)
    for name in patches:
        api.apply(name, sglang_path=str(site / "sglang"), confirm=lambda _: True)
    return str(site / "sglang")


def _tagged(trace: str, version: str) -> str:
    """The trace as if recorded from a server of `version`: the model follows its release facts."""
    out = trace.replace(".jsonl", f"-{version}.jsonl")
    if not os.path.exists(out):
        with open(trace) as f:
            head, *rest = f.readlines()
        h = json.loads(head)
        h.setdefault("source", {})["sglang_version"] = version
        with open(out, "w") as f:
            f.writelines([json.dumps(h) + "\n", *rest])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("-n", type=int, default=30, help="requests per replay")
    ap.add_argument("--repeat", type=int, default=2, help="alternating rounds of every configuration")
    ap.add_argument("--tree", action="append", default=[], metavar="VERSION=PATH",
                    help="an unpacked sglang package of VERSION (default: the test suite's wheels)")
    a = ap.parse_args()
    given = dict(t.split("=", 1) for t in a.tree)
    with tempfile.TemporaryDirectory(prefix="mmdiag-bench-") as d:
        d = Path(d)
        os.environ["MMDIAG_STATE_DIR"] = str(d / "state")  # the backups and manifests of these copies only
        trace = str(d / "trace.jsonl")
        subprocess.run([sys.executable, "-m", "mmdiag", "trace", "synth", "-n", str(a.n), "--image-resolution",
                        "700x1120", "--image-count", "1", "--max-concurrency", "1", "-o", trace],
                       cwd=ROOT, check=True, capture_output=True)
        runs = []
        for label, how in CONFIGS:
            if isinstance(how, dict):
                runs.append((label, dict(how)))
            else:
                version, patches, env = how
                runs.append((label, dict(impl="sglang", sglang_path=_install(version, patches, given, d),
                                         extra_env=env)))
        got: dict[str, list] = {label: [] for label, _ in runs}
        for rnd in range(a.repeat):
            for label, kw in runs:
                kw = dict(kw)
                release = kw.pop("as_release", None)
                s = next(iter(api.replay(_tagged(trace, release) if release else trace, tp=a.tp, **kw)
                              .strategies.values()))
                got[label].append(s)
                print(f"  round {rnd + 1}/{a.repeat}: {label}: {s.throughput_rps:.1f} req/s", file=sys.stderr,
                      flush=True)
    base = statistics.median(s.throughput_rps for s in got[CONFIGS[0][0]])
    rows = []
    for label, _ in CONFIGS:
        rs = got[label]
        med = statistics.median(s.throughput_rps for s in rs)  # the mean of two rounds; every round is printed
        tok = sorted(rs, key=lambda s: s.throughput_rps)[(len(rs) - 1) // 2].tokenizer_ms or {}
        rows.append([label, f"{med:.1f}", " ".join(f"{s.throughput_rps:.1f}" for s in rs), f"{med / base:.2f}x",
                     f"{tok.get('per_mm_request', 0):.1f}", "yes" if all(s.ranks_agree for s in rs) else "NO"])
    print(f"the release's own code beside the model: tp {a.tp}, {a.n} requests of one 1120x700 image, "
          f"concurrency 1, median of {a.repeat} alternating rounds ({os.cpu_count()} CPUs, {os.uname().nodename})")
    print(tabulate(rows, headers=["configuration", "req/s", "rounds", "vs model revert", "tokenizer ms/req",
                                  "ranks agree"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
