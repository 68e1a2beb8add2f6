"""mmdiag apply / --undo on the real SGLang wheels: diffs, byte-identical undo, refusals."""
from __future__ import annotations

import errno
import fcntl
import os
import py_compile
import re

import pytest
from click.testing import CliRunner

from sglang_wheels import checkout, pristine, site_packages, state_of, tree_bytes  # noqa: F401

import mmdiag.sglang.apply as A
from mmdiag.cli import main
from mmdiag.sglang.detect import detect
from mmdiag.sglang.errors import (AlreadyPatched, ApplyLocked, ChangedSinceApply, NoManifest, NotApplicable,
                                  ReadOnlyInstall, UnknownLayout)
from mmdiag.sglang.locate import locate
from mmdiag.strategies import PATCHABLE as PATCHABLE_STRATEGIES

# What issue 10 asks of each family: files written, [] nothing to patch, "env"/"flag" what
# the user sets instead of code (the release ships it), None refused as not applicable.
_S, _T = ["scheduler"], ["tokenizer_manager"]
EXPECT = {
    "0.5.4.post1": {"revert": [], "dict": None, "batch": None, "precompute": _T, "cond": None,
                   "shm": _T + _S},
    "0.5.5.post2": {"revert": _S, "dict": _S, "batch": _S, "precompute": _T + _S, "cond": _S,
                   "shm": _T + _S},
    "0.5.6.post2": {"revert": "flag", "dict": _S, "batch": _S, "precompute": _T, "cond": _S,
                   "shm": _T + _S},
    "0.5.7": {"revert": "flag", "dict": _S, "batch": _S, "precompute": "env", "cond": _S,
             "shm": _T + _S},
    "0.5.9": {"revert": "flag", "dict": _S, "batch": _S, "precompute": "env", "cond": _S,
             "shm": _T + _S},
    # a release candidate, taken by its code: the 0.5.9 family's (features pickled in the recv broadcast)
    "0.5.10rc0": {"revert": "flag", "dict": _S, "batch": _S, "precompute": "env", "cond": _S, "shm": _T + _S},
    # shared-memory transport: features already reach every rank; dict, batch and cond would pickle them again
    "0.5.13": {"revert": "flag", "dict": None, "batch": None, "precompute": "env", "cond": None, "shm": "env"},
    "0.5.17": {"revert": "flag", "dict": None, "batch": None, "precompute": "env", "cond": None, "shm": "env"},
    "0.5.19": {"revert": "flag", "dict": None, "batch": None, "precompute": "env", "cond": None, "shm": "env"},
    "0.5.21": {"revert": "flag", "dict": None, "batch": None, "precompute": "env", "cond": None, "shm": "env"},
    "0.5.23": {"revert": "flag", "dict": None, "batch": None, "precompute": "env", "cond": None, "shm": "env"},
}
FILES = {"scheduler": "srt/managers/scheduler.py", "tokenizer_manager": "srt/managers/tokenizer_manager.py"}


def run(*args):
    r = CliRunner().invoke(main, ["apply", *[str(a) for a in args]])
    assert "Traceback" not in r.output
    return r


