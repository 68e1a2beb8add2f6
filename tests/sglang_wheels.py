"""Real SGLang wheels for the sglang tests: fetched with `pip download --no-deps`
into MMDIAG_WHEEL_CACHE (default <repo>/.cache/sglang-wheels) and unpacked.

Only the Python files mmdiag reads are unpacked (KEEP): the same bytes as the wheel,
never its compiled parts (wheels from 0.5.12.post1 on are cp311 platform wheels).
No SGLang source lives in the repository.

A wheel that cannot be had skips the test locally, but fails it when the CI
environment variable is set (CI runs with CI=true), so CI never passes on skips.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MMDIAG_WHEEL_CACHE", REPO / ".cache" / "sglang-wheels"))
UNPACKED = CACHE / "unpacked"

# version -> variant by code structure (the mm path's shape), for the gloo/runtime tests
RELEASES = {
    "0.5.4.post1": "per-rank",
    "0.5.4.post2": "broadcast-always",
    "0.5.5": "broadcast-always",
    "0.5.5.post3": "broadcast-flag",
    "0.5.6": "broadcast-flag",
    "0.5.9": "broadcast-flag",  # dp_tp group, MM_PAD_SHIFT pad values, SGLANG_MM_PRECOMPUTE_HASH
}
# One wheel per layout family (issue 10), oldest to newest.
FAMILY_WHEELS = ["0.5.4.post1", "0.5.5.post2", "0.5.6.post2", "0.5.7", "0.5.8.post1", "0.5.9", "0.5.12.post1",
                 "0.5.13", "0.5.16", "0.5.17", "0.5.19", "0.5.20", "0.5.21", "0.5.23"]
KEEP = ("sglang/__init__.py", "sglang/version.py", "sglang/_version.py", "sglang/srt/managers/",
        "sglang/srt/server_args.py", "sglang/srt/utils/common.py", "sglang/srt/environ.py", "sglang/srt/constants.py",
        "sglang/srt/arg_groups/fields/", "sglang/srt/multimodal/processors/hash_executor.py",
        "sglang/srt/multimodal/cache/identity.py", "sglang/srt/multimodal/cache/__init__.py",
        "sglang/srt/multimodal/modality.py", "sglang/srt/utils/stale_shm_cleanup.py", "sglang/srt/observability/scheduler_stage_metrics.py")


def wheel(version: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"sglang=={version}",
                        "-d", str(CACHE)], capture_output=True, text=True, timeout=300)
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not found:
        last = r.stderr.strip().splitlines()[-1:]
        why = (f"sglang=={version} wheel not available: not in {CACHE} and `pip download --no-deps` "
               f"failed ({last[0] if last else f'exit {r.returncode}'})")
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            # In CI a missing wheel must not turn the real-SGLang tests into passing skips.
            pytest.fail(f"{why}; CI is set, so this fails instead of skipping", pytrace=False)
        pytest.skip(f"{why}; these tests need the real SGLang wheels (network or a filled "
                    f"MMDIAG_WHEEL_CACHE); skipped because CI is not set")
    return found[0]


def pristine(version: str) -> Path:
    """The unpacked `sglang` package of one wheel (shared, never modified)."""
    tag = hashlib.sha256("\n".join(KEEP).encode()).hexdigest()[:8]  # a new KEEP unpacks afresh
    dest = UNPACKED / f"{version}-{tag}"
    pkg = dest / "sglang"
    if (pkg / "srt" / "managers" / "scheduler.py").is_file():
        return pkg
    tmp = UNPACKED / f".{version}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel(version)) as z:
        for name in z.namelist():
            if name.startswith(KEEP) and name.endswith(".py"):
                z.extract(name, tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return pkg


def site_packages(version: str, root: Path) -> Path:
    """A writable copy laid out as <root>/site-packages/sglang; returns the package dir."""
    pkg = root / "site-packages" / "sglang"
    shutil.copytree(pristine(version), pkg)
    return pkg


def checkout(version: str, root: Path) -> Path:
    """The same code as a git checkout: <root>/repo/{.git,python/pyproject.toml,python/sglang}."""
    repo = root / "repo"
    shutil.copytree(pristine(version), repo / "python" / "sglang")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "python" / "pyproject.toml").write_text('[project]\nname = "sglang"\n')
    return repo / "python" / "sglang"


def tree_bytes(pkg: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under the package, hidden ones included:
    what `pip uninstall` would meet. Byte-exact undo means this is unchanged."""
    return {str(p.relative_to(pkg)): (p.read_bytes() if p.is_file() else None) for p in sorted(pkg.rglob("*"))
            if "__pycache__" not in p.parts}


def state_of(pkg: Path) -> Path:
    """mmdiag's state folder for the install at pkg (outside the package)."""
    from mmdiag.sglang.locate import locate
    return locate(str(pkg)).state_dir


def with_xxhash(site: Path) -> None:
    """The real xxhash package (from this environment) beside a copied sglang: a server's
    site-packages that has it (`mmdiag apply xxh3` refuses an install whose Python lacks it)."""
    import xxhash
    src = Path(xxhash.__file__).parent
    shutil.copytree(src, site / "xxhash")
    for d in src.parent.glob("xxhash-*.dist-info"):
        shutil.copytree(d, site / d.name)
