"""Apply and undo a strategy patch on an SGLang install, safely.

- plan first, show a unified diff; every patched file must compile;
- refuse with no write: unknown layout, a file changed since the apply, another
  strategy applied, a read-only install, another apply holding the lock;
- write: backups (original bytes) and a manifest (strategy, variant, files,
  sha256 before/after) in the install's state folder, outside the package tree
  (SGLangInstall.state_dir: undo leaves the install byte-for-byte and file-for-file
  as it was, and `pip uninstall` never meets mmdiag's files), then each target via temp file +
  fsync + os.replace (mode kept); a failure midway restores what was replaced;
- applying the same strategy twice is a no-op; undo restores the original bytes
  exactly, after checking every file still has the bytes mmdiag wrote;
- a content hash (`xxh3`) stacks on a strategy, or a strategy on it: one manifest lists
  both (`patches`), keeps each file's original bytes, and one undo restores them all.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .detect import MANIFEST_NAME, Detection, detect, read_manifest
from .errors import (AlreadyPatched, ApplyLocked, ChangedSinceApply, NoManifest, ReadOnlyInstall,
                     SGLangError, UnknownLayout)
from .facts import file_rel
from .locate import SGLangInstall
from .patches import PATCHES, axis_of, strategy_module

LOCK_NAME = "apply.lock"
BACKUP_DIR = "backup"
MANIFEST_SCHEMA = "mmdiag.sglang-patch/1"


@dataclass
class ApplyResult:
    strategy: str | None
    # "dry-run" | "applied" | "already-applied" | "nothing-to-do" | "undone" | "declined"
    # | "settings" (the release ships the fix: nothing written, `settings` says what to set)
    status: str
    variant: str | None
    diff: str = ""
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: str | None = None
    settings: dict = field(default_factory=dict)  # {"env": {VAR: value}, "flags": {option: on?}}
    undo: str | None = None   # applied, already applied: the command that restores (SGLangInstall.undo_command)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{path}", tofile=f"b/{path}"))


# ---------------------------------------------------------------- file safety

def check_writable(paths: list[Path]) -> None:
    """ReadOnlyInstall unless every path and its folder can be written.

    os.access answers for the mode bits (and says yes to root); the probe, a temp
    file created and removed in the folder, catches read-only mounts (EROFS) and
    other refusals that os.access does not see.
    """
    dirs = []
    for p in paths:
        if p.exists() and not os.access(p, os.W_OK):
            raise ReadOnlyInstall("file is not writable", where=str(p),
                                  fix="run as the install's owner or use a writable copy; nothing was changed")
        d = p if p.is_dir() else p.parent
        if d not in dirs:
            dirs.append(d)
    for d in dirs:
        if not os.access(d, os.W_OK):
            raise ReadOnlyInstall("folder is not writable", where=str(d),
                                  fix="run as the install's owner or use a writable copy; nothing was changed")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".mmdiag-probe-", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise ReadOnlyInstall(f"cannot write here ({e.strerror or e})", where=str(d),
                                  fix="the install is read-only (image layer, read-only mount?); "
                                  "nothing was changed") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file beside `path`, fsync, os.replace: the target is old or new, never half."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=".mmdiag-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _oserror(e: OSError, path: Path, doing: str) -> SGLangError:
    if e.errno == errno.ENOSPC:
        return SGLangError(f"no space left while {doing}", where=str(path),
                           fix="free disk space and retry; the original files are intact")
    return SGLangError(f"{doing} failed ({e.strerror or e})", where=str(path),
                       fix="the original files are intact; fix the cause and retry")


def state_dir_of(install: SGLangInstall) -> Path:
    """The state folder in use: the legacy in-package one while it holds a manifest
    written by an older mmdiag (so its undo still works), else the external one."""
    if (install.legacy_state_dir / MANIFEST_NAME).exists():
        return install.legacy_state_dir
    return install.state_dir


@contextlib.contextmanager
def install_lock(install: SGLangInstall) -> Iterator[Path]:
    """Exclusive, non-blocking flock on <state>/apply.lock (released on exit or crash).
    The lock file stays in the external state folder (unlinking a lock others may hold
    open would let two applies run at once)."""
    install.state_dir.mkdir(parents=True, exist_ok=True)
    path = install.state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApplyLocked("another mmdiag apply is running on this install", where=str(path),
                              fix="wait for it to finish and retry") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)


# ------------------------------------------------------------------ manifest

def applied(manifest: dict) -> list[str]:
    """The patches a manifest records, in the order applied (a strategy, a content hash)."""
    return list(manifest.get("patches") or [manifest["strategy"]])


def _manifest_path(install: SGLangInstall) -> Path:
    return state_dir_of(install) / MANIFEST_NAME


def _backup_path(install: SGLangInstall, rel: str) -> Path:
    return state_dir_of(install) / BACKUP_DIR / rel


def _current_vs_manifest(install: SGLangInstall, manifest: dict) -> list[tuple[str, str]]:
    """[(rel, state)] with state 'after' | 'before' | 'step' | 'changed' | 'missing'
    ('step': the bytes of an earlier patch of a stack, whose last write did not happen)."""
    out = []
    for rel, f in manifest["files"].items():
        p = install.package_dir / rel
        try:
            h = sha256(p.read_bytes())
        except FileNotFoundError:
            out.append((rel, "missing"))
            continue
        out.append((rel, "after" if h == f["sha256_after"] else "before" if h == f["sha256_before"]
                    else "step" if h in f.get("sha256_steps", ()) else "changed"))
    return out


def _changed_error(install: SGLangInstall, manifest: dict, states, doing: str) -> ChangedSinceApply:
    bad = [rel for rel, s in states if s in ("changed", "missing")]
    rel = bad[0]
    p = install.package_dir / rel
    detail = ""
    patched = _backup_path(install, rel + ".patched")
    if p.exists() and patched.exists():
        d = unified_diff(patched.read_text(encoding="utf-8"), p.read_text(encoding="utf-8"), rel)
        detail = d
    err = ChangedSinceApply(
        f"{', '.join(bad)} changed since mmdiag applied `{'+'.join(applied(manifest))}`",
        where=str(p), fix=f"{doing} refused, nothing was changed; restore the file or reinstall SGLang",
    )
    err.detail = detail  # the difference, shown by the CLI under the one-line error
    return err


# --------------------------------------------------------------------- plan

FILE_KEYS = ("scheduler", "tokenizer_manager", "mm_utils")


def _decode(data: bytes) -> str:
    """The text read_text(encoding="utf-8") gives for these bytes (universal newlines)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()