def _refused(strategy, pkg, before):
    r = run(strategy, "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and r.output.startswith("mmdiag: error: ") and "does not apply" in r.output
    assert tree_bytes(pkg) == before


def _settings_only(strategy, pkg, before, what):
    r = run(strategy, "--sglang", pkg, "--yes")
    assert r.exit_code == 0 and "nothing was written" in r.output, r.output
    assert tree_bytes(pkg) == before and not (state_of(pkg) / "manifest.json").exists()
    res = A.apply(locate(str(pkg)), strategy)
    assert res.status == "settings"
    # the broadcast flag stays off either way; precompute and shm set the release's own variable
    assert res.settings["flags"]["--enable-broadcast-mm-inputs-process"] is False
    if strategy == "shm":  # the release's own shared-memory transport, on its CPU default
        assert "moves features by shared memory itself" in r.output
        assert set(res.settings["flags"]) <= {"--enable-broadcast-mm-inputs-process", "--mm-feature-transport"}
        assert res.settings["flags"].get("--mm-feature-transport", "cpu") == "cpu"
    else:
        assert res.settings["flags"] == {"--enable-broadcast-mm-inputs-process": False}
    if what == "env":
        assert res.settings["env"] == {"SGLANG_MM_PRECOMPUTE_HASH": "1"}
        assert "SGLANG_MM_PRECOMPUTE_HASH=1 python -m sglang.launch_server" in r.output
        assert "srt/environ.py:" in r.output
    assert "--enable-broadcast-mm-inputs-process off" in r.output


@pytest.mark.parametrize("version", list(EXPECT))
@pytest.mark.parametrize("strategy", PATCHABLE_STRATEGIES)
def test_apply_undo_roundtrip(version, strategy, tmp_path):
    layout = "checkout" if version in ("0.5.5.post2", "0.5.9", "0.5.23") else "site-packages"
    pkg = (checkout if layout == "checkout" else site_packages)(version, tmp_path)
    before = tree_bytes(pkg)
    expect = EXPECT[version][strategy]
    if expect is None:
        return _refused(strategy, pkg, before)
    if expect in ("env", "flag"):
        return _settings_only(strategy, pkg, before, expect)
    dry = run(strategy, "--sglang", pkg, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert tree_bytes(pkg) == before and not (state_of(pkg) / "manifest.json").exists()
    if not expect:
        assert "nothing to patch" in dry.output
        return
    for key in expect:
        assert f"+++ b/{FILES[key]}" in dry.output
    r = run(strategy, "--sglang", pkg, "--yes")
    assert r.exit_code == 0, r.output
    assert r.output.index("+++ b/") < r.output.index("applied `")  # diff shown first
    for key in expect:
        py_compile.compile(str(pkg / FILES[key]), doraise=True, cfile=str(tmp_path / "c.pyc"))
    after = tree_bytes(pkg)
    assert after.keys() == before.keys()  # no mmdiag file inside the package
    assert {k for k in before if after[k] != before[k]} == {FILES[k] for k in expect}
    det = detect(locate(str(pkg)))
    assert det.patched == strategy and det.variant == detect(locate(str(pristine(version)))).variant
    assert det.manifest["files"].keys() == {FILES[k] for k in expect}
    again = run(strategy, "--sglang", pkg, "--yes")  # twice: a no-op
    assert again.exit_code == 0 and "already applied" in again.output
    other = next(s for s in ("dict", "batch") if s != strategy)
    with pytest.raises(AlreadyPatched):  # another strategy on top: refused
        A.apply(locate(str(pkg)), other)
    doc = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg)])
    assert re.search(rf"^mmdiag patch\s+{strategy} \(applied", doc.output, re.M), doc.output
    u = run("--undo", "--sglang", pkg, "--yes")
    assert u.exit_code == 0, u.output
    assert tree_bytes(pkg) == before  # byte-identical, file-for-file
    assert detect(locate(str(pkg))).patched is None


