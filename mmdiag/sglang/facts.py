"""The data table behind detection and patching (variants.toml beside this file)."""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path
from typing import Any

FACTS_PATH = Path(__file__).with_name("variants.toml")


@functools.lru_cache(maxsize=1)
def facts() -> dict[str, Any]:
    with open(FACTS_PATH, "rb") as f:
        return tomllib.load(f)


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

def since(family_key: str) -> str:
    """First release of the family variants.toml [defaults] names under `family_key`."""
    return family(facts()["defaults"][family_key])["releases"].split("..")[0].strip()


def at_least(version: str | None, first: str) -> bool:
    from packaging.version import InvalidVersion, Version
    try:
        return version is not None and Version(version) >= Version(first)
    except InvalidVersion:
        return False


def default_transport(version: str | None) -> str:
    """What a release implies; with no release known, `pickle` (every release up to 0.5.9)."""
    return "shm" if at_least(version, since("shm_family")) else "pickle"


def default_tokenizer_workers(version: str | None) -> int:
    d = facts()["defaults"]
    return d["hash_pool_workers"] if at_least(version, since("hash_pool_family")) else 1
