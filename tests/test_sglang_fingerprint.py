"""Layout fingerprints depend on the source only: every Python SGLang runs on (3.10 .. 3.13)
computes, for the real wheels' functions, the values variants.toml holds, so doctor/apply
accept an install whichever interpreter runs mmdiag (3.12 refused 0.5.5.post2 when the
fingerprint was a hash of ast.dump)."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_wheels import pristine  # noqa: F401

from mmdiag.sglang import astutil
from mmdiag.sglang.facts import facts, file_rel, layouts

# one wheel of the first layouts, the 0.5.5.post2 of the report, and the newest family
WHEELS = ["0.5.4.post1", "0.5.5.post2", "0.5.6", "0.5.23"]
MINORS = [10, 11, 12, 13]
# Code whose AST differs across Pythons although the source is the same: 3.12 adds
# empty literal parts to f-string format specs and a type_params field to every def.
SNIPPET = '''
def f(x, w, *, y=None):
    return f"{x!r:^{w}}" + f"{x!s:{{}}>{w}}" + f"{x = }" + "a" f"b{y}"
'''

# Runs under each interpreter: loads astutil.py alone (no mmdiag package, no third-party
# imports) and prints the fingerprint of each (path or source, target) it is given.
CHILD = r'''
import ast, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("astutil", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules["astutil"] = m; spec.loader.exec_module(m)
out = []
for src, target in json.load(sys.stdin):
    if target is None:
        out.append(m.fingerprint(ast.parse(src).body[0]))
        continue
    node = m.target_node(open(src, encoding="utf-8").read(), target)
    out.append(None if node is None else m.fingerprint(node))
print(json.dumps(out))
'''


@functools.lru_cache(maxsize=None)
def interpreter(minor: int) -> str | None:
    """A Python 3.<minor> here (pyenv's, or on PATH), None when there is none."""
    cands = sorted(Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python")) + [shutil.which(f"python3.{minor}")]
    for c in filter(None, cands):
        r = subprocess.run([str(c), "-c", "import sys; print(sys.version_info[1])"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == str(minor):
            return str(c)
    return None


@functools.lru_cache(maxsize=1)
def jobs() -> list[tuple[str, str | None]]:
    """(file, target) for every [layouts] target in each wheel's scheduler, tokenizer manager, mm_utils."""
    files = [str(pristine(v) / file_rel(k)) for v in WHEELS for k in ("scheduler", "tokenizer_manager", "mm_utils")]
    return [(f, t) for f in files for t in facts()["layouts"]] + [(SNIPPET, None)]


def fingerprints(python: str) -> list[str | None]:
    r = subprocess.run([python, "-c", CHILD, astutil.__file__], input=json.dumps(jobs()), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@functools.lru_cache(maxsize=1)
def reference() -> list[str | None]:
    """The values on 3.11 (the interpreter the table was derived with), else this one's."""
    return fingerprints(interpreter(11) or sys.executable)


def test_the_wheels_functions_match_the_table():
    """On the reference Python every target a wheel has is a known layout (what detect reads)."""
    found = {}
    for (src, target), fp in zip(jobs(), reference()):
        if target is not None and fp is not None:
            assert fp in layouts(target), f"{src}: {target} fingerprint {fp} is not in variants.toml"
            found.setdefault(target, set()).add(Path(src).parents[3].name)
    # every target is met, and in each wheel that carries it (0.5.4.post1 has no broadcast method)
    assert set(found) == set(facts()["layouts"])
    assert len(found["Scheduler._process_and_broadcast_mm_inputs"]) == len(WHEELS) - 1
    # and this process (the one mmdiag runs in) agrees with the reference
    nodes = [astutil.target_node(Path(s).read_text(encoding="utf-8"), t) for s, t in jobs() if t is not None]
    assert [n and astutil.fingerprint(n) for n in nodes] == [fp for fp, (_, t) in zip(reference(), jobs()) if t]


@pytest.mark.parametrize("minor", MINORS)
def test_fingerprints_are_the_same_on_every_python(minor):
    python = interpreter(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} here (looked in ~/.pyenv/versions and PATH)")
    got = fingerprints(python)
    diff = [f"{Path(s).parents[3].name if t else 'snippet'}: {t}: {a} != {b}"
            for (s, t), a, b in zip(jobs(), got, reference()) if a != b]
    assert not diff, f"Python 3.{minor} ({python}) fingerprints differ from 3.11's: " + "; ".join(diff)
