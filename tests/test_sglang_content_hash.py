"""`mmdiag apply xxh3` on the real SGLang wheels of every layout family: the diff, byte-identical
undo, stacking with a strategy, the refusal where the server's Python lacks xxhash, and that
the patched release really hashes with xxh3 (its own functions, run in two processes)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from axis_patches import apply_then_undo, run
from sglang_wheels import FAMILY_WHEELS, checkout, site_packages, state_of, tree_bytes, with_xxhash

import mmdiag.sglang.apply as A
from mmdiag.sglang.detect import detect
from mmdiag.sglang.errors import AlreadyPatched
from mmdiag.sglang.locate import locate

REPO = Path(__file__).resolve().parent.parent



def _install(version: str, tmp_path: Path) -> Path:
    pkg = site_packages(version, tmp_path)
    with_xxhash(pkg.parent)
    return pkg


@pytest.mark.parametrize("version", FAMILY_WHEELS)
def test_apply_xxh3_and_undo_byte_identical(version, tmp_path):
    pkg = _install(version, tmp_path)

    def no_sha256_left_in_the_feature_hashing(text):
        assert "hashlib.sha256" not in "".join(re.findall(
            r"^def (?:data_hash|tensor_hash|hash_feature)\(.*?(?=^def )", text, re.M | re.S))
        det = detect(locate(str(pkg)))
        assert det.content_hash == "xxh3" and det.patched is None  # no strategy applied

    apply_then_undo(pkg, "xxh3", "content hash", r"sha256 \(content hash kept\)", r"xxh3 \(content hash kept\)",
                    no_sha256_left_in_the_feature_hashing)


@pytest.mark.parametrize("version,strategy", [("0.5.4.post1", "shm"), ("0.5.9", "shm"), ("0.5.7", "batch")])
def test_xxh3_stacks_on_a_strategy_either_order_and_one_undo_restores_all(version, strategy, tmp_path):
    pkg = _install(version, tmp_path)
    before = tree_bytes(pkg)
    for order in ([strategy, "xxh3"], ["xxh3", strategy]):
        for name in order:
            r = run("apply", name, "--sglang", pkg, "--yes")
            assert r.exit_code == 0 and f"applied `{name}`" in r.output, r.output
        det = detect(locate(str(pkg)))
        assert det.patched == strategy and det.content_hash == "xxh3"
        assert det.manifest["patches"] == order
        with pytest.raises(AlreadyPatched):  # one patch per axis
            A.apply(locate(str(pkg)), "dict" if strategy != "dict" else "batch")
        u = run("apply", "--undo", "--sglang", pkg, "--yes")
        assert u.exit_code == 0 and f"undone `{'+'.join(order)}`" in u.output, u.output
        assert tree_bytes(pkg) == before


def test_refused_where_the_servers_python_lacks_xxhash(tmp_path):
    """An install in a venv whose Python cannot import xxhash (mmdiag's can): one line, nothing
    written; once xxhash is installed into that environment, the apply goes through."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(f'python{sys.version_info[0]}."
                        "{sys.version_info[1]}')"], capture_output=True, text=True, check=True)
    site = venv / "lib" / r.stdout.strip() / "site-packages"
    pkg = site / "sglang"
    shutil.copytree(site_packages("0.5.9", tmp_path / "src"), pkg)
    before = tree_bytes(pkg)
    out = run("apply", "xxh3", "--sglang", pkg, "--yes")
    assert out.exit_code != 0 and out.output.startswith("mmdiag: error: ") and len(out.output.splitlines()) == 1
    assert str(venv / "bin") in out.output and "xxhash" in out.output and "nothing was changed" in out.output
    assert tree_bytes(pkg) == before and not (state_of(pkg) / "manifest.json").exists()
    with_xxhash(site)  # now that environment has it
    ok = run("apply", "xxh3", "--sglang", pkg, "--yes")
    assert ok.exit_code == 0, ok.output
    assert run("apply", "--undo", "--sglang", pkg, "--yes").exit_code == 0
    assert tree_bytes(pkg) == before


def test_checkout_without_a_known_python_is_refused(tmp_path):
    pkg = checkout("0.5.23", tmp_path)
    before = tree_bytes(pkg)
    out = run("apply", "xxh3", "--sglang", pkg, "--yes")
    assert out.exit_code != 0 and out.output.startswith("mmdiag: error: ") and len(out.output.splitlines()) == 1
    assert "server's Python" in out.output and tree_bytes(pkg) == before


