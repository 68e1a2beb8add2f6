"""mmdiag doctor: locate and detect on the real SGLang wheels (site-packages and checkout layouts)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sglang_wheels import RELEASES, checkout, isolated_state, pristine, site_packages  # noqa: F401

from mmdiag.cli import main
from mmdiag.sglang.detect import detect
from mmdiag.sglang.errors import SGLangNotFound, UnknownLayout
from mmdiag.sglang.facts import release
from mmdiag.sglang.locate import locate


@pytest.mark.parametrize("version", list(RELEASES))
@pytest.mark.parametrize("layout", ["site-packages", "checkout"])
def test_variant_by_structure(version, layout, tmp_path):
    pkg = site_packages(version, tmp_path) if layout == "site-packages" else checkout(version, tmp_path)
    # every accepted PATH form finds the same package
    forms = [pkg, pkg.parent] + ([pkg.parent.parent] if layout == "checkout" else [])
    for form in forms:
        inst = locate(str(form))
        assert inst.package_dir == pkg.resolve()
        assert inst.layout == layout
        assert inst.version == version
    det = detect(inst)
    assert det.variant == RELEASES[version]
    assert det.patched is None and det.notes == []
    fact = release(version)
    assert det.scheduler_lines == fact["scheduler_lines"]
    if "method_line" in fact:
        assert det.methods["_process_and_broadcast_mm_inputs"] == fact["method_line"]
    assert all(v is not None for v in det.layouts.values()), det.layouts
    if det.variant == "broadcast-flag":
        assert det.flag["field_line"] == fact["flag_line"] and det.flag["default"] == "False"


def test_doctor_cli_json_and_text(tmp_path):
    pkg = site_packages("0.5.6", tmp_path)
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["variant"] == "broadcast-flag" and d["install"]["version"] == "0.5.6"
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg.parent)])
    assert r.exit_code == 0 and "broadcast-flag" in r.output and "server_args.py:582" in r.output


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
    pkg = site_packages("0.5.5", tmp_path)
    monkeypatch.syspath_prepend(str(pkg.parent))
    inst = locate(None)
    assert inst.package_dir == pkg.resolve() and inst.found_by == "interpreter"
    assert "sglang" not in sys.modules  # found, not imported


def test_unknown_layout_reports_markers(tmp_path):
    pkg = site_packages("0.5.6", tmp_path)
    sched = pkg / "srt/managers/scheduler.py"
    text = sched.read_text()
    # a later-style layout: renamed materializer, flag read elsewhere
    text = text.replace("MultimodalInputs.from_dict", "MultimodalInputs.from_processor_output")
    text = text.replace("self.server_args.enable_broadcast_mm_inputs_process", "get_mm().broadcast")
    sched.write_text(text)
    det = detect(locate(str(pkg)))
    assert det.variant is None
    assert "from_processor_output" in det.notes[0] and "_process_and_broadcast_mm_inputs" in det.notes[0]
    r = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg)])
    assert r.exit_code == 1 and "unknown" in r.output


def test_sglang_folder_without_scheduler(tmp_path):
    pkg = tmp_path / "sglang"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    with pytest.raises(UnknownLayout):
        locate(str(tmp_path))


def test_pristine_is_untouched_by_tests():
    # the shared unpacked copies are only ever copied from
    for v in RELEASES:
        assert not (pristine(v) / ".mmdiag").exists()