def _raw(install: SGLangInstall) -> dict[str, bytes]:
    return {k: install.path(k).read_bytes() for k in FILE_KEYS if install.path(k).exists()}


def _texts(install: SGLangInstall) -> dict[str, str]:
    return {k: _decode(b) for k, b in _raw(install).items()}


def plan(install: SGLangInstall, strategy: str, det: Detection | None = None):
    """(Plan, Detection, diff text); raises when the strategy cannot be applied.

    The Plan records the sha256 of each target's bytes as read here
    (`planned_sha256`): apply refuses if a target differs under its lock.
    """
    if strategy not in PATCHES:
        raise SGLangError(f"unknown strategy {strategy!r}",
                          fix=f"choose one of {', '.join(PATCHES)}")
    det = det or detect(install)
    if det.variant is None:
        raise UnknownLayout(
            f"unknown SGLang layout (version {install.version or 'unknown'}, {install.layout}); "
            + "; ".join(det.notes), where=str(install.package_dir), fix="nothing was changed")
    raw = _raw(install)
    texts = {k: _decode(b) for k, b in raw.items()}
    p = strategy_module(strategy).build(det, texts)
    p.planned_sha256 = {k: sha256(raw[k]) for k in p.new_texts}
    diffs = []
    for key, new in p.new_texts.items():
        try:
            compile(new, str(install.path(key)), "exec")
        except SyntaxError as e:  # a bug in mmdiag's patch, never written
            raise SGLangError(f"patched {file_rel(key)} does not compile (line {e.lineno}: {e.msg})",
                              where=str(install.path(key)), fix="nothing was changed; report this") from None
        diffs.append(unified_diff(texts[key], new, file_rel(key)))
    return p, det, "".join(diffs)