# The patched release's own hashing, run by mmdiag's runtime in a fresh process: item hashes
# through SGLang's set_pad_value (and so hash_feature -> tensor_hash -> data_hash), for a
# tensor, a list of tensors and a numpy array, plus mmdiag's reference over the same bytes.
PROBE = r"""
import json, sys
import numpy as np, torch
from mmdiag.mmpath import hashing
from mmdiag.sglang.runtime import load_sglang_mm_path
path = load_sglang_mm_path(sys.argv[1])
seed = int(sys.argv[2])
g = torch.Generator().manual_seed(seed)
t = torch.randn(300, 1176, generator=g)
u = torch.randn(7, 1176, generator=g)
b = torch.randn(5, 64, generator=g).to(torch.bfloat16)
item = path.make_item(t)
item.set_pad_value()
hf = path.ns["hash_feature"]
print(json.dumps({
    "item": item.hash, "tensor": hf(t), "list": hf([t, u]), "ndarray": hf(t.numpy()),
    "ref": hashing.FUNCTIONS["xxh3"](t.numpy().tobytes()),
    "ref_list": hashing.FUNCTIONS["xxh3"](t.numpy().tobytes() + u.numpy().tobytes()),
    "sha256": hashing.FUNCTIONS["sha256"](t.numpy().tobytes()),
    "bf16": hf(b), "ref_bf16": hashing.FUNCTIONS["xxh3"](b.view(torch.uint8).numpy().tobytes()),
}))
"""


def _probe(pkg: Path, seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", PROBE, str(pkg), str(seed)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version", ["0.5.4.post1", "0.5.9", "0.5.12.post1", "0.5.23"])
def test_patched_release_hashes_with_xxh3_in_every_process(version, tmp_path):
    pkg = _install(version, tmp_path)
    plain = _probe(pkg, 1)
    assert plain["item"] == plain["tensor"] == plain["sha256"]  # SGLang's own: sha256
    assert A.apply(locate(str(pkg)), "xxh3").status == "applied"
    a, b, c = _probe(pkg, 1), _probe(pkg, 1), _probe(pkg, 2)  # three processes
    for h in (a, b, c):
        assert h["item"] == h["tensor"] == h["ndarray"] == h["ref"] != h["sha256"]
        assert h["list"] == h["ref_list"]  # incremental over a list = one pass over its bytes
        assert h["bf16"] == h["ref_bf16"]  # bytes as stored, on every release (0.5.9 widened them for sha256)
    assert a == b  # equal bytes, equal hash, in two processes
    assert c["ref"] != a["ref"] and c["item"] != a["item"]  # different bytes, different hash
    A.undo(locate(str(pkg)))
    assert _probe(pkg, 1) == plain


def test_a_stacked_apply_that_fails_midway_leaves_the_prior_patch_and_its_record(tmp_path, monkeypatch):
    """xxh3 applied, then `shm` fails writing its second file (no space): its first file is put
    back, the manifest and backups are xxh3's as before, and one undo restores the wheel's bytes."""
    import errno
    import json
    pkg = _install("0.5.9", tmp_path)
    before = tree_bytes(pkg)
    assert A.apply(locate(str(pkg)), "xxh3").status == "applied"
    with_xxh3 = tree_bytes(pkg)
    manifest = (state_of(pkg) / "manifest.json").read_bytes()
    backups = sorted(p.relative_to(state_of(pkg)) for p in state_of(pkg).rglob("*") if p.is_file())
    scheduler = pkg / "srt/managers/scheduler.py"
    real = os.replace

    def flaky(src, dst):
        if str(dst) == str(scheduler):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(A.os, "replace", flaky)
    r = run("apply", "shm", "--sglang", pkg, "--yes")
    monkeypatch.setattr(A.os, "replace", real)
    assert r.exit_code != 0 and f"{scheduler}: no space left" in r.output, r.output
    assert tree_bytes(pkg) == with_xxh3
    assert json.loads((state_of(pkg) / "manifest.json").read_bytes()) == json.loads(manifest)
    assert sorted(p.relative_to(state_of(pkg)) for p in state_of(pkg).rglob("*") if p.is_file()) == backups
    assert run("apply", "--undo", "--sglang", pkg, "--yes").exit_code == 0
    assert tree_bytes(pkg) == before
