"""mmdiag doctor: locate and detect on the real SGLang wheels (one per layout family,
site-packages and checkout layouts)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sglang_wheels import FAMILY_WHEELS, checkout, pristine, site_packages  # noqa: F401

from mmdiag.cli import main
from mmdiag.sglang.detect import detect
from mmdiag.sglang.errors import SGLangNotFound, UnknownLayout
from mmdiag.sglang.facts import families
from mmdiag.sglang.locate import locate

# What issue 10 / SGLANG_NOTES say each family does (the spec, checked against the code):
# variant, handler, flag declared in, flag read through, group, precompute hashing,
# transport, error-broadcast protocol.
SPEC = {
    "0.5.4.post1": ("per-rank", "handle_generate_request", None, None, None, None, "pickle", None),
    "0.5.5.post2": ("broadcast-always", "handle_generate_request", None, None, "self.cpu_group", None, "pickle", None),
    "0.5.6.post2": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
                    "self.cpu_group", None, "pickle", None),
    "0.5.7": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
              "self.cpu_group", "tokenizer loop", "pickle", None),
    "0.5.8.post1": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
                    "self.dp_tp_cpu_group", "tokenizer loop", "pickle", None),
    "0.5.9": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
              "self.dp_tp_cpu_group", "tokenizer loop", "pickle", None),
    "0.5.12.post1": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
                     "self.dp_tp_cpu_group", "tokenizer loop", "shm", None),
    "0.5.13": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
               "self.dp_tp_cpu_group", "tokenizer loop", "shm", None),
    "0.5.16": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "self.server_args.",
               "self.dp_tp_cpu_group", "tokenizer loop", "shm", None),
    "0.5.17": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "get_mm().",
               "self.dp_tp_cpu_group", "tokenizer loop", "shm", None),
    "0.5.19": ("broadcast-flag", "handle_generate_request", "srt/server_args.py", "get_mm().",
               "self.dp_tp_cpu_group", "tokenizer loop", "shm", "_MultimodalInputBroadcast"),
    "0.5.20": ("broadcast-flag", "handle_generate_request", "srt/arg_groups/fields/mm.py", "get_mm().",
               "self.dp_tp_cpu_group", "tokenizer loop", "shm", "_MultimodalInputBroadcast"),
    "0.5.21": ("broadcast-flag", "handle_generate_request", "srt/arg_groups/fields/mm.py", "get_mm().",
               "self.dp_tp_cpu_group", "thread pool", "shm", "_MultimodalInputBroadcast"),
    "0.5.23": ("broadcast-flag", "_handle_generate_request", "srt/arg_groups/fields/mm.py", "get_mm().",
               "self.dp_tp_cpu_group", "thread pool", "shm", "_MultimodalInputBroadcast"),
}


def _in_range(version: str, releases: str) -> bool:
    from packaging.version import Version
    lo, _, hi = releases.partition(" .. ")
    return Version(lo) <= Version(version) <= Version(hi or lo)


@pytest.mark.parametrize("version", FAMILY_WHEELS)
def test_release_facts_by_structure(version, tmp_path):
    layout = "checkout" if FAMILY_WHEELS.index(version) % 2 else "site-packages"
    pkg = site_packages(version, tmp_path) if layout == "site-packages" else checkout(version, tmp_path)
    forms = [pkg, pkg.parent] + ([pkg.parent.parent] if layout == "checkout" else [])
    for form in forms:  # every accepted PATH form finds the same package
        inst = locate(str(form))
        assert (inst.package_dir, inst.layout, inst.version) == (pkg.resolve(), layout, version)
    det = detect(inst)
    f = det.facts
    variant, handler, flag_file, flag_read, group, hashing, transport, proto = SPEC[version]
    assert det.variant == variant and f.handler == handler and det.patched is None and det.notes == []
    assert f.flag_file == flag_file and f.group == group and f.transport == transport
    assert f.error_protocol == proto
    if flag_read:
        assert f.flag_read.startswith(flag_read) and f.flag_default == "False"
        # the declared line really declares the field
        rel, line = f.flag_declared.rsplit(":", 1)
        assert "enable_broadcast_mm_inputs_process" in (pkg / rel).read_text().splitlines()[int(line) - 1]
    assert (hashing is None) == (f.precompute_env is None)
    if hashing:
        assert f.precompute_hashing.startswith(hashing) and f.precompute_default == "False"
    assert f.shm_barrier == (transport == "shm")
    assert f.shm_failure_agreement == (proto is not None)
    # the family table (variants.toml) names a range that holds this release
    fam = next(x for x in families() if x["name"] == f.family)
    assert _in_range(version, fam["releases"]), (version, fam)
    assert all(v is not None for v in det.layouts.values()), det.layouts


def test_every_layout_family_is_checked_on_a_real_wheel():
    """FAMILY_WHEELS holds one release of each family in variants.toml, and detect puts each
    in its own family: a family added to the table without a wheel here would go untested."""
    detected = [detect(locate(str(pristine(v)))).family for v in FAMILY_WHEELS]
    assert sorted(detected) == sorted(f["name"] for f in families()), dict(zip(FAMILY_WHEELS, detected))


@pytest.mark.parametrize("version", FAMILY_WHEELS)
def test_family_frames_are_defined_by_the_release(version):
    """variants.toml's frames (for the live profiler's rules) name real definitions of
    the family's code, in the files named."""
    import ast
    pkg = pristine(version)
    fam = next(x for x in families() if x["name"] == detect(locate(str(pkg))).family)
    for frame in fam["frames"]:
        rel, qual = frame.split(":")
        tree = ast.parse((pkg / rel).read_text())
        scope = tree.body
        for part in qual.split("."):
            node = next((n for n in scope if getattr(n, "name", None) == part), None)
            assert node is not None, f"{frame} is not defined in sglang {version}"
            scope = getattr(node, "body", [])