def apply(install: SGLangInstall, strategy: str, *, dry_run: bool = False, confirm=None) -> ApplyResult:
    """Apply `strategy`. `confirm(diff) -> bool` is asked before writing (None: yes)."""
    det = detect(install)
    manifest = det.manifest
    stale = []
    if manifest and all(s == "before" for _, s in _current_vs_manifest(install, manifest)):
        # Every file has its original bytes again (reinstalled, checked out): the record is stale.
        _cleanup_state(install)
        stale = [f"dropped a stale record of `{'+'.join(applied(manifest))}`: the files had their original bytes"]
        det = detect(install)
        manifest = det.manifest
    if manifest:
        states = _current_vs_manifest(install, manifest)
        if any(s in ("changed", "missing") for _, s in states):
            raise _changed_error(install, manifest, states, "apply")
        names = applied(manifest)
        if strategy in names and all(s == "after" for _, s in states):
            return ApplyResult(strategy, "already-applied", manifest.get("variant"),
                               files=list(manifest["files"]), manifest=str(_manifest_path(install)),
                               undo=install.undo_command)
        if any(s == "step" for _, s in states):
            raise ChangedSinceApply(f"an apply of `{'+'.join(names)}` was interrupted midway",
                                    where=str(install.package_dir), fix=f"run `{install.undo_command}` first")
        if axis_of(strategy) in {axis_of(n) for n in names}:
            raise AlreadyPatched(f"mmdiag strategy `{'+'.join(names)}` is applied to this install",
                                 where=str(install.package_dir),
                                 fix=f"run `{install.undo_command}` first")
        # else: the other axis (a content hash on a strategy, or the reverse) stacks on it
    if det.patch_markers and not manifest:
        raise UnknownLayout("mmdiag patch markers found but no manifest", where=str(install.package_dir),
                            fix="reinstall SGLang (or git checkout the files); nothing was changed")
    p, det, diff = plan(install, strategy, det)
    p.notes[:0] = stale
    files = [file_rel(k) for k in p.new_texts]
    if p.nothing_to_do:
        return ApplyResult(strategy, "nothing-to-do", det.variant, notes=p.notes)
    if not p.new_texts:  # the release ships it: say what to set, write nothing
        return ApplyResult(strategy, "settings", det.variant, notes=p.notes, settings=p.settings)
    if dry_run:
        return ApplyResult(strategy, "dry-run", det.variant, diff, files, p.notes, settings=p.settings)
    targets = [install.path(k) for k in p.new_texts]
    check_writable(targets + [install.package_dir])
    _check_state_writable(install)
    if confirm is not None and not confirm(diff):
        return ApplyResult(strategy, "declined", det.variant, diff, files, p.notes)

    mpath = _write_patch(install, strategy, det, p, manifest)
    return ApplyResult(strategy, "applied", det.variant, diff, files, p.notes, str(mpath), p.settings,
                       undo=install.undo_command)



