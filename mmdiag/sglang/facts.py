"""The data table behind detection and patching (variants.toml beside this file)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
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
    "in range"; "other family" (inside another family's range); "pre-release" (a release
    candidate, alpha or beta of a release: not in the matrix, read by its code); "newer" / "older"
    than every checked release; "unchecked" (between checked ranges); "unknown" (no usable version)."""
    inside = in_releases(version, releases)
    if inside is None:
        return "unknown"
    if inside:
        return "in range"
    if _version(version).pre is not None:
        return "pre-release"
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


def entry_rank_copies_out(version: str | None) -> bool:
    """The release writes segments but pickles the features anyway (0.5.9): its tokenizer
    writes each one, its entry rank copies it back out before the recv broadcast."""
    return at_least(version, since("shm_write_family")) and not at_least(version, since("shm_family"))


def hashes_in_place(version: str | None) -> bool:
    """Whether the release hashes a feature where it lies (no concat, no tobytes copy)."""
    return at_least(version, since("hash_in_place_family"))


def default_tokenizer_workers(version: str | None) -> int:
    d = facts()["defaults"]
    return d["hash_pool_workers"] if at_least(version, since("hash_pool_family")) else 1


# ---- how the server was launched: what turns a shared-memory release back to pickling


@dataclass(frozen=True)
class Launch:
    """The launch settings that decide a release's effective transport and who hashes
    (read from a live server's command line and environment, or given as options)."""
    dist_init_addr: str | None = None  # --dist-init-addr
    skip_tokenizer_init: bool = False  # --skip-tokenizer-init
    nnodes: int = 1                    # --nnodes
    rust_server: bool = False          # SGLANG_RUST_SERVER=1


_HOLDS = {"set": lambda v: v not in (None, ""), "on": bool, "above 1": lambda v: (v or 0) > 1}


def _in_span(version: str | None, first: str, last: str | None) -> bool:
    v = _version(version)
    return v is not None and v >= _version(first) and (last is None or v <= _version(last))


def pickle_reasons(version: str | None, launch: Launch) -> list[str]:
    """Why this release pickles the features despite its shared-memory transport: one phrase
    per rule of variants.toml [[pickle_when]] that holds (empty: it uses shared memory)."""
    return [f"{r['flag']}" + (f" {getattr(launch, r['setting'])}" if r["holds"] != "on" else "")
            + f" ({r['where']}, {r['from']}" + (f" .. {r['to']})" if r.get("to") else "+)")
            for r in facts()["pickle_when"]
            if _in_span(version, r["from"], r.get("to")) and _HOLDS[r["holds"]](getattr(launch, r["setting"]))]


def effective_transport(version: str | None, code_transport: str, launch: Launch) -> tuple[str, str]:
    """(transport, why): the code's transport (probed, or the release's default), unless the
    launch turns a shared-memory release back to pickling features."""
    if code_transport != TRANSPORT_SHM:
        return code_transport, "the release's CPU transport"
    why = pickle_reasons(version, launch)
    if why:
        return TRANSPORT_PICKLE, "shared-memory release, pickled because of " + "; ".join(why)
    return TRANSPORT_SHM, "the release's CPU transport"


def rust_hashes(version: str | None, launch: Launch) -> bool:
    """SGLANG_RUST_SERVER=1 on a release whose Rust front end takes images: items arrive hashed."""
    return launch.rust_server and at_least(version, facts()["rust_server"]["images_from"])


def shm_clones(version: str | None) -> bool:
    """Whether the release's ranks copy each feature out of its segment (materialize() clones,
    0.5.10 .. 0.5.20) instead of mapping it copy-on-write (variants.toml [shm_materialize])."""
    return not at_least(version, facts()["shm_materialize"]["cow_from"])


def first_shm_release(launch: Launch) -> str | None:
    """The first release (a family's first) that moves features by shared memory under `launch`;
    None on several nodes (shared memory is one node's)."""
    if launch.nnodes > 1:
        return None
    firsts = sorted({release_range(f["releases"])[0] for f in families()}, key=_version)
    return next((v for v in firsts if at_least(v, since("shm_family")) and not pickle_reasons(v, launch)), None)