def test_moved_lines_keep_the_layout(tmp_path):
    """A release that only moved code (blank lines, reordered methods) is not refused."""
    pkg = site_packages("0.5.23", tmp_path)
    sched = pkg / "srt/managers/scheduler.py"
    text = sched.read_text()
    sched.write_text("\n\n\n" + text.replace("    def _get_multimodal_inputs(", "\n\n    def _get_multimodal_inputs(", 1))
    det = detect(locate(str(pkg)))
    assert det.variant == "broadcast-flag" and det.family == "private-handler"
    assert all(v is not None for v in det.layouts.values())


def test_unchecked_release_keeps_its_family_and_says_so(tmp_path):
    """A 0.5.23 wheel whose version reads 0.5.24 (a release mmdiag has not checked, same
    mm path): doctor names the family from the code, says the version is outside what it
    checked, and does not refuse (exit 0)."""
    pkg = site_packages("0.5.23", tmp_path)
    vfile = pkg / "_version.py"  # 0.5.23's version.py imports __version__ from _version.py
    text = vfile.read_text()
    assert "'0.5.23'" in text
    vfile.write_text(text.replace("'0.5.23'", "'0.5.24'"))
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["install"]["version"] == "0.5.24" and d["variant"] == "broadcast-flag"
    assert d["family"] == "private-handler" and d["facts"]["family_fit"] == "newer"
    said = ("0.5.24 is not a release mmdiag has checked (newer than 0.5.23, the newest release checked); "
            "its multimodal path matches the 0.5.22 .. 0.5.23 family (private-handler)")
    assert d["facts"]["family_note"].startswith(said) and d["notes"] == [d["facts"]["family_note"]]
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg)])
    assert r.exit_code == 0, r.output
    assert "private-handler (releases 0.5.22 .. 0.5.23); 0.5.24 is not one of them: matched by its code" in r.output
    assert f"note: {said}" in r.output
    # the real 0.5.23 is in range: no note, and the fit says so
    vfile.write_text(text)
    det = detect(locate(str(pkg)))
    assert det.facts.family_fit == "in range" and det.facts.family_note is None and det.notes == []


@pytest.mark.parametrize("version, releases, fit", [
    ("0.5.22", "0.5.22 .. 0.5.23", "in range"), ("0.5.23.dev4", "0.5.22 .. 0.5.23", "in range"),
    ("0.5.23.post1", "0.5.22 .. 0.5.23", "newer"), ("0.6.0", "0.5.22 .. 0.5.23", "newer"),
    ("0.5.3", "0.5.4 .. 0.5.4.post1", "older"), ("0.5.15.post2", "0.5.16", "unchecked"),
    ("0.5.9", "0.5.22 .. 0.5.23", "other family"), ("main", "0.5.19", "unknown"), (None, "0.5.19", "unknown"),
    ("0.5.10rc0", "0.5.9", "pre-release")])
def test_version_fit(version, releases, fit):
    from mmdiag.sglang.facts import version_fit
    assert version_fit(version, releases) == fit


def test_doctor_cli_json_and_text(tmp_path):
    pkg = site_packages("0.5.23", tmp_path)
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["variant"] == "broadcast-flag" and d["install"]["version"] == "0.5.23"
    assert d["facts"]["handler"] == "_handle_generate_request"
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg.parent)])
    assert r.exit_code == 0
    for needle in ("srt/arg_groups/fields/mm.py:", "get_mm().enable_broadcast_mm_inputs_process",
                   "thread pool", "all_reduce", "--mm-feature-transport {cpu,cuda_ipc,cuda_vmm}"):
        assert needle in r.output, needle


def test_not_found(tmp_path):
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(tmp_path / "nope")])
    assert r.exit_code != 0 and r.output.startswith("mmdiag: error: ") and "Traceback" not in r.output
    with pytest.raises(SGLangNotFound):
        locate(str(tmp_path))


def test_interpreter_without_sglang(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SGLangNotFound, match="no `sglang` package importable"):
        locate(None)