def test_unknown_layout_refused_nothing_written(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    sched = pkg / FILES["scheduler"]
    sched.write_text(sched.read_text().replace("obj_list, src=0, group=self.cpu_group",
                                               "obj_list, src=1, group=self.cpu_group"))
    before = tree_bytes(pkg)
    r = run("dict", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and "matches no known layout" in r.output and "nothing was changed" in r.output
    assert tree_bytes(pkg) == before and not (state_of(pkg) / "manifest.json").exists()


def test_unknown_release_refused(tmp_path):
    pkg = site_packages("0.5.6", tmp_path)
    sched = pkg / FILES["scheduler"]
    sched.write_text(sched.read_text().replace("MultimodalInputs.from_dict(recv_req",
                                               "MultimodalInputs.from_processor_output(recv_req")
                     .replace("_get_multimodal_inputs", "_mm_inputs_v2"))
    before = tree_bytes(pkg)
    r = run("batch", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and "unknown SGLang layout" in r.output and "markers found" in r.output
    assert tree_bytes(pkg) == before


def test_read_only_by_mode_bits(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    target = pkg / FILES["scheduler"]
    os.chmod(target, 0o444)
    os.chmod(target.parent, 0o555)
    real_access = os.access
    # Tests run as root, for whom os.access says yes: answer as an unprivileged user would.
    monkeypatch.setattr(A.os, "access", lambda p, m: (os.stat(p).st_mode & 0o222) != 0 if m == os.W_OK
                        else real_access(p, m))
    try:
        before = tree_bytes(pkg)
        r = run("revert", "--sglang", pkg, "--yes")
        assert r.exit_code != 0 and "not writable" in r.output and "nothing was changed" in r.output
        assert tree_bytes(pkg) == before
    finally:
        os.chmod(target.parent, 0o755)
        os.chmod(target, 0o644)


def test_read_only_mount_probe(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    real = A.tempfile.mkstemp

    def erofs(*a, **k):
        if "probe" in k.get("prefix", ""):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, **k)

    monkeypatch.setattr(A.tempfile, "mkstemp", erofs)
    before = tree_bytes(pkg)
    with pytest.raises(ReadOnlyInstall, match="Read-only file system"):
        A.apply(locate(str(pkg)), "revert")
    assert tree_bytes(pkg) == before


def test_lock_held_refuses(tmp_path):
    pkg = site_packages("0.5.4.post2", tmp_path)
    inst = locate(str(pkg))
    inst.state_dir.mkdir()
    fd = os.open(inst.state_dir / A.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another apply in progress
    try:
        before = tree_bytes(pkg)
        r = run("revert", "--sglang", pkg, "--yes")
        assert r.exit_code == ApplyLocked.exit_code and "another mmdiag apply is running" in r.output
        assert tree_bytes(pkg) == before
    finally:
        os.close(fd)
    assert run("revert", "--sglang", pkg, "--yes").exit_code == 0


def test_undo_without_manifest(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    r = run("--undo", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and r.output.startswith("mmdiag: error: ") and "no mmdiag patch recorded" in r.output
    with pytest.raises(NoManifest):
        A.undo(locate(str(pkg)))


def test_undo_after_edit_refused_with_difference(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    assert run("batch", "--sglang", pkg, "--yes").exit_code == 0
    sched = pkg / FILES["scheduler"]
    sched.write_text(sched.read_text().replace("def _mmdiag_batch_prepare", "def _mmdiag_batch_prepare_EDITED"))
    edited = tree_bytes(pkg)
    r = run("--undo", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and "changed since mmdiag applied `batch`" in r.output
    assert "+    def _mmdiag_batch_prepare_EDITED" in r.output  # the difference is shown
    assert tree_bytes(pkg) == edited
    with pytest.raises(ChangedSinceApply):
        A.apply(locate(str(pkg)), "batch")


def _fail_replace(monkeypatch, targets, exc, calls):
    """os.replace raising `exc` when the destination is exactly one of `targets`
    (a list: each entry is consumed by one failure, so a path may fail twice)."""
    real = os.replace
    pending = [str(t) for t in targets]

    def flaky(src, dst):
        calls.append(str(dst))
        if str(dst) in pending:
            pending.remove(str(dst))
            raise exc
        return real(src, dst)

    monkeypatch.setattr(A.os, "replace", flaky)
    return real


def test_interrupted_write_restores_first_target(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)  # precompute writes two files: tokenizer_manager, then scheduler
    before = tree_bytes(pkg)
    first, second = pkg / FILES["tokenizer_manager"], pkg / FILES["scheduler"]
    calls = []
    real = _fail_replace(monkeypatch, [second], KeyboardInterrupt(), calls)
    with pytest.raises(KeyboardInterrupt):
        A.apply(locate(str(pkg)), "precompute")
    monkeypatch.setattr(A.os, "replace", real)
    # The first target was replaced, then put back; the second was the one interrupted.
    assert calls.count(str(first)) == 2 and calls.count(str(second)) == 1
    assert calls.index(str(first)) < calls.index(str(second))
    assert any(str(state_of(pkg)) in c for c in calls)  # the backups were written first
    assert tree_bytes(pkg) == before
    assert not (state_of(pkg) / "manifest.json").exists()
    assert not (state_of(pkg) / A.BACKUP_DIR).exists()
    assert not list(pkg.rglob(".mmdiag-*"))  # no temp files left behind
    assert detect(locate(str(pkg))).patched is None


def test_second_target_write_fails_names_it_and_restores_first(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    second = pkg / FILES["scheduler"]
    calls = []
    _fail_replace(monkeypatch, [second], OSError(errno.ENOSPC, "No space left on device"), calls)
    r = run("precompute", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and "\nmmdiag: error: " in r.output  # after the diff
    assert f"{second}: no space left while writing the patched file" in r.output, r.output
    assert "original files are intact" in r.output
    assert tree_bytes(pkg) == before
    assert not (state_of(pkg) / "manifest.json").exists()


def test_failed_restore_keeps_manifest_and_backups(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    first, second = pkg / FILES["tokenizer_manager"], pkg / FILES["scheduler"]
    calls = []
    # The second target's write fails, then putting the first back fails too.
    real = _fail_replace(monkeypatch, [second], OSError(errno.EIO, "Input/output error"), calls)
    inner = A.os.replace

    def and_restore_fails(src, dst):
        if str(dst) == str(first) and calls.count(str(first)) == 1 and str(second) in calls:
            calls.append(str(dst))
            raise OSError(errno.EIO, "Input/output error")
        return inner(src, dst)

    monkeypatch.setattr(A.os, "replace", and_restore_fails)
    with pytest.raises(A.SGLangError) as ei:
        A.apply(locate(str(pkg)), "precompute")
    monkeypatch.setattr(A.os, "replace", real)
    msg = ei.value.one_line()
    assert "restoring srt/managers/tokenizer_manager.py failed too" in msg and "mmdiag apply --undo" in msg
    assert "intact" not in msg
    # Partly patched: the first target holds the patch, and the way back is kept.
    assert tree_bytes(pkg)[FILES["tokenizer_manager"]] != before[FILES["tokenizer_manager"]]
    assert tree_bytes(pkg)[FILES["scheduler"]] == before[FILES["scheduler"]]
    assert (state_of(pkg) / "manifest.json").exists()
    assert (state_of(pkg) / A.BACKUP_DIR / FILES["tokenizer_manager"]).exists()
    u = run("--undo", "--sglang", pkg, "--yes")
    assert u.exit_code == 0, u.output
    assert tree_bytes(pkg) == before
    assert not (state_of(pkg) / "manifest.json").exists()


def test_interrupted_backup_leaves_no_state(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    inst = locate(str(pkg))
    calls = []
    # The second backup file (the patched copy of the first target) is interrupted.
    b = A._backup_path(inst, FILES["tokenizer_manager"])
    _fail_replace(monkeypatch, [b.with_name(b.name + ".patched")], KeyboardInterrupt(), calls)
    with pytest.raises(KeyboardInterrupt):
        A.apply(inst, "precompute")
    assert str(b) in calls  # one backup had been written
    assert tree_bytes(pkg) == before
    assert not (state_of(pkg) / "manifest.json").exists()
    assert not (state_of(pkg) / A.BACKUP_DIR).exists()


def test_change_after_plan_refused(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    sched = pkg / FILES["scheduler"]

    def edit_while_confirming(diff):
        sched.write_text(sched.read_text() + "\n# edited by someone else\n")
        return True

    with pytest.raises(ChangedSinceApply, match="changed since the diff was planned"):
        A.apply(locate(str(pkg)), "dict", confirm=edit_while_confirming)
    edited = tree_bytes(pkg)
    assert edited[FILES["scheduler"]].endswith(b"# edited by someone else\n")
    assert not (state_of(pkg) / "manifest.json").exists()


def test_crlf_file_applies_and_undo_restores_bytes(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    sched = pkg / FILES["scheduler"]
    sched.write_bytes(sched.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    before = tree_bytes(pkg)
    r = run("dict", "--sglang", pkg, "--yes")
    assert r.exit_code == 0, r.output
    assert detect(locate(str(pkg))).patched == "dict"
    u = run("--undo", "--sglang", pkg, "--yes")
    assert u.exit_code == 0, u.output
    assert tree_bytes(pkg) == before


def test_disk_full_leaves_original(tmp_path, monkeypatch):
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    real_fdopen = A.os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(A.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    r = run("dict", "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and "no space left" in r.output and "original files are intact" in r.output
    assert tree_bytes(pkg) == before


def test_no_tty_without_yes_writes_nothing(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    r = run("dict", "--sglang", pkg)
    assert r.exit_code != 0 and "--yes" in r.output
    assert tree_bytes(pkg) == before


def test_usage_errors(tmp_path):
    r = run("--sglang", tmp_path)
    assert r.exit_code == 2 and "give a STRATEGY or --undo" in r.output
    r = run("revert", "--sglang", tmp_path / "missing", "--yes")
    assert r.exit_code != 0 and r.output.startswith("mmdiag: error: ")


def test_undo_leaves_install_exactly_as_it_was(tmp_path):
    """Issue 8.7: no mmdiag file or folder inside the package, during the patch or after undo."""
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    assert run("batch", "--sglang", pkg, "--yes").exit_code == 0
    during = tree_bytes(pkg)
    assert during.keys() == before.keys()  # pip uninstall would meet only its own files
    assert (state_of(pkg) / "manifest.json").exists() and pkg not in state_of(pkg).parents
    assert run("--undo", "--sglang", pkg, "--yes").exit_code == 0
    assert tree_bytes(pkg) == before


def test_legacy_in_package_state_is_undone_and_removed(tmp_path):
    """A patch applied by an older mmdiag (state in <sglang>/.mmdiag/) still undoes, and
    its folder goes with it."""
    pkg = site_packages("0.5.5", tmp_path)
    before = tree_bytes(pkg)
    assert run("dict", "--sglang", pkg, "--yes").exit_code == 0
    state_of(pkg).rename(pkg / ".mmdiag")  # where the older mmdiag kept it
    assert detect(locate(str(pkg))).patched == "dict"
    assert run("--undo", "--sglang", pkg, "--yes").exit_code == 0
    assert tree_bytes(pkg) == before


def test_stale_record_after_reinstall_is_dropped(tmp_path):
    pkg = site_packages("0.5.5", tmp_path)
    sched = pkg / FILES["scheduler"]
    orig = sched.read_bytes()
    assert run("dict", "--sglang", pkg, "--yes").exit_code == 0
    sched.write_bytes(orig)  # `pip install --force-reinstall` puts the release's bytes back
    r = run("batch", "--sglang", pkg, "--yes")
    assert r.exit_code == 0 and "stale record of `dict`" in r.output, r.output
    assert detect(locate(str(pkg))).patched == "batch"


@pytest.mark.parametrize("strategy", ["batch", "dict", "cond"])
def test_resending_strategies_refused_on_shared_memory_releases(strategy, tmp_path):
    """On a shared-memory release the features already reach every rank; batch, dict and cond
    would pickle them again from the entry rank: refused alike, with that reason, nothing written."""
    pkg = site_packages("0.5.23", tmp_path / "site")
    before = tree_bytes(pkg)
    r = run(strategy, "--sglang", pkg, "--yes")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"`{strategy}` does not apply" in r.output and "pickle them again from the entry rank" in r.output
    assert "use `precompute`" in r.output and tree_bytes(pkg) == before


def test_undo_hints_work_as_printed_for_an_install_named_by_path(tmp_path):
    """Issue 20.3: an install named with --sglang PATH gets undo hints that name it again (doctor,
    apply's own lines, the refusal of a second strategy), and the printed command, run as printed,
    restores it; "already applied" is said once."""
    import shlex
    pkg = site_packages("0.5.9", tmp_path)
    before = tree_bytes(pkg)
    hint = f"mmdiag apply --undo --sglang {shlex.quote(str(pkg))}"
    r = run("batch", "--sglang", pkg, "--yes")
    assert r.exit_code == 0 and r.output.rstrip().endswith(f"undo: {hint}"), r.output
    again = run("batch", "--sglang", pkg, "--yes")
    assert again.exit_code == 0 and again.output.count("already applied") == 1, again.output
    assert f"(undo: {hint})" in again.output
    other = run("dict", "--sglang", pkg, "--yes")
    assert other.exit_code != 0 and f"run `{hint}` first" in other.output, other.output
    doc = CliRunner().invoke(main, ["doctor", "--sglang", str(pkg)])
    printed = re.search(r"undo: (mmdiag apply --undo[^)]*)\)", doc.output).group(1)
    assert printed == hint
    argv = shlex.split(printed)[2:] + ["--yes"]     # as printed, less the program name
    u = run(*argv)
    assert u.exit_code == 0 and "undone `batch`" in u.output, u.output
    assert tree_bytes(pkg) == before
    # an install found through the interpreter needs no path
    from dataclasses import replace
    assert replace(locate(str(pkg)), found_by="interpreter").undo_command == "mmdiag apply --undo"
