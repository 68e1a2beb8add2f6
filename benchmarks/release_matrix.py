"""Every SGLang release on the index through `mmdiag doctor` and every `mmdiag apply` (dry run).

    python benchmarks/release_matrix.py                    # 0.5.4 .. newest, prints the matrix
    python benchmarks/release_matrix.py --releases 0.5.7 0.5.23
    python benchmarks/release_matrix.py --replay           # + `replay --impl sglang` (tp 2) of each
    python benchmarks/release_matrix.py --frames           # the frames each family defines (TOML)
    python benchmarks/release_matrix.py --layouts          # variants.toml [layouts] keys, from the wheels

Releases come from `pip index versions sglang`; wheels are fetched with
`pip download --no-deps` into MMDIAG_WHEEL_CACHE (default .cache/sglang-wheels) and only
their Python sources are unpacked (wheels from 0.5.12.post1 on are cp311 platform wheels:
nothing compiled is imported). Nothing is written to any wheel: every apply is a dry run.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mmdiag.errors import MmdiagError  # noqa: E402
from mmdiag.sglang import astutil  # noqa: E402
from mmdiag.sglang.apply import apply  # noqa: E402
from mmdiag.sglang.detect import detect  # noqa: E402
from mmdiag.sglang.facts import facts, families, file_rel, layouts  # noqa: E402
from mmdiag.sglang.locate import locate  # noqa: E402
from mmdiag.strategies import PATCHABLE  # noqa: E402

CACHE = Path(os.environ.get("MMDIAG_WHEEL_CACHE", REPO / ".cache" / "sglang-wheels"))
KEEP = re.compile(r"^sglang/(version\.py|_version\.py|__init__\.py|srt/(managers/.*|utils/common\.py|environ\.py|constants\.py|"
                  r"server_args\.py|arg_groups/fields/.*|multimodal/processors/hash_executor\.py|multimodal/modality\.py|"
                  r"multimodal/cache/(__init__|identity)\.py|observability/scheduler_stage_metrics\.py))$")
KEEP_TAG = hashlib.sha256(KEEP.pattern.encode()).hexdigest()[:8]  # a new KEEP unpacks afresh
FIRST = (0, 5, 4)
# Frames the live profiler maps (file, qualified name); --frames says which each family defines.
FRAME_CANDIDATES = {
    "srt/managers/scheduler.py": ["Scheduler.recv_requests", "Scheduler.process_input_requests",
                                  "Scheduler.handle_generate_request", "Scheduler._handle_generate_request",
                                  "Scheduler._process_and_broadcast_mm_inputs", "Scheduler._get_multimodal_inputs",
                                  "_MultimodalInputBroadcast"],
    "srt/managers/scheduler_components/request_receiver.py": [
        "SchedulerRequestReceiver.recv_requests", "SchedulerRequestReceiver._broadcast_reqs_across_ranks",
        "SchedulerRequestReceiver._finalize_shm_features"],
    "srt/managers/schedule_batch.py": ["MultimodalInputs.from_dict", "MultimodalInputs.from_processor_output",
                                       "MultimodalDataItem.set_pad_value"],
    "srt/multimodal/cache/identity.py": ["resolve_multimodal_item_hash"],
    "srt/managers/mm_utils.py": ["hash_feature", "tensor_hash", "data_hash",
                                 "unwrap_shm_features", "ShmPointerMMData.__init__", "ShmPointerMMData.__setstate__",
                                 "ShmPointerMMData.materialize"],
    "srt/utils/common.py": ["broadcast_pyobj"],
    "srt/multimodal/processors/hash_executor.py": ["MultimodalHashExecutor.set_pad_values", "_set_pad_values"],
    "srt/managers/tokenizer_manager.py": ["TokenizerManager._tokenize_one_request"],
}


def _vkey(v: str) -> tuple:
    nums = [int(x) for x in re.findall(r"\d+", v)]
    return tuple(nums[:3]) + ((nums[3],) if "post" in v and len(nums) > 3 else (0,))


def index_versions() -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "sglang"], capture_output=True,
                       text=True, timeout=120)
    m = re.search(r"Available versions: (.*)", r.stdout)
    if not m:
        sys.exit(f"release_matrix: `pip index versions sglang` gave no versions ({r.stderr.strip()[-200:]})")
    vs = [v.strip() for v in m.group(1).split(",")]
    return sorted((v for v in vs if _vkey(v)[:3] >= FIRST and re.fullmatch(r"[\d.]+(post\d+)?", v)), key=_vkey)


def unpacked(version: str) -> Path:
    dest = CACHE / "matrix-src" / KEEP_TAG / version / "sglang"
    if (dest / "srt/managers/scheduler.py").is_file():
        return dest
    whl = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not whl:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"sglang=={version}",
                        "-d", str(CACHE)], check=True, timeout=600)
        whl = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    with zipfile.ZipFile(whl[0]) as z:
        for name in z.namelist():
            if KEEP.match(name) and name.endswith(".py"):
                z.extract(name, dest.parent)
    return dest


def apply_cell(inst, strategy: str) -> str:
    try:
        r = apply(inst, strategy, dry_run=True)
    except MmdiagError as e:
        return "refused" if "does not apply" in str(e) else "unknown-layout"
    if r.status == "settings":
        return "env" if r.settings.get("env") else "flag-off"
    if r.status == "nothing-to-do":
        return "none"
    return "patch:" + "+".join(Path(f).stem.replace("tokenizer_manager", "tm").replace("scheduler", "sch")
                               for f in r.files)


def replay_cell(version: str, cells: list[str], trace: str) -> str:
    """`mmdiag replay --impl sglang --tp 2` of a tiny trace on the release as installed and
    on each setting or patch `apply` gives it (a patch on a scratch copy): which ran with
    every rank agreeing ("-" where it did not run, with the first error on stderr)."""
    from mmdiag import api
    ran = []
    jobs = [("installed", None, {})] + [(s, s, {}) for s, c in zip(PATCHABLE, cells) if c.startswith("patch:")] \
        + [("env", None, {"SGLANG_MM_PRECOMPUTE_HASH": "1"})] * any(c == "env" for c in cells)
    for label, strategy, env in jobs:
        with tempfile.TemporaryDirectory(prefix="mmdiag-matrix-") as tmp:
            pkg = Path(tmp) / "sglang"
            shutil.copytree(unpacked(version), pkg)
            try:
                if strategy:
                    apply(locate(str(pkg)), strategy)
                run = api.replay(trace, tp=2, impl="sglang", sglang_path=str(pkg), extra_env=env, timeout=30.0)
                ok = all(st.ranks_agree for st in run.strategies.values())
            except MmdiagError as e:
                print(f"release_matrix: {version} {label}: {e.one_line()}", file=sys.stderr)
                ok = False
        ran.append(label if ok else f"-{label}")
    return ",".join(ran)


def row(version: str) -> list[str]:
    inst = locate(str(unpacked(version)))
    det = detect(inst)
    f = det.facts
    pre = ("-" if not f.precompute_env else "pool" if f.precompute_hashing.startswith("thread") else "loop")
    transport = f.transport + ("+barrier" if f.shm_barrier else "") + ("+agree" if f.shm_failure_agreement else "")
    flag = "-" if not f.flag_declared else ("sa." if "server_args" in (f.flag_read or "") else "get_mm.") + \
        ("args" if "server_args.py" in f.flag_declared else "fields/mm")
    # a release outside its family's `releases` (or any family's) is marked: the table needs updating
    fam = (f.family or "?") + ("" if f.family_fit in (None, "in range") else f" [{f.family_fit}]")
    return [version, det.variant or "UNKNOWN", fam, f.handler or "?", flag,
            (f.group or "-").replace("self.", ""), pre, transport,
            ",".join(f.feature_transport_option) or "-"] + [apply_cell(inst, s) for s in PATCHABLE]


def defined(pkg: Path) -> set[str]:
    """`file:qualname` of every top-level function/class and class method in the candidate files."""
    out = set()
    for rel in FRAME_CANDIDATES:
        try:
            tree = astutil.parse((pkg / rel).read_text(encoding="utf-8"), rel)
        except OSError:
            continue
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(f"{rel}:{n.name}")
            if isinstance(n, ast.ClassDef):
                out |= {f"{rel}:{n.name}.{m.name}" for m in n.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def frames(versions: list[str]) -> None:
    """Per family: the candidate frames that every one of its releases here defines, as TOML."""
    common: dict[str, tuple[list[str], set[str]]] = {}
    for v in versions:
        pkg = unpacked(v)
        fam = detect(locate(str(pkg))).family
        seen, have = common.get(fam, ([], None))
        common[fam] = (seen + [v], defined(pkg) if have is None else have & defined(pkg))
    for fam in families():
        if fam["name"] not in common:
            continue
        seen, have = common[fam["name"]]
        names = [f"{rel}:{n}" for rel, ns in FRAME_CANDIDATES.items() for n in ns if f"{rel}:{n}" in have]
        print(f'# {fam["name"]} (defined in each of {", ".join(seen)})\nframes = [\n'
              + "".join(f'  "{n}",\n' for n in names) + "]")


def layout_keys(versions: list[str]) -> None:
    """Per [layouts] target: each fingerprint the releases carry (TOML keys; a new one is marked)."""
    for target in facts()["layouts"]:
        seen: dict[str, list[str]] = {}
        for v in versions:
            pkg = unpacked(v)
            texts = ((pkg / file_rel(k)).read_text(encoding="utf-8")
                     for k in ("scheduler", "tokenizer_manager", "mm_utils"))
            node = next((n for n in (astutil.target_node(t, target) for t in texts) if n is not None), None)
            if node is not None:
                seen.setdefault(astutil.fingerprint(node), []).append(v)
        print(f'[layouts."{target}"]')
        for fp, vs in seen.items():
            print(f'{fp} = "{layouts(target).get(fp, "NEW: describe this layout")}"  # {", ".join(vs)}')
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--releases", nargs="*", help="these versions instead of the index's 0.5.4 .. newest")
    ap.add_argument("--frames", action="store_true", help="print the frames each family defines (TOML)")
    ap.add_argument("--layouts", action="store_true", help="print the [layouts] fingerprints of the releases (TOML)")
    ap.add_argument("--replay", action="store_true", help="also run `replay --impl sglang` (tp 2) on each")
    a = ap.parse_args()
    versions = a.releases or index_versions()
    if a.frames:
        return frames(versions)
    if a.layouts:
        return layout_keys(versions)
    head = ["release", "variant", "family", "handler", "flag", "group", "precompute", "transport",
            "--mm-feature-transport"] + [f"apply {s}" for s in PATCHABLE]
    t0 = time.perf_counter()
    rows = [row(v) for v in versions]
    if a.replay:
        head.append("replay --impl sglang")
        with tempfile.TemporaryDirectory(prefix="mmdiag-matrix-") as tmp:
            from mmdiag import api
            trace = str(Path(tmp) / "t.jsonl")
            api.synth_trace(trace, n=6)
            for r in rows:
                r.append(replay_cell(r[0], r[-len(PATCHABLE):], trace))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\n{len(rows)} releases, {time.perf_counter() - t0:.0f} s; apply cells: patch:<files written>, "
          "env = set SGLANG_MM_PRECOMPUTE_HASH=1 (+ flag off), flag-off = keep the broadcast flag off (its default), "
          "none = nothing to change, refused = does not apply to that release; "
          "family [x]: the release lies outside that family's `releases` in variants.toml (x = facts.version_fit)"
          + ("; replay: what ran with every rank agreeing (installed, each patch, env = the release's "
             "SGLANG_MM_PRECOMPUTE_HASH=1; -x = failed)" if a.replay else ""))


if __name__ == "__main__":
    main()
