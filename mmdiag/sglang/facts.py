"""The data table behind detection and patching (variants.toml beside this file)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ..tables import load_table
from ..vocab import TRANSPORT_PICKLE, TRANSPORT_SHM

FACTS_PATH = Path(__file__).with_name("variants.toml")


@functools.lru_cache(maxsize=1)
def facts() -> dict[str, Any]:
    return load_table(FACTS_PATH, "SGLang facts file")


def file_rel(key: str) -> str:
    """Path of one SGLang file, relative to the `sglang` package folder."""
    return facts()["files"][key]


def variants() -> list[dict[str, Any]]:
    return facts()["variants"]


def variant(name: str) -> dict[str, Any]:
    return next(v for v in variants() if v["name"] == name)


def layouts(target: str) -> dict[str, str]:
    return facts()["layouts"].get(target, {})


def release(version: str | None) -> dict[str, Any] | None:
    return next((r for r in facts()["releases"] if r["version"] == version), None)


def releases() -> list[dict[str, Any]]:
    return facts()["releases"]


def families() -> list[dict[str, Any]]:
    return facts()["families"]


def family(name: str | None) -> dict[str, Any] | None:
    return next((f for f in families() if f["name"] == name), None)


# ---- release thresholds, by family ([defaults]): what the replay and recommend assume of a release

# Versions are compared here only (PEP 440, packaging.version): a family's `releases` is
# "A .. B" (both included) or a single release "A".

def _version(v: str | None):
    """packaging's Version of v, None when v is missing or not a PEP 440 version."""
    from packaging.version import InvalidVersion, Version
    try:
        return Version(v) if v is not None else None
    except InvalidVersion:
        return None


def release_range(releases: str) -> tuple[str, str]:
    """(first, last) of a family's `releases` ("A .. B" or "A")."""
    lo, _, hi = releases.partition("..")
    return lo.strip(), (hi.strip() or lo.strip())


def in_releases(version: str | None, releases: str) -> bool | None:
    """Whether `version` lies in the family range `releases` (ends included); None when the
    version is missing or not a version (nothing can be said)."""
    v = _version(version)
    if v is None:
        return None
    lo, hi = release_range(releases)
    return _version(lo) <= v <= _version(hi)


def checked_span() -> tuple[str, str]:
    """The oldest and newest release any family covers: what mmdiag checked."""
    ends = [e for f in families() for e in release_range(f["releases"])]
    return min(ends, key=_version), max(ends, key=_version)


def version_fit(version: str | None, releases: str) -> str:
    """Where `version` stands against a family's range and every release mmdiag checked:
    "in range"; "other family" (inside another family's range); "newer" / "older" than every
    checked release; "unchecked" (between checked ranges); "unknown" (no usable version)."""
    inside = in_releases(version, releases)
    if inside is None:
        return "unknown"
    if inside:
        return "in range"
    if any(in_releases(version, f["releases"]) for f in families()):
        return "other family"
    first, last = checked_span()
    v = _version(version)
    return "newer" if v > _version(last) else "older" if v < _version(first) else "unchecked"


def since(family_key: str) -> str:
    """First release of the family variants.toml [defaults] names under `family_key`."""
    return release_range(family(facts()["defaults"][family_key])["releases"])[0]


def at_least(version: str | None, first: str) -> bool:
    v = _version(version)
    return v is not None and v >= _version(first)


def default_transport(version: str | None) -> str:
    """What a release implies; with no release known, `pickle` (every release up to 0.5.9)."""
    return TRANSPORT_SHM if at_least(version, since("shm_family")) else TRANSPORT_PICKLE


def default_tokenizer_workers(version: str | None) -> int:
    d = facts()["defaults"]
    return d["hash_pool_workers"] if at_least(version, since("hash_pool_family")) else 1