def test_interpreter_install_found_without_import(monkeypatch, tmp_path):
    import sys
    pkg = site_packages("0.5.7", tmp_path)
    monkeypatch.syspath_prepend(str(pkg.parent))
    inst = locate(None)
    assert inst.package_dir == pkg.resolve() and inst.found_by == "interpreter"
    assert inst.version == "0.5.7"  # from _version.py
    assert "sglang" not in sys.modules  # found, not imported


def test_unknown_layout_reports_markers(tmp_path):
    pkg = site_packages("0.5.6.post2", tmp_path)
    sched = pkg / "srt/managers/scheduler.py"
    text = sched.read_text()
    # a layout mmdiag does not know: the handler calls something new
    text = text.replace("self._get_multimodal_inputs(recv_req", "self._mm_inputs_v9(recv_req")
    sched.write_text(text)
    det = detect(locate(str(pkg)))
    assert det.variant is None
    assert "_process_and_broadcast_mm_inputs" in det.notes[0] and "markers found" in det.notes[0]
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg)])
    assert r.exit_code == 1 and "unknown" in r.output


def test_a_renamed_method_is_reported_under_its_own_name(tmp_path):
    """Issue 20 (also seen): `_process_and_broadcast_mm_inputs_v2` is no
    `_process_and_broadcast_mm_inputs`: the unknown layout's note names what the code spells."""
    pkg = site_packages("0.5.6.post2", tmp_path)
    sched = pkg / "srt/managers/scheduler.py"
    text = sched.read_text()
    assert "_process_and_broadcast_mm_inputs(" in text
    sched.write_text(text.replace("_process_and_broadcast_mm_inputs(", "_process_and_broadcast_mm_inputs_v2("))
    det = detect(locate(str(pkg)))
    assert det.variant is None and "markers found" in det.notes[0]
    assert "_process_and_broadcast_mm_inputs_v2 (line" in det.notes[0]
    assert "_process_and_broadcast_mm_inputs (line" not in det.notes[0], det.notes[0]
    assert set(det.markers) >= {"_process_and_broadcast_mm_inputs_v2", "broadcast_object_list"}


def test_sglang_folder_without_scheduler(tmp_path):
    pkg = tmp_path / "sglang"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    with pytest.raises(UnknownLayout):
        locate(str(tmp_path))


def test_pristine_is_untouched_by_tests():
    # the shared unpacked copies are only ever copied from
    for v in FAMILY_WHEELS:
        assert not (pristine(v) / ".mmdiag").exists()


@pytest.mark.parametrize("precompute_env", ["0", "1"])
def test_runtime_runs_every_family_own_mm_path(precompute_env, monkeypatch):
    """replay --impl sglang's loader on one wheel per family: the release's own item classes
    (msgspec structs from 0.5.19, Modality from multimodal/modality.py in 0.5.23), hashing
    (multimodal/cache/identity.py) and scheduler methods give SGLang's sha256 of the feature;
    with SGLANG_MM_PRECOMPUTE_HASH=1 in the environment, releases that read it (0.5.7+) hash
    in their tokenizer step (a thread pool from 0.5.21) and the scheduler hashes nothing."""
    import hashlib
    import torch
    from mmdiag.sglang.runtime import load_sglang_mm_path
    monkeypatch.setenv("SGLANG_MM_PRECOMPUTE_HASH", precompute_env)
    f = torch.arange(96, dtype=torch.float32).reshape(8, 12)
    want = int.from_bytes(hashlib.sha256(f.numpy().tobytes()).digest()[:8], "big")
    for v in FAMILY_WHEELS:
        path = load_sglang_mm_path(str(pristine(v)))
        raw = path.make_mm_inputs([path.make_item(f.clone())])
        in_tokenizer = path.tokenizer_side(raw)
        out = path.process_input_requests(path.make_scheduler(None), [path.generate_req("r", raw),
                                                                      path.generate_req("t")])
        assert [it.hash for it in out["r"].mm_items] == [want] and out["t"] is None, v
        assert in_tokenizer == (precompute_env == "1" and path.detection.facts.precompute_env is not None), v
        assert path.stats.hash_calls == (0 if in_tokenizer else 1), v


def test_release_candidate_is_taken_by_its_code(tmp_path):
    """0.5.10rc0 is not 0.5.10: its multimodal path is the 0.5.9 family's, features pickled in the
    recv broadcast. doctor says so, and why it does not take the version's word."""
    pkg = site_packages("0.5.10rc0", tmp_path)
    d = json.loads(CliRunner().invoke(main, ["doctor", "--sglang", str(pkg), "--json"]).output)
    assert d["install"]["version"] == "0.5.10rc0" and d["family"] == "shm-unwrap-first"
    assert d["facts"]["family_fit"] == "pre-release" and d["facts"]["transport"] == "pickle"
    assert d["facts"]["family_note"].startswith("0.5.10rc0 is a pre-release of 0.5.10") and d["variant"]
