"""What every stacking patch (`mmdiag apply xxh3`, `mmdiag apply pool`) promises on a real wheel,
checked through the CLI: only mm_utils.py changes and still compiles, doctor shows the axis
before and after, a second apply is "already applied", and one --undo restores every byte."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from sglang_wheels import state_of, tree_bytes

from mmdiag.cli import main

MM_UTILS = "srt/managers/mm_utils.py"


def run(*args):
    r = CliRunner().invoke(main, [*[str(a) for a in args]])
    assert "Traceback" not in r.output, r.output
    return r


def doctor_row(pkg: Path, row: str, value: str) -> None:
    out = run("doctor", "--sglang", pkg).output
    assert re.search(rf"^{row}\s+{value}", out, re.M), out


def apply_then_undo(pkg: Path, name: str, row: str, was: str, now: str, check: Callable[[str], None]) -> None:
    """Apply `name`, whose doctor `row` reads `was` before and `now` after; `check(text)`: the
    patch's own assertions on the patched mm_utils.py."""
    before = tree_bytes(pkg)
    doctor_row(pkg, row, was)
    r = run("apply", name, "--sglang", pkg, "--yes")
    assert r.exit_code == 0 and f"applied `{name}`" in r.output, r.output
    after = tree_bytes(pkg)
    assert {k for k in before if after[k] != before[k]} == {MM_UTILS}  # only the file it patches
    text = after[MM_UTILS].decode()
    compile(text, MM_UTILS, "exec")
    check(text)
    doctor_row(pkg, row, now)
    doctor_row(pkg, "mmdiag patch", rf"{name} \(applied")
    again = run("apply", name, "--sglang", pkg, "--yes")
    assert again.exit_code == 0 and "already applied" in again.output, again.output
    u = run("apply", "--undo", "--sglang", pkg, "--yes")
    assert u.exit_code == 0 and f"undone `{name}`" in u.output, u.output
    assert tree_bytes(pkg) == before
    assert not (state_of(pkg) / "manifest.json").exists()