def _new_manifest(install: SGLangInstall, strategy: str, det: Detection, prior: dict | None,
                  originals: dict[str, bytes], news: dict[str, bytes]) -> dict:
    """The manifest after this apply. Stacked on `prior`, a file it already holds keeps its
    original bytes (sha256_before, backup) and remembers the earlier patch's bytes as a step."""
    m = json.loads(json.dumps(prior)) if prior else {
        "schema": MANIFEST_SCHEMA, "strategy": None, "patches": [], "variant": det.variant,
        "sglang_version": install.version, "layout": install.layout, "files": {}}
    m.setdefault("patches", applied(m))
    m["patches"].append(strategy)
    if axis_of(strategy) == "strategy":
        m["strategy"] = strategy
    m["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m["status"] = "applying"
    for k, new in news.items():
        f = m["files"].get(file_rel(k))
        if f is None:
            m["files"][file_rel(k)] = {"sha256_before": sha256(originals[k]), "sha256_after": sha256(new),
                                       "backup": str(Path(BACKUP_DIR) / file_rel(k))}
        else:
            f["sha256_steps"] = f.get("sha256_steps", []) + [f["sha256_after"]]
            f["sha256_after"] = sha256(new)
    return m


def _undo_state(install: SGLangInstall, prior: dict | None, prior_patched: dict[str, bytes | None],
                fresh: list[str]) -> None:
    """Put the state folder back as before this apply: none, or the prior stack's."""
    if prior is None:
        _cleanup_state(install)
        return
    for rel in fresh:  # backups of files the prior stack did not hold
        for name in (rel, rel + ".patched"):
            with contextlib.suppress(OSError):
                _backup_path(install, name).unlink()
    for rel, data in prior_patched.items():
        with contextlib.suppress(OSError):
            write_bytes_atomic(_backup_path(install, rel + ".patched"), data)
    write_bytes_atomic(_manifest_path(install), (json.dumps(prior, indent=1) + "\n").encode())


def _write_patch(install: SGLangInstall, strategy: str, det: Detection, p, prior: dict | None = None) -> Path:
    """Under the lock: backups and manifest first, then each target atomically; a failure
    midway puts back what was replaced (and the prior stack's record). Returns the manifest path."""
    with install_lock(install):
        # Re-read under the lock: another apply may have finished meanwhile.
        on_disk = read_manifest(install) if _manifest_path(install).exists() else None
        if on_disk != prior:
            raise AlreadyPatched("another mmdiag apply finished while this one waited",
                                 where=str(install.package_dir), fix="run `mmdiag doctor` to see its state")
        originals = {k: install.path(k).read_bytes() for k in p.new_texts}
        news = {k: p.new_texts[k].encode("utf-8") for k in p.new_texts}
        for k in p.new_texts:  # bytes, not text: a CRLF file is not "changed" by newline translation
            if sha256(originals[k]) != p.planned_sha256.get(k):
                raise ChangedSinceApply("file changed since the diff was planned", where=str(install.path(k)),
                                        fix="nothing was changed; rerun `mmdiag apply` to see the new diff")
        manifest = _new_manifest(install, strategy, det, prior, originals, news)
        held = prior["files"] if prior else {}
        fresh = [file_rel(k) for k in p.new_texts if file_rel(k) not in held]
        prior_patched = {}
        for rel in held:
            with contextlib.suppress(OSError):
                prior_patched[rel] = _backup_path(install, rel + ".patched").read_bytes()
        mpath = _manifest_path(install)
        try:
            for k in p.new_texts:  # backups first: the original bytes and the bytes we write
                b = _backup_path(install, file_rel(k))
                b.parent.mkdir(parents=True, exist_ok=True)
                if file_rel(k) not in held:  # a stacked file's backup keeps its original bytes
                    write_bytes_atomic(b, originals[k])
                write_bytes_atomic(b.with_name(b.name + ".patched"), news[k])
            write_bytes_atomic(mpath, (json.dumps(manifest, indent=1) + "\n").encode())
        except BaseException as e:  # Ctrl-C included: no partial backups left behind
            _undo_state(install, prior, prior_patched, fresh)
            if isinstance(e, OSError):
                raise _oserror(e, state_dir_of(install), "writing the backup") from None
            raise
        done: list[str] = []
        current = None
        try:
            for k in p.new_texts:
                current = k
                write_bytes_atomic(install.path(k), news[k])
                done.append(k)
        except BaseException as e:
            not_restored = []
            for k in done:  # put back what was already replaced
                try:
                    write_bytes_atomic(install.path(k), originals[k])
                except OSError:
                    not_restored.append(k)
            if not_restored:
                # Keep the manifest and backups: they are the way back.
                rels = ", ".join(file_rel(k) for k in not_restored)
                why = f" ({e.strerror or e})" if isinstance(e, OSError) else f" ({type(e).__name__})"
                raise SGLangError(
                    f"writing the patched {file_rel(current)} failed{why}, and restoring {rels} failed too: "
                    "the install is partly patched", where=str(install.path(not_restored[0])),
                    fix=f"the backups and manifest are kept in {state_dir_of(install)}; "
                    f"run `{install.undo_command}` to restore the original bytes") from None
            _undo_state(install, prior, prior_patched, fresh)
            if isinstance(e, OSError):
                raise _oserror(e, install.path(current), "writing the patched file") from None
            raise
        manifest["status"] = "applied"
        try:
            write_bytes_atomic(mpath, (json.dumps(manifest, indent=1) + "\n").encode())
        except OSError as e:
            raise SGLangError(f"the patch was written but its manifest could not be updated ({e.strerror or e})",
                              where=str(mpath), fix=f"`{install.undo_command}` still restores the original bytes") from None
    return mpath


def _check_state_writable(install: SGLangInstall) -> None:
    d = install.state_dir
    while not d.exists() and d.parent != d:
        d = d.parent  # the nearest existing ancestor must let us create the folder
    check_writable([d])


def _rmtree_quiet(d: Path) -> None:
    if d.exists():
        for f in sorted(d.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                f.unlink() if (f.is_file() or f.is_symlink()) else f.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()


def _cleanup_state(install: SGLangInstall) -> None:
    """Drop manifest and backups; a legacy in-package folder goes entirely (lock too)."""
    if state_dir_of(install) == install.legacy_state_dir:
        _rmtree_quiet(install.legacy_state_dir)
        return
    with contextlib.suppress(OSError):
        _manifest_path(install).unlink()
    _rmtree_quiet(install.state_dir / BACKUP_DIR)


def undo(install: SGLangInstall, *, dry_run: bool = False, confirm=None) -> ApplyResult:
    """Restore the original bytes recorded by the manifest."""
    mpath = _manifest_path(install)
    det = detect(install)
    manifest = det.manifest
    if manifest is None:
        raise NoManifest("no mmdiag patch recorded for this install", where=str(mpath),
                         fix="nothing to undo" + ("; mmdiag-patch markers are present, reinstall SGLang"
                                                   if det.patch_markers else ""))
    states = _current_vs_manifest(install, manifest)
    if any(s in ("changed", "missing") for _, s in states):
        raise _changed_error(install, manifest, states, "undo")
    diffs, restore = [], {}
    for rel, state in states:
        f = manifest["files"][rel]
        b = state_dir_of(install) / f["backup"]
        try:
            orig = b.read_bytes()
        except OSError:
            raise NoManifest("backup missing", where=str(b), fix="reinstall SGLang to restore") from None
        if sha256(orig) != f["sha256_before"]:
            raise ChangedSinceApply("backup does not match the manifest", where=str(b),
                                    fix="reinstall SGLang to restore; nothing was changed")
        if state in ("after", "step"):
            cur = (install.package_dir / rel).read_text(encoding="utf-8")
            diffs.append(unified_diff(cur, orig.decode("utf-8"), rel))
            restore[rel] = orig
    diff = "".join(diffs)
    if dry_run:
        return ApplyResult("+".join(applied(manifest)), "dry-run", manifest.get("variant"), diff, list(restore))
    check_writable([install.package_dir / r for r in restore] + [state_dir_of(install)])
    if confirm is not None and not confirm(diff):
        return ApplyResult("+".join(applied(manifest)), "declined", manifest.get("variant"), diff, list(restore))
    with install_lock(install):
        for rel, data in restore.items():
            try:
                write_bytes_atomic(install.package_dir / rel, data)
            except OSError as e:
                raise _oserror(e, install.package_dir / rel, "restoring the original") from None
        _cleanup_state(install)
    return ApplyResult("+".join(applied(manifest)), "undone", manifest.get("variant"), diff, list(restore),
                       [f"restored the original bytes of {', '.join(restore) or 'nothing'}"])
