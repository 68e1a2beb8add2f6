"""Find an SGLang install without importing it.

Accepted: nothing (the current interpreter's `sglang`, via importlib.util.find_spec,
which does not execute the package), or a PATH that is the `sglang` package folder
itself, a folder holding it (site-packages, a checkout's `python/`), or a git
checkout's root (holding `python/sglang`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import SGLangNotFound, UnknownLayout
from .facts import file_rel

# `__version__ = "0.5.6"` (version.py) or `__version__ = version = '0.5.7'` (_version.py)
_VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", re.M)


@dataclass(frozen=True)
class SGLangInstall:
    package_dir: Path  # the `sglang` package folder
    layout: str  # "site-packages" | "checkout"
    version: str | None  # from sglang/version.py, None when absent
    found_by: str  # "interpreter" | "path"

    def path(self, key: str) -> Path:
        return self.package_dir / file_rel(key)

    @property
    def state_dir(self) -> Path:
        """Where mmdiag keeps its lock, manifest and backups for this install: outside the
        package tree (so undo leaves the install exactly as it was and `pip uninstall`
        never meets mmdiag's files), one folder per install path."""
        return state_root() / hashlib.sha256(str(self.package_dir).encode()).hexdigest()[:16]

    @property
    def undo_command(self) -> str:
        """The undo that works as printed: an install named by --sglang PATH is named again."""
        return "mmdiag apply --undo" + (f" --sglang {shlex.quote(str(self.package_dir))}"
                                        if self.found_by == "path" else "")

    @property
    def legacy_state_dir(self) -> Path:
        """Where mmdiag before 2026-11 kept that state (inside the package); still read."""
        return self.package_dir / ".mmdiag"

    def to_dict(self) -> dict:
        return {
            "package_dir": str(self.package_dir),
            "layout": self.layout,
            "version": self.version,
            "found_by": self.found_by,
        }


def state_root() -> Path:
    """MMDIAG_STATE_DIR, else $XDG_STATE_HOME/mmdiag/sglang, else ~/.local/state/mmdiag/sglang."""
    env = os.environ.get("MMDIAG_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "mmdiag" / "sglang"


def read_version(package_dir: Path) -> str | None:
    """`__version__` from version.py, or from _version.py (0.5.7+: version.py imports it)."""
    for key in ("version", "version_generated"):
        try:
            text = (package_dir / file_rel(key)).read_text(encoding="utf-8")
        except OSError:
            continue
        m = _VERSION_RE.search(text)
        if m:
            return m.group(1)
    return None


def _layout_of(package_dir: Path) -> str:
    parent = package_dir.parent
    if parent.name == "python" and (
        (parent.parent / ".git").exists() or (parent / "pyproject.toml").exists()
    ):
        return "checkout"
    return "site-packages"


def _make(package_dir: Path, found_by: str) -> SGLangInstall:
    package_dir = package_dir.resolve()
    return SGLangInstall(package_dir, _layout_of(package_dir), read_version(package_dir), found_by)


def locate(path: str | None = None) -> SGLangInstall:
    """Return the install at PATH, or the current interpreter's; SGLangNotFound if none."""
    sched = file_rel("scheduler")
    if path is None:
        try:
            spec = importlib.util.find_spec("sglang")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise SGLangNotFound(
                f"no `sglang` package importable by {sys.executable}",
                fix="install SGLang in this environment or pass --sglang PATH "
                "(a site-packages `sglang` folder or a git checkout's `python/`)",
            )
        pkg = Path(list(spec.submodule_search_locations)[0])
        if not (pkg / sched).is_file():
            raise UnknownLayout(
                f"`sglang` package has no {sched}", where=str(pkg),
                fix="this is not an SGLang runtime install; pass --sglang PATH",
            )
        return _make(pkg, "interpreter")

    p = Path(path).expanduser()
    if not p.exists():
        raise SGLangNotFound("no such path", where=str(p),
                             fix="pass a site-packages `sglang` folder or a git checkout's `python/`")
    candidates = [p, p / "sglang", p / "python" / "sglang"]
    for c in candidates:
        if (c / sched).is_file():
            return _make(c, "path")
    pkgs = [c for c in candidates if c.is_dir() and (c / "__init__.py").is_file() and c.name == "sglang"]
    if pkgs:
        raise UnknownLayout(f"an `sglang` package without {sched}", where=str(pkgs[0]),
                            fix="this SGLang layout is not supported; nothing was changed")
    raise SGLangNotFound(f"no SGLang here (looked for {sched} under it, sglang/, python/sglang/)",
                         where=str(p),
                         fix="pass a site-packages `sglang` folder or a git checkout's `python/`")
